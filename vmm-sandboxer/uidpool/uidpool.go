// Package uidpool hands out user IDs from a range, each to one owner at a
// time: a pod's VMM runs as a user of its own, so that a guest that breaks
// into one VMM cannot signal or trace another (an unprivileged process is
// open to every process of its user).
package uidpool

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/containerd/errdefs"
)

// Pool is the range [base, base+count) of user IDs.
type Pool struct {
	base, count uint32

	mu    sync.Mutex
	owner map[uint32]string
	// next is the offset the search for a free ID starts at: round robin,
	// so that an ID just released is the last to be handed out again.
	next uint32
}

// New returns the pool of the count IDs from base; base+count must not
// overflow.
func New(base, count uint32) *Pool {
	return &Pool{base: base, count: count, owner: map[uint32]string{}}
}

// Allocate gives owner an ID that no other owner holds and no process on
// the host runs as (real, effective, saved or file-system ID): a VMM whose
// record was lost, or another daemon's, keeps its ID.
func (p *Pool) Allocate(owner string) (uint32, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	busy, err := p.running()
	if err != nil {
		return 0, err
	}
	for i := range p.count {
		off := (p.next + i) % p.count
		id := p.base + off
		if _, held := p.owner[id]; held || busy[id] {
			continue
		}
		p.owner[id] = owner
		p.next = (off + 1) % p.count
		return id, nil
	}
	return 0, fmt.Errorf("all %d user IDs from %d are in use by VMs: %w", p.count, p.base, errdefs.ErrResourceExhausted)
}

// Reserve records that owner holds id, as a restarted daemon learns from a
// pod's record. An ID outside the range (the range was changed) is held
// all the same; one that another owner holds is an error.
func (p *Pool) Reserve(id uint32, owner string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if o, held := p.owner[id]; held && o != owner {
		return fmt.Errorf("user ID %d is already held by %s: %w", id, o, errdefs.ErrAlreadyExists)
	}
	p.owner[id] = owner
	return nil
}

// Release frees id if owner holds it; a stale release by an earlier
// owner leaves the current one's alone.
func (p *Pool) Release(id uint32, owner string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.owner[id] == owner {
		delete(p.owner, id)
	}
}

// running is the set of IDs of the range some process on the host runs as.
func (p *Pool) running() (map[uint32]bool, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	busy := map[uint32]bool{}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "status"))
		if err != nil {
			continue // gone meanwhile
		}
		for _, id := range statusUIDs(b) {
			if id-p.base < p.count {
				busy[id] = true
			}
		}
	}
	return busy, nil
}

// statusUIDs reads the four IDs of the "Uid:" line of /proc/<pid>/status.
func statusUIDs(status []byte) []uint32 {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) == 0 || string(f[0]) != "Uid:" {
			continue
		}
		var ids []uint32
		for _, s := range f[1:] {
			if v, err := strconv.ParseUint(string(s), 10, 32); err == nil {
				ids = append(ids, uint32(v))
			}
		}
		return ids
	}
	return nil
}
