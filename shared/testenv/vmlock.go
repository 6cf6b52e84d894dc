package testenv

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// vmLockPath is the lock of the tests that boot VMs, host-wide: go test
// runs the packages of a module in parallel, each in its own process.
const vmLockPath = "/run/lock/kuasar-go-vm-tests.lock"

// vmMu serializes the tests of one process: a second open file of the
// lock would wait for the first forever.
var vmMu sync.Mutex

// BootsVMs makes t the only test on the host that boots VMs until it ends,
// waiting for the one that is. Under TCG a booting guest keeps a core
// busy: on a 2-core machine the pod VMs of two such tests at once (the
// vmm e2e tests beside the mixed-node tests) starved each other's boots
// past the CRI call's deadline, and each test took the other's QEMU for a
// leak of its own. Call it before Start: the lock is released in a
// cleanup, which then runs after the environment's.
func BootsVMs(t testing.TB) {
	t.Helper()
	t0 := time.Now()
	vmMu.Lock()
	f, err := lockFile(vmLockPath, true)
	if err != nil {
		vmMu.Unlock()
		t.Fatalf("testenv: %v", err)
	}
	if d := time.Since(t0); d > time.Second {
		t.Logf("testenv: waited %v for another test's VMs", d.Round(time.Millisecond))
	}
	t.Cleanup(func() {
		f.Close() // releases the lock
		vmMu.Unlock()
	})
}

// lockFile takes an exclusive flock of path, created if need be; with
// wait false it fails at once with EWOULDBLOCK while another holds it.
// Closing the file releases the lock, as the holder's death does.
func lockFile(path string, wait bool) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	how := unix.LOCK_EX
	if !wait {
		how |= unix.LOCK_NB
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}
