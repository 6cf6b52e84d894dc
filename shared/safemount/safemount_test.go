package safemount

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
}

func openDir(t *testing.T, dir string) *os.File {
	t.Helper()
	d, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// tmpfs mounts a tmpfs at dir for the test.
func tmpfs(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

func TestBindOptions(t *testing.T) {
	for _, tc := range []struct {
		opts []string
		rec  bool
		attr Attr
	}{
		{nil, false, 0},
		{[]string{"rbind", "ro"}, true, ReadOnly},
		{[]string{"bind", "ro", "rw"}, false, 0},
		{[]string{"rbind", "ro", "nosuid", "nodev", "noexec"}, true, ReadOnly | NoSuid | NoDev | NoExec},
	} {
		rec, attr := BindOptions(tc.opts)
		if rec != tc.rec || attr != tc.attr {
			t.Errorf("BindOptions(%q) = %v, %#x; want %v, %#x", tc.opts, rec, attr, tc.rec, tc.attr)
		}
	}
}

// A planted symlink never becomes a way out: not for a target, not for a
// directory, not on the way to an unmount.
func TestSymlinksRefused(t *testing.T) {
	needRoot(t)
	outside := t.TempDir()
	dir := t.TempDir()
	for _, name := range []string{"file", "dir", "parent"} {
		if err := os.Symlink(outside, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(outside, "new"), filepath.Join(dir, "dangling")); err != nil {
		t.Fatal(err)
	}
	d := openDir(t, dir)
	for _, tc := range []struct {
		name string
		do   func() error
	}{
		{"file target", func() error { f, err := Target(d, "file", false); f.Close(); return err }},
		{"dangling file target", func() error { f, err := Target(d, "dangling", false); f.Close(); return err }},
		{"dir target", func() error { f, err := Target(d, "dir", true); f.Close(); return err }},
		{"open below", func() error { f, err := OpenBeneath(d, "parent/x", unix.O_PATH); f.Close(); return err }},
		{"dot dot", func() error { f, err := OpenBeneath(d, "../x", unix.O_PATH); f.Close(); return err }},
		{"absolute", func() error { f, err := OpenBeneath(d, "/etc", unix.O_PATH); f.Close(); return err }},
		{"name with slash", func() error { f, err := Target(d, "a/b", true); f.Close(); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.do(); err == nil {
				t.Fatal("no error")
			}
		})
	}
	// Unmount through a symlinked parent finds nothing to unmount: it
	// must not reach the mount outside.
	tmpfs(t, outside)
	if err := Unmount(d, "parent/x"); err == nil {
		t.Fatal("unmount below a symlink: no error")
	}
	if err := Unmount(d, "parent"); err != nil {
		t.Fatal(err)
	}
	if !isMountPoint(t, outside) {
		t.Fatal("the mount a symlink points to was unmounted")
	}
	if err := Remove(d, "parent"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(outside); err != nil {
		t.Fatalf("removing the symlink removed its target: %v", err)
	}
	entries, _ := os.ReadDir(outside)
	if len(entries) != 0 {
		t.Fatalf("something was created outside: %v", entries)
	}
}

func isMountPoint(t *testing.T, path string) bool {
	t.Helper()
	var a, b unix.Stat_t
	if err := unix.Stat(path, &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(filepath.Dir(path), &b); err != nil {
		t.Fatal(err)
	}
	return a.Dev != b.Dev
}

// A read-only bind is read-only at once, submounts included; a recursive
// one carries the submounts, a plain one does not.
func TestBindReadOnlyRecursive(t *testing.T) {
	needRoot(t)
	src := t.TempDir()
	tmpfs(t, src)
	if err := os.Mkdir(filepath.Join(src, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	tmpfs(t, filepath.Join(src, "sub"))
	for _, tc := range []struct {
		name      string
		recursive bool
	}{{"recursive", true}, {"plain", false}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			d := openDir(t, dir)
			target, err := Target(d, "vol", true)
			if err != nil {
				t.Fatal(err)
			}
			defer target.Close()
			if err := Bind(src, target, tc.recursive, ReadOnly|NoSuid|NoDev); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := Unmount(d, "vol"); err != nil {
					t.Error(err)
				}
				if isMountPoint(t, filepath.Join(dir, "vol")) {
					t.Error("still mounted after Unmount")
				}
			})
			for _, p := range []string{"vol/f", "vol/sub/f"} {
				// Without recursion, vol/sub is the plain directory of
				// the read-only copy: read-only too.
				err := os.WriteFile(filepath.Join(dir, p), []byte("x"), 0o644)
				if !errors.Is(err, unix.EROFS) {
					t.Errorf("write %s: %v, want EROFS", p, err)
				}
			}
			var st unix.Statfs_t
			if err := unix.Statfs(filepath.Join(dir, "vol", "sub"), &st); err != nil {
				t.Fatal(err)
			}
			carried := st.Type == unix.TMPFS_MAGIC && isMountPoint(t, filepath.Join(dir, "vol", "sub"))
			if carried != tc.recursive {
				t.Errorf("submount carried: %v, want %v", carried, tc.recursive)
			}
			if tc.recursive && st.Flags&unix.ST_RDONLY == 0 {
				t.Error("submount of a recursive read-only bind is writable")
			}
			// The source stays writable.
			if err := os.WriteFile(filepath.Join(src, "sub", "ok"), []byte("x"), 0o644); err != nil {
				t.Error(err)
			}
		})
	}
}

// A file target is made as a regular file and taken again as one; a file
// of another kind there is refused without opening it.
func TestTargetFile(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	d := openDir(t, dir)
	for i := 0; i < 2; i++ {
		f, err := Target(d, "f", false)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := Target(d, "fifo", false); err == nil {
		f.Close()
		t.Fatal("a FIFO was taken as a file target")
	}
	src := filepath.Join(t.TempDir(), "src")
	if err := os.WriteFile(src, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := Target(d, "f", false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Bind(src, f, false, ReadOnly); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Unmount(d, "f") })
	b, err := os.ReadFile(filepath.Join(dir, "f"))
	if err != nil || string(b) != "hello" {
		t.Fatalf("read the bound file: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
		t.Fatalf("write the read-only bound file: %v", err)
	}
}
