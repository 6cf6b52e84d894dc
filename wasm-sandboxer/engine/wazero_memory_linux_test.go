package engine

import (
	"testing"
	"unsafe"
)

// The linear memory grows in place, zeroed, up to its maximum and no
// further.
func TestMmapMemory(t *testing.T) {
	const page = 65536
	lm := allocateMemory(page, 4*page)
	if _, ok := lm.(*mmapMemory); !ok {
		t.Fatalf("allocator gave %T, want *mmapMemory", lm)
	}
	defer lm.Free()
	b := lm.Reallocate(page)
	if len(b) != page {
		t.Fatalf("len %d", len(b))
	}
	b[0], b[page-1] = 1, 2
	b2 := lm.Reallocate(3 * page)
	if len(b2) != 3*page || unsafe.SliceData(b2) != unsafe.SliceData(b) {
		t.Fatalf("grown memory: len %d, moved %v", len(b2), unsafe.SliceData(b2) != unsafe.SliceData(b))
	}
	if b2[0] != 1 || b2[page-1] != 2 || b2[page] != 0 || b2[3*page-1] != 0 {
		t.Error("growing lost or left data")
	}
	b2[3*page-1] = 3
	if lm.Reallocate(5*page) != nil {
		t.Error("grew past the maximum")
	}
	if lm.Reallocate(4 * page)[3*page-1] != 3 {
		t.Error("growing to the maximum lost data")
	}
	// No maximum: a Go slice, as wazero's own.
	if lm := allocateMemory(0, 0); lm.Reallocate(0) == nil {
		t.Error("empty memory")
	}
}
