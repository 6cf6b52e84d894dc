package wasmrt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// proc is a module process: a child of the daemon that runs one module
// once Start writes to its control pipe.
type proc struct {
	id        string // exec ID; "" for the init
	pid       int
	startTime uint64 // task.StartTimer
	stdio     stdio.Stdio
	c         *container
	// restored: a process of an earlier daemon instance, not this one's
	// child: it counts as reaped once its exit is known.
	restored bool

	mu      sync.Mutex
	ctl     *os.File // write end of the control pipe until Start or Delete
	started bool
	exited  bool
	status  int
	at      time.Time
	waitCh  chan struct{} // closed by SetExited
	reaped  chan struct{} // closed once the daemon collected the child
}

var _ process.Process = (*proc)(nil)

func (p *proc) ID() string         { return p.id }
func (p *proc) StartTime() uint64  { return p.startTime }
func (p *proc) Pid() int           { return p.pid }
func (p *proc) Stdio() stdio.Stdio { return p.stdio }

// Stdin is the daemon's hold on the process's stdin: none, the process
// opens its FIFO itself.
func (p *proc) Stdin() io.Closer { return nopCloser{} }

type nopCloser struct{}

func (nopCloser) Close() error { return nil }

func (p *proc) ExitStatus() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status
}

func (p *proc) ExitedAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.at
}

func (p *proc) Status(ctx context.Context) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.exited:
		return "stopped", nil
	case p.c.isPaused():
		return "paused", nil
	case p.started:
		return "running", nil
	}
	return "created", nil
}

func (p *proc) Wait(ctx context.Context) error {
	select {
	case <-p.waitCh:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (p *proc) Resize(ws console.WinSize) error {
	return fmt.Errorf("wasm processes have no terminal: %w", errdefs.ErrNotImplemented)
}

// Start lets the module run.
func (p *proc) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited || p.isReaped() {
		return fmt.Errorf("process %s has exited: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	if p.started {
		return fmt.Errorf("process %s already started: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	if p.ctl == nil {
		// Its control pipe closed with an earlier daemon instance.
		return fmt.Errorf("process %s was created by an earlier instance of the daemon and can no longer start: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	_, err := p.ctl.Write([]byte{1})
	p.ctl.Close()
	p.ctl = nil
	if err != nil {
		return fmt.Errorf("start process %s: %w", p.name(), err)
	}
	p.started = true
	return nil
}

// Delete releases an exited process; an unstarted one is killed first.
func (p *proc) Delete(ctx context.Context) error {
	p.mu.Lock()
	if p.started && !p.exited && !p.isReaped() {
		p.mu.Unlock()
		return fmt.Errorf("process %s is running: %w", p.name(), errdefs.ErrFailedPrecondition)
	}
	if p.ctl != nil {
		p.ctl.Close()
		p.ctl = nil
	}
	p.mu.Unlock()
	// Unstarted: closing the control pipe ends it; make sure.
	if !p.isReaped() {
		unix.Kill(p.pid, unix.SIGKILL)
	}
	select {
	case <-p.reaped:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(10 * time.Second):
		return fmt.Errorf("process %s (pid %d) did not exit after SIGKILL", p.name(), p.pid)
	}
}

// Kill signals the process; all also signals the container's other
// processes (for the init).
func (p *proc) Kill(ctx context.Context, sig uint32, all bool) error {
	if all {
		p.c.signalAll(unix.Signal(sig))
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited || p.isReaped() {
		return fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
	}
	if err := unix.Kill(p.pid, unix.Signal(sig)); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
		}
		return fmt.Errorf("signal %d to process %s: %w", sig, p.name(), err)
	}
	return nil
}

// SetExited records the exit the task service matched to this process.
func (p *proc) SetExited(status int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return
	}
	p.exited, p.status, p.at = true, status, time.Now()
	if p.ctl != nil {
		p.ctl.Close()
		p.ctl = nil
	}
	close(p.waitCh)
	if p.restored {
		close(p.reaped)
	}
}

func (p *proc) isReaped() bool {
	select {
	case <-p.reaped:
		return true
	default:
		return false
	}
}

func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.exited && !p.isReaped()
}

func (p *proc) name() string {
	if p.id == "" {
		return p.c.id
	}
	return p.c.id + "/" + p.id
}
