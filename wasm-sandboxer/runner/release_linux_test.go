package runner

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rssOf returns the Rss (KiB) of this process's mapping that starts at addr.
func rssOf(t *testing.T, addr uintptr) int {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	prefix := fmt.Sprintf("%x-", addr)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, prefix) {
			in = true
			continue
		}
		if in && strings.HasPrefix(l, "Rss:") {
			n, _ := strconv.Atoi(strings.Fields(l)[1])
			return n
		}
	}
	t.Fatalf("no mapping at %x", addr)
	return 0
}

func TestReleaseStartupPages(t *testing.T) {
	data := bytes.Repeat([]byte("kuasar-wasm-runner "), 64<<10) // ~1.2 MiB
	path := filepath.Join(t.TempDir(), "code")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ro, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(ro)
	// A writable private mapping of the same file, written to: its
	// copied-on-write page must survive.
	rw, err := unix.Mmap(int(f.Fd()), 0, len(data), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(rw)
	copy(rw, "written")
	if !bytes.Equal(ro, data) { // touches every page
		t.Fatal("mapping differs from the file")
	}
	roAddr := uintptr(unsafe.Pointer(&ro[0]))
	if rss := rssOf(t, roAddr); rss < 1024 {
		t.Fatalf("read-only mapping: Rss %d KiB before release, want >= 1024", rss)
	}

	procSelf := openProcSelf()
	if procSelf == nil {
		t.Fatal("cannot open /proc/self")
	}
	defer procSelf.Close()
	releaseStartupPages(procSelf)

	if rss := rssOf(t, roAddr); rss != 0 {
		t.Errorf("read-only mapping: Rss %d KiB after release, want 0", rss)
	}
	if !bytes.Equal(ro, data) {
		t.Error("read-only mapping differs from the file after release")
	}
	if string(rw[:7]) != "written" || !bytes.Equal(rw[7:], data[7:]) {
		t.Error("writable mapping lost what was written")
	}
}
