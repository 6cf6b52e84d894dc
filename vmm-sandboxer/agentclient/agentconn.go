package agentclient

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport/frames"
)

// ttrpc's frame header (github.com/containerd/ttrpc, channel.go): payload
// length, stream ID, type, flags.
const (
	ttrpcHeaderSize = 10
	ttrpcMaxMessage = 4 << 20

	ttrpcRequest  = 1
	ttrpcResponse = 2
	ttrpcData     = 3

	ttrpcRemoteClosed = 1
)

// agentConn is the agent connection as the ttrpc client sees it. ttrpc
// logs a line for every frame on a stream it is not waiting on, and its
// writes wait as long as the peer makes them, holding up every other call.
// So agentConn holds the guest to what a ttrpc server sends: one response
// per request of the host's, data only on the host's streaming requests
// until they end, no message larger than ttrpc's 4 MiB; and gives every
// write stall to complete. Anything else closes the connection, which ends
// the client.
type agentConn struct {
	net.Conn
	stall time.Duration
	in    *frames.Scanner // read by ttrpc's receive loop only
	out   *frames.Scanner // written under ttrpc's send lock only

	mu   sync.Mutex
	open map[uint32]bool // the host's streams the guest has not ended; true: streaming
	err  error           // why the host gave up on the guest
}

func newAgentConn(conn net.Conn, stall time.Duration) *agentConn {
	c := &agentConn{Conn: conn, stall: stall, open: map[uint32]bool{}}
	c.in = frames.NewScanner(ttrpcHeaderSize, c.guestFrame)
	c.out = frames.NewScanner(ttrpcHeaderSize, c.hostFrame)
	return c
}

func (c *agentConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if serr := c.in.Scan(p[:n]); serr != nil {
		return 0, c.fail(serr)
	}
	return n, err
}

func (c *agentConn) Write(p []byte) (int, error) {
	// Before the bytes go: the guest may answer as soon as they do.
	_ = c.out.Scan(p)
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.stall))
	n, err := c.Conn.Write(p)
	if err != nil {
		// Part of a frame may have gone: the connection is done for.
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			return n, c.fail(fmt.Errorf("%w: the agent left a request waiting for %s", transport.ErrMisbehaved, c.stall))
		}
		c.Conn.Close()
	}
	return n, err
}

// fail records the first reason to give up on the guest, closes the
// connection and returns the reason.
func (c *agentConn) fail(err error) error {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	c.mu.Unlock()
	c.Conn.Close()
	return err
}

// Err is why the host gave up on the guest, nil while it has not.
func (c *agentConn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// hostFrame notes the streams the host's requests open.
func (c *agentConn) hostFrame(h []byte) (uint32, error) {
	if h[8] == ttrpcRequest {
		c.mu.Lock()
		// ttrpc sends unary requests without flags.
		c.open[binary.BigEndian.Uint32(h[4:8])] = h[9] != 0
		c.mu.Unlock()
	}
	return binary.BigEndian.Uint32(h[:4]), nil
}

// guestFrame accepts the header of a frame the guest may send now and
// returns the length of its payload.
func (c *agentConn) guestFrame(h []byte) (uint32, error) {
	length, id, typ := binary.BigEndian.Uint32(h[:4]), binary.BigEndian.Uint32(h[4:8]), h[8]
	if length > ttrpcMaxMessage {
		return 0, fmt.Errorf("%w: a message of %d bytes from the agent, more than ttrpc's %d", transport.ErrMisbehaved, length, ttrpcMaxMessage)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	streaming, open := c.open[id]
	switch {
	case open && typ == ttrpcResponse:
		delete(c.open, id)
	case open && typ == ttrpcData && streaming:
		if h[9]&ttrpcRemoteClosed != 0 {
			delete(c.open, id)
		}
	default:
		return 0, fmt.Errorf("%w: the agent sent a message of type %d on stream %d, which has no request of the host's waiting for one", transport.ErrMisbehaved, typ, id)
	}
	return length, nil
}
