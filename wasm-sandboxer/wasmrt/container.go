package wasmrt

import (
	"context"
	"fmt"
	"sync"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/task"
)

// container is a wasm container: its rootfs, its cgroup below the pod's,
// its init module process and the modules exec'd into it.
type container struct {
	id, bundle string
	rt         *Runtime
	spec       *specs.Spec
	engine     string
	rootfs     string
	mounted    bool
	cg         *cgroup // nil without cgroups path
	init       *proc

	task.Execs[*proc]

	mu     sync.Mutex
	paused bool
}

var _ task.Container = (*container)(nil)

func (c *container) ID() string     { return c.id }
func (c *container) Bundle() string { return c.bundle }
func (c *container) Pid() int       { return c.init.pid }

func (c *container) Cgroup() any {
	if c.cg == nil {
		return nil
	}
	return c.cg.object()
}

func (c *container) isPaused() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.paused
}

func (c *container) Process(execID string) (process.Process, error) {
	p, err := c.Execs.Process(c.init, execID)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", c.id, err)
	}
	return p, nil
}

func (c *container) Start(ctx context.Context, r *taskAPI.StartRequest) (process.Process, error) {
	return c.StartProcess(ctx, c.init, r)
}

// Delete deletes an exec'd process, or the init and with it the container:
// its rootfs is unmounted and its cgroup removed.
func (c *container) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (process.Process, error) {
	p, err := c.DeleteProcess(ctx, c.init, r)
	if err != nil || r.ExecID != "" {
		return p, err
	}
	for _, e := range c.ExecdProcesses() {
		if err := e.Delete(ctx); err != nil {
			c.rt.log.Warn("delete exec'd process", zap.String("container", c.id), zap.String("exec", e.ID()), zap.Error(err))
		}
	}
	if err := c.release(); err != nil {
		return nil, err
	}
	return p, nil
}

// release undoes Create's work on the host: the cgroup and the rootfs.
func (c *container) release() error {
	if c.cg != nil {
		if c.isPaused() {
			c.cg.thaw()
		}
		if err := c.cg.delete(); err != nil {
			return err
		}
	}
	if c.mounted {
		if err := mount.UnmountRecursive(c.rootfs, 0); err != nil {
			return fmt.Errorf("unmount rootfs of %s: %w", c.id, err)
		}
		c.mounted = false
	}
	return nil
}

// Exec prepares another module process in the container, not yet started.
func (c *container) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (process.Process, error) {
	if r.Terminal {
		return nil, fmt.Errorf("exec %s: %w", r.ExecID, errTerminal)
	}
	v, err := typeurl.UnmarshalAny(r.Spec)
	if err != nil {
		return nil, fmt.Errorf("exec %s: process spec: %v: %w", r.ExecID, err, errdefs.ErrInvalidArgument)
	}
	ps, ok := v.(*specs.Process)
	if !ok {
		return nil, fmt.Errorf("exec %s: process spec of type %T: %w", r.ExecID, v, errdefs.ErrInvalidArgument)
	}
	if ps.Terminal {
		return nil, fmt.Errorf("exec %s: %w", r.ExecID, errTerminal)
	}
	p, err := c.rt.startProcess(ctx, c, r.ExecID, ps, r.Stdin, r.Stdout, r.Stderr)
	if err != nil {
		return nil, err
	}
	c.Add(r.ExecID, p)
	return p, nil
}

func (c *container) Kill(ctx context.Context, r *taskAPI.KillRequest) error {
	return c.KillProcess(ctx, c.init, r)
}

// signalAll signals every running process of the container.
func (c *container) signalAll(sig unix.Signal) {
	for _, p := range append(c.List(), c.init) {
		if p.running() {
			unix.Kill(p.pid, sig)
		}
	}
}

func (c *container) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) error {
	return fmt.Errorf("wasm processes have no terminal: %w", errdefs.ErrNotImplemented)
}

// CloseIO has nothing to close: each process holds its own stdin FIFO,
// which ends when containerd closes its side.
func (c *container) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) error {
	_, err := c.Process(r.ExecID)
	return err
}

func (c *container) Pause(ctx context.Context) error {
	if c.cg == nil {
		return fmt.Errorf("container %s has no cgroup to freeze: %w", c.id, errdefs.ErrNotImplemented)
	}
	if err := c.cg.freeze(); err != nil {
		return err
	}
	c.mu.Lock()
	c.paused = true
	c.mu.Unlock()
	return nil
}

func (c *container) Resume(ctx context.Context) error {
	if c.cg == nil {
		return fmt.Errorf("container %s has no cgroup to thaw: %w", c.id, errdefs.ErrNotImplemented)
	}
	if err := c.cg.thaw(); err != nil {
		return err
	}
	c.mu.Lock()
	c.paused = false
	c.mu.Unlock()
	return nil
}

func (c *container) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) error {
	if c.cg == nil {
		return fmt.Errorf("container %s has no cgroup: %w", c.id, errdefs.ErrNotImplemented)
	}
	v, err := typeurl.UnmarshalAny(r.Resources)
	if err != nil {
		return fmt.Errorf("resources: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	res, ok := v.(*specs.LinuxResources)
	if !ok {
		return fmt.Errorf("resources of type %T: %w", v, errdefs.ErrInvalidArgument)
	}
	return c.cg.update(res)
}

// Pids lists the container's running processes.
func (c *container) Pids(ctx context.Context) ([]int, error) {
	var pids []int
	for _, p := range append([]*proc{c.init}, c.List()...) {
		if p.running() {
			pids = append(pids, p.pid)
		}
	}
	return pids, nil
}

// InitExited ends the exec'd processes: they run in the pod's PID
// namespace and would not die with the init.
func (c *container) InitExited(ctx context.Context) {
	for _, p := range c.List() {
		if p.running() {
			unix.Kill(p.pid, unix.SIGKILL)
		}
	}
}
