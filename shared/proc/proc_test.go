package proc

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParseStat(t *testing.T) {
	for _, c := range []struct {
		name, stat string
		start      uint64
		state      string
		ok         bool
	}{
		{"parentheses in the name", "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 100", 123456, "S", true},
		{"zombie", "7 (sh) Z 1 7 7 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 99 0 0", 99, "Z", true},
		{"short", "42 (x) S 1", 0, "", false},
		{"no name", "42 x S 1", 0, "", false},
		{"bad start time", "42 (x) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 abc 0 0", 0, "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			start, state, err := parseStat([]byte(c.stat))
			if (err == nil) != c.ok || start != c.start || state != c.state {
				t.Errorf("parseStat = %d, %q, %v; want %d, %q, ok %v", start, state, err, c.start, c.state, c.ok)
			}
		})
	}
}

func TestAlive(t *testing.T) {
	self, err := StartTime(os.Getpid())
	if err != nil || self == 0 {
		t.Fatalf("own start time: %d, %v", self, err)
	}
	if ok, err := Alive(os.Getpid(), self); !ok || err != nil {
		t.Errorf("Alive(self) = %v, %v", ok, err)
	}
	if ok, _ := Alive(os.Getpid(), self+1); ok {
		t.Error("a different start time counts as the same process")
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if ok, err := Alive(cmd.Process.Pid, self); ok || err != nil {
		t.Errorf("Alive(ended process) = %v, %v", ok, err)
	}
}

func TestSignal(t *testing.T) {
	cmd := exec.Command("sleep", "3600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	pid := cmd.Process.Pid
	start, err := StartTime(pid)
	if err != nil {
		t.Fatal(err)
	}

	// Another start time: what a reused PID looks like.
	if err := Signal(pid, start+1, syscall.SIGKILL); !errors.Is(err, ErrFinished) || !errdefs.IsNotFound(err) {
		t.Errorf("Signal with another start time: %v, want ErrFinished (NotFound)", err)
	}
	if err := Signal(pid, start, syscall.SIGKILL); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	cmd.Wait()
	if ws := cmd.ProcessState.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("the process ended %v, want SIGKILL alone", ws)
	}
	if err := Signal(pid, start, syscall.SIGKILL); !errors.Is(err, ErrFinished) {
		t.Errorf("Signal of an ended process: %v, want ErrFinished", err)
	}
}
