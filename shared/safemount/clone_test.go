package safemount

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestClone: a read-only clone of a directory gives its files for reading
// only (not even root writes through it), nothing above it, and is
// attached nowhere; a clone of a file is that file.
func TestClone(t *testing.T) {
	needRoot(t)
	base := t.TempDir()
	dir := filepath.Join(base, "entry")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "code"), []byte("code"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "other"), []byte("other"), 0o644); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile("/proc/self/mountinfo")
	tree, err := Clone(dir, false, ReadOnly|NoSuid|NoDev)
	if err != nil {
		t.Fatal(err)
	}
	defer tree.Close()
	if after, _ := os.ReadFile("/proc/self/mountinfo"); string(after) != string(before) {
		t.Error("the clone is attached somewhere")
	}
	through := ProcPath(tree)
	if b, err := os.ReadFile(through + "/code"); err != nil || string(b) != "code" {
		t.Errorf("read through the clone: %q, %v", b, err)
	}
	for _, tc := range []struct {
		name string
		do   func() error
	}{
		{"write a file", func() error { return os.WriteFile(through+"/code", []byte("x"), 0o644) }},
		{"create a file", func() error { return os.WriteFile(through+"/new", []byte("x"), 0o644) }},
		{"remove a file", func() error { return os.Remove(through + "/code") }},
		{"chmod", func() error { return os.Chmod(through+"/code", 0o777) }},
	} {
		if err := tc.do(); !errors.Is(err, unix.EROFS) {
			t.Errorf("%s through a read-only clone: %v, want EROFS", tc.name, err)
		}
	}
	if _, err := os.ReadFile(through + "/../other"); err == nil {
		t.Error("the clone's parent is reachable")
	}
	file, err := Clone(filepath.Join(dir, "code"), false, ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	if b, err := os.ReadFile(ProcPath(file)); err != nil || string(b) != "code" {
		t.Errorf("read a file's clone: %q, %v", b, err)
	}
	if err := os.WriteFile(ProcPath(file), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write a file's read-only clone: %v, want EROFS", err)
	}
}
