package testenv

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// NewNetns makes a network namespace bound to a file, as CRI does, and
// removes it when the test ends.
func NewNetns(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "netns")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		// The thread stays locked, so Go discards it: it is in the new netns.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- unix.Mount("/proc/thread-self/ns/net", p, "", unix.MS_BIND, "")
	}()
	if err := <-errc; err != nil {
		t.Fatalf("make netns: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(p, unix.MNT_DETACH) })
	return p
}
