package agentclient

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// pipeDialer gives the host its end of a new pipe per dial and the guest's
// end to serve.
type pipeDialer func(port uint32, guest net.Conn)

func (d pipeDialer) Dial(_ context.Context, port uint32) (net.Conn, error) {
	host, guest := net.Pipe()
	go d(port, guest)
	return host, nil
}

func (pipeDialer) Close() error { return nil }

// ttrpcFrame is a frame as a ttrpc server writes it.
func ttrpcFrame(id uint32, typ, flags byte, payload []byte) []byte {
	h := make([]byte, ttrpcHeaderSize, ttrpcHeaderSize+len(payload))
	binary.BigEndian.PutUint32(h[:4], uint32(len(payload)))
	binary.BigEndian.PutUint32(h[4:8], id)
	h[8], h[9] = typ, flags
	return append(h, payload...)
}

// pingAnswer is the agent's answer to a Ping on stream id.
func pingAnswer(t testing.TB, id uint32) []byte {
	p, _ := proto.Marshal(&vmmtask.PingResponse{})
	r, err := proto.Marshal(&ttrpc.Response{Payload: p})
	if err != nil {
		t.Fatal(err)
	}
	return ttrpcFrame(id, ttrpcResponse, 0, r)
}

// readRequest reads one frame of the host's and returns its stream.
func readRequest(r io.Reader) (uint32, error) {
	var h [ttrpcHeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, err
	}
	_, err := io.CopyN(io.Discard, r, int64(binary.BigEndian.Uint32(h[:4])))
	return binary.BigEndian.Uint32(h[4:8]), err
}

// fakeAgent answers the host's first request with first(id) and every
// later one with a proper Ping answer.
func fakeAgent(t *testing.T, stall time.Duration, first func(id uint32) []byte) *Client {
	t.Helper()
	served := make(chan struct{})
	d := pipeDialer(func(_ uint32, guest net.Conn) {
		defer close(served)
		defer guest.Close()
		answer := first
		for {
			id, err := readRequest(guest)
			if err != nil {
				return
			}
			if _, err := guest.Write(answer(id)); err != nil {
				return
			}
			answer = func(id uint32) []byte { return pingAnswer(t, id) }
		}
	})
	c, err := dial(context.Background(), d, stall)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); <-served })
	return c
}

// wantMisbehaved waits for the host to give up on the agent, with why.
func wantMisbehaved(t *testing.T, c *Client, why string) {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the host kept the agent connection")
	}
	if err := c.Err(); !errors.Is(err, transport.ErrMisbehaved) || !strings.Contains(err.Error(), why) {
		t.Fatalf("the agent connection ended with %v, want ErrMisbehaved saying %q", err, why)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Ping(ctx, &vmmtask.PingRequest{}); err == nil {
		t.Fatal("a call succeeded after the host gave up on the agent")
	}
}

func TestAgentConnRefusesGuestFrames(t *testing.T) {
	tests := []struct {
		name  string
		first func(t testing.TB, id uint32) []byte
		why   string // "": the connection stays
	}{
		{name: "an answer", first: pingAnswer},
		{name: "two answers", first: func(t testing.TB, id uint32) []byte {
			return slices.Concat(pingAnswer(t, id), pingAnswer(t, id))
		}, why: "type 2 on stream 1,"},
		{name: "an answer to no request", first: func(t testing.TB, id uint32) []byte {
			return slices.Concat(pingAnswer(t, id+2), pingAnswer(t, id))
		}, why: "type 2 on stream 3,"},
		{name: "data on a unary call", first: func(t testing.TB, id uint32) []byte {
			return ttrpcFrame(id, ttrpcData, 0, []byte("x"))
		}, why: "type 3 on stream 1,"},
		{name: "a request from the agent", first: func(t testing.TB, id uint32) []byte {
			return ttrpcFrame(id, ttrpcRequest, 0, nil)
		}, why: "type 1 on stream 1,"},
		{name: "a message over ttrpc's maximum", first: func(t testing.TB, id uint32) []byte {
			return ttrpcFrame(id, ttrpcResponse, 0, make([]byte, ttrpcMaxMessage+1))
		}, why: "a message of 4194305 bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := fakeAgent(t, transport.StallTimeout, func(id uint32) []byte { return tc.first(t, id) })
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := c.Ping(ctx, &vmmtask.PingRequest{})
			if tc.why != "" {
				wantMisbehaved(t, c, tc.why)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Ping(ctx, &vmmtask.PingRequest{}); err != nil {
				t.Fatal(err)
			}
			if err := c.Err(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// An agent that takes no request leaves the host's call waiting in ttrpc's
// send, where the call's context does not reach, holding up every other
// call; the host gives up after the stall timeout instead.
func TestAgentConnGuestStopsReading(t *testing.T) {
	release := make(chan struct{})
	d := pipeDialer(func(_ uint32, guest net.Conn) {
		<-release
		guest.Close()
	})
	c, err := dial(context.Background(), d, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); close(release) })
	called := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := c.Ping(ctx, &vmmtask.PingRequest{})
		called <- err
	}()
	select {
	case err := <-called:
		if err == nil {
			t.Fatal("a call to an agent that reads nothing succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a call to an agent that reads nothing did not end")
	}
	wantMisbehaved(t, c, "the agent left a request waiting for 200ms")
}

// ioAgent serves the IO port with answer(header) and the agent port not
// at all.
func ioAgent(t *testing.T, stall time.Duration, answer func(guest net.Conn)) *Client {
	t.Helper()
	release := make(chan struct{})
	d := pipeDialer(func(port uint32, guest net.Conn) {
		defer guest.Close()
		if port == transport.IOPort {
			var n [4]byte
			if _, err := io.ReadFull(guest, n[:]); err == nil {
				if _, err := io.CopyN(io.Discard, guest, int64(binary.BigEndian.Uint32(n[:]))); err == nil {
					answer(guest)
				}
			}
		}
		<-release
	})
	c, err := dial(context.Background(), d, stall)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { close(release); c.Close() })
	return c
}

// A guest that never answers an IO stream's header is waited for only as
// long as the stall timeout, whatever the caller's context.
func TestOpenStreamUnanswered(t *testing.T) {
	c := ioAgent(t, 200*time.Millisecond, func(net.Conn) {})
	opened := make(chan error, 1)
	go func() {
		s, err := c.OpenStream(context.Background(), "c1", "", vmmtask.IOStreamHeader_STDOUT)
		if s != nil {
			s.Close()
		}
		opened <- err
	}()
	select {
	case err := <-opened:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("open of an unanswered stream: %v, want the stall timeout", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the open of an IO stream the guest does not answer did not end")
	}
}

// The guest's refusal goes into the host's error quoted and cut.
func TestOpenStreamRefused(t *testing.T) {
	text := "no such process\n" + strings.Repeat("\x1b[2J", 2000)
	c := ioAgent(t, transport.StallTimeout, func(guest net.Conn) {
		guest.Write(binary.BigEndian.AppendUint32(nil, 1<<31))
		guest.Write([]byte(text))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := c.OpenStream(ctx, "c1", "", vmmtask.IOStreamHeader_STDERR)
	if err == nil {
		t.Fatal("a refused stream opened")
	}
	msg := err.Error()
	if !strings.Contains(msg, `refused: "no such process\n\x1b[2J`) || strings.ContainsAny(msg, "\n\x1b") || len(msg) > 5*maxRefusal {
		t.Fatalf("refusal error (%d bytes) %.200q...", len(msg), msg)
	}
}

// When the transport gives up on a guest, the agent client ends with the
// transport's reason: the signal the pod's owner ends the pod on.
func TestClientEndsWhenTransportGivesUp(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	srv := transport.NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	al, err := srv.Listen(transport.AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	vmmtask.RegisterAgentService(ts, pingOnly{})
	go ts.Serve(context.Background(), al)
	t.Cleanup(func() { ts.Close() })
	link := make(chan *lockedConn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		lc := &lockedConn{Conn: c}
		link <- lc
		srv.ServeConn(lc)
	}()

	d := transport.NewSerialDialer(sock)
	t.Cleanup(func() { d.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Ping(ctx, &vmmtask.PingRequest{}); err != nil {
		t.Fatal(err)
	}
	// The link is idle: a ping, which no guest of ours sends, goes whole.
	ping := make([]byte, 12)
	ping[1], ping[3], ping[11] = 2, 1, 1 // yamux ping, SYN, ping ID 1
	(<-link).Write(ping)
	wantMisbehaved(t, c, "it pinged")
}

// pingOnly is an agent that serves Ping only.
type pingOnly struct{ vmmtask.AgentService }

func (pingOnly) Ping(context.Context, *vmmtask.PingRequest) (*vmmtask.PingResponse, error) {
	return &vmmtask.PingResponse{}, nil
}

// lockedConn keeps the writes of the guest's multiplexer and the test's
// whole.
type lockedConn struct {
	net.Conn
	mu sync.Mutex
}

func (c *lockedConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.Write(p)
}

// FuzzAgentAnswer answers the host's Ping with any bytes, then hangs up.
// The call ends, and the host gives up on the guest exactly when a
// complete frame is not the one answer of the call (agentBreaks).
func FuzzAgentAnswer(f *testing.F) {
	f.Add(pingAnswer(f, 1))
	f.Add(slices.Concat(pingAnswer(f, 1), pingAnswer(f, 1)))
	f.Add(ttrpcFrame(1, ttrpcData, ttrpcRemoteClosed, nil))
	f.Add(ttrpcFrame(3, ttrpcResponse, 0, []byte{0x12, 0}))
	f.Add(binary.BigEndian.AppendUint32(nil, ttrpcMaxMessage+1))
	f.Add(pingAnswer(f, 1)[:7])
	f.Fuzz(func(t *testing.T, b []byte) {
		d := pipeDialer(func(_ uint32, guest net.Conn) {
			defer guest.Close()
			if _, err := readRequest(guest); err == nil {
				// net.Pipe's Write returns once the host has read every
				// byte, or closed the connection.
				_, _ = guest.Write(b)
			}
		})
		c, err := dial(context.Background(), d, transport.StallTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Ping(ctx, &vmmtask.PingRequest{}); errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("answer %x: the call did not end", b)
		}
		select {
		case <-c.Done():
		case <-ctx.Done():
			t.Fatalf("answer %x: the client did not end after the agent hung up", b)
		}
		if got, want := errors.Is(c.Err(), transport.ErrMisbehaved), agentBreaks(b); got != want {
			t.Fatalf("answer %x: the host gave up on the agent: %v (%v), want %v", b, got, c.Err(), want)
		}
	})
}

// agentBreaks tells whether b, the agent's bytes after the host's one
// unary request on stream 1, holds a complete frame header other than the
// request's one answer.
func agentBreaks(b []byte) bool {
	answered := false
	for len(b) >= ttrpcHeaderSize {
		l, id, typ := binary.BigEndian.Uint32(b[:4]), binary.BigEndian.Uint32(b[4:8]), b[8]
		if l > ttrpcMaxMessage || answered || id != 1 || typ != ttrpcResponse {
			return true
		}
		answered = true
		b = b[ttrpcHeaderSize:]
		b = b[min(len(b), int(l)):]
	}
	return false
}

// FuzzOpenStreamAnswer answers an IO stream's header with any bytes, then
// hangs up. The stream opens exactly when they start with a zero length,
// and then carries the rest unchanged; a refusal's error is one line of
// bounded size.
func FuzzOpenStreamAnswer(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 'o', 'u', 't'})
	f.Add(append([]byte{0, 0, 0, 3}, "bad\nmore"...))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0x1b})
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		d := pipeDialer(func(port uint32, guest net.Conn) {
			defer guest.Close()
			if port != transport.IOPort {
				_, _ = io.Copy(io.Discard, guest)
				return
			}
			var n [4]byte
			if _, err := io.ReadFull(guest, n[:]); err == nil {
				if _, err := io.CopyN(io.Discard, guest, int64(binary.BigEndian.Uint32(n[:]))); err == nil {
					_, _ = guest.Write(b)
				}
			}
		})
		c, err := dial(context.Background(), d, transport.StallTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := c.OpenStream(ctx, "c1", "e1", vmmtask.IOStreamHeader_STDOUT)
		opens := len(b) >= 4 && binary.BigEndian.Uint32(b) == 0
		if opens != (err == nil) {
			t.Fatalf("answer %q: open: %v", b, err)
		}
		if err != nil {
			if msg := err.Error(); strings.Contains(msg, "\n") || len(msg) > 5*maxRefusal {
				t.Fatalf("answer %q: refusal error (%d bytes) %.200q", b, len(msg), msg)
			}
			return
		}
		defer s.Close()
		got, _ := io.ReadAll(s)
		if !bytes.Equal(got, b[4:]) {
			t.Fatalf("answer %q: stream carried %q", b, got)
		}
	})
}
