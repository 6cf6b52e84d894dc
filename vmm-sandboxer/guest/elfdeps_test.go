package guest

import (
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBinaryFilesRunc resolves Debian's runc: itself, the loader it names
// and libc and libseccomp, every library an ELF file at its soname.
func TestBinaryFilesRunc(t *testing.T) {
	if _, err := os.Stat(DefaultRunc); err != nil {
		t.Skipf("%s not installed (Debian package runc)", DefaultRunc)
	}
	files, err := BinaryFiles(DefaultRunc, nil)
	if err != nil {
		t.Fatal(err)
	}
	if files["usr/sbin/runc"] != DefaultRunc {
		t.Errorf("runc itself missing: %v", files)
	}
	want := map[string]bool{"lib64/ld-linux-x86-64.so.2": false, "libc.so.6": false, "libseccomp.so.2": false}
	for g, h := range files {
		for w := range want {
			if g == w || filepath.Base(g) == w {
				want[w] = true
			}
		}
		if _, err := elf.Open(h); err != nil {
			t.Errorf("%s (%s) is not an ELF file: %v", g, h, err)
		}
		if strings.HasPrefix(g, "/") {
			t.Errorf("image path %q is absolute", g)
		}
	}
	for w, ok := range want {
		if !ok {
			t.Errorf("%s not resolved: %v", w, files)
		}
	}
	again, _ := BinaryFiles(DefaultRunc, nil)
	if len(again) != len(files) {
		t.Errorf("two resolutions differ: %v vs %v", files, again)
	}
}

func TestBinaryFilesStaticAndMissing(t *testing.T) {
	if _, err := os.Stat("/bin/busybox"); err == nil {
		files, err := BinaryFiles("/bin/busybox", nil)
		if err != nil || len(files) != 1 || files["bin/busybox"] != "/bin/busybox" {
			t.Errorf("static busybox: %v, %v; want itself only", files, err)
		}
	}
	if _, err := os.Stat(DefaultRunc); err == nil {
		// A library directory list without libc: the error names it.
		_, err := BinaryFiles(DefaultRunc, []string{t.TempDir()})
		if err == nil || !strings.Contains(err.Error(), "needs lib") {
			t.Errorf("missing library: %v", err)
		}
	}
	if _, err := BinaryFiles(filepath.Join(t.TempDir(), "nope"), nil); err == nil {
		t.Error("a missing binary resolved")
	}
}
