package unixsock

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListenIsRootOnlyAndRefusesALiveSocket(t *testing.T) {
	p := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen(p)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
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
}
