// Package oci runs the runc family's containers (runc, crun: any OCI
// runtime CLI with runc's command line) for a sandboxer daemon in a way
// that survives the daemon's restart.
//
// containerd's runc shim library, which task.RuncRuntime uses, copies a
// container's stdout and stderr through pipes the daemon owns: when the
// daemon is killed the pipes' read ends close and the container gets
// SIGPIPE, and its process.Init cannot be rebuilt by the next daemon
// instance. Here, instead:
//
//   - a non-terminal process gets containerd's FIFOs themselves as its
//     stdio (see OpenStdio): runc create/exec pass their own stdio on to
//     the process, and the daemon closes its copies as soon as runc
//     returns, so it holds nothing of the process's IO;
//   - a container describes itself as a record (Container.Record) that a
//     new daemon instance turns back into the same container
//     (Runtime.Restore), without any IO object to rebuild.
//
// A terminal process is the exception: its console is copied to the FIFOs
// by the daemon, as the shim does, and is lost with it. A restored terminal
// process has no console; ResizePty on it is FailedPrecondition and CloseIO
// does nothing.
//
// Record format (JSON, version 1):
//
//	{"version": 1, "id": "<container>", "bundle": "/abs/bundle",
//	 "runtime": {"binary": "runc", "root": "/run/x/<namespace>",
//	             "systemd_cgroup": false, "no_pivot_root": false,
//	             "no_new_keyring": false, "io_uid": 0, "io_gid": 0},
//	 "rootfs_mounted": true,
//	 "init": {"pid": 42, "start_time": 123, "status": "running",
//	          "exit_status": 0, "exited_at": "<RFC 3339, when stopped>",
//	          "stdio": {"stdin": "", "stdout": "/fifo", "stderr": "/fifo", "terminal": false}},
//	 "execs": [{"id": "<exec>", "pid": 43, "start_time": 124, "status": "running",
//	            "exit_status": 0, "stdio": {...}, "spec": {<OCI process>}}]}
//
// Status is one of created, running, paused, stopped, deleted (deleted
// for the init only). Every process started here goes through go-runc and
// so through its global Monitor, which the daemon sets (package reap); the
// daemon's task service receives exits and calls SetExited.
package oci

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	shimrunc "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/runc"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

var (
	_ task.Runtime    = (*Runtime)(nil)
	_ task.Restorer   = (*Runtime)(nil)
	_ task.Container  = (*Container)(nil)
	_ task.Recorded   = (*Container)(nil)
	_ task.StartTimer = (*Init)(nil)
	_ task.StartTimer = (*Exec)(nil)
)

// Runtime makes containers whose processes the daemon holds no IO of, and
// rebuilds them from their records.
type Runtime struct {
	cfg task.RuntimeConfig
	// platform copies terminal consoles, as in the shim.
	platform stdio.Platform
	log      *zap.Logger
	hook     Hook // nil: processes run as containerd asked
}

// NewRuntime returns a runtime driving cfg's CLI.
func NewRuntime(cfg task.RuntimeConfig, log *zap.Logger, opts ...Option) (*Runtime, error) {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	platform, err := shimrunc.NewPlatform()
	if err != nil {
		return nil, fmt.Errorf("console platform: %w", err)
	}
	rt := &Runtime{
		cfg:      cfg,
		platform: platform,
		log:      log,
	}
	for _, o := range opts {
		o(rt)
	}
	return rt, nil
}

// Close stops console copying; containers keep running.
func (rt *Runtime) Close() error { return rt.platform.Close() }

// newRunc returns the CLI for a container as the shim configures it.
func newRunc(binary, root, bundle string, systemd bool) *runc.Runc {
	return &runc.Runc{
		Command:       binary,
		Root:          root,
		Log:           filepath.Join(bundle, "log.json"),
		LogFormat:     runc.JSON,
		PdeathSignal:  unix.SIGKILL,
		SystemdCgroup: systemd,
	}
}

// Create mounts the rootfs on <bundle>/rootfs and runs `runc create` with
// the process's own stdio (or a console in terminal mode). It undoes its
// work on error.
func (rt *Runtime) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ task.Container, retErr error) {
	if err := validate.ID("container", r.ID); err != nil {
		return nil, err
	}
	if err := validate.AbsPath("bundle", r.Bundle); err != nil {
		return nil, err
	}
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, fmt.Errorf("checkpoint restore: %w", errdefs.ErrNotImplemented)
	}
	opts, err := rt.cfg.Resolve(r.Options)
	if err != nil {
		return nil, err
	}
	if err := validate.AbsPath("runtime root", opts.Root); err != nil {
		return nil, err
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
	}
	sio := stdio.Stdio{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	if err := checkStdio(sio); err != nil {
		return nil, err
	}

	c := &Container{
		rt:           rt,
		id:           r.ID,
		bundle:       r.Bundle,
		runc:         newRunc(opts.BinaryName, filepath.Join(opts.Root, ns), r.Bundle, opts.SystemdCgroup),
		noPivotRoot:  opts.NoPivotRoot,
		noNewKeyring: opts.NoNewKeyring,
		ioUID:        int(opts.IoUid),
		ioGID:        int(opts.IoGid),
	}
	var mounts []mount.Mount
	for _, m := range r.Rootfs {
		mounts = append(mounts, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	if len(mounts) > 0 {
		rootfs := filepath.Join(r.Bundle, "rootfs")
		if err := os.Mkdir(rootfs, 0o711); err != nil && !os.IsExist(err) {
			return nil, fmt.Errorf("rootfs mount point: %w", err)
		}
		if err := mount.All(mounts, rootfs); err != nil {
			if uerr := mount.UnmountMounts(mounts, rootfs, 0); uerr != nil {
				rt.log.Warn("unmount partly mounted rootfs", zap.String("container", r.ID), zap.Error(uerr))
			}
			return nil, fmt.Errorf("mount rootfs: %w", err)
		}
		c.rootfsMounted = true
	}
	c.init = &Init{c: c, exitState: newExitState(stateCreated), stdio: sio}
	if err := c.init.create(ctx, opts); err != nil {
		c.init.prep.release()
		// Force: a created container's init is running (runc init).
		if derr := c.destroy(context.WithoutCancel(ctx), true); derr != nil {
			rt.log.Warn("clean up failed create", zap.String("container", r.ID), zap.Error(derr))
		}
		return nil, err
	}
	c.cgroup = loadCgroup(c.init.pid, c.init.startTime)
	return c, nil
}

// create runs `runc create` (on the spec the hook adapted) and records the
// init's PID and start time.
func (p *Init) create(ctx context.Context, opts *options.Options) error {
	c := p.c
	pidFile := filepath.Join(c.bundle, initPidFile)
	copts := &runc.CreateOpts{PidFile: pidFile, NoPivot: c.noPivotRoot, NoNewKeyring: c.noNewKeyring}
	if c.rt.hook != nil {
		prep, err := c.rt.prepareInit(ctx, c.bundle)
		if err != nil {
			return err
		}
		p.prep = prep
		// runc init holds them once runc create returns.
		defer prep.closeFiles()
		copts.ExtraFiles = prep.Files
	}
	pio, socket, err := c.rt.prepareIO(p.stdio, c.ioUID, c.ioGID)
	if err != nil {
		return fmt.Errorf("container io: %w", err)
	}
	if pio != nil {
		defer pio.Close()
		copts.IO = pio
	}
	if socket != nil {
		defer socket.Close()
		copts.ConsoleSocket = socket
	}
	if err := c.runc.Create(ctx, c.id, c.bundle, copts); err != nil {
		return c.runtimeError(err, "OCI runtime create failed")
	}
	if pio != nil {
		// The container has its stdio: drop the daemon's copies now.
		pio.Close()
	}
	pid, err := runc.ReadPidFile(pidFile)
	if err != nil {
		return fmt.Errorf("read container pid: %w", err)
	}
	if p.startTime, err = proc.StartTime(pid); err != nil {
		return fmt.Errorf("container init %d: %w", pid, err)
	}
	p.pid = pid
	if socket != nil {
		if err := c.rt.startConsole(ctx, c.id, socket, p.stdio, &p.io); err != nil {
			return err
		}
	}
	return nil
}

// prepareIO returns what runc gets for a process's stdio: its own files
// (non-terminal) or a socket to send the console master to (terminal).
func (rt *Runtime) prepareIO(s stdio.Stdio, uid, gid int) (*directIO, *runc.Socket, error) {
	if s.Terminal {
		socket, err := runc.NewTempConsoleSocket()
		if err != nil {
			return nil, nil, fmt.Errorf("console socket: %w", err)
		}
		return nil, socket, nil
	}
	d, err := newDirectIO(s, uid, gid)
	if err != nil {
		return nil, nil, err
	}
	return d, nil, nil
}

// startConsole receives a terminal process's console and copies it to and
// from the FIFOs in the daemon, as the shim does.
func (rt *Runtime) startConsole(ctx context.Context, id string, socket *runc.Socket, s stdio.Stdio, pio *procIO) error {
	master, err := socket.ReceiveMaster()
	if err != nil {
		return fmt.Errorf("receive console master: %w", err)
	}
	if s.Stdin != "" {
		if pio.stdin, err = openStdinWriter(s.Stdin); err != nil {
			master.Close()
			return err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 3*consoleTimeout)
	defer cancel()
	cons, err := rt.platform.CopyConsole(ctx, master, id, s.Stdin, s.Stdout, s.Stderr, &pio.wg)
	if err != nil {
		master.Close()
		rt.closeIO(pio)
		return fmt.Errorf("copy console: %w", err)
	}
	pio.console = cons
	return nil
}

// shutdownConsole ends a console's copy once its process has exited.
func (rt *Runtime) shutdownConsole(pio *procIO) {
	if pio.console == nil {
		return
	}
	if err := rt.platform.ShutdownConsole(context.Background(), pio.console); err != nil {
		rt.log.Debug("shut down console", zap.Error(err))
	}
}

// closeIO releases what the daemon holds of a process's IO.
func (rt *Runtime) closeIO(pio *procIO) {
	if pio.stdin != nil {
		pio.stdin.Close()
		pio.stdin = nil
	}
	if pio.console != nil {
		rt.shutdownConsole(pio)
		pio.console.Close()
		pio.console = nil
	}
}

// lastRuntimeError returns the last error runc logged to its JSON log, as
// the shim's runtimeError reads it.
func lastRuntimeError(path string) (string, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	defer f.Close()
	return parseRuntimeLog(f)
}
