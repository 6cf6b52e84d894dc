package gvisor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	runcshim "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/runc"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// PodLookup finds the running gVisor pod a container joins.
type PodLookup interface {
	TaskPod(id string) (*sandbox.Pod, error)
}

// Runtime is the task service's runtime for gVisor pods: each container is
// a runsc container joined to its pod's sandbox. It drives runsc through
// containerd's runc process library (create, exec, kill, delete, pause)
// and starts containers itself, because runsc hands a container the stdio
// of `runsc start`, not of `runsc create`.
type Runtime struct {
	engine   *Engine
	pods     PodLookup
	platform stdio.Platform
	self     string
	log      *zap.Logger
}

var _ task.Runtime = (*Runtime)(nil)

// NewRuntime returns the runtime of e's pods.
func NewRuntime(e *Engine, pods PodLookup, log *zap.Logger) (*Runtime, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable for the waiters: %w", err)
	}
	platform, err := runcshim.NewPlatform()
	if err != nil {
		return nil, err
	}
	return &Runtime{engine: e, pods: pods, platform: platform, self: self, log: log}, nil
}

// Close implements task.Runtime.
func (rt *Runtime) Close() error { return rt.platform.Close() }

// joinPod checks the container's CRI annotations against the pod it
// belongs to; a bundle without them (not made by CRI) gets them.
func joinPod(bundle, sandboxID string) error {
	path := filepath.Join(bundle, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("bundle %s: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return fmt.Errorf("bundle %s: config.json: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	switch t := spec.Annotations[annotationContainerType]; t {
	case "", containerTypeContainer:
	case containerTypeSandbox:
		return fmt.Errorf("container claims to be the sandbox container of pod %s (%s=sandbox); the sandboxer runs that itself: %w", sandboxID, annotationContainerType, errdefs.ErrInvalidArgument)
	default:
		return fmt.Errorf("unknown %s %q: %w", annotationContainerType, t, errdefs.ErrInvalidArgument)
	}
	if id := spec.Annotations[annotationSandboxID]; id != "" && id != sandboxID {
		return fmt.Errorf("container's %s %q is not its pod %s: %w", annotationSandboxID, id, sandboxID, errdefs.ErrInvalidArgument)
	}
	if spec.Annotations[annotationContainerType] == containerTypeContainer && spec.Annotations[annotationSandboxID] == sandboxID {
		return nil
	}
	if spec.Annotations == nil {
		spec.Annotations = map[string]string{}
	}
	spec.Annotations[annotationContainerType] = containerTypeContainer
	spec.Annotations[annotationSandboxID] = sandboxID
	out, err := json.Marshal(&spec)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, 0o600)
}

// Create implements task.Runtime: `runsc create` of a container in its
// pod's sandbox, rootfs mounted in the bundle.
func (rt *Runtime) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ task.Container, retErr error) {
	id, err := os.ReadFile(filepath.Join(r.Bundle, "sandbox"))
	if err != nil {
		return nil, fmt.Errorf("bundle %s names no sandbox: %w", r.Bundle, errdefs.ErrFailedPrecondition)
	}
	sandboxID := strings.TrimSpace(string(id))
	pod, err := rt.pods.TaskPod(sandboxID)
	if err != nil {
		return nil, err
	}
	if err := joinPod(r.Bundle, sandboxID); err != nil {
		return nil, err
	}
	rootfs := ""
	var mounts []mount.Mount
	var pmounts []process.Mount
	for _, m := range r.Rootfs {
		mounts = append(mounts, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
		pmounts = append(pmounts, process.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	if len(mounts) > 0 {
		rootfs = filepath.Join(r.Bundle, "rootfs")
		if err := os.Mkdir(rootfs, 0o711); err != nil && !os.IsExist(err) {
			return nil, err
		}
		if err := mount.All(mounts, rootfs); err != nil {
			return nil, fmt.Errorf("mount rootfs of container %s: %w", r.ID, err)
		}
		defer func() {
			if retErr != nil {
				if err := mount.UnmountRecursive(rootfs, 0); err != nil {
					rt.log.Warn("unmount rootfs after failed create", zap.String("container", r.ID), zap.Error(err))
				}
			}
		}()
	}
	rc := &runc.Runc{
		Command:      rt.engine.Binary(),
		Root:         rt.engine.root,
		Log:          filepath.Join(r.Bundle, "log.json"),
		LogFormat:    runc.JSON,
		PdeathSignal: unix.SIGKILL,
		ExtraArgs:    rt.engine.args(pod),
	}
	io := stdio.Stdio{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	// Without a terminal, the container's FIFOs go to `runsc start` (see
	// initProcess.Start); the runc process library must not open them.
	var libIO stdio.Stdio
	if r.Terminal {
		libIO = io
	}
	p := rt.newInit(r.ID, r.Bundle, rootfs, rc, libIO)
	if err := p.Create(ctx, &process.CreateConfig{
		ID: r.ID, Bundle: r.Bundle, Runtime: rc.Command, Rootfs: pmounts, Terminal: r.Terminal,
		Stdin: libIO.Stdin, Stdout: libIO.Stdout, Stderr: libIO.Stderr,
	}); err != nil {
		if derr := rc.Delete(context.WithoutCancel(ctx), r.ID, &runc.DeleteOpts{Force: true}); derr != nil && !notExist(derr) {
			rt.log.Warn("delete container after failed create", zap.String("container", r.ID), zap.Error(derr))
		}
		return nil, err
	}
	init := &initProcess{Init: p, rt: rt, runc: rc, id: r.ID, stdio: io}
	return &container{
		id: r.ID, bundle: r.Bundle, sandboxID: sandboxID, init: init, log: rt.log,
	}, nil
}

// newInit is containerd's process.Init of a runsc container: made by
// Create, or made again by Restore for a container that runs.
func (rt *Runtime) newInit(id, bundle, rootfs string, rc *runc.Runc, libIO stdio.Stdio) *process.Init {
	p := process.New(id, rc, libIO)
	p.Bundle = bundle
	p.Platform = rt.platform
	p.Rootfs = rootfs
	p.WorkDir = filepath.Join(bundle, "work")
	return p
}

// initProcess is a container's init: containerd's process.Init for
// everything but Start, and the PID of the container's waiter.
type initProcess struct {
	*process.Init
	rt    *Runtime
	runc  *runc.Runc
	id    string
	stdio stdio.Stdio

	mu        sync.Mutex
	pid       int
	startTime uint64 // the waiter's (task.StartTimer)
	started   bool
	paused    bool
	// exitedAt is the recorded exit of a container restored exited:
	// process.Init's SetExited takes the time of the call.
	exitedAt time.Time
}

// StartTime implements task.StartTimer: the waiter's start time.
func (p *initProcess) StartTime() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.startTime
}

// Pid is the waiter's PID once started: the process whose exit is the
// container's.
func (p *initProcess) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Stdio implements process.Process.
func (p *initProcess) Stdio() stdio.Stdio { return p.stdio }

// Stdin is the terminal's stdin; without a terminal the container holds
// the FIFO itself and containerd's end of it closes its stdin.
func (p *initProcess) Stdin() io.Closer {
	if p.stdio.Terminal {
		return p.Init.Stdin()
	}
	return nil
}

// Status implements process.Process.
func (p *initProcess) Status(ctx context.Context) (string, error) {
	s, err := p.Init.Status(ctx)
	if err != nil || s != "created" {
		return s, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.paused:
		return "paused", nil
	case p.started:
		return "running", nil
	}
	return "created", nil
}

// openIO opens the container's FIFOs for `runsc start`, which hands them
// to the sandbox: the workload writes to them directly, no copying.
func openIO(s stdio.Stdio) (files [3]*os.File, err error) {
	open := func(path string, flag int) (*os.File, error) {
		if path == "" {
			return nil, nil
		}
		// Non-blocking so that a FIFO without a reader fails instead of
		// hanging; the sandbox gets it blocking.
		fd, err := unix.Open(path, flag|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		// containerd's stdio are FIFOs; a restored container's come from
		// its record, which must not make the workload write any file.
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
			unix.Close(fd)
			return nil, fmt.Errorf("%s is not a FIFO: %w", path, errdefs.ErrInvalidArgument)
		}
		if err := unix.SetNonblock(fd, false); err != nil {
			unix.Close(fd)
			return nil, err
		}
		return os.NewFile(uintptr(fd), path), nil
	}
	for i, f := range []struct {
		path string
		flag int
	}{{s.Stdin, unix.O_RDONLY}, {s.Stdout, unix.O_WRONLY}, {s.Stderr, unix.O_WRONLY}} {
		if files[i], err = open(f.path, f.flag); err != nil {
			closeAll(files)
			return files, err
		}
	}
	return files, nil
}

func closeAll(files [3]*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// Start runs `runsc start` with the container's stdio, then the waiter.
func (p *initProcess) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started {
		return fmt.Errorf("container %s is already started: %w", p.id, errdefs.ErrFailedPrecondition)
	}
	if s, _ := p.Init.Status(ctx); s != "created" {
		return fmt.Errorf("container %s is %s: %w", p.id, s, errdefs.ErrFailedPrecondition)
	}
	var files [3]*os.File
	if !p.stdio.Terminal {
		var err error
		if files, err = openIO(p.stdio); err != nil {
			return fmt.Errorf("container %s io: %w", p.id, err)
		}
	}
	cmd := exec.CommandContext(ctx, p.runc.Command, append(globalArgs(p.runc), "start", p.id)...)
	// Unset files are /dev/null.
	if files[0] != nil {
		cmd.Stdin = files[0]
	}
	if files[1] != nil {
		cmd.Stdout = files[1]
	}
	if files[2] != nil {
		cmd.Stderr = files[2]
	}
	ec, err := reap.Monitor.Start(cmd)
	closeAll(files)
	if err != nil {
		return fmt.Errorf("start container %s: %w", p.id, err)
	}
	if status, err := reap.Monitor.Wait(cmd, ec); err != nil || status != 0 {
		if err == nil {
			err = fmt.Errorf("exit status %d", status)
		}
		return runtimeError(p.runc.Log, err, "start container "+p.id)
	}
	waiter := exec.Command(p.rt.self, append(append([]string{p.runc.Command}, globalArgs(p.runc)...), "wait", p.id)...)
	waiter.Args[0] = "kuasar-runsc-wait"
	waiter.Env = []string{waiterMarker + "=1", "PATH=" + os.Getenv("PATH")}
	wc, err := reap.Monitor.Start(waiter)
	if err != nil {
		// Nothing would see the container end: do not let it run.
		if kerr := p.runc.Kill(context.WithoutCancel(ctx), p.id, int(unix.SIGKILL), &runc.KillOpts{All: true}); kerr != nil {
			p.rt.log.Warn("kill container without waiter", zap.String("container", p.id), zap.Error(kerr))
		}
		return fmt.Errorf("start the waiter of container %s: %w", p.id, err)
	}
	go reap.Monitor.Wait(waiter, wc)
	p.pid = waiter.Process.Pid
	// Zero if it has already ended: its exit then matches on the PID.
	p.startTime, _ = proc.StartTime(p.pid)
	p.started = true
	return nil
}

func (p *initProcess) pause(ctx context.Context, pause bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.started {
		return fmt.Errorf("container %s is not running: %w", p.id, errdefs.ErrFailedPrecondition)
	}
	var err error
	if pause {
		err = p.runc.Pause(ctx, p.id)
	} else {
		err = p.runc.Resume(ctx, p.id)
	}
	if err != nil {
		return runtimeError(p.runc.Log, err, "pause/resume container "+p.id)
	}
	p.paused = pause
	return nil
}

// container implements task.Container for a runsc container.
type container struct {
	id, bundle, sandboxID string
	init                  *initProcess
	log                   *zap.Logger

	task.Execs[process.Process]
}

func (c *container) ID() string     { return c.id }
func (c *container) Bundle() string { return c.bundle }
func (c *container) Pid() int       { return c.init.Pid() }

// Cgroup is nil: the workload runs inside the sandbox's processes, which
// are accounted in the pod's cgroup, not per container.
func (c *container) Cgroup() any { return nil }

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

func (c *container) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (process.Process, error) {
	return c.DeleteProcess(ctx, c.init, r)
}

// Exec adds a process: `runsc exec --detach`, whose host child stands for
// the exec'd process and exits with its status.
func (c *container) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (process.Process, error) {
	p, err := c.init.Init.Exec(ctx, c.bundle, &process.ExecConfig{
		ID: r.ExecID, Terminal: r.Terminal, Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Spec: r.Spec,
	})
	if err != nil {
		return nil, err
	}
	c.Add(r.ExecID, p)
	return p, nil
}

func (c *container) Kill(ctx context.Context, r *taskAPI.KillRequest) error {
	return c.KillProcess(ctx, c.init, r)
}

func (c *container) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) error {
	return c.ResizeProcess(c.init, r)
}

func (c *container) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) error {
	p, err := c.Process(r.ExecID)
	if err != nil {
		return err
	}
	if stdin := p.Stdin(); stdin != nil {
		return stdin.Close()
	}
	return nil
}

func (c *container) Pause(ctx context.Context) error  { return c.init.pause(ctx, true) }
func (c *container) Resume(ctx context.Context) error { return c.init.pause(ctx, false) }

func (c *container) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) error {
	return c.init.Init.Update(ctx, r.Resources)
}

// Pids lists the container's processes (PIDs inside the sandbox).
func (c *container) Pids(ctx context.Context) ([]int, error) {
	return c.init.runc.Ps(ctx, c.id)
}

// InitExited kills the container's other processes when it shares the
// pod's PID namespace: they would not die with the init.
func (c *container) InitExited(ctx context.Context) {
	if !runcshim.ShouldKillAllOnExit(ctx, c.bundle) {
		return
	}
	if err := c.init.KillAll(ctx); err != nil {
		c.log.Debug("kill container processes after init exit", zap.String("container", c.id), zap.Error(err))
	}
}
