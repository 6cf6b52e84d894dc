// Package wasmrt is wasm-sandboxer's task.Runtime: a wasm container is an
// OCI container that runc runs through the runc family's runtime (package
// oci), whose process is the engine's runner (package runner). So a module
// process is confined exactly as a runc container's process is (its own
// mount namespace and pivot_root, the spec's mounts, read-only root,
// masked paths, capabilities, no_new_privs, seccomp filter, rlimits, user,
// cgroup, the pod's namespaces), and wasm containers get runc's pause,
// exec, stats, OOM events, records and restore.
//
// What is wasm's is the oci.Hook here: before runc creates a container (or
// execs a process) it opens the module inside the rootfs once (package
// modfile), has it compiled into the cache by the bounded compile child
// (package compile), and rewrites the process for runc: the runner, exec'd
// from a descriptor runc passes on, with the module, its compiled code
// (a read-only mount of its cache entry) and its configuration as
// descriptors too; the module's own args and env go to WASI.
package wasmrt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/safemount"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/task/oci"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/compile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/modfile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// EngineAnnotation chooses a container's engine. CRI passes it into the
// container's OCI spec from the pod's annotations and from the
// container's (which win) when the runtime handler lists it in
// pod_annotations and container_annotations.
const EngineAnnotation = "wasm.kuasar-go.io/engine"

// Config configures the runtime.
type Config struct {
	// Engine is the default engine.
	Engine string
	// AllowedEngines are the engines EngineAnnotation may choose (config
	// wasm.allowed_engines); empty allows Engine only.
	AllowedEngines []string
	// CacheDir holds compiled modules; "" disables the cache (every
	// process then compiles inside its own container).
	CacheDir string
	// Compile bounds the compiles (and the modules) of the cache.
	Compile compile.Limits
	// ContainerdAddress is containerd's gRPC socket, to read the modules
	// of wasm OCI artifacts from its content store; "" disables them.
	ContainerdAddress string
	// ModulesDir keeps the modules read from artifacts, by digest.
	ModulesDir string
	// RunnerDir holds the runners (runner.BinaryName and
	// runner.WasmtimeBinaryName); default: the daemon's own directory.
	RunnerDir string
	// Compiler is the compile child's program, one whose runner.Main
	// compiles with the engines the runners run; default: the daemon's
	// own binary.
	Compiler string
	// Runtime is the OCI runtime CLI (runc) and its state directory.
	Runtime task.RuntimeConfig
}

// readyTimeout bounds the wait for a started module process to load and
// instantiate its module, when the request has no deadline.
const readyTimeout = 2 * time.Minute

// runnerEnv is a module process's own environment (the module's is WASI's):
// one Go P for the Go runner (see runner's maxProcs), one worker thread for
// the tokio runtime of wasmtime's WASI (else one per CPU of the host, each
// with its stack and malloc arena, in every container).
var runnerEnv = []string{runner.EnvMode + "=" + runner.ModeRun, "GOMAXPROCS=1", "TOKIO_WORKER_THREADS=1"}

// hook prepares wasm containers for runc (oci.Hook).
type hook struct {
	cfg      Config
	runners  map[string]*os.File // engine -> read-only clone of its runner
	compiler *compile.Compiler   // nil without a cache
	log      *zap.Logger
}

var _ oci.Hook = (*hook)(nil)

// New checks cfg and returns the runtime.
func New(cfg Config, log *zap.Logger) (task.Runtime, error) {
	if err := engine.Check(cfg.Engine); err != nil {
		return nil, err
	}
	if len(cfg.AllowedEngines) == 0 {
		cfg.AllowedEngines = []string{cfg.Engine}
	}
	if cfg.ContainerdAddress != "" && cfg.ModulesDir == "" {
		return nil, fmt.Errorf("a modules directory is needed to run wasm OCI artifacts")
	}
	if cfg.Compile.MaxModuleSize <= 0 {
		return nil, fmt.Errorf("the largest module must be set: %w", errdefs.ErrInvalidArgument)
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	if cfg.RunnerDir == "" {
		cfg.RunnerDir = filepath.Dir(self)
	}
	if cfg.Compiler == "" {
		cfg.Compiler = self
	}
	h := &hook{cfg: cfg, runners: map[string]*os.File{}, log: log}
	for _, name := range cfg.AllowedEngines {
		if err := engine.Check(name); err != nil {
			return nil, err
		}
		f, err := openRunner(filepath.Join(cfg.RunnerDir, runnerName(name)))
		if err != nil {
			h.close()
			return nil, fmt.Errorf("the %s engine's runner: %w", name, err)
		}
		h.runners[name] = f
		log.Info("module processes run "+runnerName(name), zap.String("engine", name), zap.String("runner", f.Name()))
	}
	if cfg.CacheDir != "" {
		if h.compiler, err = compile.New(cfg.Compiler, cfg.CacheDir, cfg.Compile, log); err != nil {
			h.close()
			return nil, err
		}
	}
	rt, err := oci.NewRuntime(cfg.Runtime, log, oci.WithHook(h))
	if err != nil {
		h.close()
		return nil, err
	}
	return rt, nil
}

func (h *hook) close() {
	for _, f := range h.runners {
		f.Close()
	}
}

// runnerName is the runner of an engine's module processes.
func runnerName(engine string) string {
	if engine == "wasmtime" {
		return runner.WasmtimeBinaryName
	}
	return runner.BinaryName
}

// engineFor is the engine of a container: the default, or the one
// EngineAnnotation names. The annotation comes from the pod spec, which is
// not trusted: an engine this build lacks is InvalidArgument, one the
// operator did not allow PermissionDenied.
func (h *hook) engineFor(spec *specs.Spec) (string, error) {
	name := h.cfg.Engine
	if a := spec.Annotations[EngineAnnotation]; a != "" {
		name = a
	}
	if err := engine.Check(name); err != nil {
		return "", fmt.Errorf("annotation %s: %v: %w", EngineAnnotation, err, errdefs.ErrInvalidArgument)
	}
	if !slices.Contains(h.cfg.AllowedEngines, name) {
		return "", fmt.Errorf("annotation %s asks for the %s engine, which the operator did not allow (wasm.allowed_engines: %s): %w",
			EngineAnnotation, name, strings.Join(h.cfg.AllowedEngines, ", "), errdefs.ErrPermissionDenied)
	}
	return name, nil
}

var errTerminal = fmt.Errorf("wasm containers have no terminal (tty): %w", errdefs.ErrInvalidArgument)

// Init implements oci.Hook: the container's process becomes the runner of
// its module, confined as the spec says and then some (no_new_privs, a
// seccomp filter when the spec has none).
func (h *hook) Init(ctx context.Context, bundle string, spec *specs.Spec) (*oci.Prepared, error) {
	if spec.Process.Terminal {
		return nil, errTerminal
	}
	name, err := h.engineFor(spec)
	if err != nil {
		return nil, err
	}
	if !hasProc(spec) {
		return nil, fmt.Errorf("wasm containers need /proc mounted (runc execs the runner through /proc/self/fd): %w", errdefs.ErrInvalidArgument)
	}
	prep, err := h.prepare(ctx, name, bundle, spec, spec.Process)
	if err != nil {
		return nil, err
	}
	if spec.Annotations == nil {
		spec.Annotations = map[string]string{}
	}
	// Execs run with the engine the container got.
	spec.Annotations[EngineAnnotation] = name
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	if spec.Linux.Seccomp == nil {
		spec.Linux.Seccomp = defaultSeccomp()
	}
	return prep, nil
}

// Exec implements oci.Hook: an exec'd process is the runner of its module
// too.
func (h *hook) Exec(ctx context.Context, bundle string, spec *specs.Spec, ps *specs.Process) (*oci.Prepared, error) {
	if ps.Terminal {
		return nil, errTerminal
	}
	name, err := h.engineFor(spec)
	if err != nil {
		return nil, err
	}
	return h.prepare(ctx, name, bundle, spec, ps)
}

func hasProc(spec *specs.Spec) bool {
	return slices.ContainsFunc(spec.Mounts, func(m specs.Mount) bool {
		return filepath.Clean(m.Destination) == "/proc" && m.Type == "proc"
	})
}

// prepare opens the module ps names, has it compiled, and makes ps the
// runner's process with what it needs as descriptors (runner's FD
// constants).
func (h *hook) prepare(ctx context.Context, name, bundle string, spec *specs.Spec, ps *specs.Process) (_ *oci.Prepared, retErr error) {
	var files []*os.File
	defer func() {
		if retErr != nil {
			for _, f := range files {
				f.Close()
			}
		}
	}()
	rootfs := spec.Root.Path
	if !filepath.IsAbs(rootfs) {
		rootfs = filepath.Join(bundle, rootfs)
	}
	// No process can take a NUL in an argument or a variable; the runner
	// would refuse one late, and not as the caller's fault.
	for _, s := range append(slices.Clip(ps.Args), ps.Env...) {
		if strings.ContainsRune(s, 0) {
			return nil, fmt.Errorf("process args and env must not contain NUL bytes: %w", errdefs.ErrInvalidArgument)
		}
	}
	m, err := h.module(ctx, rootfs, spec, ps)
	if err != nil {
		return nil, err
	}
	files = append(files, nil, nil, nil, m.File) // runner, config, status, module
	var entry string
	if h.compiler != nil {
		if entry, err = h.compiler.Entry(ctx, name, m); err != nil {
			return nil, err
		}
		// Its code and nothing else of the cache, read-only.
		cache, err := safemount.Clone(entry, false, safemount.ReadOnly|safemount.NoSuid|safemount.NoDev)
		if err != nil {
			return nil, fmt.Errorf("module cache entry: %w", err)
		}
		files = append(files, cache)
	}
	cfg := runner.RunConfig{Engine: name, Key: m.Key, Cached: entry != "", Args: ps.Args, Env: ps.Env}
	if ps.Cwd != "" && ps.Cwd != "/" && !hasEnv(ps.Env, "PWD") {
		// WASI has no working directory; Go's wasip1 runtime (and others)
		// take it from PWD.
		cfg.Env = append(append([]string(nil), ps.Env...), "PWD="+ps.Cwd)
	}
	if l := spec.Linux; l != nil && l.Resources != nil && l.Resources.Memory != nil && l.Resources.Memory.Limit != nil && *l.Resources.Memory.Limit > 0 {
		cfg.MemoryLimit = uint64(*l.Resources.Memory.Limit)
	}
	if files[0], err = dup(h.runners[name]); err != nil {
		return nil, err
	}
	if files[1], err = configFile(cfg); err != nil {
		return nil, err
	}
	status, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	files[2] = w
	ps.Args = []string{runner.BinaryPath, m.Guest}
	ps.Env = append([]string(nil), runnerEnv...)
	// A WASI module cannot exec; its runner never needs to gain privileges.
	ps.NoNewPrivileges = true
	return &oci.Prepared{
		Files:   files,
		Ready:   func(ctx context.Context) error { return h.ready(ctx, name, m, entry, status) },
		Release: func() { status.Close() },
	}, nil
}

// module opens the module ps names: in the rootfs or, when it is not there
// and the container's image is a wasm OCI artifact, the artifact's.
func (h *hook) module(ctx context.Context, rootfs string, spec *specs.Spec, ps *specs.Process) (*modfile.Module, error) {
	max := h.cfg.Compile.MaxModuleSize
	m, err := modfile.Find(ctx, rootfs, ps, max)
	image := spec.Annotations[imageNameAnnotation]
	if err == nil || !errors.Is(err, modfile.ErrNotFound) || image == "" {
		return m, err
	}
	path, aerr := h.artifactModule(ctx, image)
	switch {
	case aerr == nil:
		return modfile.OpenHost(ctx, path, ps.Args[0], max)
	case errors.Is(aerr, errdefs.ErrInvalidArgument):
		return nil, aerr
	case !errors.Is(aerr, errNotArtifact):
		h.log.Warn("look for a wasm artifact", zap.String("image", image), zap.Error(aerr))
	}
	return nil, err
}

// ready reads the started process's status: it has loaded and
// instantiated its module, or says why it could not.
func (h *hook) ready(ctx context.Context, name string, m *modfile.Module, entry string, status *os.File) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(readyTimeout)
	}
	status.SetReadDeadline(deadline)
	data, err := io.ReadAll(io.LimitReader(status, 1<<20))
	if err != nil {
		return fmt.Errorf("module process not ready: %w", err)
	}
	var st runner.Status
	if len(strings.TrimSpace(string(data))) == 0 {
		return errors.New("module process exited before it was ready")
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("module process status %q: %w", data, err)
	}
	switch {
	case st.Error == "":
		h.log.Debug("module process ready", zap.String("engine", name), zap.String("module", m.Guest), zap.Bool("cached", st.Cached))
		return nil
	case st.BadCache && entry != "":
		// Compiled by another wasmtime or configuration, or damaged: the
		// next start compiles the module again.
		if err := engine.Uncache(h.cfg.CacheDir, name, m.Key); err != nil {
			h.log.Warn("drop a cache entry", zap.String("entry", entry), zap.Error(err))
		}
		h.log.Warn("cached compiled module not loadable; dropped from the cache", zap.String("engine", name),
			zap.String("entry", entry), zap.String("error", st.Error))
		return fmt.Errorf("%s (cache entry %s, dropped)", st.Error, entry)
	case st.Invalid:
		return fmt.Errorf("%s: %w", st.Error, errdefs.ErrInvalidArgument)
	}
	return fmt.Errorf("module process: %s", st.Error)
}

// configFile is a sealed memory file holding cfg for the runner.
func configFile(cfg runner.RunConfig) (*os.File, error) {
	data, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	fd, err := unix.MemfdCreate("kuasar-wasm-config", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("runner config: %w", err)
	}
	f := os.NewFile(uintptr(fd), "kuasar-wasm-config")
	if _, err := f.Write(data); err != nil {
		f.Close()
		return nil, fmt.Errorf("runner config: %w", err)
	}
	// Read from the start (the runners read from where the file is), and
	// as written.
	if _, err := f.Seek(0, io.SeekStart); err == nil {
		_, err = unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SEAL|unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("runner config: %w", err)
	}
	return f, nil
}

// dup is another descriptor of f, which the Runtime may close.
func dup(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

func hasEnv(env []string, key string) bool {
	for _, kv := range env {
		if strings.HasPrefix(kv, key+"=") {
			return true
		}
	}
	return false
}
