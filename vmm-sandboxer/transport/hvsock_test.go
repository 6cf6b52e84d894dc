package transport

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// hvsockServer listens on a unix socket in a temp dir and answers every
// connection's handshake line with answer(line); a "" answer closes the
// connection unanswered. After an OK the connection echoes.
func hvsockServer(t *testing.T, answer func(line string) string) (path string, handshakes *atomic.Int32) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "vsock.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	handshakes = new(atomic.Int32)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				handshakes.Add(1)
				a := answer(strings.TrimSuffix(line, "\n"))
				if a == "" {
					return
				}
				if _, err := io.WriteString(c, a); err != nil || !strings.HasPrefix(a, "OK ") {
					return
				}
				io.Copy(c, r)
			}()
		}
	}()
	return path, handshakes
}

func TestHybridVsockDialer(t *testing.T) {
	var closes atomic.Int32
	tests := []struct {
		name    string
		answer  func(line string) string
		noSock  bool
		wantErr string // "" means the dial succeeds
		proto   bool   // the error is ErrHybridVsockProtocol (no retries)
	}{
		{name: "ok", answer: func(line string) string {
			if line != "CONNECT 1024" {
				return "ERR bad request " + line + "\n"
			}
			return "OK 3245\n"
		}},
		{name: "guest listens after two tries", answer: func(string) string {
			if closes.Add(1) <= 2 {
				return ""
			}
			return "OK 1\n"
		}},
		{name: "closed unanswered", answer: func(string) string { return "" },
			wantErr: "context deadline exceeded (last error: read answer to CONNECT 1024"},
		{name: "no socket", noSock: true, wantErr: "connect: no such file or directory"},
		{name: "refused", answer: func(string) string { return "ERR no such port\n" },
			wantErr: `unexpected handshake answer: "ERR no such port" to CONNECT 1024`, proto: true},
		{name: "garbage port", answer: func(string) string { return "OK banana\n" },
			wantErr: `"OK banana"`, proto: true},
		{name: "endless line", answer: func(string) string { return strings.Repeat("x", 100) },
			wantErr: "is too long", proto: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var path string
			var handshakes *atomic.Int32
			if tc.noSock {
				path = filepath.Join(t.TempDir(), "absent.sock")
			} else {
				path, handshakes = hvsockServer(t, tc.answer)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			t.Cleanup(cancel)
			d := &HybridVsockDialer{SocketPath: path}
			t.Cleanup(func() { d.Close() })
			c, err := d.Dial(ctx, 1024)
			if tc.wantErr != "" {
				if err == nil {
					c.Close()
					t.Fatalf("dial succeeded, want error %q", tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %q does not say %q", err, tc.wantErr)
				}
				if got := errors.Is(err, ErrHybridVsockProtocol); got != tc.proto {
					t.Fatalf("errors.Is(%v, ErrHybridVsockProtocol) = %v, want %v", err, got, tc.proto)
				}
				if tc.proto && handshakes.Load() != 1 {
					t.Fatalf("%d handshakes: a protocol error must not be retried", handshakes.Load())
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			// The stream after the handshake is the guest's, byte for byte.
			if _, err := io.WriteString(c, "ping\n"); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 5)
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping\n" {
				t.Fatalf("echo: %q, %v", got, err)
			}
		})
	}
}

func TestHybridVsockDialerCancelledMidHandshake(t *testing.T) {
	// The server reads CONNECT and never answers; cancelling ctx (no
	// deadline) must end the dial.
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	path, _ := hvsockServer(t, func(string) string { <-release; return "" })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	time.AfterFunc(100*time.Millisecond, cancel)
	d := &HybridVsockDialer{SocketPath: path}
	done := make(chan error, 1)
	go func() {
		c, err := d.Dial(ctx, 7)
		if c != nil {
			c.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("error %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Dial did not return after ctx was cancelled")
	}
}
