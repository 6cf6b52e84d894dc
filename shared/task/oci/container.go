package oci

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	shimrunc "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/runc"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// initPidFile is where runc writes the init's pid, as in the shim.
const initPidFile = "init.pid"

// Container is a runc-family container: its init and exec'd processes.
type Container struct {
	rt     *Runtime
	id     string
	bundle string
	runc   *runc.Runc
	// Runtime options runc create/exec need beyond the CLI's.
	noPivotRoot, noNewKeyring bool
	ioUID, ioGID              int
	// rootfsMounted: Create mounted the rootfs on <bundle>/rootfs, so
	// Delete unmounts it.
	rootfsMounted bool

	init   *Init
	execs  task.Execs[*Exec]
	cgroup any

	// destroyMu serialises runc delete with the rest of teardown.
	destroyMu sync.Mutex
}

func (c *Container) ID() string     { return c.id }
func (c *Container) Bundle() string { return c.bundle }
func (c *Container) Pid() int       { return c.init.Pid() }

// Cgroup is the container's cgroup1.Cgroup or *cgroupsv2.Manager, loaded
// from the init when it was created or restored; nil if none was found.
func (c *Container) Cgroup() any { return c.cgroup }

// Process returns the init (execID "") or an exec'd process.
func (c *Container) Process(execID string) (process.Process, error) {
	return c.execs.Process(c.init, execID)
}

func (c *Container) ExecdProcesses() []process.Process { return c.execs.ExecdProcesses() }

func (c *Container) ReserveProcess(execID string) (bool, func()) {
	return c.execs.ReserveProcess(execID)
}

// Start starts the init or an exec'd process.
func (c *Container) Start(ctx context.Context, r *taskAPI.StartRequest) (process.Process, error) {
	return c.execs.StartProcess(ctx, c.init, r)
}

// Delete deletes the init (the container) or an exec'd process.
func (c *Container) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (process.Process, error) {
	return c.execs.DeleteProcess(ctx, c.init, r)
}

// Exec adds a process to the container from the request's OCI process
// spec; Start runs it.
func (c *Container) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (process.Process, error) {
	if r.Spec == nil {
		return nil, fmt.Errorf("exec %s has no process spec: %w", r.ExecID, errdefs.ErrInvalidArgument)
	}
	var spec specs.Process
	if err := json.Unmarshal(r.Spec.Value, &spec); err != nil {
		return nil, fmt.Errorf("exec %s process spec: %v: %w", r.ExecID, err, errdefs.ErrInvalidArgument)
	}
	spec.Terminal = r.Terminal
	sio := stdio.Stdio{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	if err := checkStdio(sio); err != nil {
		return nil, err
	}
	switch s := c.init.currentState(); s {
	case stateCreated, stateRunning:
	default:
		return nil, fmt.Errorf("cannot exec in a %s container: %w", s, errdefs.ErrFailedPrecondition)
	}
	e := &Exec{c: c, id: r.ExecID, exitState: newExitState(stateCreated), spec: spec, stdio: sio}
	c.execs.Add(r.ExecID, e)
	return e, nil
}

// Kill signals the init (through runc) or an exec'd process.
func (c *Container) Kill(ctx context.Context, r *taskAPI.KillRequest) error {
	return c.execs.KillProcess(ctx, c.init, r)
}

// ResizePty resizes a terminal process's console.
func (c *Container) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) error {
	return c.execs.ResizeProcess(c.init, r)
}

// CloseIO closes a process's stdin where the daemon holds it (terminal
// mode); a non-terminal process has its stdin FIFO itself.
func (c *Container) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) error {
	var pio *procIO
	var mu *sync.Mutex
	if r.ExecID == "" {
		pio, mu = &c.init.io, &c.init.mu
	} else {
		e, err := c.execs.Lookup(r.ExecID)
		if err != nil {
			return err
		}
		pio, mu = &e.io, &e.mu
	}
	mu.Lock()
	stdin := pio.stdin
	pio.stdin = nil
	mu.Unlock()
	if stdin != nil {
		if err := stdin.Close(); err != nil {
			return fmt.Errorf("close stdin: %w", err)
		}
	}
	return nil
}

// Pause freezes the container (`runc pause`).
func (c *Container) Pause(ctx context.Context) error { return c.init.pause(ctx) }

// Resume thaws the container (`runc resume`).
func (c *Container) Resume(ctx context.Context) error { return c.init.resume(ctx) }

// Update applies r.Resources (JSON OCI LinuxResources) with `runc update`.
func (c *Container) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) error {
	if r.Resources == nil {
		return fmt.Errorf("update without resources: %w", errdefs.ErrInvalidArgument)
	}
	var resources specs.LinuxResources
	if err := json.Unmarshal(r.Resources.Value, &resources); err != nil {
		return fmt.Errorf("resources: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return c.init.update(ctx, &resources)
}

// Pids lists the container's processes (`runc ps`).
func (c *Container) Pids(ctx context.Context) ([]int, error) {
	pids, err := c.runc.Ps(ctx, c.id)
	if err != nil {
		return nil, c.runtimeError(err, "OCI runtime ps failed")
	}
	return pids, nil
}

// InitExited kills what else runs of the container when the init's end
// does not end it: the container shares a PID namespace (the pod's, or
// the host's), as the shim's ShouldKillAllOnExit decides.
func (c *Container) InitExited(ctx context.Context) {
	if !shimrunc.ShouldKillAllOnExit(ctx, c.bundle) {
		return
	}
	if err := c.runc.Kill(ctx, c.id, int(unix.SIGKILL), &runc.KillOpts{All: true}); err != nil {
		c.rt.log.Warn("kill container processes after init exit", zap.String("container", c.id),
			zap.Error(c.runtimeError(err, "OCI runtime killall failed")))
	}
}

// destroy removes the container from runc (force: even if it runs),
// unmounts the rootfs and removes the pid files. Each step tolerates
// having been done before, so a failed destroy can be retried.
func (c *Container) destroy(ctx context.Context, force bool) error {
	c.destroyMu.Lock()
	defer c.destroyMu.Unlock()
	if err := c.runc.Delete(ctx, c.id, &runc.DeleteOpts{Force: force}); err != nil {
		rerr := c.runtimeError(err, "OCI runtime delete failed")
		// Gone already: a retry, or runc lost its state.
		if !strings.Contains(rerr.Error(), "does not exist") {
			return rerr
		}
	}
	if err := c.unmountRootfs(); err != nil {
		return err
	}
	files := []string{filepath.Join(c.bundle, initPidFile)}
	for _, e := range c.execs.List() {
		files = append(files, c.execPidFile(e.id))
	}
	for _, f := range files {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("remove pid file: %w", err)
		}
	}
	return nil
}

// runtimeError adds to a runc failure the error runc logged, like the
// shim's runtimeError.
func (c *Container) runtimeError(rErr error, msg string) error {
	if rErr == nil {
		return nil
	}
	rMsg, err := lastRuntimeError(c.runc.Log)
	switch {
	case err != nil:
		return fmt.Errorf("%s: %w (runtime log unreadable: %v)", msg, rErr, err)
	case rMsg == "":
		return fmt.Errorf("%s: %w", msg, rErr)
	default:
		return fmt.Errorf("%s: %s: %w", msg, rMsg, rErr)
	}
}

// parseRuntimeLog returns the message of the last error entry of runc's
// JSON log.
func parseRuntimeLog(r io.Reader) (string, error) {
	var msg string
	dec := json.NewDecoder(r)
	for {
		var entry struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if err := dec.Decode(&entry); err != nil {
			if err == io.EOF {
				return msg, nil
			}
			// A torn last line still leaves the messages before it.
			if msg != "" {
				return msg, nil
			}
			return "", err
		}
		if entry.Level == "error" {
			msg = strings.TrimSpace(entry.Msg)
		}
	}
}

// loadCgroup loads the cgroup of the process pid that started at
// startTime, as the shim does; nil if it is gone or has none.
func loadCgroup(pid int, startTime uint64) any {
	if pid <= 0 {
		return nil
	}
	if cgroups.Mode() == cgroups.Unified {
		g, err := cgroupsv2.PidGroupPath(pid)
		if err != nil {
			return nil
		}
		m, err := cgroupsv2.Load(g)
		if err != nil || !sameProcess(pid, startTime) {
			return nil
		}
		return m
	}
	cg, err := cgroup1.Load(cgroup1.PidPath(pid))
	if err != nil || !sameProcess(pid, startTime) {
		return nil
	}
	return cg
}

// sameProcess reports whether pid still is the process that started at
// startTime.
func sameProcess(pid int, startTime uint64) bool {
	st, err := proc.StartTime(pid)
	return err == nil && st == startTime
}
