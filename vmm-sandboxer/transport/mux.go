// Package transport carries host<->guest connections for vmm pods. Both
// ends speak in ports, as vsock does: the guest listens on a port, the host
// dials one. Where the host has vhost-vsock, ports are vsock ports; where it
// has not, every connection is a stream of a multiplexer (yamux) over one
// virtio-serial port, opened with a small port header. The host's Dialer
// and the guest's Listen hide which.
package transport

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
)

// Ports of the guest agent.
const (
	// AgentPort serves the agent's ttrpc API.
	AgentPort uint32 = 1024
	// IOPort takes containers' IO streams (see vmmtask.IOStreamHeader).
	IOPort uint32 = 1025
)

// Port-header answers: the guest's first byte on a new stream.
const (
	portOK     byte = 0
	portClosed byte = 1
)

// ErrNoListener means the guest has nothing listening on the port.
var ErrNoListener = errors.New("transport: no listener on that port in the guest")

// muxConfig tunes yamux for a slow, reliable, in-order byte pipe: no
// keepalives (a guest under emulation can be slow to answer and the agent
// has its own ping), generous timeouts, no log noise.
func muxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.ConnectionWriteTimeout = StallTimeout
	c.StreamOpenTimeout = 0 // the guest may not be up yet: the caller's context decides
	c.StreamCloseTimeout = 30 * time.Second
	c.AcceptBacklog = 512
	c.LogOutput = io.Discard
	return c
}

// MuxClient is the host's end of a multiplexed link. It holds the guest to
// the protocol (see hostLink): a guest that breaks it loses the link, and
// Err says why.
type MuxClient struct {
	s    *yamux.Session
	link *hostLink
	// answered is set once the guest has answered a stream's port header
	// on this session.
	answered atomic.Bool
}

// NewMuxClient starts a multiplexer session over conn (which it owns).
func NewMuxClient(conn net.Conn) (*MuxClient, error) {
	return newMuxClient(conn, StallTimeout)
}

func newMuxClient(conn net.Conn, stall time.Duration) (*MuxClient, error) {
	link := newHostLink(conn, stall)
	s, err := yamux.Client(link, muxConfig())
	if err != nil {
		return nil, fmt.Errorf("transport: mux session: %w", err)
	}
	return &MuxClient{s: s, link: link}, nil
}

// Dial opens a stream to port in the guest and waits for the guest to
// accept it (or refuse: ErrNoListener), until ctx ends.
func (m *MuxClient) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	st, err := m.s.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("transport: open stream to port %d: %w", port, m.cause(err))
	}
	stop := context.AfterFunc(ctx, func() { _ = st.SetDeadline(time.Now()) })
	defer stop()
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], port)
	var ans [1]byte
	if _, err = st.Write(hdr[:]); err == nil {
		_, err = io.ReadFull(st, ans[:])
	}
	if !stop() {
		st.Close()
		return nil, fmt.Errorf("transport: dial port %d: %w", port, ctx.Err())
	}
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("transport: dial port %d: %w", port, m.cause(err))
	}
	_ = st.SetDeadline(time.Time{})
	switch ans[0] {
	case portOK:
		m.answered.Store(true)
		return st, nil
	case portClosed:
		m.answered.Store(true)
		st.Close()
		return nil, fmt.Errorf("port %d: %w", port, ErrNoListener)
	default:
		err := m.link.fail(fmt.Errorf("%w: it answered %#x to a stream to port %d", ErrMisbehaved, ans[0], port))
		m.s.Close()
		return nil, err
	}
}

// cause is err, or why the host gave up on the guest when it did.
func (m *MuxClient) cause(err error) error {
	if lerr := m.link.Err(); lerr != nil {
		return lerr
	}
	return err
}

// Done is closed when the session ends (the link broke or Close).
func (m *MuxClient) Done() <-chan struct{} { return m.s.CloseChan() }

// Err is why the host gave up on the guest (it wraps ErrMisbehaved), nil
// while it has not.
func (m *MuxClient) Err() error { return m.link.Err() }

// Close ends the session and its streams.
func (m *MuxClient) Close() error { return m.s.Close() }

// MuxServer is the guest's end: listeners by port that survive the link's
// sessions (the host may reconnect, e.g. after a daemon restart).
type MuxServer struct {
	mu        sync.Mutex
	listeners map[uint32]*portListener
	closed    bool
	// HeaderTimeout bounds how long a new stream may take to name its port.
	HeaderTimeout time.Duration
}

// NewMuxServer returns a server with no listeners.
func NewMuxServer() *MuxServer {
	return &MuxServer{listeners: map[uint32]*portListener{}, HeaderTimeout: 30 * time.Second}
}

// Listen returns a listener for streams the host opens to port.
func (m *MuxServer) Listen(port uint32) (net.Listener, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errors.New("transport: mux server closed")
	}
	if _, ok := m.listeners[port]; ok {
		return nil, fmt.Errorf("transport: port %d: already listening", port)
	}
	l := &portListener{m: m, port: port, ch: make(chan net.Conn, 64), done: make(chan struct{})}
	m.listeners[port] = l
	return l, nil
}

// ServeConn runs one multiplexer session over conn until the link ends;
// streams go to the listeners of the ports they name.
func (m *MuxServer) ServeConn(conn io.ReadWriteCloser) error {
	s, err := yamux.Server(conn, muxConfig())
	if err != nil {
		return fmt.Errorf("transport: mux session: %w", err)
	}
	defer s.Close()
	for {
		st, err := s.AcceptStream()
		if err != nil {
			if hostLeft(err) {
				return nil
			}
			return fmt.Errorf("transport: accept: %w", err)
		}
		go m.route(st)
	}
}

// hostLeft tells the host closing its end of the link (which reads as EOF,
// or as a reset when data was still in flight) from real failures.
func hostLeft(err error) bool {
	return errors.Is(err, yamux.ErrSessionShutdown) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, net.ErrClosed)
}

func (m *MuxServer) route(st *yamux.Stream) {
	_ = st.SetReadDeadline(time.Now().Add(m.HeaderTimeout))
	var hdr [4]byte
	if _, err := io.ReadFull(st, hdr[:]); err != nil {
		st.Close()
		return
	}
	_ = st.SetReadDeadline(time.Time{})
	port := binary.BigEndian.Uint32(hdr[:])
	m.mu.Lock()
	l := m.listeners[port]
	m.mu.Unlock()
	if l == nil {
		_, _ = st.Write([]byte{portClosed})
		st.Close()
		return
	}
	if _, err := st.Write([]byte{portOK}); err != nil {
		st.Close()
		return
	}
	select {
	case l.ch <- st:
	case <-l.done:
		st.Close()
	}
}

// Close closes every listener.
func (m *MuxServer) Close() error {
	m.mu.Lock()
	m.closed = true
	ls := m.listeners
	m.listeners = map[uint32]*portListener{}
	m.mu.Unlock()
	for _, l := range ls {
		l.shut()
	}
	return nil
}

type portListener struct {
	m    *MuxServer
	port uint32
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func (l *portListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *portListener) shut() { l.once.Do(func() { close(l.done) }) }

func (l *portListener) Close() error {
	l.m.mu.Lock()
	if l.m.listeners[l.port] == l {
		delete(l.m.listeners, l.port)
	}
	l.m.mu.Unlock()
	l.shut()
	return nil
}

func (l *portListener) Addr() net.Addr { return PortAddr(l.port) }

// PortAddr is a multiplexed port as a net.Addr.
type PortAddr uint32

func (PortAddr) Network() string  { return "mux" }
func (p PortAddr) String() string { return fmt.Sprintf("mux:%d", uint32(p)) }
