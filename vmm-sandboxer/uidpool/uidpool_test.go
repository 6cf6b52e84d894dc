package uidpool

import (
	"errors"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
)

// base is far from the IDs of this host's users and of other tests.
const base = 0x7a000000

func TestAllocate(t *testing.T) {
	for _, tc := range []struct {
		name string
		// run acts on a pool of 3 IDs from base and returns the IDs it got.
		run  func(t *testing.T, p *Pool) []uint32
		want []uint32
	}{
		{"unique until exhausted", func(t *testing.T, p *Pool) []uint32 {
			got := []uint32{alloc(t, p, "a"), alloc(t, p, "b"), alloc(t, p, "c")}
			if _, err := p.Allocate("d"); !errdefs.IsResourceExhausted(err) {
				t.Errorf("a fourth ID of three: %v, want ResourceExhausted", err)
			}
			return got
		}, []uint32{base, base + 1, base + 2}},
		{"a released ID is handed out again last", func(t *testing.T, p *Pool) []uint32 {
			a := alloc(t, p, "a")
			p.Release(a, "a")
			return []uint32{alloc(t, p, "b"), alloc(t, p, "c"), alloc(t, p, "d")}
		}, []uint32{base + 1, base + 2, base}},
		{"a stale release leaves the new owner's ID", func(t *testing.T, p *Pool) []uint32 {
			for _, o := range []string{"a", "b", "c"} {
				alloc(t, p, o)
			}
			p.Release(base, "a")
			got := alloc(t, p, "d") // the one free ID: a's
			p.Release(base, "a")    // a's release, again
			if id, err := p.Allocate("e"); err == nil {
				t.Errorf("%d given to e while d holds it", id)
			}
			return []uint32{got}
		}, []uint32{base}},
		{"reserved IDs are skipped", func(t *testing.T, p *Pool) []uint32 {
			if err := p.Reserve(base, "recovered"); err != nil {
				t.Fatal(err)
			}
			if err := p.Reserve(base, "recovered"); err != nil {
				t.Errorf("reserving an ID twice for its owner: %v", err)
			}
			if err := p.Reserve(base, "other"); !errdefs.IsAlreadyExists(err) {
				t.Errorf("reserving another owner's ID: %v, want AlreadyExists", err)
			}
			// An ID from before the range changed is held, not handed out.
			if err := p.Reserve(base+10, "old-range"); err != nil {
				t.Fatal(err)
			}
			return []uint32{alloc(t, p, "a"), alloc(t, p, "b")}
		}, []uint32{base + 1, base + 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.run(t, New(base, 3))
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}

// A process that runs as an ID of the range (a VM whose record was lost,
// another daemon's) keeps it.
func TestAllocateSkipsIDsProcessesRunAs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another user")
	}
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: base, Gid: base}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	p := New(base, 2)
	if got := alloc(t, p, "a"); got != base+1 {
		t.Errorf("got %d while a process runs as %d; want %d", got, base, base+1)
	}
	if id, err := p.Allocate("b"); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("got %d, %v; want ResourceExhausted", id, err)
	}
}

func TestStatusUIDs(t *testing.T) {
	got := statusUIDs([]byte("Name:\tqemu\nUmask:\t0022\nUid:\t1879048192\t1879048193\t7\t8\nGid:\t1\t1\t1\t1\n"))
	want := []uint32{1879048192, 1879048193, 7, 8}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func alloc(t *testing.T, p *Pool, owner string) uint32 {
	t.Helper()
	id, err := p.Allocate(owner)
	if err != nil {
		t.Fatal(err)
	}
	return id
}
