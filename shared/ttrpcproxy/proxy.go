// Package ttrpcproxy forwards ttrpc connections to a backend unix socket and
// survives the backend's restarts. containerd dials a task address once per
// container and never redials, so a sandboxer daemon that restarts behind a
// plain socket breaks every task connection and containerd reports all its
// containers exited. A Proxy holds the client side open instead: it redials
// the backend, sends again the requests that are safe to repeat, and answers
// the others Unavailable.
//
// Frames are forwarded unchanged; the proxy only reads the ttrpc header and,
// for requests, the service and method names.
package ttrpcproxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// ttrpc wire format, from github.com/containerd/ttrpc channel.go.
const (
	headerLength   = 10
	maxMessageSize = 4 << 20
	typeRequest    = 0x1
	typeResponse   = 0x2
)

const (
	taskService    = "containerd.task.v3.Task"
	defaultPending = 30 * time.Second
	minBackoff     = 20 * time.Millisecond
	maxBackoff     = 500 * time.Millisecond
	// dialTimeout bounds a connect to a daemon that listens but does not
	// accept, so that pending requests still time out meanwhile.
	dialTimeout = time.Second
)

// Config configures a Proxy.
type Config struct {
	// Backend is the unix socket path of the real ttrpc server.
	Backend string
	// Replayable reports whether a request already sent to a backend that
	// went away may be sent again to the next one. nil: DefaultReplayable.
	Replayable func(service, method string) bool
	// Patient reports whether a request may wait for a backend without limit
	// (containerd keeps Wait open for a task's life). nil: DefaultPatient.
	Patient func(service, method string) bool
	// PendingTimeout bounds how long any other request waits for a backend
	// before it is answered Unavailable. 0: 30s.
	PendingTimeout time.Duration
	// Log receives reconnects (Debug) and synthesized errors (Warn).
	// nil: zap.NewNop().
	Log *zap.Logger
}

// DefaultReplayable allows the task API's read-only calls to be repeated:
// Wait, State, Stats, Pids and Connect of containerd.task.v3.Task.
func DefaultReplayable(service, method string) bool {
	if service != taskService {
		return false
	}
	switch method {
	case "Wait", "State", "Stats", "Pids", "Connect":
		return true
	}
	return false
}

// DefaultPatient lets containerd.task.v3.Task/Wait wait for a backend
// without limit: containerd holds it open for the task's whole life.
func DefaultPatient(service, method string) bool {
	return service == taskService && method == "Wait"
}

// Proxy accepts ttrpc client connections and forwards each one to its own
// connection to Config.Backend.
type Proxy struct {
	cfg Config
	log *zap.Logger

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	wg        sync.WaitGroup
}

// New returns a Proxy for cfg; Serve starts it.
func New(cfg Config) *Proxy {
	if cfg.Replayable == nil {
		cfg.Replayable = DefaultReplayable
	}
	if cfg.Patient == nil {
		cfg.Patient = DefaultPatient
	}
	if cfg.PendingTimeout <= 0 {
		cfg.PendingTimeout = defaultPending
	}
	log := cfg.Log
	if log == nil {
		log = zap.NewNop()
	}
	return &Proxy{
		cfg:       cfg,
		log:       log.With(zap.String("backend", cfg.Backend)),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}
}

// Serve accepts client connections on l until Close, which also closes l.
// It returns nil after Close.
func (p *Proxy) Serve(l net.Listener) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		l.Close()
		return nil
	}
	p.listeners[l] = struct{}{}
	p.mu.Unlock()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			p.mu.Lock()
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				p.mu.Lock()
				delete(p.listeners, l)
				p.mu.Unlock()
				return fmt.Errorf("accept: %w", err)
			}
			// Out of descriptors and the like: the keeper must outlive
			// them, as ttrpc's own server does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			p.log.Warn("accept failed, retrying", zap.Error(err), zap.Duration("backoff", backoff))
			time.Sleep(backoff)
			continue
		}
		backoff = 0

		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			nc.Close()
			return nil
		}
		c := newConn(p, nc)
		p.conns[c] = struct{}{}
		// Added under p.mu so that Close's Wait cannot miss it.
		p.wg.Add(1)
		p.mu.Unlock()

		go func() {
			defer p.wg.Done()
			c.run()
			p.mu.Lock()
			delete(p.conns, c)
			p.mu.Unlock()
		}()
	}
}

// Close stops accepting, closes every client and backend connection and
// waits for their goroutines. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.wg.Wait()
		return nil
	}
	p.closed = true
	var errs []error
	for l := range p.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for c := range p.conns {
		// Closing the client ends its reader, which tears down the rest.
		c.client.Close()
	}
	p.mu.Unlock()

	p.wg.Wait()
	return errors.Join(errs...)
}

// entry is a request the client sent that has no response yet.
type entry struct {
	frame   []byte // header and payload, as received
	service string
	method  string
	sent    bool      // written to the current backend connection
	queued  time.Time // since when it waits for a backend, if !sent
}

// conn is one client connection and its backend connection.
type conn struct {
	p      *Proxy
	log    *zap.Logger
	client net.Conn
	ctx    context.Context
	cancel context.CancelFunc

	// wmu keeps frames written to the client whole: the backend reader,
	// the redial loop and the timeouts all answer it.
	wmu sync.Mutex

	// mu guards the fields below. bwmu serializes writes to the backend; it
	// is taken while holding mu and mu is then released, so requests reach
	// the backend in the order they were recorded (ttrpc servers demand
	// increasing stream IDs) without holding mu during a blocking write.
	mu      sync.Mutex
	bwmu    sync.Mutex
	closed  bool
	backend net.Conn
	entries map[uint32]*entry
}

func newConn(p *Proxy, client net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{
		p:       p,
		log:     p.log,
		client:  client,
		ctx:     ctx,
		cancel:  cancel,
		entries: make(map[uint32]*entry),
	}
}

// run serves the connection until the client goes away or the proxy closes.
func (c *conn) run() {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.backendLoop()
	}()

	if err := c.readClient(); err != nil && !isClosed(err) {
		c.log.Debug("client connection ended", zap.Error(err))
	}

	c.cancel()
	c.mu.Lock()
	c.closed = true
	if c.backend != nil {
		c.backend.Close()
	}
	c.mu.Unlock()
	c.client.Close()
	<-done
}

// readClient forwards the client's frames, recording requests so that they
// can be sent again or answered should the backend go away.
func (c *conn) readClient() error {
	br := bufio.NewReader(c.client)
	for {
		frame, err := readFrame(br)
		if err != nil {
			return err
		}
		id, typ := streamID(frame), frame[8]

		c.mu.Lock()
		if typ == typeRequest {
			e := &entry{frame: frame, queued: time.Now()}
			var req ttrpc.Request
			// An unreadable request is still forwarded: the backend answers
			// it. With no name it is neither replayable nor patient.
			if proto.Unmarshal(frame[headerLength:], &req) == nil {
				e.service, e.method = req.Service, req.Method
			}
			c.entries[id] = e
			e.sent = c.backend != nil
		}
		// Other frames (stream data) are not replayed: they are lost while
		// no backend is connected.
		b := c.backend
		if b == nil {
			c.mu.Unlock()
			continue
		}
		c.bwmu.Lock()
		c.mu.Unlock()
		_, err = b.Write(frame)
		c.bwmu.Unlock()
		if err != nil {
			// The backend reader sees the failure too and handles it.
			b.Close()
		}
	}
}

// backendLoop keeps a backend connection while the client is connected.
func (c *conn) backendLoop() {
	backoff := minBackoff
	failing := false
	for {
		d := net.Dialer{Timeout: dialTimeout}
		b, err := d.DialContext(c.ctx, "unix", c.p.cfg.Backend)
		if err == nil {
			if !c.attach(b) {
				return
			}
			failing = false
			backoff = minBackoff

			err = c.readBackend(b)
			if c.ctx.Err() != nil {
				b.Close()
				return
			}
			c.log.Debug("backend connection lost", zap.Error(err))
			c.detach()
			b.Close()
			continue
		}
		if c.ctx.Err() != nil {
			return
		}
		if !failing {
			c.log.Debug("backend unreachable, redialing", zap.Error(err))
			failing = true
		}

		// Sleep no longer than the next pending deadline, nor than the
		// timeout itself: a request arriving meanwhile cannot expire sooner.
		wait := min(backoff, c.p.cfg.PendingTimeout)
		if next, ok := c.expire(time.Now()); ok {
			wait = min(wait, time.Until(next))
		}
		backoff = min(2*backoff, maxBackoff)

		t := time.NewTimer(max(wait, time.Millisecond))
		select {
		case <-c.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		c.expire(time.Now())
	}
}

// attach makes b the backend and sends it every pending request, in
// stream-ID order. It reports false, having closed b, if the client is gone.
func (c *conn) attach(b net.Conn) bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		b.Close()
		return false
	}
	c.backend = b
	var ids []uint32
	for id, e := range c.entries {
		if !e.sent {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	var buf []byte
	for _, id := range ids {
		e := c.entries[id]
		e.sent = true
		buf = append(buf, e.frame...)
	}
	c.bwmu.Lock()
	c.mu.Unlock()
	defer c.bwmu.Unlock()

	c.log.Debug("backend connected", zap.Int("pending", len(ids)))
	if len(ids) > 0 {
		if _, err := b.Write(buf); err != nil {
			// readBackend fails on the closed connection; detach handles it.
			b.Close()
		}
	}
	return true
}

// detach forgets the broken backend: requests it had that are replayable
// wait for the next one, the others are answered Unavailable.
func (c *conn) detach() {
	now := time.Now()
	var failed []uint32
	c.mu.Lock()
	c.backend = nil
	for id, e := range c.entries {
		if !e.sent {
			continue
		}
		if c.p.cfg.Replayable(e.service, e.method) {
			e.sent = false
			e.queued = now
			continue
		}
		delete(c.entries, id)
		failed = append(failed, id)
		c.log.Warn("answering Unavailable: sandboxer went away with request in flight",
			zap.String("method", e.service+"/"+e.method), zap.Uint32("stream", id))
	}
	c.mu.Unlock()

	for _, id := range failed {
		c.answer(id, "sandboxer went away while the request was in flight")
	}
}

// expire answers Unavailable the pending requests that waited longer than
// PendingTimeout and are not patient. It returns the earliest deadline left.
func (c *conn) expire(now time.Time) (next time.Time, ok bool) {
	timeout := c.p.cfg.PendingTimeout
	var failed []uint32
	c.mu.Lock()
	for id, e := range c.entries {
		if e.sent || c.p.cfg.Patient(e.service, e.method) {
			continue
		}
		deadline := e.queued.Add(timeout)
		if !now.Before(deadline) {
			delete(c.entries, id)
			failed = append(failed, id)
			c.log.Warn("answering Unavailable: no sandboxer to serve request",
				zap.String("method", e.service+"/"+e.method), zap.Uint32("stream", id),
				zap.Duration("timeout", timeout))
			continue
		}
		if !ok || deadline.Before(next) {
			next, ok = deadline, true
		}
	}
	c.mu.Unlock()

	for _, id := range failed {
		c.answer(id, fmt.Sprintf("no sandboxer to serve the request within %s", timeout))
	}
	return next, ok
}

// readBackend forwards the backend's frames to the client until either
// fails. A response ends its stream; frames of unknown streams, such as a
// second answer to a replayed request, are dropped.
func (c *conn) readBackend(b net.Conn) error {
	br := bufio.NewReader(b)
	for {
		frame, err := readFrame(br)
		if err != nil {
			return err
		}
		id := streamID(frame)
		c.mu.Lock()
		_, known := c.entries[id]
		if known && frame[8] == typeResponse {
			delete(c.entries, id)
		}
		c.mu.Unlock()
		if !known {
			continue
		}
		c.writeClient(frame)
	}
}

// answer sends the client an Unavailable response for stream id.
func (c *conn) answer(id uint32, msg string) {
	payload, err := proto.Marshal(&ttrpc.Response{Status: status.New(codes.Unavailable, msg).Proto()})
	if err != nil {
		// Cannot happen for this message; leave the client to its timeout.
		c.log.Error("marshal response", zap.Error(err))
		return
	}
	frame := make([]byte, headerLength, headerLength+len(payload))
	binary.BigEndian.PutUint32(frame[0:4], uint32(len(payload)))
	binary.BigEndian.PutUint32(frame[4:8], id)
	frame[8] = typeResponse
	c.writeClient(append(frame, payload...))
}

// writeClient writes one whole frame to the client. A client that cannot
// take it is closed, which ends the connection.
func (c *conn) writeClient(frame []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.client.Write(frame); err != nil {
		c.client.Close()
	}
}

// readFrame reads one ttrpc frame, header included.
func readFrame(r io.Reader) ([]byte, error) {
	var h [headerLength]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(h[:4])
	if n > maxMessageSize {
		return nil, fmt.Errorf("frame of %d bytes exceeds the maximum of %d", n, maxMessageSize)
	}
	frame := make([]byte, headerLength+int(n))
	copy(frame, h[:])
	if _, err := io.ReadFull(r, frame[headerLength:]); err != nil {
		return nil, fmt.Errorf("read frame payload: %w", err)
	}
	return frame, nil
}

func streamID(frame []byte) uint32 {
	return binary.BigEndian.Uint32(frame[4:8])
}

func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)
}
