package runner

import (
	"bufio"
	"bytes"
	"os"

	"golang.org/x/sys/unix"
)

// openProcSelf opens /proc/self (the container's), which
// releaseStartupPages reads smaps through.
func openProcSelf() *os.File {
	f, err := os.Open("/proc/self")
	if err != nil {
		return nil
	}
	return f
}

// releaseStartupPages unmaps, from this process's page tables only, the
// file pages that starting touched: the runner's text and read-only data,
// the shared libraries', the compiled module's code (wasmtime's .cwasm,
// wazero's shared code file). Every page fault maps a page and, with the
// kernel's fault-around, up to 15 neighbours, so that loading the module,
// instantiating it and the module's own initialisation leave about 19 MiB
// of file pages mapped with wasmtime (11 MiB of the runner binary) of
// which the running module uses a part; every container pays its share of
// those pages in PSS. MADV_DONTNEED on a read-only private file mapping
// only drops page table entries: the pages stay in the page cache (shared,
// reclaimable), and a later access maps them again from there. Mappings
// that are writable, or that hold copied-on-write pages (resident or
// swapped out), are left alone, so nothing the process wrote is lost;
// nothing in the process makes a file mapping writable later. Best
// effort: errors are ignored.
func releaseStartupPages(procSelf *os.File) {
	if procSelf == nil {
		return
	}
	fd, err := unix.Openat(int(procSelf.Fd()), "smaps", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	smaps := os.NewFile(uintptr(fd), "smaps")
	defer smaps.Close()
	// Parsed in place (no allocation per line): the second call runs
	// beside the module, with no collection after it.
	type region struct{ start, end uintptr }
	var drop [64]region
	n := 0
	var cur region
	have, curAnon := false, false
	flush := func() {
		if have && !curAnon && n < len(drop) {
			drop[n] = cur
			n++
		}
		have, curAnon = false, false
	}
	rd := bufio.NewReaderSize(smaps, 4096)
	for {
		line, err := rd.ReadSlice('\n')
		if len(line) > 0 {
			sp := bytes.IndexByte(line, ' ')
			switch {
			case sp > 0 && line[sp-1] == ':':
				// A field of the current mapping: copied-on-write pages,
				// resident (Anonymous) or swapped out (Swap), mean the
				// process wrote there.
				if have && (bytes.HasPrefix(line, []byte("Anonymous:")) || bytes.HasPrefix(line, []byte("Swap:"))) &&
					!bytes.Equal(bytes.TrimSpace(line[sp:]), []byte("0 kB")) {
					curAnon = true
				}
			case sp > 0:
				// start-end perms offset dev inode path: a private
				// mapping of a file, not writable.
				flush()
				rest := line[sp+1:]
				if len(rest) < 5 || rest[4] != ' ' || rest[1] == 'w' || rest[3] != 'p' || bytes.IndexByte(rest, '/') < 0 {
					break
				}
				lo, hi, ok := bytes.Cut(line[:sp], []byte("-"))
				start, ok1 := parseHex(lo)
				end, ok2 := parseHex(hi)
				if ok && ok1 && ok2 && end > start {
					cur, have = region{start, end}, true
				}
			}
		}
		if err != nil {
			break
		}
	}
	flush()
	for _, r := range drop[:n] {
		unix.Syscall(unix.SYS_MADVISE, r.start, r.end-r.start, unix.MADV_DONTNEED)
	}
}

func parseHex(b []byte) (uintptr, bool) {
	var v uintptr
	if len(b) == 0 || len(b) > 16 {
		return 0, false
	}
	for _, c := range b {
		switch {
		case '0' <= c && c <= '9':
			v = v<<4 | uintptr(c-'0')
		case 'a' <= c && c <= 'f':
			v = v<<4 | uintptr(c-'a'+10)
		default:
			return 0, false
		}
	}
	return v, true
}
