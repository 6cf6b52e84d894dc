package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/console"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/proc"
)

// Process states, as containerd's runc shim names them.
const (
	stateCreated = "created"
	stateRunning = "running"
	statePaused  = "paused"
	statePausing = "pausing"
	stateStopped = "stopped"
	stateDeleted = "deleted"
)

// consoleTimeout bounds opening the FIFOs a console is copied to, and the
// wait for that copy to drain on Delete, as the shim does.
const consoleTimeout = 10 * time.Second

// procIO is what the daemon holds of a process's IO: only in terminal
// mode (the console and its copy; the stdin FIFO's write end for CloseIO).
// A process restored from a record has none.
type procIO struct {
	console console.Console
	stdin   io.Closer
	wg      sync.WaitGroup
	// noConsole marks a terminal process whose console was lost with the
	// daemon that made it.
	noConsole bool
}

// exitState is the part of a process's state both kinds share.
type exitState struct {
	state     string
	status    int
	exited    time.Time
	waitBlock chan struct{}
}

func newExitState(state string) exitState {
	return exitState{state: state, waitBlock: make(chan struct{})}
}

// setExited records the exit and releases Wait; the caller holds the
// process lock and has checked the state allows it.
func (s *exitState) setExited(status int, at time.Time) {
	s.status = status
	s.exited = at
	s.state = stateStopped
	close(s.waitBlock)
}

func wait(ctx context.Context, block <-chan struct{}) error {
	select {
	case <-block:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Init is a container's init process: the container itself to runc.
type Init struct {
	c *Container

	mu sync.Mutex
	exitState
	pausing   atomic.Bool
	pid       int
	startTime uint64
	stdio     stdio.Stdio
	io        procIO
	// prep is what the hook prepared, until Start or Delete; nil without a
	// hook or after a daemon restart.
	prep *Prepared
}

// Exec is a process exec'd into a container.
type Exec struct {
	c  *Container
	id string

	mu sync.Mutex
	exitState
	// pid is read without mu: the service asks while Start runs.
	pid       atomic.Int64
	startTime atomic.Uint64
	spec      specs.Process
	stdio     stdio.Stdio
	io        procIO
}

func (p *Init) ID() string                     { return p.c.id }
func (p *Init) Pid() int                       { return p.pid }
func (p *Init) StartTime() uint64              { return p.startTime }
func (p *Init) Stdio() stdio.Stdio             { return p.stdio }
func (p *Init) Wait(ctx context.Context) error { return wait(ctx, p.waitBlock) }

func (p *Init) ExitStatus() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status
}

func (p *Init) ExitedAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exited
}

// Stdin is the stdin FIFO's write end the daemon keeps in terminal mode
// (CloseIO closes it); nil otherwise.
func (p *Init) Stdin() io.Closer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.io.stdin
}

// Status reports the init's state as the shim tracks it: created, running,
// pausing, paused or stopped (a deleted init reports stopped).
func (p *Init) Status(ctx context.Context) (string, error) {
	if p.pausing.Load() {
		return statePausing, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == stateDeleted {
		return stateStopped, nil
	}
	return p.state, nil
}

func (p *Init) currentState() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}

// Start runs `runc start`.
func (p *Init) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state != stateCreated {
		return fmt.Errorf("cannot start a %s process: %w", p.state, errdefs.ErrFailedPrecondition)
	}
	if err := p.c.runc.Start(ctx, p.c.id); err != nil {
		return p.c.runtimeError(err, "OCI runtime start failed")
	}
	p.state = stateRunning
	prep := p.prep
	p.prep = nil
	if err := prep.ready(ctx); err != nil {
		// It runs but cannot do its job: it must not go on.
		if kerr := p.c.kill(context.WithoutCancel(ctx), uint32(unix.SIGKILL), false); kerr != nil && !errors.Is(kerr, errdefs.ErrNotFound) {
			p.c.rt.log.Warn("kill a container that did not get ready", zap.String("container", p.c.id), zap.Error(kerr))
		}
		return err
	}
	return nil
}

// SetExited records the init's exit status and releases Wait.
func (p *Init) SetExited(status int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch p.state {
	case stateCreated, stateRunning, statePaused:
	default:
		return
	}
	paused := p.state == statePaused
	p.setExited(status, time.Now())
	p.c.rt.shutdownConsole(&p.io)
	if paused {
		// As the shim: what else runs of the container must not stay frozen.
		if err := p.c.runc.Resume(context.Background(), p.c.id); err != nil {
			p.c.rt.log.Warn("resume exited container", zap.String("container", p.c.id), zap.Error(err))
		}
	}
}

// Delete removes the container from runc, unmounts its rootfs and removes
// its pid files. A created or stopped init may be deleted; a failed
// Delete can be retried.
func (p *Init) Delete(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch p.state {
	case stateCreated, stateStopped:
	case stateDeleted:
		return fmt.Errorf("cannot delete a deleted process: %w", errdefs.ErrNotFound)
	default:
		return fmt.Errorf("cannot delete a %s process: %w", p.state, errdefs.ErrFailedPrecondition)
	}
	if err := p.c.destroy(context.WithoutCancel(ctx), false); err != nil {
		return err
	}
	p.prep.release()
	p.prep = nil
	if p.state == stateCreated {
		// runc delete killed it; its exit, if delivered at all, comes after
		// the delete, too late for Wait.
		p.setExited(int(unix.SIGKILL)+128, time.Now())
		p.c.rt.shutdownConsole(&p.io)
	}
	if err := waitTimeout(&p.io.wg, consoleTimeout); err != nil {
		p.c.rt.log.Warn("console copy did not drain", zap.String("container", p.c.id), zap.Error(err))
	}
	p.c.rt.closeIO(&p.io)
	p.state = stateDeleted
	return nil
}

// Kill signals the init (every process of the container with all) through
// `runc kill`.
func (p *Init) Kill(ctx context.Context, sig uint32, all bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state == stateDeleted {
		return fmt.Errorf("cannot kill a deleted process: %w", errdefs.ErrNotFound)
	}
	return p.c.kill(ctx, sig, all)
}

// Resize resizes the init's console.
func (p *Init) Resize(ws console.WinSize) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return resize(&p.io, ws)
}

func (p *Init) pause(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state != stateRunning {
		return fmt.Errorf("cannot pause a %s container: %w", p.state, errdefs.ErrFailedPrecondition)
	}
	p.pausing.Store(true)
	defer p.pausing.Store(false)
	if err := p.c.runc.Pause(ctx, p.c.id); err != nil {
		return p.c.runtimeError(err, "OCI runtime pause failed")
	}
	p.state = statePaused
	return nil
}

func (p *Init) resume(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state != statePaused {
		return fmt.Errorf("cannot resume a %s container: %w", p.state, errdefs.ErrFailedPrecondition)
	}
	if err := p.c.runc.Resume(ctx, p.c.id); err != nil {
		return p.c.runtimeError(err, "OCI runtime resume failed")
	}
	p.state = stateRunning
	return nil
}

func (p *Init) update(ctx context.Context, resources *specs.LinuxResources) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch p.state {
	case stateCreated, stateRunning, statePaused:
	default:
		return fmt.Errorf("cannot update a %s container: %w", p.state, errdefs.ErrFailedPrecondition)
	}
	if err := p.c.runc.Update(ctx, p.c.id, resources); err != nil {
		return p.c.runtimeError(err, "OCI runtime update failed")
	}
	return nil
}

func (e *Exec) ID() string                     { return e.id }
func (e *Exec) Pid() int                       { return int(e.pid.Load()) }
func (e *Exec) StartTime() uint64              { return e.startTime.Load() }
func (e *Exec) Stdio() stdio.Stdio             { return e.stdio }
func (e *Exec) Wait(ctx context.Context) error { return wait(ctx, e.waitBlock) }

func (e *Exec) ExitStatus() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.status
}

func (e *Exec) ExitedAt() time.Time {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.exited
}

// Stdin is the stdin FIFO's write end the daemon keeps in terminal mode.
func (e *Exec) Stdin() io.Closer {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.io.stdin
}

// Status is the container's when it is paused or pausing, else the exec's.
func (e *Exec) Status(ctx context.Context) (string, error) {
	s, err := e.c.init.Status(ctx)
	if err != nil {
		return "", err
	}
	if s == statePaused || s == statePausing {
		return s, nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state == stateDeleted {
		return stateStopped, nil
	}
	return e.state, nil
}

// Start runs `runc exec --detach` with the process's own stdio.
func (e *Exec) Start(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state != stateCreated {
		return fmt.Errorf("cannot start a %s process: %w", e.state, errdefs.ErrFailedPrecondition)
	}
	if err := e.start(ctx); err != nil {
		// Nothing runs: let Wait return and Delete clean up, as for a
		// process that ended at once.
		e.c.rt.closeIO(&e.io)
		e.setExited(255, time.Now())
		return err
	}
	e.state = stateRunning
	return nil
}

func (e *Exec) start(ctx context.Context) error {
	pidFile := e.c.execPidFile(e.id)
	opts := &runc.ExecOpts{PidFile: pidFile, Detach: true}
	spec := e.spec
	var prep *Prepared
	if e.c.rt.hook != nil {
		var err error
		if spec, prep, err = e.c.rt.prepareExec(ctx, e.c.bundle, spec); err != nil {
			return err
		}
		defer prep.release()
		opts.ExtraArgs = preserveFds(prep.Files)
	}
	pio, socket, err := e.c.rt.prepareIO(e.stdio, e.c.ioUID, e.c.ioGID)
	if err != nil {
		return fmt.Errorf("exec %s io: %w", e.id, err)
	}
	if pio != nil {
		defer pio.Close()
		opts.IO = pio
	}
	if socket != nil {
		defer socket.Close()
		opts.ConsoleSocket = socket
	}
	if prep != nil {
		opts.IO = withFiles{IO: opts.IO, files: prep.Files}
	}
	err = e.c.runc.Exec(ctx, e.c.id, spec, opts)
	prep.closeFiles() // the process has them, or runc failed
	if err != nil {
		return e.c.runtimeError(err, "OCI runtime exec failed")
	}
	if pio != nil {
		// The process has its stdio: drop the daemon's copies now.
		pio.Close()
	}
	pid, err := runc.ReadPidFile(pidFile)
	if err != nil {
		return fmt.Errorf("read exec %s pid: %w", e.id, err)
	}
	e.pid.Store(int64(pid))
	// A process that has already ended has no start time; Kill then
	// treats it as gone, which it is.
	st, _ := proc.StartTime(pid)
	e.startTime.Store(st)
	if socket != nil {
		if err := e.c.rt.startConsole(ctx, e.id, socket, e.stdio, &e.io); err != nil {
			// Its terminal's other end is gone: do not leave it running.
			_ = proc.Signal(pid, st, unix.SIGKILL)
			return err
		}
	}
	if err := prep.ready(ctx); err != nil {
		// It runs but cannot do its job: it must not go on.
		_ = proc.Signal(pid, st, unix.SIGKILL)
		return err
	}
	return nil
}

// SetExited records the exec's exit status and releases Wait.
func (e *Exec) SetExited(status int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch e.state {
	case stateCreated, stateRunning:
	default:
		return
	}
	e.setExited(status, time.Now())
	e.c.rt.shutdownConsole(&e.io)
}

// Delete releases what the daemon holds of an exec that is not running.
func (e *Exec) Delete(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch e.state {
	case stateCreated, stateStopped:
	case stateDeleted:
		return fmt.Errorf("cannot delete a deleted process: %w", errdefs.ErrNotFound)
	default:
		return fmt.Errorf("cannot delete a %s process: %w", e.state, errdefs.ErrFailedPrecondition)
	}
	if err := waitTimeout(&e.io.wg, consoleTimeout); err != nil {
		e.c.rt.log.Warn("exec console copy did not drain", zap.String("exec", e.id), zap.Error(err))
	}
	e.c.rt.closeIO(&e.io)
	if err := os.Remove(e.c.execPidFile(e.id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove exec pid file: %w", err)
	}
	if e.state == stateCreated {
		close(e.waitBlock)
	}
	e.state = stateDeleted
	return nil
}

// Kill signals the exec if it is still the process that was started (same
// PID and start time).
func (e *Exec) Kill(ctx context.Context, sig uint32, _ bool) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch {
	case e.state == stateDeleted:
		return fmt.Errorf("cannot kill a deleted process: %w", errdefs.ErrNotFound)
	case e.Pid() == 0:
		return fmt.Errorf("process not created: %w", errdefs.ErrFailedPrecondition)
	case e.state == stateStopped:
		return fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
	}
	return proc.Signal(e.Pid(), e.StartTime(), syscall.Signal(sig))
}

// Resize resizes the exec's console.
func (e *Exec) Resize(ws console.WinSize) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state == stateStopped || e.state == stateDeleted {
		return fmt.Errorf("cannot resize a %s process: %w", e.state, errdefs.ErrFailedPrecondition)
	}
	return resize(&e.io, ws)
}

func resize(pio *procIO, ws console.WinSize) error {
	if pio.noConsole {
		return fmt.Errorf("the console was lost with the daemon that made it: %w", errdefs.ErrFailedPrecondition)
	}
	if pio.console == nil {
		return nil
	}
	return pio.console.Resize(ws)
}

// kill runs `runc kill`, mapping a process or container that is gone to
// NotFound as the shim does.
func (c *Container) kill(ctx context.Context, sig uint32, all bool) error {
	err := c.runc.Kill(ctx, c.id, int(sig), &runc.KillOpts{All: all})
	if err == nil {
		return nil
	}
	msg := strings.ToLower(err.Error())
	if rMsg, _ := lastRuntimeError(c.runc.Log); rMsg != "" {
		msg += " " + strings.ToLower(rMsg)
	}
	switch {
	case strings.Contains(msg, "process already finished"),
		strings.Contains(msg, "container not running"),
		strings.Contains(msg, "no such process"):
		return fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
	case strings.Contains(msg, "does not exist"):
		return fmt.Errorf("no such container: %w", errdefs.ErrNotFound)
	}
	return c.runtimeError(err, "OCI runtime kill failed")
}

func waitTimeout(wg *sync.WaitGroup, timeout time.Duration) error {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("timed out after %s: %w", timeout, context.DeadlineExceeded)
	}
}

// openStdinWriter opens the write end of a terminal process's stdin FIFO,
// as the shim does, so that CloseIO can close it.
func openStdinWriter(path string) (io.Closer, error) {
	f, err := fifo.OpenFifo(context.Background(), path, unix.O_WRONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open stdin fifo %s: %w", path, err)
	}
	return f, nil
}

// execPidFile is where runc writes an exec's pid.
func (c *Container) execPidFile(execID string) string {
	return filepath.Join(c.bundle, execID+".pid")
}

// unmountRootfs unmounts what Create mounted on <bundle>/rootfs.
func (c *Container) unmountRootfs() error {
	if !c.rootfsMounted {
		return nil
	}
	if err := mount.UnmountRecursive(filepath.Join(c.bundle, "rootfs"), 0); err != nil {
		return fmt.Errorf("unmount rootfs: %w", err)
	}
	return nil
}
