package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport/frames"
)

// ErrMisbehaved means the guest sent the host what a well-behaved guest
// never sends, or stopped taking what the host sends: the host closed that
// link, and the pod should end.
var ErrMisbehaved = fmt.Errorf("transport: the guest misbehaved on its link (%w)", errdefs.ErrUnavailable)

// StallTimeout bounds how long the host waits for a guest to take bytes it
// writes. A guest's multiplexer and agent read all the time, so one that
// takes nothing for this long is hung or hostile.
const StallTimeout = 30 * time.Second

// yamux's frame header (github.com/hashicorp/yamux, spec.md): version,
// type, flags, stream ID, length.
const (
	yamuxHeaderSize = 12

	yamuxData         = 0
	yamuxWindowUpdate = 1
	yamuxPing         = 2
	yamuxGoAway       = 3

	yamuxSYN = 1
	yamuxACK = 2
	yamuxFIN = 4
	yamuxRST = 8

	// yamuxWindow is a stream's receive window, which no data frame nor
	// window update of a well-behaved peer exceeds (muxConfig keeps
	// yamux's default MaxStreamWindowSize).
	yamuxWindow = 256 << 10
)

// hostLink is the host's end of the serial link as its yamux session sees
// it. yamux trusts its peer: it answers every ping in a new goroutine that
// waits up to its write timeout, keeps the streams the peer opens (each
// with a 256 KiB receive window) until they are accepted, which the host
// never does, and its writes wait as long as the peer makes them. So
// hostLink lets through only what a guest running MuxServer sends: data
// and window updates, within the window, on streams the host opened (odd
// IDs), and GoAway; the first other frame ends the session. And it gives
// every write stall to complete.
type hostLink struct {
	conn  net.Conn
	stall time.Duration
	in    *frames.Scanner // read by yamux's receive loop only

	mu  sync.Mutex
	err error // why the host gave up on the guest
}

func newHostLink(conn net.Conn, stall time.Duration) *hostLink {
	return &hostLink{conn: conn, stall: stall, in: frames.NewScanner(yamuxHeaderSize, checkGuestFrame)}
}

// Read passes on what the guest sent, or nothing of a read that holds a
// frame the host does not take: the session ends there.
func (l *hostLink) Read(p []byte) (int, error) {
	n, err := l.conn.Read(p)
	if serr := l.in.Scan(p[:n]); serr != nil {
		return 0, l.fail(serr)
	}
	return n, err
}

func (l *hostLink) Write(p []byte) (int, error) {
	_ = l.conn.SetWriteDeadline(time.Now().Add(l.stall))
	n, err := l.conn.Write(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = l.fail(fmt.Errorf("%w: it left a write of the host's waiting for %s", ErrMisbehaved, l.stall))
	}
	return n, err
}

func (l *hostLink) Close() error { return l.conn.Close() }

// fail records the first reason to give up on the guest and returns it.
func (l *hostLink) fail(err error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err == nil {
		l.err = err
	}
	return l.err
}

// Err is why the host gave up on the guest, nil while it has not.
func (l *hostLink) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// checkGuestFrame accepts the header of a frame a well-behaved guest may
// send and returns the length of the payload that follows.
func checkGuestFrame(h []byte) (uint32, error) {
	typ, flags := h[1], binary.BigEndian.Uint16(h[2:4])
	id, length := binary.BigEndian.Uint32(h[4:8]), binary.BigEndian.Uint32(h[8:12])
	var why string
	switch {
	case h[0] != 0:
		why = fmt.Sprintf("protocol version %d", h[0])
	case typ == yamuxPing:
		// Neither end keeps alive (muxConfig) nor pings.
		why = "it pinged"
	case flags&yamuxSYN != 0:
		// Nothing in the host accepts streams.
		why = "it opened a stream"
	case flags&^(yamuxACK|yamuxFIN|yamuxRST) != 0:
		why = fmt.Sprintf("unknown flags %#x", flags)
	case typ == yamuxGoAway:
		return 0, nil
	case typ != yamuxData && typ != yamuxWindowUpdate:
		why = fmt.Sprintf("frame type %d", typ)
	case id%2 == 0:
		why = fmt.Sprintf("a frame for stream %d, which the host did not open", id)
	case length > yamuxWindow:
		why = fmt.Sprintf("%d bytes of data or window for stream %d, more than the %d of its window", length, id, yamuxWindow)
	case typ == yamuxData:
		return length, nil
	default:
		return 0, nil
	}
	return 0, fmt.Errorf("%w: %s", ErrMisbehaved, why)
}
