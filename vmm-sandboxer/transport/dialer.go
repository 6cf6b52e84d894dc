package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/mdlayher/vsock"
)

// Dialer connects the host to ports in one guest.
type Dialer interface {
	// Dial connects to port in the guest, waiting (until ctx ends) for the
	// guest to come up and listen.
	Dial(ctx context.Context, port uint32) (net.Conn, error)
	Close() error
}

// HostHasVsock tells whether the host can give guests vsock devices.
func HostHasVsock() bool {
	_, err := os.Stat("/dev/vhost-vsock")
	return err == nil
}

// retryDelay is how long a dialer waits between tries while the guest is
// not there yet.
const retryDelay = 20 * time.Millisecond

// freshSessionWait bounds the wait for the guest's first answer on a new
// serial session before the session is replaced.
const freshSessionWait = 5 * time.Second

// ErrDialerClosed is returned by Dial after Close.
var ErrDialerClosed = errors.New("transport: dialer closed")

// VsockDialer dials AF_VSOCK ports of the guest with a context ID.
type VsockDialer struct {
	CID uint32
}

// Dial retries while the guest has not come up (reset or refused
// connections) until ctx ends.
func (d *VsockDialer) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	for {
		c, err := vsock.Dial(d.CID, port, nil)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("transport: vsock %d:%d: %w (last error: %v)", d.CID, port, ctx.Err(), err)
		case <-time.After(retryDelay):
		}
	}
}

func (d *VsockDialer) Close() error { return nil }

// SerialDialer reaches the guest through the unix socket QEMU listens on for
// a virtio-serial port, one multiplexer session at a time: a session that
// breaks (the socket closed, the guest restarted its end) is replaced on
// the next Dial, unless the guest misbehaved on it after answering on it
// (see Err). Before its first answer, what arrives on a session may be the
// rest of the guest's previous one: QEMU drops what the guest writes while
// no host is connected, which can cut a frame and leave its tail to the
// next host; such a session is only replaced.
type SerialDialer struct {
	SocketPath string

	mu     sync.Mutex
	mux    *MuxClient
	err    error // why the dialer gave up on the guest
	closed bool
}

// NewSerialDialer returns a dialer over the port's host socket.
func NewSerialDialer(socketPath string) *SerialDialer {
	return &SerialDialer{SocketPath: socketPath}
}

func (d *SerialDialer) session(ctx context.Context) (*MuxClient, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, ErrDialerClosed
	}
	if err := d.errLocked(); err != nil {
		return nil, err
	}
	if d.mux != nil {
		select {
		case <-d.mux.Done():
			d.mux = nil
		default:
			return d.mux, nil
		}
	}
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "unix", d.SocketPath)
	if err != nil {
		return nil, fmt.Errorf("transport: virtio-serial socket: %w", err)
	}
	m, err := NewMuxClient(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	d.mux = m
	return m, nil
}

// Dial opens a stream to port. While the guest is booting the stream's
// opening waits in the VMM's buffers, so this returns once the guest's
// agent listens; a refused port or a broken session is retried until ctx
// ends, a guest that misbehaved is not.
func (d *SerialDialer) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	for {
		m, err := d.session(ctx)
		if errors.Is(err, ErrDialerClosed) || errors.Is(err, ErrMisbehaved) {
			return nil, err
		}
		if err == nil {
			// On a session the guest has never answered on, the guest's
			// end may still be in the previous host's session (a daemon
			// restart): wait a while for it, then start afresh. What
			// this host wrote on a session it gives up is dropped with
			// the connection, before the guest reads it.
			tryCtx, cancel := ctx, context.CancelFunc(func() {})
			if !m.answered.Load() {
				tryCtx, cancel = context.WithTimeout(ctx, freshSessionWait)
			}
			var c net.Conn
			c, err = m.Dial(tryCtx, port)
			cancel()
			if err == nil {
				return c, nil
			}
			if !errors.Is(err, ErrNoListener) {
				// The session is suspect: start a fresh one next time,
				// unless the guest misbehaved for good on it.
				d.mu.Lock()
				if d.mux == m {
					_ = d.errLocked()
					d.mux = nil
				}
				gaveUp := d.err
				d.mu.Unlock()
				m.Close()
				if gaveUp != nil {
					return nil, gaveUp
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("transport: serial %s port %d: %w (last error: %v)", d.SocketPath, port, ctx.Err(), err)
		case <-time.After(retryDelay):
		}
	}
}

// Err is why the dialer gave up on the guest for good: it wraps
// ErrMisbehaved. Streams dialed before then are closed; Dial fails at once.
func (d *SerialDialer) Err() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.errLocked()
}

func (d *SerialDialer) errLocked() error {
	if d.err == nil && d.mux != nil && d.mux.answered.Load() {
		d.err = d.mux.Err()
	}
	return d.err
}

// Close ends the session and every stream on it.
func (d *SerialDialer) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	if d.mux != nil {
		err := d.mux.Close()
		d.mux = nil
		return err
	}
	return nil
}
