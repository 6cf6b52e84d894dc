// Package gvisor is quark-sandboxer's gVisor engine: runsc as an OCI
// runtime. Each pod is one runsc sandbox whose root container (annotation
// io.kubernetes.cri.container-type=sandbox) runs a pause program; the
// pod's containers join it (container-type=container, sandbox-id=<pod>)
// through the daemon's shared task service, whose Runtime this package
// also provides.
package gvisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// CRI's annotations, which runsc reads to group containers into a sandbox.
const (
	annotationContainerType = "io.kubernetes.cri.container-type"
	annotationSandboxID     = "io.kubernetes.cri.sandbox-id"
	containerTypeSandbox    = "sandbox"
	containerTypeContainer  = "container"
)

// taskAPIVersion 3 makes containerd connect to the task address directly.
const taskAPIVersion = 3

// Options configure the engine.
type Options struct {
	Config sandbox.GVisorConfig
	// StateDir is the daemon's --dir: runsc's default root and the pause
	// rootfs live there.
	StateDir string
	// TaskAddress is the daemon's task service.
	TaskAddress string
	// Pause is the static program the sandbox container runs; default the
	// daemon's own executable, which acts as holder (see shared/holder).
	Pause string
	// PauseEnv is the pause's environment; default the holder marker.
	PauseEnv []string
	// Exits reports the exits of the processes the daemon has started
	// (the sandbox processes are their orphans); nil: the daemon's reaper.
	Exits task.ExitSource
}

// Engine runs pods as runsc sandboxes.
type Engine struct {
	opts      Options
	root      string
	rootfs    string
	rootfsErr error
	log       *zap.Logger
}

var _ sandbox.Engine = (*Engine)(nil)

// New returns the engine and prepares the pause rootfs; a failure there is
// reported by Check (so the daemon still serves Quark pods).
func New(opts Options, log *zap.Logger) *Engine {
	e := &Engine{opts: opts, log: log}
	e.root = opts.Config.Root
	if e.root == "" {
		e.root = filepath.Join(opts.StateDir, "runsc")
	}
	e.rootfs = filepath.Join(opts.StateDir, "gvisor-rootfs")
	if e.opts.Pause == "" {
		self, err := os.Executable()
		if err != nil {
			e.rootfsErr = fmt.Errorf("find own executable for the pause: %w", err)
			return e
		}
		// The small kuasar-holder when it lies beside the daemon (as for
		// runc pods), else the daemon itself acting as holder.
		e.opts.Pause = self
		e.opts.PauseEnv = []string{"KUASAR_GO_HOLDER=1", "GOMAXPROCS=1"}
		small := filepath.Join(filepath.Dir(self), holder.BinaryName)
		if fi, err := os.Stat(small); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			e.opts.Pause = small
			e.opts.PauseEnv = []string{"GOMAXPROCS=1"}
		}
	}
	log.Debug("gVisor pause", zap.String("binary", e.opts.Pause))
	if err := prepareRootfs(e.rootfs, e.opts.Pause); err != nil {
		e.rootfsErr = fmt.Errorf("prepare the sandbox rootfs %s: %w", e.rootfs, err)
	}
	return e
}

// Name implements sandbox.Engine.
func (e *Engine) Name() string { return sandbox.EngineGVisor }

// Check implements sandbox.Engine.
func (e *Engine) Check() error {
	if e.rootfsErr != nil {
		return e.rootfsErr
	}
	if _, err := exec.LookPath(e.opts.Config.Binary); err != nil {
		return fmt.Errorf("gVisor runtime %q not found: %v", e.opts.Config.Binary, err)
	}
	return nil
}

// Binary is runsc's name or path.
func (e *Engine) Binary() string { return e.opts.Config.Binary }

// args are the global runsc flags of every call for the pod.
func (e *Engine) args(pod *sandbox.Pod) []string {
	a := []string{"--platform=" + pod.Platform}
	if pod.NetnsPath == "" {
		a = append(a, "--network=host")
	} else {
		// The sandbox joins the pod's network namespace (the spec's
		// network namespace path) and takes its interfaces and routes.
		a = append(a, "--network=sandbox")
	}
	if d := e.opts.Config.DebugLogDir; d != "" {
		a = append(a, "--debug", "--debug-log="+filepath.Join(d, pod.ID)+"/")
	}
	return append(a, e.opts.Config.ExtraArgs...)
}

// runsc drives runsc for the pod; its errors go to logPath as JSON.
func (e *Engine) runsc(pod *sandbox.Pod, logPath string) *runc.Runc {
	return &runc.Runc{
		Command:   e.Binary(),
		Root:      e.root,
		Log:       logPath,
		LogFormat: runc.JSON,
		ExtraArgs: e.args(pod),
	}
}

func logPath(pod *sandbox.Pod) string { return filepath.Join(pod.Dir, "runsc.log") }

// Create writes the sandbox container's bundle (config.json) in pod.Dir.
func (e *Engine) Create(ctx context.Context, pod *sandbox.Pod) error {
	if err := sandbox.ValidatePlatform(pod.Platform); err != nil {
		return fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := os.MkdirAll(e.root, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(e.sandboxSpec(pod), "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(pod.Dir, "config.json"), b, 0o600)
}

// sandboxSpec is the OCI spec of the pod's sandbox container.
func (e *Engine) sandboxSpec(pod *sandbox.Pod) *specs.Spec {
	cfg := pod.Config
	ns := []specs.LinuxNamespace{
		{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
		{Type: specs.UTSNamespace}, {Type: specs.MountNamespace},
	}
	if pod.NetnsPath != "" {
		ns = append(ns, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: pod.NetnsPath})
	}
	return &specs.Spec{
		Version:  specs.Version,
		Hostname: cfg.GetHostname(),
		Root:     &specs.Root{Path: e.rootfs, Readonly: true},
		Process: &specs.Process{
			Args:            []string{pauseName},
			Env:             e.opts.PauseEnv,
			Cwd:             "/",
			NoNewPrivileges: true,
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Annotations: map[string]string{
			annotationContainerType: containerTypeSandbox,
			annotationSandboxID:     pod.ID,
		},
		Linux: &specs.Linux{
			CgroupsPath: pod.Cgroup,
			Namespaces:  ns,
			Resources:   resources(cfg.GetLinux().GetResources()),
		},
	}
}

// resources maps the pod-level limits CRI passes (kubelet's pod overhead
// and limits) onto the sandbox, which runsc applies to its cgroup.
func resources(r *runtimeapi.LinuxContainerResources) *specs.LinuxResources {
	if r == nil {
		return nil
	}
	out := &specs.LinuxResources{}
	if r.MemoryLimitInBytes > 0 {
		l := r.MemoryLimitInBytes
		out.Memory = &specs.LinuxMemory{Limit: &l}
	}
	cpu := &specs.LinuxCPU{Cpus: r.CpusetCpus, Mems: r.CpusetMems}
	if r.CpuShares > 0 {
		s := uint64(r.CpuShares)
		cpu.Shares = &s
	}
	if r.CpuQuota > 0 {
		q := r.CpuQuota
		cpu.Quota = &q
	}
	if r.CpuPeriod > 0 {
		p := uint64(r.CpuPeriod)
		cpu.Period = &p
	}
	out.CPU = cpu
	return out
}

// Start creates and starts the sandbox container.
func (e *Engine) Start(ctx context.Context, pod *sandbox.Pod) (_ *sandbox.Started, retErr error) {
	r := e.runsc(pod, logPath(pod))
	pidFile := filepath.Join(pod.Dir, "sandbox.pid")
	nullIO, err := runc.NewNullIO()
	if err != nil {
		return nil, err
	}
	defer nullIO.Close()
	w, err := sandbox.WatchExit(e.opts.Exits)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := r.Create(ctx, pod.ID, pod.Dir, &runc.CreateOpts{PidFile: pidFile, IO: nullIO}); err != nil {
		w.Cancel()
		e.deleteSandbox(pod)
		return nil, fmt.Errorf("%w: %w", runtimeError(logPath(pod), err, "create the gVisor sandbox"), errdefs.ErrInternal)
	}
	pid, err := runc.ReadPidFile(pidFile)
	if err != nil {
		w.Cancel()
		e.deleteSandbox(pod)
		return nil, fmt.Errorf("read the gVisor sandbox's pid: %w", err)
	}
	exited := w.Pid(pid)
	tCreate := time.Since(t0)
	if err := r.Start(ctx, pod.ID); err != nil {
		unix.Kill(pid, unix.SIGKILL)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
		}
		e.deleteSandbox(pod)
		return nil, fmt.Errorf("%w: %w", runtimeError(logPath(pod), err, "start the gVisor sandbox"), errdefs.ErrInternal)
	}
	e.log.Debug("gVisor sandbox running", zap.String("sandbox", pod.ID), zap.Int("pid", pid),
		zap.String("platform", pod.Platform), zap.Duration("create", tCreate), zap.Duration("create+start", time.Since(t0)))
	return &sandbox.Started{Pid: pid, Address: e.opts.TaskAddress, Version: taskAPIVersion, Exited: exited}, nil
}

// deleteSandbox removes runsc's state of a sandbox that failed to start.
func (e *Engine) deleteSandbox(pod *sandbox.Pod) {
	if err := e.runsc(pod, logPath(pod)).Delete(context.Background(), pod.ID, &runc.DeleteOpts{Force: true}); err != nil && !notExist(err) {
		e.log.Warn("delete failed gVisor sandbox", zap.String("sandbox", pod.ID), zap.Error(err))
	}
}

// Stop asks the pod's pause to exit (which ends the sandbox) and kills the
// sandbox process if it has not ended after timeout.
func (e *Engine) Stop(ctx context.Context, pod *sandbox.Pod, proc holder.Holder, timeout time.Duration) error {
	if alive, err := holder.Alive(proc); err != nil || !alive {
		return err
	}
	if timeout > 0 {
		if err := e.runsc(pod, logPath(pod)).Kill(ctx, pod.ID, int(unix.SIGTERM), nil); err == nil {
			deadline := time.Now().Add(timeout)
			for time.Now().Before(deadline) {
				if alive, _ := holder.Alive(proc); !alive {
					return nil
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	}
	return holder.Stop(proc, 0)
}

// Shutdown deletes runsc's state of the pod: containers whose task was
// never deleted, then the sandbox (which removes its cgroup), then the lock
// files a `runsc wait` racing a delete may leave.
func (e *Engine) Shutdown(ctx context.Context, pod *sandbox.Pod) error {
	r := e.runsc(pod, logPath(pod))
	// runsc names a container's files <container>_sandbox:<sandbox>.*
	suffix := "_sandbox:" + pod.ID
	states, _ := filepath.Glob(filepath.Join(e.root, "*"+suffix+".state"))
	for _, s := range states {
		id := strings.TrimSuffix(filepath.Base(s), suffix+".state")
		if id == pod.ID {
			continue
		}
		e.log.Info("deleting a container left in the pod", zap.String("sandbox", pod.ID), zap.String("container", id))
		if err := r.Delete(ctx, id, &runc.DeleteOpts{Force: true}); err != nil && !notExist(err) {
			return runtimeError(logPath(pod), err, "delete container "+id)
		}
	}
	if err := r.Delete(ctx, pod.ID, &runc.DeleteOpts{Force: true}); err != nil && !notExist(err) {
		return runtimeError(logPath(pod), err, "delete the gVisor sandbox")
	}
	locks, _ := filepath.Glob(filepath.Join(e.root, "*"+suffix+".lock"))
	for _, l := range locks {
		if err := os.Remove(l); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// Update implements sandbox.Engine: a gVisor pod learns of its containers
// through the task API, so updates only change containerd's record.
func (e *Engine) Update(ctx context.Context, pod *sandbox.Pod, upd *types.Sandbox, fields []string) error {
	return nil
}
