// Package quark is quark-sandboxer's Quark engine, which drives Quark the
// way Kuasar does: the sandboxer writes a sandbox bundle (config.json from
// the pod, a rootfs with /dev), runs
//
//	quark -r <bundle> sandbox --task-socket <sock> --id <id> --pid-file <file>
//
// which returns once the sandbox runs, and hands containerd Quark's own
// task socket. Containers arrive in sandbox updates (the "tasks"
// extension): each gets a bundle inside the sandbox bundle with its rootfs
// mounted, its bind mounts resolved and its IO paths bound in.
package quark

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// taskAPIVersion 3 makes containerd 2.x connect to Quark's task socket
// directly (lower versions make it look for a shim binary).
const taskAPIVersion = 3

// startTimeout bounds `quark sandbox`, which returns once the sandbox runs.
const startTimeout = 30 * time.Second

// Engine runs pods under Quark.
type Engine struct {
	cfg   sandbox.QuarkConfig
	exits task.ExitSource
	log   *zap.Logger
}

var _ sandbox.Engine = (*Engine)(nil)

// New returns the engine; exits reports the exits of the processes the
// daemon has started, whose orphans the Quark sandboxes are (nil: the
// daemon's reaper).
func New(cfg sandbox.QuarkConfig, exits task.ExitSource, log *zap.Logger) *Engine {
	return &Engine{cfg: cfg, exits: exits, log: log}
}

// Name implements sandbox.Engine.
func (e *Engine) Name() string { return sandbox.EngineQuark }

// Check implements sandbox.Engine.
func (e *Engine) Check() error {
	if _, err := exec.LookPath(e.cfg.Binary); err != nil {
		return fmt.Errorf("Quark binary %q not found: %v", e.cfg.Binary, err)
	}
	return nil
}

// The pod's files, as Kuasar lays them out.
func bundleDir(pod *sandbox.Pod) string  { return filepath.Join(pod.Dir, "sandbox") }
func taskSocket(pod *sandbox.Pod) string { return filepath.Join(pod.Dir, "quark-task.sock") }
func pidFile(pod *sandbox.Pod) string    { return filepath.Join(pod.Dir, "pid") }
func outputLog(pod *sandbox.Pod) string  { return filepath.Join(pod.Dir, "quark.log") }

// Create writes the sandbox bundle: config.json from the pod's config and
// an empty rootfs with /dev.
func (e *Engine) Create(ctx context.Context, pod *sandbox.Pod) error {
	b := bundleDir(pod)
	if err := os.MkdirAll(filepath.Join(b, "rootfs", "dev"), 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(sandboxSpec(pod), "", "  ")
	if err != nil {
		return err
	}
	return store.WriteFileAtomic(filepath.Join(b, "config.json"), data)
}

// sandboxSpec is the spec Kuasar derives from the pod config: resources,
// the pod's network namespace, a default process and the rootfs.
func sandboxSpec(pod *sandbox.Pod) *specs.Spec {
	spec := &specs.Spec{
		Version:  specs.Version,
		Hostname: pod.Config.GetHostname(),
		Root:     &specs.Root{Path: "rootfs"},
		Process:  &specs.Process{Cwd: "/"},
		Linux: &specs.Linux{
			// Where the daemon places the sandbox process.
			CgroupsPath: pod.Cgroup,
			Resources:   resources(pod.Config.GetLinux().GetResources()),
		},
	}
	if pod.NetnsPath != "" {
		spec.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: pod.NetnsPath}}
	}
	return spec
}

func resources(r *runtimeapi.LinuxContainerResources) *specs.LinuxResources {
	if r == nil {
		return nil
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
	mem := &specs.LinuxMemory{}
	if r.MemoryLimitInBytes > 0 {
		l := r.MemoryLimitInBytes
		mem.Limit = &l
	}
	if r.MemorySwapLimitInBytes > 0 {
		s := r.MemorySwapLimitInBytes
		mem.Swap = &s
	}
	out := &specs.LinuxResources{CPU: cpu, Memory: mem}
	for _, h := range r.HugepageLimits {
		out.HugepageLimits = append(out.HugepageLimits, specs.LinuxHugepageLimit{Pagesize: h.PageSize, Limit: h.Limit})
	}
	return out
}

// Start runs `quark sandbox`, which daemonizes the sandbox, writes its PID
// and serves the task API on the socket.
func (e *Engine) Start(ctx context.Context, pod *sandbox.Pod) (*sandbox.Started, error) {
	sock := taskSocket(pod)
	cg, err := cgroup.New(pod.Cgroup)
	if err != nil {
		return nil, err
	}
	out, err := os.OpenFile(outputLog(pod), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, e.cfg.Binary, "-r", bundleDir(pod), "sandbox",
		"--task-socket", sock, "--id", pod.ID, "--pid-file", pidFile(pod))
	cmd.Dir = bundleDir(pod)
	// A file, not a pipe: the daemonized sandbox may keep it open.
	cmd.Stdout, cmd.Stderr = out, out
	w, err := sandbox.WatchExit(e.exits)
	if err != nil {
		return nil, err
	}
	ec, err := reap.Monitor.Start(cmd)
	if err != nil {
		w.Cancel()
		return nil, fmt.Errorf("run %s: %w", e.cfg.Binary, err)
	}
	status, err := reap.Monitor.Wait(cmd, ec)
	if err == nil && status != 0 {
		err = fmt.Errorf("exit status %d", status)
	}
	if err != nil {
		w.Cancel()
		return nil, fmt.Errorf("quark sandbox failed (%v): %s: %w", err, tail(outputLog(pod)), errdefs.ErrInternal)
	}
	pid, err := readPid(pidFile(pod))
	if err != nil {
		w.Cancel()
		return nil, fmt.Errorf("quark sandbox succeeded but %v: %w", err, errdefs.ErrInternal)
	}
	// Who the PID names now, before the process can end and its PID be
	// reused: a kill below must reach this process or none.
	h := holder.Holder{Pid: pid, StartTime: startTimeOf(pid)}
	exited := w.Pid(pid)
	// The keeper started `quark sandbox` in the daemon's cgroup; the
	// sandbox goes to the pod's, under the limits kubelet set there.
	if err := cg.Add(pid); err != nil {
		e.kill(h, exited)
		return nil, fmt.Errorf("place the Quark sandbox %d in the pod's cgroup: %w", pid, err)
	}
	if _, err := os.Stat(sock); err != nil {
		e.kill(h, exited)
		return nil, fmt.Errorf("quark sandbox %d serves no task socket at %s: %w", pid, sock, errdefs.ErrInternal)
	}
	e.log.Debug("Quark sandbox running", zap.String("sandbox", pod.ID), zap.Int("pid", pid))
	return &sandbox.Started{Pid: pid, Address: "ttrpc+unix://" + sock, Version: taskAPIVersion, Exited: exited}, nil
}

func (e *Engine) kill(h holder.Holder, exited <-chan controller.Exit) {
	holder.Stop(h, 0)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
	}
}

func startTimeOf(pid int) uint64 {
	st, _ := proc.StartTime(pid)
	return st
}

func readPid(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("no pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s holds %q", path, b)
	}
	return pid, nil
}

// tail is the end of quark's output, for error messages.
func tail(path string) string {
	b, _ := os.ReadFile(path)
	s := strings.TrimSpace(string(b))
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	if s == "" {
		return "(no output)"
	}
	return s
}

// Stop ends the sandbox process: Kuasar kills it outright; with a timeout
// it gets SIGTERM first.
func (e *Engine) Stop(ctx context.Context, pod *sandbox.Pod, proc holder.Holder, timeout time.Duration) error {
	return holder.Stop(proc, timeout)
}

// Shutdown unmounts the containers' bundles; the family removes the pod's
// directory.
func (e *Engine) Shutdown(ctx context.Context, pod *sandbox.Pod) error {
	if err := sandbox.Unmount(bundleDir(pod)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	pod.State = nil
	return nil
}
