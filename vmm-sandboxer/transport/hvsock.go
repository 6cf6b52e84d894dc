package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// HybridVsockDialer reaches guest vsock ports through the unix socket a VMM
// (Cloud Hypervisor, Firecracker) proxies them on: the host connects, writes
// "CONNECT <port>\n" and the VMM answers "OK <host port>\n" once the guest
// has accepted; from then on the connection is the stream.
type HybridVsockDialer struct {
	SocketPath string
}

// ErrHybridVsockProtocol is returned when the VMM answers the handshake with
// something other than "OK <port>"; retrying would not help.
var ErrHybridVsockProtocol = errors.New("transport: hybrid vsock: unexpected handshake answer")

// maxHandshakeLine bounds the answer line: "OK " and a 32-bit port.
const maxHandshakeLine = 32

// Dial retries while the socket is not there yet or the VMM closes the
// connection without answering (how it says that nothing listens on the
// port in the guest yet), until ctx ends.
func (d *HybridVsockDialer) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	var last error
	for {
		c, err := d.dialOnce(ctx, port)
		if err == nil || errors.Is(err, ErrHybridVsockProtocol) {
			return c, err
		}
		// A try that ctx cut short (its deadline reads as a timeout, which
		// can come just before ctx.Err says so) tells less than the one
		// before.
		if ne := net.Error(nil); last == nil || ctx.Err() == nil && !(errors.As(err, &ne) && ne.Timeout()) {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("transport: hybrid vsock %s port %d: %w (last error: %v)", d.SocketPath, port, ctx.Err(), last)
		case <-time.After(retryDelay):
		}
	}
}

func (d *HybridVsockDialer) dialOnce(ctx context.Context, port uint32) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "unix", d.SocketPath)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	// A ctx without a deadline can still be cancelled mid-handshake.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	err = handshake(c, port)
	if !stop() {
		err = errors.Join(err, ctx.Err())
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}

func handshake(c net.Conn, port uint32) error {
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		return fmt.Errorf("send CONNECT: %w", err)
	}
	// Byte by byte: what follows the line is the guest's, not ours to buffer.
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := c.Read(b); err != nil {
			return fmt.Errorf("read answer to CONNECT %d (got %q): %w", port, line, err)
		}
		if b[0] == '\n' {
			break
		}
		line = append(line, b[0])
		if len(line) > maxHandshakeLine {
			return fmt.Errorf("%w: %q... is too long", ErrHybridVsockProtocol, line)
		}
	}
	rest, ok := strings.CutPrefix(string(line), "OK ")
	if _, err := strconv.ParseUint(rest, 10, 32); !ok || err != nil {
		return fmt.Errorf("%w: %q to CONNECT %d", ErrHybridVsockProtocol, line, port)
	}
	return nil
}

func (d *HybridVsockDialer) Close() error { return nil }
