package engine

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Sharing wazero's machine code between processes. wazero copies a
// module's compiled code, from its cache or its compiler, into anonymous
// executable memory: private to each process, about four times the size of
// the module (10 MiB for a 2.7 MB Go program), in every container. After
// a compile, the code is written once to a page-aligned file of its own;
// a process that loads the module again replaces its anonymous copy by a
// private read-only mapping of that file holding the very same bytes
// (compared first), so the pages are the page cache's, shared by every
// container running the module, and only the pages the module executes
// are resident. wasmtime does the same with its own cache files.

// minSharedCode is the smallest code region worth a file.
const minSharedCode = 64 << 10

// codeRegion is an anonymous executable mapping of this process.
type codeRegion struct{ start, end uintptr }

func (r codeRegion) size() int { return int(r.end - r.start) }

// codeRegions lists the process's anonymous read-execute mappings.
func codeRegions() map[codeRegion]bool {
	out := map[codeRegion]bool{}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// start-end perms offset dev inode [path]
		fields := strings.Fields(sc.Text())
		if len(fields) != 5 || fields[1] != "r-xp" || fields[4] != "0" {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		out[codeRegion{uintptr(start), uintptr(end)}] = true
	}
	return out
}

// shareCode handles the code regions that appeared since before: each is
// mapped from dir/<size>.code (dir is the module's cache entry's) when that
// file holds the same bytes, else written there for the next process. Any
// failure leaves the region as it is (private memory): sharing is an
// optimisation only.
func shareCode(dir string, before map[codeRegion]bool) {
	if before == nil {
		return
	}
	var fresh []codeRegion
	for r := range codeRegions() {
		if !before[r] && r.size() >= minSharedCode {
			fresh = append(fresh, r)
		}
	}
	if len(fresh) == 0 {
		return
	}
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		return
	}
	defer mem.Close()
	for _, r := range fresh {
		path := filepath.Join(dir, fmt.Sprintf("%d.code", r.size()))
		region := io.NewSectionReader(mem, int64(r.start), int64(r.size()))
		if _, err := os.Stat(path); err != nil {
			writeCode(path, region)
			continue
		}
		_ = mapCode(path, r, region)
	}
}

// writeCode stores a region's bytes at path, atomically.
func writeCode(path string, region io.Reader) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return
	}
	defer os.Remove(f.Name())
	_, err = io.Copy(f, region)
	if cerr := f.Close(); err != nil || cerr != nil {
		return
	}
	os.Rename(f.Name(), path)
}

// mapCode replaces region r by a private read-execute mapping of path if
// the file holds exactly the region's bytes. Nothing runs that code yet
// (the module is compiled, not started), and the bytes are the same: the
// replacement, atomic (MAP_FIXED), is invisible to the engine.
func mapCode(path string, r codeRegion, region io.Reader) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || fi.Size() != int64(r.size()) {
		return fmt.Errorf("%s: not the region's size", path)
	}
	if same, err := sameContent(f, region); err != nil || !same {
		return fmt.Errorf("%s: not the region's bytes", path)
	}
	_, _, errno := unix.Syscall6(unix.SYS_MMAP, r.start, uintptr(r.size()),
		unix.PROT_READ|unix.PROT_EXEC, unix.MAP_PRIVATE|unix.MAP_FIXED, f.Fd(), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// sameContent compares two readers to their ends, a chunk at a time.
func sameContent(a, b io.Reader) (bool, error) {
	const chunk = 64 << 10
	ba, bb := make([]byte, chunk), make([]byte, chunk)
	for {
		na, erra := io.ReadFull(a, ba)
		nb, errb := io.ReadFull(b, bb)
		if na != nb || !bytes.Equal(ba[:na], bb[:nb]) {
			return false, nil
		}
		aEnd := erra == io.EOF || erra == io.ErrUnexpectedEOF
		bEnd := errb == io.EOF || errb == io.ErrUnexpectedEOF
		if aEnd || bEnd {
			return aEnd && bEnd, nil
		}
		if erra != nil {
			return false, erra
		}
		if errb != nil {
			return false, errb
		}
	}
}
