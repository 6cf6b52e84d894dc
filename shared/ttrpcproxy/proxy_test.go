package ttrpcproxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// fakeTask is a task service whose State answers with its name and whose
// Wait answers exitStatus. Methods listed in block wait until release is
// closed.
type fakeTask struct {
	name       string
	exitStatus uint32
	block      map[string]bool
	release    chan struct{}
	called     chan string
}

func newFake(t *testing.T, name string, block ...string) *fakeTask {
	f := &fakeTask{
		name:       name,
		exitStatus: 7,
		block:      make(map[string]bool),
		release:    make(chan struct{}),
		called:     make(chan string, 16),
	}
	for _, m := range block {
		f.block[m] = true
	}
	t.Cleanup(func() { close(f.release) })
	return f
}

func (f *fakeTask) serve(ctx context.Context, method string) error {
	f.called <- method
	if !f.block[method] {
		return nil
	}
	select {
	case <-f.release:
		return status.Error(codes.Canceled, "released")
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeTask) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	if err := f.serve(ctx, "State"); err != nil {
		return nil, err
	}
	return &taskAPI.StateResponse{ID: r.ID, Bundle: f.name}, nil
}

func (f *fakeTask) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	if err := f.serve(ctx, "Wait"); err != nil {
		return nil, err
	}
	return &taskAPI.WaitResponse{ExitStatus: f.exitStatus}, nil
}

func (f *fakeTask) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	if err := f.serve(ctx, "Start"); err != nil {
		return nil, err
	}
	return &taskAPI.StartResponse{Pid: 42}, nil
}

func (f *fakeTask) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	if err := f.serve(ctx, "Pids"); err != nil {
		return nil, err
	}
	return &taskAPI.PidsResponse{Processes: nil}, nil
}

func (f *fakeTask) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	if err := f.serve(ctx, "Kill"); err != nil {
		return nil, err
	}
	if r.ID == "missing" {
		return nil, status.Error(codes.NotFound, "no such task")
	}
	return &emptypb.Empty{}, nil
}

var errUnimplemented = status.Error(codes.Unimplemented, "not in fake")

func (f *fakeTask) Create(context.Context, *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Delete(context.Context, *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Pause(context.Context, *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Resume(context.Context, *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Exec(context.Context, *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) ResizePty(context.Context, *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) CloseIO(context.Context, *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Update(context.Context, *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Stats(context.Context, *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Connect(context.Context, *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return nil, errUnimplemented
}

func (f *fakeTask) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return nil, errUnimplemented
}

// backend is a fake daemon serving the task API.
type backend struct {
	srv *ttrpc.Server

	mu     sync.Mutex
	killed bool
	conns  []net.Conn
}

// startBackend serves f on the unix socket path until the test ends or the
// backend is killed.
func startBackend(t *testing.T, path string, f *fakeTask) *backend {
	t.Helper()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	taskAPI.RegisterTTRPCTaskService(srv, f)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{srv: srv}
	go srv.Serve(context.Background(), &trackingListener{Listener: l, b: b})
	t.Cleanup(b.kill)
	return b
}

// kill makes the backend go away as a killed daemon does: the socket and
// every connection close. ttrpc's Server.Close alone is not that: a
// connection's serving loop heeds it only while no call is in flight, as
// of the loop's last turn, so a connection with a call in flight stayed
// open now and then and the tests waited for an answer that never came.
func (b *backend) kill() {
	b.srv.Close()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.killed = true
	for _, c := range b.conns {
		c.Close()
	}
}

// trackingListener records the connections it accepts for backend.kill.
type trackingListener struct {
	net.Listener
	b *backend
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.b.mu.Lock()
	defer l.b.mu.Unlock()
	if l.b.killed {
		c.Close()
	}
	l.b.conns = append(l.b.conns, c)
	return c, nil
}

// served is the outcome of a proxy's Serve.
type served struct {
	once sync.Once
	ch   chan error
	err  error
}

// wait returns what Serve returned, waiting a while for it.
func (s *served) wait(t *testing.T) error {
	t.Helper()
	s.once.Do(func() {
		select {
		case s.err = <-s.ch:
		case <-time.After(5 * time.Second):
			s.err = errors.New("Serve did not return")
		}
	})
	return s.err
}

// startProxy serves a proxy on a socket of its own and returns a task client
// connected to it. Cleanup closes the proxy and checks that Serve returned
// nil and that no goroutine of the proxy is left.
func startProxy(t *testing.T, cfg Config) (taskAPI.TTRPCTaskService, *Proxy, *served) {
	t.Helper()
	if cfg.Log == nil {
		cfg.Log = zaptest.NewLogger(t)
	}
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	p := New(cfg)
	s := &served{ch: make(chan error, 1)}
	go func() { s.ch <- p.Serve(l) }()
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := s.wait(t); err != nil {
			t.Errorf("Serve: %v", err)
		}
		checkNoProxyGoroutines(t)
	})

	nc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(nc)
	t.Cleanup(func() { client.Close() })
	return taskAPI.NewTTRPCTaskClient(client), p, s
}

// checkNoProxyGoroutines fails if a goroutine still runs code of proxy.go.
// Tests do not run in parallel, so every such goroutine belongs to the test
// that just closed its proxy.
func checkNoProxyGoroutines(t *testing.T) {
	t.Helper()
	var stacks string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		buf := make([]byte, 1<<20)
		stacks = string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, "/ttrpcproxy/proxy.go:") {
			return
		}
	}
	t.Errorf("proxy goroutines left after Close:\n%s", stacks)
}

func backendPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "b.sock")
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func expectCall(t *testing.T, f *fakeTask, method string) {
	t.Helper()
	select {
	case m := <-f.called:
		if m != method {
			t.Fatalf("backend %s got %s, want %s", f.name, m, method)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("backend %s never got %s", f.name, method)
	}
}

type result[T any] struct {
	v   T
	err error
}

func async[T any](fn func() (T, error)) <-chan result[T] {
	ch := make(chan result[T], 1)
	go func() {
		v, err := fn()
		ch <- result[T]{v, err}
	}()
	return ch
}

func receive[T any](t *testing.T, ch <-chan result[T]) result[T] {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(5 * time.Second):
		t.Fatal("call did not return")
		return result[T]{}
	}
}

func TestForward(t *testing.T) {
	backend := backendPath(t)
	startBackend(t, backend, newFake(t, "a"))
	client, _, _ := startProxy(t, Config{Backend: backend})
	ctx := testContext(t)

	for _, tc := range []struct {
		name string
		call func() error
		code codes.Code
	}{
		{"State", func() error {
			r, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"})
			if err == nil && (r.ID != "c1" || r.Bundle != "a") {
				t.Errorf("State = %v", r)
			}
			return err
		}, codes.OK},
		{"Start", func() error {
			r, err := client.Start(ctx, &taskAPI.StartRequest{ID: "c1"})
			if err == nil && r.Pid != 42 {
				t.Errorf("Start = %v", r)
			}
			return err
		}, codes.OK},
		{"error passes through", func() error {
			_, err := client.Kill(ctx, &taskAPI.KillRequest{ID: "missing"})
			return err
		}, codes.NotFound},
		{"unimplemented", func() error {
			_, err := client.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"})
			return err
		}, codes.Unimplemented},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := status.Code(tc.call()); got != tc.code {
				t.Errorf("code = %v, want %v", got, tc.code)
			}
		})
	}
}

func TestWaitReplayedToNewBackend(t *testing.T) {
	backend := backendPath(t)
	a := newFake(t, "a", "Wait")
	srvA := startBackend(t, backend, a)
	client, _, _ := startProxy(t, Config{Backend: backend})
	ctx := testContext(t)

	wait := async(func() (*taskAPI.WaitResponse, error) {
		return client.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"})
	})
	expectCall(t, a, "Wait")
	srvA.kill()
	// Long enough for the proxy to find no backend and redial a few times.
	time.Sleep(100 * time.Millisecond)

	b := newFake(t, "b")
	b.exitStatus = 137
	startBackend(t, backend, b)
	r := receive(t, wait)
	if r.err != nil {
		t.Fatalf("Wait: %v", r.err)
	}
	if r.v.ExitStatus != 137 {
		t.Errorf("ExitStatus = %d, want 137 from the new backend", r.v.ExitStatus)
	}
	expectCall(t, b, "Wait")

	// The connection goes on working with the new backend.
	st, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"})
	if err != nil || st.Bundle != "b" {
		t.Errorf("State after replay = %v, %v", st, err)
	}
}

func TestInFlightNotReplayable(t *testing.T) {
	for _, tc := range []struct {
		method string
		call   func(context.Context, taskAPI.TTRPCTaskService) error
	}{
		{"Start", func(ctx context.Context, c taskAPI.TTRPCTaskService) error {
			_, err := c.Start(ctx, &taskAPI.StartRequest{ID: "c1"})
			return err
		}},
		{"Kill", func(ctx context.Context, c taskAPI.TTRPCTaskService) error {
			_, err := c.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9})
			return err
		}},
	} {
		t.Run(tc.method, func(t *testing.T) {
			backend := backendPath(t)
			a := newFake(t, "a", tc.method)
			srvA := startBackend(t, backend, a)
			client, _, _ := startProxy(t, Config{Backend: backend})
			ctx := testContext(t)

			call := async(func() (struct{}, error) { return struct{}{}, tc.call(ctx, client) })
			expectCall(t, a, tc.method)
			// containerd goes on calling on the same connection meanwhile;
			// the backend's serving loop then always sees a call in flight.
			if _, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"}); err != nil {
				t.Fatalf("State: %v", err)
			}
			expectCall(t, a, "State")
			srvA.kill()

			r := receive(t, call)
			if status.Code(r.err) != codes.Unavailable {
				t.Fatalf("err = %v, want Unavailable", r.err)
			}
			if !strings.Contains(r.err.Error(), "went away") {
				t.Errorf("err = %v, want it to say the sandboxer went away", r.err)
			}

			// Not sent again to the next backend.
			b := newFake(t, "b")
			startBackend(t, backend, b)
			if _, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"}); err != nil {
				t.Fatalf("State: %v", err)
			}
			expectCall(t, b, "State")
		})
	}
}

func TestQueuedUntilBackendAppears(t *testing.T) {
	backend := backendPath(t)
	client, _, _ := startProxy(t, Config{Backend: backend})
	ctx := testContext(t)

	// Several calls, so that the backend checks they come in stream order.
	state := async(func() (*taskAPI.StateResponse, error) {
		return client.State(ctx, &taskAPI.StateRequest{ID: "c1"})
	})
	start := async(func() (*taskAPI.StartResponse, error) {
		return client.Start(ctx, &taskAPI.StartRequest{ID: "c1"})
	})
	kill := async(func() (*emptypb.Empty, error) {
		return client.Kill(ctx, &taskAPI.KillRequest{ID: "c1"})
	})
	time.Sleep(100 * time.Millisecond)
	select {
	case r := <-state:
		t.Fatalf("State returned with no backend: %v", r)
	default:
	}

	startBackend(t, backend, newFake(t, "late"))
	if r := receive(t, state); r.err != nil || r.v.Bundle != "late" {
		t.Errorf("State = %v, %v", r.v, r.err)
	}
	if r := receive(t, start); r.err != nil || r.v.Pid != 42 {
		t.Errorf("Start = %v, %v", r.v, r.err)
	}
	if r := receive(t, kill); r.err != nil {
		t.Errorf("Kill: %v", r.err)
	}
}

func TestPendingTimeout(t *testing.T) {
	const timeout = 200 * time.Millisecond
	backend := backendPath(t)
	client, _, _ := startProxy(t, Config{Backend: backend, PendingTimeout: timeout})
	ctx := testContext(t)

	wait := async(func() (*taskAPI.WaitResponse, error) {
		return client.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"})
	})

	began := time.Now()
	_, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("State err = %v, want Unavailable", err)
	}
	if d := time.Since(began); d < timeout {
		t.Errorf("State answered after %v, before the %v timeout", d, timeout)
	}

	time.Sleep(3 * timeout)
	select {
	case r := <-wait:
		t.Fatalf("Wait returned with no backend: %v, %v", r.v, r.err)
	default:
	}

	startBackend(t, backend, newFake(t, "a"))
	r := receive(t, wait)
	if r.err != nil || r.v.ExitStatus != 7 {
		t.Errorf("Wait = %v, %v", r.v, r.err)
	}
}

func TestCloseEndsClients(t *testing.T) {
	backend := backendPath(t)
	a := newFake(t, "a", "Wait")
	startBackend(t, backend, a)
	client, p, served := startProxy(t, Config{Backend: backend})
	ctx := testContext(t)

	if _, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"}); err != nil {
		t.Fatalf("State: %v", err)
	}
	expectCall(t, a, "State")
	wait := async(func() (*taskAPI.WaitResponse, error) {
		return client.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"})
	})
	expectCall(t, a, "Wait")

	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := served.wait(t); err != nil {
		t.Errorf("Serve = %v, want nil", err)
	}

	if r := receive(t, wait); r.err == nil {
		t.Error("Wait in flight succeeded after Close")
	}
	if _, err := client.State(ctx, &taskAPI.StateRequest{ID: "c1"}); err == nil {
		t.Error("State succeeded after Close")
	}
	checkNoProxyGoroutines(t)
}

// TestOversizedFrame checks that a frame over ttrpc's limit ends the client
// connection rather than being read into memory.
func TestOversizedFrame(t *testing.T) {
	backend := backendPath(t)
	startBackend(t, backend, newFake(t, "a"))
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	p := New(Config{Backend: backend, Log: zaptest.NewLogger(t)})
	go p.Serve(l)
	t.Cleanup(func() { p.Close(); checkNoProxyGoroutines(t) })

	nc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	var h [headerLength]byte
	binary.BigEndian.PutUint32(h[:4], maxMessageSize+1)
	binary.BigEndian.PutUint32(h[4:8], 1)
	h[8] = typeRequest
	if _, err := nc.Write(h[:]); err != nil {
		t.Fatal(err)
	}
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.Copy(io.Discard, nc); err != nil || n != 0 {
		t.Errorf("read %d bytes, %v; want EOF", n, err)
	}
}

// TestReadFrame checks the framing on its own.
func TestReadFrame(t *testing.T) {
	frame := rawFrame
	for _, tc := range []struct {
		name    string
		in      []byte
		want    []byte
		wantErr bool
	}{
		{"request", frame(3, typeRequest, "abc"), frame(3, typeRequest, "abc"), false},
		{"empty payload", frame(5, typeResponse, ""), frame(5, typeResponse, ""), false},
		{"short header", []byte{0, 0, 0}, nil, true},
		{"short payload", frame(1, typeRequest, "abc")[:headerLength+1], nil, true},
		{"oversized", func() []byte {
			b := frame(1, typeRequest, "")
			binary.BigEndian.PutUint32(b[:4], maxMessageSize+1)
			return b
		}(), nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readFrame(bytes.NewReader(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if !bytes.Equal(got, tc.want) {
				t.Errorf("frame = %x, want %x", got, tc.want)
			}
		})
	}
	if _, err := readFrame(bytes.NewReader(nil)); !errors.Is(err, io.EOF) {
		t.Errorf("empty input: %v, want EOF", err)
	}
}

// TestUnknownStreamsDropped drives the proxy with raw frames: the backend
// answers a stream twice and a stream never asked for; the client sees one
// response only.
func TestUnknownStreamsDropped(t *testing.T) {
	backend := backendPath(t)
	bl, err := net.Listen("unix", backend)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bl.Close() })
	backendDone := make(chan error, 1)
	go func() {
		b, err := bl.Accept()
		if err != nil {
			backendDone <- err
			return
		}
		defer b.Close()
		req, err := readFrame(b)
		if err != nil {
			backendDone <- err
			return
		}
		id := streamID(req)
		var out []byte
		for _, sid := range []uint32{99, id, id} {
			out = append(out, rawFrame(sid, typeResponse, "ok")...)
		}
		_, err = b.Write(out)
		backendDone <- err
		// Hold the connection until the client is done.
		io.Copy(io.Discard, b)
	}()

	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	p := New(Config{Backend: backend, Log: zaptest.NewLogger(t)})
	go p.Serve(l)
	t.Cleanup(func() { p.Close(); checkNoProxyGoroutines(t) })

	nc, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	if _, err := nc.Write(rawFrame(1, typeRequest, "not a protobuf")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-backendDone:
		if err != nil {
			t.Fatalf("backend: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("backend got no request")
	}

	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := readFrame(nc)
	if err != nil {
		t.Fatal(err)
	}
	if want := rawFrame(1, typeResponse, "ok"); !bytes.Equal(got, want) {
		t.Fatalf("frame = %x, want %x", got, want)
	}
	nc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if extra, err := readFrame(nc); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("second frame %x, %v; want none", extra, err)
	}
}

func rawFrame(id uint32, typ byte, payload string) []byte {
	b := make([]byte, headerLength)
	binary.BigEndian.PutUint32(b[:4], uint32(len(payload)))
	binary.BigEndian.PutUint32(b[4:8], id)
	b[8] = typ
	return append(b, payload...)
}
