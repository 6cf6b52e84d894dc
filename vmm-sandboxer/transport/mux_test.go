package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// socketpair is a connected pair of unix stream sockets: a byte pipe like
// the one a virtio-serial port gives.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// echo serves l: every stream's bytes come back on it.
func echo(t *testing.T, l net.Listener) {
	t.Helper()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
}

func TestMuxConcurrentStreams(t *testing.T) {
	host, guest := socketpair(t)
	srv := NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	l7, err := srv.Listen(7)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, l7)
	// Port 8 answers with its port number, to show streams are routed.
	l8, _ := srv.Listen(8)
	go func() {
		for {
			c, err := l8.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("port 8"))
			c.Close()
		}
	}()
	served := make(chan error, 1)
	go func() { served <- srv.ServeConn(guest) }()
	cli, err := NewMuxClient(host)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	const streams, size = 64, 256 << 10
	var wg sync.WaitGroup
	errs := make(chan error, streams*2)
	for i := 0; i < streams; i++ {
		wg.Add(2)
		go func() {
			defer wg.Done()
			c, err := cli.Dial(ctx, 7)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			want := make([]byte, size)
			rand.Read(want)
			go func() { c.Write(want) }()
			got := make([]byte, size)
			if _, err := io.ReadFull(c, got); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, want) {
				errs <- errors.New("echoed bytes differ")
			}
		}()
		go func() {
			defer wg.Done()
			c, err := cli.Dial(ctx, 8)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			b, err := io.ReadAll(c)
			if err != nil || string(b) != "port 8" {
				errs <- errors.New("port 8 answered " + string(b))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	// A port nobody listens on is refused, and the session goes on.
	if _, err := cli.Dial(ctx, 9); !errors.Is(err, ErrNoListener) {
		t.Fatalf("dial unused port: %v, want ErrNoListener", err)
	}
	// A closed listener refuses too.
	l8.Close()
	if _, err := cli.Dial(ctx, 8); !errors.Is(err, ErrNoListener) {
		t.Fatalf("dial closed port: %v, want ErrNoListener", err)
	}
	if _, err := srv.Listen(7); err == nil {
		t.Fatal("listening twice on port 7 succeeded")
	}
	c, err := cli.Dial(ctx, 7)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// The host going away ends the guest's session cleanly.
	cli.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("ServeConn after the host left: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return after the host left")
	}
	if _, err := cli.Dial(ctx, 7); err == nil {
		t.Fatal("dial on a closed session succeeded")
	}
}

// fakeVMM plays QEMU's part for a SerialDialer: it listens on the port's
// unix socket and hands each host connection to the guest's mux server,
// one at a time. kill ends the current connection, as a guest restarting
// its end of the port would.
type fakeVMM struct {
	l    net.Listener
	mu   sync.Mutex
	conn net.Conn
	n    int
}

func newFakeVMM(t *testing.T, sock string, srv *MuxServer) *fakeVMM {
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeVMM{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.conn = c
			f.n++
			f.mu.Unlock()
			srv.ServeConn(c)
		}
	}()
	t.Cleanup(func() { l.Close(); f.kill() })
	return f
}

func (f *fakeVMM) kill() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conn != nil {
		f.conn.Close()
	}
}

func TestSerialDialer(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	srv := NewMuxServer()
	t.Cleanup(func() { srv.Close() })
	l, _ := srv.Listen(AgentPort)
	echo(t, l)

	d := NewSerialDialer(sock)
	t.Cleanup(func() { d.Close() })

	// Nothing listens yet: Dial retries until its context ends and says why.
	short, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err := d.Dial(short, AgentPort)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "context deadline exceeded") || !strings.Contains(err.Error(), sock) {
		t.Fatalf("dial with no VMM: %v", err)
	}

	vmm := newFakeVMM(t, sock, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	roundTrip := func() {
		t.Helper()
		c, err := d.Dial(ctx, AgentPort)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
			t.Fatalf("echo: %q, %v", b, err)
		}
	}
	roundTrip()
	roundTrip() // same session
	if vmm.n != 1 {
		t.Fatalf("%d sessions for two dials, want 1", vmm.n)
	}
	// The link breaks: the next Dial starts a new session.
	vmm.kill()
	roundTrip()
	if vmm.n != 2 {
		t.Fatalf("%d sessions after the link broke, want 2", vmm.n)
	}
	// A refused port is retried until the context ends, with the cause.
	short, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	_, err = d.Dial(short, 4242)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "no listener") {
		t.Fatalf("dial of an unused port: %v", err)
	}
	d.Close()
	if _, err := d.Dial(ctx, AgentPort); !errors.Is(err, ErrDialerClosed) {
		t.Fatalf("dial after Close: %v, want ErrDialerClosed at once", err)
	}
}

func TestFindSerialPort(t *testing.T) {
	dir := t.TempDir()
	for port, name := range map[string]string{"vport1p1": "kuasar.agent\n", "vport1p2": "other"} {
		os.MkdirAll(filepath.Join(dir, port), 0o755)
		os.WriteFile(filepath.Join(dir, port, "name"), []byte(name), 0o644)
	}
	os.MkdirAll(filepath.Join(dir, "vport0p0"), 0o755) // no name file
	if got, err := FindSerialPort(dir, "kuasar.agent"); err != nil || got != "/dev/vport1p1" {
		t.Fatalf("got %q, %v", got, err)
	}
	if _, err := FindSerialPort(dir, "missing"); err == nil || !strings.Contains(err.Error(), `"missing" not found`) {
		t.Fatalf("missing port: %v", err)
	}
}
