package engine

import (
	"context"

	"github.com/tetratelabs/wazero/experimental"
	"golang.org/x/sys/unix"
)

// wazero keeps a module's linear memory in a Go slice by default: every
// memory.grow past its capacity allocates a larger one and copies, and the
// old one stays resident as Go heap until collected and scavenged (for a
// Go program, which grows its memory several times at start, that is
// several MiB per container). mmapMemory reserves the memory's maximum
// once as address space (PROT_NONE, no commit charge) and opens it page by
// page as it grows: never copied, outside the Go heap, and only the pages
// the module touches are resident.

// withMemoryAllocator makes the instances created with ctx use mmapMemory.
func withMemoryAllocator(ctx context.Context) context.Context {
	return experimental.WithMemoryAllocator(ctx, experimental.MemoryAllocatorFunc(allocateMemory))
}

func allocateMemory(capBytes, maxBytes uint64) experimental.LinearMemory {
	if maxBytes > 0 {
		buf, err := unix.Mmap(-1, 0, int(maxBytes), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err == nil {
			return &mmapMemory{buf: buf}
		}
	}
	// No address space for the maximum (or an empty one): wazero's way.
	return &sliceMemory{buf: make([]byte, 0, capBytes)}
}

// mmapMemory is a reserved mapping of the maximum size, readable and
// writable up to open bytes.
type mmapMemory struct {
	buf  []byte
	open int
}

func (m *mmapMemory) Reallocate(size uint64) []byte {
	if size > uint64(len(m.buf)) {
		return nil
	}
	page := uint64(unix.Getpagesize())
	want := int((size + page - 1) / page * page)
	if want > len(m.buf) {
		want = len(m.buf)
	}
	if want > m.open {
		if err := unix.Mprotect(m.buf[m.open:want], unix.PROT_READ|unix.PROT_WRITE); err != nil {
			return nil
		}
		m.open = want
	}
	return m.buf[:size:size]
}

func (m *mmapMemory) Free() {
	if m.buf != nil {
		unix.Munmap(m.buf)
		m.buf, m.open = nil, 0
	}
}

// sliceMemory grows a Go slice, as wazero does without an allocator.
type sliceMemory struct{ buf []byte }

func (m *sliceMemory) Reallocate(size uint64) []byte {
	if n := uint64(len(m.buf)); size > n {
		m.buf = append(m.buf, make([]byte, size-n)...)
	}
	return m.buf[:size]
}

func (m *sliceMemory) Free() { m.buf = nil }
