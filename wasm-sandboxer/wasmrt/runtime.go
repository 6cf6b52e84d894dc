// Package wasmrt is wasm-sandboxer's task.Runtime: each container process
// is a runner (kuasar-wasm-runner beside the daemon, else the daemon's own
// binary re-executed; package runner), born into the pod's namespaces
// and placed in the container's cgroup, running one WASI module with the
// container's rootfs as its root.
package wasmrt

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	securejoin "github.com/cyphar/filepath-securejoin"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	procfs "github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// EngineAnnotation chooses a container's engine. CRI passes it into the
// container's OCI spec from the pod's annotations and from the
// container's (which win) when the runtime handler lists it in
// pod_annotations and container_annotations.
const EngineAnnotation = "wasm.kuasar-go.io/engine"

// maxModuleSize bounds the module file a container may name.
const maxModuleSize = 1 << 30

// Config configures the runtime.
type Config struct {
	// Engine is the default engine.
	Engine string
	// AllowedEngines are the engines EngineAnnotation may choose (config
	// wasm.allowed_engines); empty allows Engine only.
	AllowedEngines []string
	// CacheDir holds compiled modules; "" disables the cache (every
	// process then compiles inside its own cgroup).
	CacheDir string
	// ContainerdAddress is containerd's gRPC socket, to read the modules
	// of wasm OCI artifacts from its content store; "" disables them.
	ContainerdAddress string
	// ModulesDir keeps the modules read from artifacts, by digest.
	ModulesDir string
	// GoRunnerOnly runs wasmtime containers with the Go runner even when
	// kuasar-wasm-runner-wasmtime (no Go runtime, less memory per
	// container) lies beside the daemon.
	GoRunnerOnly bool
}

// Runtime makes wasm containers.
type Runtime struct {
	cfg  Config
	self string // the runner binary (see runnerBinary)
	// wasmtimeRunner runs the wasmtime engine's module processes:
	// kuasar-wasm-runner-wasmtime beside the daemon, or "" (self does).
	wasmtimeRunner string
	log            *zap.Logger

	compiling sync.Map // cache key -> *sync.Mutex
}

var _ task.Runtime = (*Runtime)(nil)

// New checks cfg and returns the runtime.
func New(cfg Config, log *zap.Logger) (*Runtime, error) {
	if err := engine.Check(cfg.Engine); err != nil {
		return nil, err
	}
	if cfg.CacheDir != "" {
		if err := os.MkdirAll(cfg.CacheDir, 0o700); err != nil {
			return nil, fmt.Errorf("cache directory: %w", err)
		}
	}
	if cfg.ContainerdAddress != "" && cfg.ModulesDir == "" {
		return nil, fmt.Errorf("a modules directory is needed to run wasm OCI artifacts")
	}
	self, err := runnerBinary()
	if err != nil {
		return nil, err
	}
	rt := &Runtime{cfg: cfg, self: self, log: log}
	if engine.Check("wasmtime") == nil {
		exe, err := os.Executable()
		switch {
		case err != nil:
			return nil, fmt.Errorf("find own executable: %w", err)
		case cfg.GoRunnerOnly:
			log.Info("wasmtime module processes run the Go runner (wasmtime_go_runner = true)", zap.String("runner", self))
		default:
			if rt.wasmtimeRunner = wasmtimeRunnerBeside(exe); rt.wasmtimeRunner != "" {
				log.Info("wasmtime module processes run "+runner.WasmtimeBinaryName, zap.String("runner", rt.wasmtimeRunner))
			} else {
				log.Info(runner.WasmtimeBinaryName+" is not beside the daemon: wasmtime module processes run the Go runner",
					zap.String("runner", self))
			}
		}
	}
	return rt, nil
}

// runnerFor is the program of a module process of engine name.
func (rt *Runtime) runnerFor(name string) string {
	if name == "wasmtime" && rt.wasmtimeRunner != "" {
		return rt.wasmtimeRunner
	}
	return rt.self
}

// Close implements task.Runtime.
func (rt *Runtime) Close() error { return nil }

var errTerminal = fmt.Errorf("wasm containers have no terminal (tty): %w", errdefs.ErrInvalidArgument)

// Create mounts the rootfs, makes sure the module is compiled, creates the
// cgroup and starts the init process, which waits for Start.
func (rt *Runtime) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ task.Container, retErr error) {
	if r.Terminal {
		return nil, errTerminal
	}
	for _, p := range []string{r.Stdin, r.Stdout, r.Stderr} {
		if p != "" {
			if err := validate.AbsPath("stdio", p); err != nil {
				return nil, err
			}
		}
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	name, err := rt.engineFor(spec)
	if err != nil {
		return nil, err
	}
	if spec.Process.Terminal {
		return nil, errTerminal
	}
	c := &container{
		id: r.ID, bundle: r.Bundle, rt: rt, spec: spec, engine: name,
		rootfs: spec.Root.Path,
	}
	if !filepath.IsAbs(c.rootfs) {
		c.rootfs = filepath.Join(r.Bundle, c.rootfs)
	}
	defer func() {
		if retErr != nil {
			if err := c.release(); err != nil {
				rt.log.Warn("undo create", zap.String("container", r.ID), zap.Error(err))
			}
		}
	}()
	if len(r.Rootfs) > 0 {
		var mounts []mount.Mount
		for _, m := range r.Rootfs {
			mounts = append(mounts, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
		}
		if err := os.Mkdir(c.rootfs, 0o711); err != nil && !os.IsExist(err) {
			return nil, err
		}
		if err := mount.All(mounts, c.rootfs); err != nil {
			mount.UnmountRecursive(c.rootfs, 0)
			return nil, fmt.Errorf("mount rootfs: %w", err)
		}
		c.mounted = true
	}
	if spec.Linux != nil && spec.Linux.CgroupsPath != "" {
		if c.cg, err = newCgroup(spec.Linux.CgroupsPath, spec.Linux.Resources); err != nil {
			return nil, err
		}
	}
	if c.init, err = rt.startProcess(ctx, c, "", spec.Process, r.Stdin, r.Stdout, r.Stderr); err != nil {
		return nil, err
	}
	return c, nil
}

// engineFor is the engine of a container: the default, or the one
// EngineAnnotation names. The annotation comes from the pod spec, which is
// not trusted: an engine this build lacks is InvalidArgument, one the
// operator did not allow PermissionDenied.
func (rt *Runtime) engineFor(spec *specs.Spec) (string, error) {
	name := rt.cfg.Engine
	if a := spec.Annotations[EngineAnnotation]; a != "" {
		name = a
	}
	if err := engine.Check(name); err != nil {
		return "", fmt.Errorf("annotation %s: %v: %w", EngineAnnotation, err, errdefs.ErrInvalidArgument)
	}
	allowed := rt.cfg.AllowedEngines
	if len(allowed) == 0 {
		allowed = []string{rt.cfg.Engine}
	}
	if !slices.Contains(allowed, name) {
		return "", fmt.Errorf("annotation %s asks for the %s engine, which the operator did not allow (wasm.allowed_engines: %s): %w",
			EngineAnnotation, name, strings.Join(allowed, ", "), errdefs.ErrPermissionDenied)
	}
	return name, nil
}

func readSpec(bundle string) (*specs.Spec, error) {
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("bundle %s: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, fmt.Errorf("bundle %s: config.json: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil || spec.Root == nil {
		return nil, fmt.Errorf("bundle %s: config.json has no process or root: %w", bundle, errdefs.ErrInvalidArgument)
	}
	return &spec, nil
}

// modulePath resolves process.args[0] inside the rootfs: an absolute path,
// a path relative to the working directory, or a name looked up in PATH.
func modulePath(rootfs string, ps *specs.Process) (guest, host string, err error) {
	if len(ps.Args) == 0 || ps.Args[0] == "" {
		return "", "", fmt.Errorf("process.args is empty: it must name the module: %w", errdefs.ErrInvalidArgument)
	}
	arg := ps.Args[0]
	var candidates []string
	switch {
	case path.IsAbs(arg):
		candidates = []string{arg}
	case strings.Contains(arg, "/"):
		candidates = []string{path.Join("/", ps.Cwd, arg)}
	default:
		dirs := "/"
		for _, kv := range ps.Env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				dirs = v
			}
		}
		for _, d := range strings.Split(dirs, ":") {
			candidates = append(candidates, path.Join("/", d, arg))
		}
	}
	for _, g := range candidates {
		h, err := securejoin.SecureJoin(rootfs, g)
		if err != nil {
			continue
		}
		if fi, err := os.Stat(h); err == nil && fi.Mode().IsRegular() {
			return g, h, nil
		}
	}
	return "", "", fmt.Errorf("module %q (process.args[0]) not found in the container's rootfs: %w", arg, errdefs.ErrInvalidArgument)
}

// readModule reads and checks the module file.
func readModule(guest, host string) ([]byte, error) {
	f, err := os.Open(host)
	if err != nil {
		return nil, fmt.Errorf("module %s: %v: %w", guest, err, errdefs.ErrInvalidArgument)
	}
	defer f.Close()
	wasm, err := io.ReadAll(io.LimitReader(f, maxModuleSize+1))
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", guest, err)
	}
	if len(wasm) > maxModuleSize {
		return nil, fmt.Errorf("module %s is larger than %d bytes: %w", guest, maxModuleSize, errdefs.ErrInvalidArgument)
	}
	if !engine.IsWasm(wasm) {
		return nil, fmt.Errorf("%s (process.args[0]) is not a WebAssembly module (no \\0asm header): %w", guest, errdefs.ErrInvalidArgument)
	}
	return wasm, nil
}

// ensureCompiled fills the cache with the module's compiled code by a
// compile child in the daemon's own cgroup: compiling takes several times
// the memory of running (about 100 MiB for a 3 MB Go module), which must
// not count against the container's limit. Concurrent creates of one
// module compile it once.
func (rt *Runtime) ensureCompiled(ctx context.Context, name, module string, wasm []byte) error {
	if rt.cfg.CacheDir == "" || engine.InCache(rt.cfg.CacheDir, name, wasm) {
		return nil
	}
	key := name + "/" + engine.Key(wasm)
	v, _ := rt.compiling.LoadOrStore(key, &sync.Mutex{})
	mu := v.(*sync.Mutex)
	mu.Lock()
	defer mu.Unlock()
	if engine.InCache(rt.cfg.CacheDir, name, wasm) {
		return nil
	}
	req, _ := json.Marshal(runner.CompileRequest{Engine: name, CacheDir: rt.cfg.CacheDir, Module: module})
	cmd := exec.Command(rt.self)
	cmd.Args = []string{"kuasar-wasm-compile"}
	cmd.Env = []string{runner.EnvMode + "=" + runner.ModeCompile}
	cmd.Dir = "/"
	cmd.Stdin = bytes.NewReader(req)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	t0 := time.Now()
	ec, err := reap.Monitor.Start(cmd)
	if err != nil {
		return fmt.Errorf("start compiler: %w", err)
	}
	status, err := reap.Monitor.Wait(cmd, ec)
	if err != nil {
		return fmt.Errorf("compiler: %w", err)
	}
	switch status {
	case 0:
		rt.log.Info("module compiled", zap.String("engine", name), zap.String("module", module),
			zap.Int("bytes", len(wasm)), zap.Duration("took", time.Since(t0)))
		return nil
	case runner.ExitInvalidModule:
		return fmt.Errorf("%s: %w", strings.TrimSpace(stderr.String()), errdefs.ErrInvalidArgument)
	}
	return fmt.Errorf("compile %s with %s: exit status %d: %s", module, name, status, strings.TrimSpace(stderr.String()))
}

// startProcess starts a module process for ps in c, in the pod's
// namespaces and c's cgroup, and returns once it is ready to run.
func (rt *Runtime) startProcess(ctx context.Context, c *container, execID string, ps *specs.Process, stdin, stdout, stderr string) (_ *proc, retErr error) {
	guest, host, err := modulePath(c.rootfs, ps)
	if errors.Is(err, errdefs.ErrInvalidArgument) && len(ps.Args) > 0 && c.spec.Annotations[imageNameAnnotation] != "" {
		// Not in the rootfs: the image may be a wasm OCI artifact.
		switch a, aerr := rt.artifactModule(ctx, c.spec.Annotations[imageNameAnnotation]); {
		case aerr == nil:
			guest, host, err = ps.Args[0], a, nil
		case errors.Is(aerr, errdefs.ErrInvalidArgument):
			return nil, aerr
		case !errors.Is(aerr, errNotArtifact):
			rt.log.Warn("look for a wasm artifact", zap.String("container", c.id), zap.Error(aerr))
		}
	}
	if err != nil {
		return nil, err
	}
	wasm, err := readModule(guest, host)
	if err != nil {
		return nil, err
	}
	if err := rt.ensureCompiled(ctx, c.engine, host, wasm); err != nil {
		return nil, err
	}
	join, newNS, err := podNamespaces(c.spec)
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, errdefs.ErrNotImplemented)
	}
	cfg := runner.RunConfig{
		Engine: c.engine, CacheDir: rt.cfg.CacheDir,
		Module: host, Rootfs: c.rootfs,
		Args: ps.Args, Env: ps.Env,
		Stdin: stdin, Stdout: stdout, Stderr: stderr,
		UID: ps.User.UID, GID: ps.User.GID, Groups: ps.User.AdditionalGids,
	}
	if ps.Cwd != "" && ps.Cwd != "/" && !hasEnv(ps.Env, "PWD") {
		// WASI has no working directory; Go's wasip1 runtime (and others)
		// take it from PWD.
		cfg.Env = append(append([]string(nil), ps.Env...), "PWD="+ps.Cwd)
	}
	if newNS&unix.CLONE_NEWUTS != 0 {
		cfg.Hostname = c.spec.Hostname
	}
	if l := c.spec.Linux; l != nil && l.Resources != nil && l.Resources.Memory != nil && l.Resources.Memory.Limit != nil && *l.Resources.Memory.Limit > 0 {
		cfg.MemoryLimit = uint64(*l.Resources.Memory.Limit)
	}
	bin := rt.runnerFor(c.engine)
	if bin != rt.self {
		// Only the wasmtime runner reads it.
		cfg.Compiled = engine.WasmtimeCodePath(rt.cfg.CacheDir, wasm)
	}
	line, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}

	ctlR, ctlW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	stR, stW, err := os.Pipe()
	if err != nil {
		ctlR.Close()
		ctlW.Close()
		return nil, err
	}
	defer stR.Close()
	cmd := exec.Command(bin)
	// What ps shows: the container, and the module.
	cmd.Args = []string{"kuasar-wasm", c.id, guest}
	// One Go P from the start (see runner's maxProcs), and one worker
	// thread for the tokio runtime of wasmtime's WASI (else one per CPU of
	// the host, each with its stack and malloc arena, in every container).
	cmd.Env = []string{runner.EnvMode + "=" + runner.ModeRun, "GOMAXPROCS=1", "TOKIO_WORKER_THREADS=1"}
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{ctlR, stW} // runner.ControlFD, runner.StatusFD
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Cloneflags: newNS}
	ec, err := reap.Monitor.StartIn(cmd, join)
	ctlR.Close()
	stW.Close()
	if err != nil {
		ctlW.Close()
		return nil, fmt.Errorf("start module process: %w", err)
	}
	p := &proc{
		id: execID, pid: cmd.Process.Pid, c: c, ctl: ctlW,
		stdio:  stdio.Stdio{Stdin: stdin, Stdout: stdout, Stderr: stderr},
		waitCh: make(chan struct{}), reaped: make(chan struct{}),
	}
	// Zero if it has already ended: its exit then matches on the PID.
	p.startTime, _ = procfs.StartTime(p.pid)
	go func() {
		reap.Monitor.Wait(cmd, ec)
		close(p.reaped)
	}()
	defer func() {
		if retErr != nil {
			ctlW.Close()
			unix.Kill(p.pid, unix.SIGKILL)
			<-p.reaped
		}
	}()
	if c.cg != nil {
		if err := c.cg.add(p.pid); err != nil {
			return nil, fmt.Errorf("place module process in cgroup %s: %w", c.cg.path, err)
		}
	}
	if _, err := ctlW.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("configure module process: %w", err)
	}
	st, err := readStatus(ctx, stR)
	if err != nil {
		return nil, err
	}
	if st.Error != "" {
		if st.BadCache {
			// Compiled by another wasmtime or configuration, or damaged:
			// the next start compiles the module again.
			engine.Uncache(rt.cfg.CacheDir, c.engine, wasm)
			rt.log.Warn("cached compiled module not loadable; dropped from the cache", zap.String("container", c.id),
				zap.String("engine", c.engine), zap.String("error", st.Error))
		}
		if st.Invalid {
			return nil, fmt.Errorf("%s: %w", st.Error, errdefs.ErrInvalidArgument)
		}
		return nil, fmt.Errorf("module process: %s", st.Error)
	}
	rt.log.Debug("module process ready", zap.String("container", c.id), zap.String("exec", execID),
		zap.Int("pid", p.pid), zap.String("engine", c.engine), zap.String("runner", filepath.Base(bin)), zap.Bool("cached", st.Cached))
	return p, nil
}

// readyTimeout bounds a module process's preparation (opening FIFOs,
// loading or compiling the module) when the request has no deadline.
const readyTimeout = 2 * time.Minute

func readStatus(ctx context.Context, r *os.File) (runner.Status, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(readyTimeout)
	}
	r.SetReadDeadline(deadline)
	data, err := io.ReadAll(r)
	if err != nil {
		return runner.Status{}, fmt.Errorf("module process not ready: %w", err)
	}
	var st runner.Status
	if len(bytes.TrimSpace(data)) == 0 {
		return st, errors.New("module process exited before it was ready")
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return st, fmt.Errorf("module process status %q: %w", data, err)
	}
	return st, nil
}

func hasEnv(env []string, key string) bool {
	for _, kv := range env {
		if strings.HasPrefix(kv, key+"=") {
			return true
		}
	}
	return false
}
