package testenv

import (
	"bufio"
	"errors"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestLockFileExcludesOtherProcesses: while another process holds the
// lock it cannot be taken; once that process has ended it can, and then
// keeps the other processes out in turn.
func TestLockFileExcludesOtherProcesses(t *testing.T) {
	flock, err := exec.LookPath("flock")
	if err != nil {
		t.Skip("flock(1) not installed (Debian package util-linux)")
	}
	path := filepath.Join(t.TempDir(), "vm.lock")
	holder := exec.Command(flock, path, "sh", "-c", "echo held; exec cat >/dev/null")
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		holder.Process.Kill()
		holder.Wait()
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "held\n" {
		t.Fatalf("flock(1) said %q, %v", line, err)
	}

	if f, err := lockFile(path, false); !errors.Is(err, unix.EWOULDBLOCK) {
		if f != nil {
			f.Close()
		}
		t.Fatalf("lock held by another process: %v, want EWOULDBLOCK", err)
	}

	stdin.Close()
	if err := holder.Wait(); err != nil {
		t.Fatalf("flock(1): %v", err)
	}
	f, err := lockFile(path, false)
	if err != nil {
		t.Fatalf("lock after its holder ended: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	if err := exec.Command(flock, "-n", path, "true").Run(); err == nil {
		t.Error("another process took the lock this one holds")
	}
}
