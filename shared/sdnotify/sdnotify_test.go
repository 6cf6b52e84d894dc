package sdnotify

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

var abstractSeq atomic.Int64

// listen creates a unixgram socket of the test's own, points NOTIFY_SOCKET at
// it and returns it. abstract selects the '@' namespace.
func listen(t *testing.T, abstract bool) *net.UnixConn {
	t.Helper()
	var name string
	if abstract {
		name = fmt.Sprintf("@kuasar-go-sdnotify-test-%d-%d", os.Getpid(), abstractSeq.Add(1))
	} else {
		dir, err := os.MkdirTemp("", "sdn")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		name = filepath.Join(dir, "notify.sock")
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", name, err)
	}
	t.Cleanup(func() { conn.Close() })
	t.Setenv(envSocket, name)
	return conn
}

// recv reads one datagram or fails after timeout.
func recv(t *testing.T, conn *net.UnixConn, timeout time.Duration) string {
	t.Helper()
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("read datagram: %v", err)
	}
	return string(buf[:n])
}

func TestNotify(t *testing.T) {
	tests := []struct {
		name     string
		abstract bool
		state    string
	}{
		{"path ready", false, Ready},
		{"path stopping", false, Stopping},
		{"path watchdog", false, Watchdog},
		{"path several assignments", false, "READY=1\nSTATUS=serving 3 pods\nMAINPID=42"},
		{"abstract ready", true, Ready},
		{"abstract stopping", true, Stopping},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn := listen(t, tc.abstract)
			sent, err := Notify(tc.state)
			if err != nil || !sent {
				t.Fatalf("Notify(%q) = %v, %v; want true, nil", tc.state, sent, err)
			}
			if got := recv(t, conn, 5*time.Second); got != tc.state {
				t.Fatalf("received %q, want %q", got, tc.state)
			}
		})
	}
}

func TestNotifyUnsetOrBad(t *testing.T) {
	tests := []struct {
		name    string
		socket  string
		wantErr bool
	}{
		{"unset", "", false},
		{"relative path", "notify.sock", true},
		{"vsock", "vsock:2:1234", true},
		{"missing socket", filepath.Join(t.TempDir(), "absent.sock"), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(envSocket, tc.socket)
			if tc.socket == "" {
				os.Unsetenv(envSocket) // t.Setenv restores the old value.
			}
			sent, err := Notify(Ready)
			if sent {
				t.Fatalf("Notify sent = true, want false")
			}
			if (err != nil) != tc.wantErr {
				t.Fatalf("Notify error = %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

func TestWatchdogInterval(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	tests := []struct {
		name string
		usec string // "" leaves WATCHDOG_USEC unset
		pid  string // "" leaves WATCHDOG_PID unset
		want time.Duration
	}{
		{"unset", "", "", 0},
		{"30s no pid", "30000000", "", 15 * time.Second},
		{"30s own pid", "30000000", self, 15 * time.Second},
		{"pid mismatch", "30000000", strconv.Itoa(os.Getpid() + 1), 0},
		{"pid garbage", "30000000", "abc", 0},
		{"usec zero", "0", "", 0},
		{"usec garbage", "soon", "", 0},
		{"usec negative", "-5", "", 0},
		{"usec odd", "3", "", 1500 * time.Nanosecond},
		{"usec huge", "18446744073709551615", "", time.Duration(1<<63-1) / time.Microsecond * time.Microsecond / 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			setOrUnset(t, envWatchdogUsec, tc.usec)
			setOrUnset(t, envWatchdogPID, tc.pid)
			if got := WatchdogInterval(); got != tc.want {
				t.Fatalf("WatchdogInterval() = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestRunWatchdog(t *testing.T) {
	tests := []struct {
		name     string
		abstract bool
		usec     string
		pid      string
		pings    int // 0: RunWatchdog must return at once and send nothing
	}{
		{"path 20ms", false, "20000", "", 3},
		{"abstract own pid", true, "20000", strconv.Itoa(os.Getpid()), 3},
		{"disabled", false, "", "", 0},
		{"other pid", false, "20000", "1", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			conn := listen(t, tc.abstract)
			setOrUnset(t, envWatchdogUsec, tc.usec)
			setOrUnset(t, envWatchdogPID, tc.pid)

			ctx, cancel := context.WithCancel(context.Background())
			t.Cleanup(cancel)
			done := make(chan struct{})
			go func() {
				defer close(done)
				RunWatchdog(ctx)
			}()

			if tc.pings == 0 {
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					t.Fatal("RunWatchdog did not return at once with the watchdog disabled")
				}
				if err := conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
					t.Fatal(err)
				}
				buf := make([]byte, 64)
				if n, err := conn.Read(buf); err == nil {
					t.Fatalf("unexpected datagram %q", buf[:n])
				}
				return
			}

			start := time.Now()
			for i := 0; i < tc.pings; i++ {
				if got := recv(t, conn, 5*time.Second); got != Watchdog {
					t.Fatalf("ping %d: received %q, want %q", i, got, Watchdog)
				}
			}
			// 3 pings at a 10ms interval cannot arrive sooner than ~30ms.
			if el := time.Since(start); el < 20*time.Millisecond {
				t.Fatalf("%d pings in %v: faster than the interval", tc.pings, el)
			}
			cancel()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("RunWatchdog did not return after cancel")
			}
		})
	}
}

func setOrUnset(t *testing.T, key, val string) {
	t.Helper()
	t.Setenv(key, val) // registers the restore
	if val == "" {
		os.Unsetenv(key)
	}
}
