package task

import (
	"context"
	"fmt"
	"sync"

	"github.com/containerd/console"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/errdefs"
)

// Execs is the table of a container's exec'd processes with the IDs
// reserved while one is being made, for Container implementations other
// than the runc one (which has its own) to embed. P is the family's
// process type. The zero value is ready to use.
type Execs[P process.Process] struct {
	mu       sync.Mutex
	procs    map[string]P
	reserved map[string]bool
}

// Lookup returns the exec'd process execID, or NotFound.
func (t *Execs[P]) Lookup(execID string) (P, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	p, ok := t.procs[execID]
	if !ok {
		var zero P
		return zero, fmt.Errorf("exec %s: %w", execID, errdefs.ErrNotFound)
	}
	return p, nil
}

// Process returns init for the empty exec ID, else the exec'd process.
func (t *Execs[P]) Process(init process.Process, execID string) (process.Process, error) {
	if execID == "" {
		return init, nil
	}
	return t.Lookup(execID)
}

// StartProcess starts the init or exec'd process that r names.
func (t *Execs[P]) StartProcess(ctx context.Context, init process.Process, r *taskAPI.StartRequest) (process.Process, error) {
	p, err := t.Process(init, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.Start(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// DeleteProcess deletes the init or exec'd process that r names; an
// exec'd one leaves the table.
func (t *Execs[P]) DeleteProcess(ctx context.Context, init process.Process, r *taskAPI.DeleteRequest) (process.Process, error) {
	p, err := t.Process(init, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.Delete(ctx); err != nil {
		return nil, err
	}
	if r.ExecID != "" {
		t.Remove(r.ExecID)
	}
	return p, nil
}

// KillProcess signals the init or exec'd process that r names.
func (t *Execs[P]) KillProcess(ctx context.Context, init process.Process, r *taskAPI.KillRequest) error {
	p, err := t.Process(init, r.ExecID)
	if err != nil {
		return err
	}
	return p.Kill(ctx, r.Signal, r.All)
}

// ResizeProcess resizes the terminal of the init or exec'd process that r
// names.
func (t *Execs[P]) ResizeProcess(init process.Process, r *taskAPI.ResizePtyRequest) error {
	p, err := t.Process(init, r.ExecID)
	if err != nil {
		return err
	}
	return p.Resize(console.WinSize{Width: uint16(r.Width), Height: uint16(r.Height)})
}

// List returns the exec'd processes.
func (t *Execs[P]) List() []P {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]P, 0, len(t.procs))
	for _, p := range t.procs {
		out = append(out, p)
	}
	return out
}

// ExecdProcesses implements Container.
func (t *Execs[P]) ExecdProcesses() []process.Process {
	ps := t.List()
	out := make([]process.Process, len(ps))
	for i, p := range ps {
		out[i] = p
	}
	return out
}

// ReserveProcess implements Container: it claims execID unless a process
// has it or another Exec is making one; cancel releases the claim.
func (t *Execs[P]) ReserveProcess(execID string) (bool, func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.procs[execID]; ok || t.reserved[execID] {
		return false, func() {}
	}
	if t.reserved == nil {
		t.reserved = map[string]bool{}
	}
	t.reserved[execID] = true
	return true, func() {
		t.mu.Lock()
		delete(t.reserved, execID)
		t.mu.Unlock()
	}
}

// Add records p under its reserved execID.
func (t *Execs[P]) Add(execID string, p P) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.procs == nil {
		t.procs = map[string]P{}
	}
	t.procs[execID] = p
	delete(t.reserved, execID)
}

// Remove forgets execID.
func (t *Execs[P]) Remove(execID string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.procs, execID)
	delete(t.reserved, execID)
}
