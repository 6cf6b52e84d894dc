package unixsock

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

func TestListenIsRootOnlyAndRefusesALiveSocket(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := Listen(p); err == nil {
		t.Error("a second listener took over a served socket")
	}
	if _, err := Listen("/tmp/" + strings.Repeat("x", 120)); err == nil {
		t.Error("an over-long socket path was accepted")
	}
	l.Close()
	if _, err := os.Lstat(p); !os.IsNotExist(err) {
		t.Errorf("socket file after Close: %v, want it removed", err)
	}
}

// TestListenLeavesTheUmask checks that files other goroutines create while
// Listen runs get their usual mode: the umask is process-wide, so Listen
// must not narrow it even for a moment.
func TestListenLeavesTheUmask(t *testing.T) {
	dir := t.TempDir()
	umask := syscall.Umask(0o022)
	syscall.Umask(umask)
	want := os.FileMode(0o666) &^ os.FileMode(umask)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wrong := make(chan os.FileMode, 4)
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := filepath.Join(dir, fmt.Sprintf("file%d", i))
			for {
				select {
				case <-stop:
					return
				default:
				}
				f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o666)
				if err != nil {
					t.Error(err)
					return
				}
				fi, err := f.Stat()
				f.Close()
				os.Remove(p)
				if err != nil {
					t.Error(err)
					return
				}
				if fi.Mode().Perm() != want {
					wrong <- fi.Mode().Perm()
					return
				}
			}
		}()
	}

	sock := filepath.Join(dir, "s.sock")
	for range 1000 {
		l, err := Listen(sock)
		if err != nil {
			t.Fatal(err)
		}
		l.Close()
		if len(wrong) > 0 {
			break
		}
	}
	close(stop)
	wg.Wait()
	if len(wrong) > 0 {
		t.Errorf("a file created while Listen ran got mode %v, want %v", <-wrong, want)
	}
}
