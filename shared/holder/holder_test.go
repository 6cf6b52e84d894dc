package holder

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/reap"
)

// The test binary doubles as the holder, as the daemon binary does.
func TestMain(m *testing.M) {
	if IsHolder() {
		Main()
		return
	}
	os.Exit(m.Run())
}

// started is a process of the test and the Holder naming it.
type started struct {
	cmd *exec.Cmd
	out io.Reader // its stdout
	h   Holder
}

// start runs name with args; cleanup kills and reaps it.
func start(t *testing.T, name string, args ...string) started {
	t.Helper()
	cmd := exec.Command(name, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	st, err := proc.StartTime(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	return started{cmd: cmd, out: out, h: Holder{Pid: cmd.Process.Pid, StartTime: st}}
}

// endedBy ends cmd with SIGTERM unless something ended it before, reaps it
// and returns the signal that ended it. A SIGKILL sent earlier wins even
// if the process had not died of it yet: the kernel decides the exit at
// the kill.
func endedBy(t *testing.T, cmd *exec.Cmd) syscall.Signal {
	t.Helper()
	cmd.Process.Signal(unix.SIGTERM)
	cmd.Wait()
	ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ws.Signaled() {
		t.Fatalf("%s ended %v, not by a signal", cmd.Path, ws)
	}
	return ws.Signal()
}

// takePID starts `sleep 3600` as PID pid, which must be free: it moves
// the PID namespace's last PID just below (ns_last_pid, root only) and
// tries again while other processes' forks take the PID first.
func takePID(pid int) (*exec.Cmd, error) {
	for range 50 {
		if err := os.WriteFile("/proc/sys/kernel/ns_last_pid", []byte(strconv.Itoa(pid-1)), 0); err != nil {
			return nil, err
		}
		cmd := exec.Command("sleep", "3600")
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		if cmd.Process.Pid == pid {
			return cmd, nil
		}
		cmd.Process.Kill()
		cmd.Wait()
	}
	return nil, errors.New("another process took the PID every time")
}

// reused starts a process, ends it and starts another under its PID and a
// later start time (both count clock ticks: a PID reused within the tick
// its first process started in is beyond telling apart). It returns the
// Holder naming the first process and the second one.
func reused(t *testing.T) (Holder, *exec.Cmd) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: reusing a PID on purpose writes ns_last_pid")
	}
	first := start(t, "sleep", "3600")
	first.cmd.Process.Kill()
	first.cmd.Wait()
	for range 50 {
		cmd, err := takePID(first.h.Pid)
		if err != nil {
			t.Skipf("could not reuse PID %d: %v", first.h.Pid, err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
		if st, err := proc.StartTime(cmd.Process.Pid); err != nil {
			t.Fatal(err)
		} else if st != first.h.StartTime {
			return first.h, cmd
		}
		cmd.Process.Kill()
		cmd.Wait()
		time.Sleep(10 * time.Millisecond) // the next clock tick
	}
	t.Skipf("PID %d was reused within its first start's clock tick every time", first.h.Pid)
	return Holder{}, nil
}

func TestStop(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration
	}{
		{"killed at once", 0},
		{"asked first", 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Run("running", func(t *testing.T) {
				// Exits 0 on SIGTERM once it says so.
				s := start(t, "sh", "-c", "trap 'exit 0' TERM; echo trapped; while :; do sleep 0.05; done")
				if line, err := bufio.NewReader(s.out).ReadString('\n'); line != "trapped\n" {
					t.Fatalf("the holder said %q, %v", line, err)
				}
				if err := Stop(s.h, tc.timeout); err != nil {
					t.Fatalf("Stop: %v", err)
				}
				s.cmd.Wait()
				ws := s.cmd.ProcessState.Sys().(syscall.WaitStatus)
				if tc.timeout > 0 && !(ws.Exited() && ws.ExitStatus() == 0) {
					t.Errorf("the holder ended %v; want it to exit 0 on SIGTERM", ws)
				}
				if tc.timeout == 0 && !(ws.Signaled() && ws.Signal() == unix.SIGKILL) {
					t.Errorf("the holder ended %v; want SIGKILL", ws)
				}
			})
			t.Run("gone", func(t *testing.T) {
				s := start(t, "true")
				s.cmd.Wait()
				if err := Stop(s.h, tc.timeout); err != nil {
					t.Errorf("Stop of an ended holder: %v", err)
				}
			})
			t.Run("PID reused", func(t *testing.T) {
				h, other := reused(t)
				if err := Stop(h, tc.timeout); err != nil {
					t.Errorf("Stop of an ended holder: %v", err)
				}
				if sig := endedBy(t, other); sig != unix.SIGTERM {
					t.Errorf("the process that reused the holder's PID got %v", sig)
				}
			})
		})
	}
}

// diesAtOnce is a process monitor whose holder dies before it is ready and
// is reaped (as containerd's reaper does: by PID, not through cmd.Process)
// and whose PID another process takes, all before Start looks again.
type diesAtOnce struct {
	other *exec.Cmd
}

func (m *diesAtOnce) Start(cmd *exec.Cmd) (chan runc.Exit, error) { return m.StartIn(cmd, nil) }

func (m *diesAtOnce) StartLocked(cmd *exec.Cmd) (chan runc.Exit, error) {
	return m.StartIn(cmd, nil)
}

func (m *diesAtOnce) StartIn(cmd *exec.Cmd, _ map[int]string) (chan runc.Exit, error) {
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	pid := cmd.Process.Pid
	cmd.Process.Signal(unix.SIGKILL)
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, 0, nil); err != nil {
		return nil, err
	}
	other, err := takePID(pid)
	if err != nil {
		return nil, err
	}
	m.other = other
	ec := make(chan runc.Exit, 1)
	ec <- runc.Exit{Pid: pid, Status: 128 + int(ws.Signal())}
	return ec, nil
}

func (m *diesAtOnce) Wait(_ *exec.Cmd, ec chan runc.Exit) (int, error) {
	e := <-ec
	return e.Status, nil
}

// TestStartNeverKillsAReusedPID: a holder that dies before it is ready is
// killed to be sure; the kill must not reach the process that took its
// PID meanwhile.
func TestStartNeverKillsAReusedPID(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: reusing a PID on purpose writes ns_last_pid")
	}
	m := &diesAtOnce{}
	saved, savedRunc := reap.Monitor, runc.Monitor
	reap.Use(m)
	t.Cleanup(func() { reap.Monitor, runc.Monitor = saved, savedRunc })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h, _, err := Start(ctx, Spec{})
	if m.other == nil {
		t.Skipf("could not reuse the holder's PID: %v", err)
	}
	other := m.other
	t.Cleanup(func() {
		other.Process.Kill()
		other.Wait()
	})
	if err == nil {
		t.Fatalf("Start of a holder that died at once = %+v, want an error", h)
	}
	if sig := endedBy(t, other); sig != unix.SIGTERM {
		t.Errorf("the process that reused the holder's PID got %v", sig)
	}
}
