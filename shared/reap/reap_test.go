package reap

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.uber.org/zap/zaptest"
)

func pidfds(t *testing.T) int {
	t.Helper()
	fds, err := filepath.Glob("/proc/self/fd/*")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if l, _ := os.Readlink(fd); l == "anon_inode:[pidfd]" {
			n++
		}
	}
	return n
}

// Children waited for through Monitor leave no process handle (pidfd)
// open behind them, as a soak test of the sandboxers found they did.
func TestMonitorReleasesProcessHandles(t *testing.T) {
	if err := Start(zaptest.NewLogger(t)); err != nil {
		t.Fatal(err)
	}
	before := pidfds(t)
	for i := 0; i < 20; i++ {
		cmd := exec.Command("true")
		ec, err := Monitor.Start(cmd)
		if err != nil {
			t.Fatal(err)
		}
		if status, err := Monitor.Wait(cmd, ec); err != nil || status != 0 {
			t.Fatalf("wait: %d, %v", status, err)
		}
	}
	if after := pidfds(t); after > before {
		t.Errorf("%d process handles open after 20 children, %d before", after, before)
	}
}
