package transport

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/hashicorp/yamux"
)

// yamuxFrame is a frame header as a guest's yamux would write it.
func yamuxFrame(typ uint8, flags uint16, id, length uint32) []byte {
	h := make([]byte, yamuxHeaderSize)
	h[1] = typ
	binary.BigEndian.PutUint16(h[2:4], flags)
	binary.BigEndian.PutUint32(h[4:8], id)
	binary.BigEndian.PutUint32(h[8:12], length)
	return h
}

// hostOver starts the host's end of a link over a pipe and returns the
// guest's end, raw.
func hostOver(t *testing.T, stall time.Duration) (*MuxClient, net.Conn) {
	t.Helper()
	host, guest := net.Pipe()
	cli, err := newMuxClient(host, stall)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close(); guest.Close() })
	return cli, guest
}

// wantMisbehaved waits for the host to give up on the guest, with why.
func wantMisbehaved(t *testing.T, cli *MuxClient, why string) {
	t.Helper()
	select {
	case <-cli.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the host kept the link")
	}
	if err := cli.Err(); !errors.Is(err, ErrMisbehaved) || !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), why) {
		t.Fatalf("the host closed the link with %v, want ErrMisbehaved (unavailable) saying %q", err, why)
	}
}

// Every ping is answered in a goroutine of its own that waits for the link
// while the guest does not read; a flood of them must not pile up.
func TestMuxGuestPingFlood(t *testing.T) {
	base := runtime.NumGoroutine()
	cli, guest := hostOver(t, StallTimeout)
	const pings = 5000
	// The guest never reads: net.Pipe's Write returns once the host has
	// read every ping, or closed the link.
	_, _ = guest.Write(bytes.Repeat(yamuxFrame(yamuxPing, yamuxSYN, 0, 1), pings))
	if n := runtime.NumGoroutine() - base; n > 20 {
		t.Fatalf("%d more goroutines after %d pings from the guest", n, pings)
	}
	wantMisbehaved(t, cli, "it pinged")
}

// Streams the guest opens are never accepted by the host: each would keep
// a full receive window in the daemon's memory.
func TestMuxGuestOpensStreams(t *testing.T) {
	cli, guest := hostOver(t, StallTimeout)
	data := make([]byte, yamuxWindow)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const streams = 64
	for i := range uint32(streams) {
		id := 2 * (i + 1) // the guest's stream IDs are even
		if _, err := guest.Write(yamuxFrame(yamuxWindowUpdate, yamuxSYN, id, 0)); err != nil {
			break
		}
		if _, err := guest.Write(append(yamuxFrame(yamuxData, 0, id, yamuxWindow), data...)); err != nil {
			break
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 4<<20 {
		t.Fatalf("the host's heap grew by %d MiB for %d streams the guest opened", grew>>20, streams)
	}
	wantMisbehaved(t, cli, "it opened a stream")
}

func TestMuxRefusesGuestFrames(t *testing.T) {
	tests := []struct {
		name  string
		frame []byte
		why   string
	}{
		{"ping", yamuxFrame(yamuxPing, yamuxSYN, 0, 7), "it pinged"},
		{"ping answer", yamuxFrame(yamuxPing, yamuxACK, 0, 7), "it pinged"},
		{"stream opened by data", yamuxFrame(yamuxData, yamuxSYN, 2, 0), "it opened a stream"},
		{"stream opened on an odd ID", yamuxFrame(yamuxWindowUpdate, yamuxSYN, 1, 0), "it opened a stream"},
		{"version", append([]byte{1}, yamuxFrame(yamuxData, 0, 1, 0)[1:]...), "protocol version 1"},
		{"type", yamuxFrame(4, 0, 1, 0), "frame type 4"},
		{"flags", yamuxFrame(yamuxData, 0x10, 1, 0), "unknown flags 0x10"},
		{"stream the host did not open", yamuxFrame(yamuxData, 0, 4, 0), "stream 4, which the host did not open"},
		{"stream 0", yamuxFrame(yamuxWindowUpdate, yamuxACK, 0, 0), "stream 0, which the host did not open"},
		{"data beyond the window", yamuxFrame(yamuxData, 0, 1, yamuxWindow+1), "262145 bytes of data or window for stream 1"},
		{"window beyond the window", yamuxFrame(yamuxWindowUpdate, 0, 3, 1<<31), "2147483648 bytes of data or window for stream 3"},
		{"garbage", []byte("GET / HTTP/1.1\r\n"), "protocol version 71"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cli, guest := hostOver(t, StallTimeout)
			go guest.Write(tc.frame)
			wantMisbehaved(t, cli, tc.why)
			if _, err := cli.Dial(context.Background(), AgentPort); !errors.Is(err, ErrMisbehaved) {
				t.Fatalf("dial after the guest misbehaved: %v", err)
			}
		})
	}
}

// Frames a well-behaved guest may send, even unasked, keep the link.
func TestMuxPassesGuestFrames(t *testing.T) {
	cli, guest := hostOver(t, StallTimeout)
	for _, f := range [][]byte{
		append(yamuxFrame(yamuxData, 0, 1, 5), "stale"...), // a stream the host closed
		append(yamuxFrame(yamuxData, yamuxFIN, 3, yamuxWindow), make([]byte, yamuxWindow)...),
		yamuxFrame(yamuxWindowUpdate, yamuxACK, 5, yamuxWindow),
		yamuxFrame(yamuxWindowUpdate, yamuxRST, 7, 0),
	} {
		if _, err := guest.Write(f); err != nil {
			t.Fatalf("the host stopped reading: %v", err)
		}
	}
	srv := NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	l, err := srv.Listen(AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, l)
	go srv.ServeConn(guest)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := cli.Dial(ctx, AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := cli.Err(); err != nil {
		t.Fatal(err)
	}
}

// frozenGuest is a guest's end of the link that stops reading on freeze.
type frozenGuest struct {
	net.Conn
	frozen atomic.Bool
	once   sync.Once
	closed chan struct{}
}

func (g *frozenGuest) Read(p []byte) (int, error) {
	if g.frozen.Load() {
		<-g.closed
		return 0, net.ErrClosed
	}
	return g.Conn.Read(p)
}

func (g *frozenGuest) Close() error {
	g.once.Do(func() { close(g.closed) })
	return g.Conn.Close()
}

// A guest that stops reading its port leaves the host's writes waiting;
// the host gives up after its stall timeout instead of for ever.
func TestMuxGuestStopsReading(t *testing.T) {
	host, guestEnd := net.Pipe()
	guest := &frozenGuest{Conn: guestEnd, closed: make(chan struct{})}
	srv := NewMuxServer()
	l, err := srv.Listen(IOPort)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	go srv.ServeConn(guest)
	cli, err := newMuxClient(host, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close(); srv.Close(); guest.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := cli.Dial(ctx, IOPort)
	if err != nil {
		t.Fatal(err)
	}
	guest.frozen.Store(true)
	wrote := make(chan error, 1)
	go func() {
		_, err := c.Write(make([]byte, 1<<20))
		wrote <- err
	}()
	select {
	case err := <-wrote:
		if err == nil {
			t.Fatal("1 MiB written to a guest that reads nothing")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a write to a guest that stopped reading did not end")
	}
	wantMisbehaved(t, cli, "it left a write of the host's waiting for 200ms")
}

// The guest answers a stream's port header with neither yes nor no.
func TestMuxGuestAnswersGarbage(t *testing.T) {
	cli, guest := hostOver(t, StallTimeout)
	s, err := yamux.Server(guest, muxConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	go func() {
		st, err := s.AcceptStream()
		if err != nil {
			return
		}
		var hdr [4]byte
		if _, err := io.ReadFull(st, hdr[:]); err == nil {
			st.Write([]byte{7})
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Dial(ctx, AgentPort); !errors.Is(err, ErrMisbehaved) {
		t.Fatalf("dial answered 7: %v, want ErrMisbehaved", err)
	}
	wantMisbehaved(t, cli, "it answered 0x7 to a stream to port 1024")
}

// A SerialDialer does not reconnect to a guest that misbehaved on a
// session it had answered on: its dials fail at once, and Err says why.
func TestSerialDialerGivesUpOnMisbehavingGuest(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	srv := NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	l, err := srv.Listen(AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, l)
	vmm := newFakeVMM(t, sock, srv)
	d := NewSerialDialer(sock)
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.Dial(ctx, AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// The guest's multiplexer is idle: the ping goes whole.
	vmm.mu.Lock()
	vmm.conn.Write(yamuxFrame(yamuxPing, yamuxSYN, 0, 1))
	vmm.mu.Unlock()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("a stream of the session the guest misbehaved on read %v, want EOF", err)
	}
	for range 2 {
		if _, err := d.Dial(ctx, AgentPort); !errors.Is(err, ErrMisbehaved) || !strings.Contains(err.Error(), "it pinged") {
			t.Fatalf("dial of a guest that pinged: %v, want ErrMisbehaved", err)
		}
	}
	if err := d.Err(); !errors.Is(err, ErrMisbehaved) {
		t.Fatalf("Err: %v", err)
	}
	if vmm.n != 1 {
		t.Fatalf("%d sessions with a guest that misbehaved, want 1", vmm.n)
	}
}

// Before the guest has answered on a session, what arrives may be the tail
// of a frame of its previous session, which QEMU cut: the session is
// replaced, and the guest not given up on.
func TestSerialDialerReplacesSessionCutShort(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	srv := NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	al, err := srv.Listen(AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, al)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var sessions atomic.Int32
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			if sessions.Add(1) == 1 {
				c.Write([]byte("the tail of a container's output"))
			}
			go srv.ServeConn(c)
		}
	}()
	d := NewSerialDialer(sock)
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d.Dial(ctx, AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := sessions.Load(); n != 2 || d.Err() != nil {
		t.Fatalf("%d sessions, Err %v; want 2 and nil", n, d.Err())
	}
}

// TestSerialDialerReplacesSilentSession: a guest whose end of the link does
// not answer a new session (still in the previous host's, as after a
// daemon restart) gets a fresh one before the caller's deadline.
func TestSerialDialerReplacesSilentSession(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	srv := NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	al, err := srv.Listen(AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, al)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var sessions atomic.Int32
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			if sessions.Add(1) == 1 {
				continue // read nothing, answer nothing
			}
			go srv.ServeConn(c)
		}
	}()
	d := NewSerialDialer(sock)
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 3*freshSessionWait)
	defer cancel()
	c, err := d.Dial(ctx, AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := sessions.Load(); n != 2 || d.Err() != nil {
		t.Fatalf("%d sessions, Err %v; want 2 and nil", n, d.Err())
	}
}
