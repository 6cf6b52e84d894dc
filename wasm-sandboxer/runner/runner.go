// Package runner is what runs a wasm container's module, and what fills
// the compiled-module cache:
//
//   - run: a container's process. runc runs it like any container's
//     process (inside the container's root after pivot_root, in its
//     namespaces and cgroup, as its user, with its capabilities,
//     no_new_privs and seccomp filter), exec'ing it from a descriptor it
//     passes on: the runner is not in the container's rootfs, so it must
//     be a static program (kuasar-wasm-runner, built without cgo, runs
//     wazero; kuasar-wasm-runner-wasmtime, C, runs wasmtime). What it runs
//     comes as descriptors too (see the FD constants), never as host paths.
//   - compile: the daemon's binary re-executed on the host, in a cgroup with
//     limits and under a deadline, compiles one module into a cache entry.
//
// Run mode imports only the engines and what the process needs, so that a
// module process does not pay for the daemon's packages in memory.
package runner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

const (
	// EnvMode tells a child its job: ModeRun or ModeCompile.
	EnvMode     = "KUASAR_GO_WASM_CHILD"
	ModeRun     = "run"
	ModeCompile = "compile"

	// BinaryName is the runner of the engines other than wasmtime, which
	// the daemon looks for beside its own binary.
	BinaryName = "kuasar-wasm-runner"
	// WasmtimeBinaryName is the wasmtime engine's runner, C on wasmtime's
	// C API (cmd/kuasar-wasm-runner-wasmtime), beside it too.
	WasmtimeBinaryName = "kuasar-wasm-runner-wasmtime"

	// Descriptors of a module process (runc create/exec --preserve-fds).
	BinaryFD = 3 // the runner itself, a read-only mount of the file
	ConfigFD = 4 // RunConfig as JSON
	StatusFD = 5 // one Status as JSON once ready, or why not; then closed
	ModuleFD = 6 // the module, opened read-only in the container's rootfs
	CacheFD  = 7 // with RunConfig.Cached: the module's cache entry, a read-only mount of that directory

	// BinaryPath is what runc execs: the runner, through BinaryFD.
	BinaryPath = "/proc/self/fd/3"

	// CompileModuleFD is a compile child's module.
	CompileModuleFD = 3

	// ExitInvalidModule is a compile child's exit code for a module the
	// engine rejects.
	ExitInvalidModule = 2
	// ExitTrap is a module process's exit code when the module trapped
	// (as a process dying of SIGABRT would report).
	ExitTrap = 134

	// maxProcs bounds the Go scheduler's Ps of a module process: a WASI
	// preview 1 module runs on one thread. Each P costs a cache of heap
	// spans and more threads: 1 instead of 2 saves 0.35 MiB per container
	// with wazero. The daemon sets GOMAXPROCS=1 in its environment already,
	// so that the second P is never made.
	maxProcs = 1

	// maxConfig bounds the configuration a runner reads.
	maxConfig = 16 << 20
)

// CachePath is where a module process finds its cache entry.
var CachePath = fmt.Sprintf("/proc/self/fd/%d", CacheFD)

// IsChild reports whether this process was started as a module process or
// a compiler.
func IsChild() bool { return os.Getenv(EnvMode) != "" }

// Main is a child's whole life; call it first in main when IsChild.
func Main() {
	switch os.Getenv(EnvMode) {
	case ModeCompile:
		os.Exit(compileMain())
	case ModeRun:
		os.Exit(runMain())
	}
	fmt.Fprintf(os.Stderr, "wasm-sandboxer: unknown child mode %q\n", os.Getenv(EnvMode))
	os.Exit(1)
}

// CompileRequest is a compile child's stdin; the module is its descriptor
// CompileModuleFD.
type CompileRequest struct {
	Engine string `json:"engine"`
	// Entry is the directory to fill: a temporary one, which the daemon
	// makes the module's cache entry once it has checked the result.
	Entry string `json:"entry"`
	// MaxSize bounds the module read.
	MaxSize int64 `json:"max_size"`
}

// CompileResult is a compile child's stdout: the key of the bytes it
// compiled.
type CompileResult struct {
	Key string `json:"key"`
}

func compileMain() int {
	var req CompileRequest
	if err := json.NewDecoder(io.LimitReader(os.Stdin, maxConfig)).Decode(&req); err != nil {
		fmt.Fprintf(os.Stderr, "decode compile request: %v", err)
		return 1
	}
	module := os.NewFile(CompileModuleFD, "module")
	// pread: the daemon passes the same file to the container's process.
	wasm, err := io.ReadAll(io.NewSectionReader(module, 0, req.MaxSize+1))
	module.Close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "read the module: %v", err)
		return 1
	}
	if int64(len(wasm)) > req.MaxSize {
		fmt.Fprintf(os.Stderr, "the module is larger than %d bytes", req.MaxSize)
		return ExitInvalidModule
	}
	ctx := context.Background()
	e, err := engine.New(req.Engine, engine.Options{Cache: req.Entry})
	if err != nil {
		fmt.Fprint(os.Stderr, err)
		return 1
	}
	m, err := e.Compile(ctx, wasm)
	if err != nil {
		fmt.Fprint(os.Stderr, err)
		if errors.Is(err, engine.ErrInvalidModule) {
			return ExitInvalidModule
		}
		return 1
	}
	m.Close(ctx)
	e.Close(ctx)
	if err := json.NewEncoder(os.Stdout).Encode(CompileResult{Key: engine.Key(wasm)}); err != nil {
		return 1
	}
	return 0
}

// RunConfig is what the daemon tells a module process (ConfigFD).
type RunConfig struct {
	Engine string `json:"engine"`
	// Key is the module's key as the daemon read it (engine.Key): the
	// runner refuses module bytes of another key.
	Key string `json:"key"`
	// Cached: CacheFD is the module's cache entry.
	Cached bool `json:"cached,omitempty"`
	// Args and Env are the module's (WASI's), args[0] included.
	Args []string `json:"args"`
	Env  []string `json:"env,omitempty"`
	// MemoryLimit is the container's memory limit in bytes (0: none).
	MemoryLimit uint64 `json:"memory_limit,omitempty"`
}

// Status is what a module process reports once ready (Error empty) or
// failed; Invalid marks the container's fault (its module or request).
type Status struct {
	Error   string `json:"error,omitempty"`
	Invalid bool   `json:"invalid,omitempty"`
	Cached  bool   `json:"cached,omitempty"`
	// BadCache: the cached compiled code could not be loaded (written by
	// another engine version or configuration, or damaged); the daemon
	// drops the cache entry so that the next start compiles again.
	BadCache bool `json:"bad_cache,omitempty"`
}

// releaseAfter is when a started module process releases the file pages
// that its start mapped (releaseStartupPages) a second time.
const releaseAfter = time.Second

// errChanged: the module's bytes are not those the daemon checked.
var errChanged = errors.New("the module changed since the daemon read it")

func runMain() int {
	if runtime.GOMAXPROCS(0) > maxProcs {
		runtime.GOMAXPROCS(maxProcs)
	}
	setName("kuasar-wasm")
	exitOnSignalsAsInit()
	status := os.NewFile(StatusFD, "status")
	report := func(st Status) {
		// The daemon may have gone (restarted) since: that is no error.
		json.NewEncoder(status).Encode(st)
		status.Close()
	}
	cfg, err := readConfig()
	if err != nil {
		report(Status{Error: err.Error()})
		return 1
	}
	procSelf := openProcSelf()
	inst, cached, err := prepare(cfg)
	if err != nil {
		report(Status{Error: err.Error(), Invalid: errors.Is(err, engine.ErrInvalidModule) || errors.Is(err, engine.ErrLink) || errors.Is(err, errChanged)})
		return 1
	}
	report(Status{Cached: cached})
	// The file pages that loading and instantiating mapped leave this
	// process's page tables (they stay in the page cache; see
	// releaseStartupPages), and what they left on the heap goes back to
	// the kernel: else the Go heap keeps it resident for the life of the
	// container.
	releaseStartupPages(procSelf)
	debug.FreeOSMemory()
	// Once more when the module has initialised itself (a Go module's
	// runtime start touches much of its code and of the engine's).
	if procSelf != nil {
		time.AfterFunc(releaseAfter, func() { releaseStartupPages(procSelf) })
	}
	code, err := inst.Run(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "wasm-sandboxer: %v\n", err)
		return ExitTrap
	}
	return code
}

// exitOnSignalsAsInit makes SIGTERM, SIGINT and SIGHUP end the process
// as they end any other one (exit status 128 + the signal) when it is its
// PID namespace's init (a container with a PID namespace of its own), to
// which the kernel sends no signal it has no handler for: a WASI module
// cannot handle signals, so the runner does what their default would.
func exitOnSignalsAsInit() {
	if os.Getpid() != 1 {
		return
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	go func() {
		s := <-sigs
		os.Exit(128 + int(s.(unix.Signal)))
	}()
}

// setName sets what ps shows as the process's name, rather than the
// descriptor runc exec'd ("3").
func setName(name string) {
	b := append([]byte(name), 0)
	_ = unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&b[0])), 0, 0, 0)
}

func readConfig() (RunConfig, error) {
	var cfg RunConfig
	f := os.NewFile(ConfigFD, "config")
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfig))
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return cfg, fmt.Errorf("decode config: %w", err)
	}
	return cfg, nil
}

// prepare does everything before the module runs: the engine, the module
// (its code from the cache entry), instantiation with WASI, "/" being the
// container's root.
func prepare(cfg RunConfig) (engine.Instance, bool, error) {
	if cfg.MemoryLimit > 0 {
		// The Go heap then collects before the cgroup kills.
		debug.SetMemoryLimit(int64(cfg.MemoryLimit) * 9 / 10)
	}
	module := os.NewFile(ModuleFD, "module")
	// pread: the file's offset is not the runner's to rely on.
	wasm, err := io.ReadAll(io.NewSectionReader(module, 0, 1<<40))
	module.Close()
	os.NewFile(BinaryFD, "runner").Close()
	if err != nil {
		return nil, false, fmt.Errorf("read the module: %w", err)
	}
	if engine.Key(wasm) != cfg.Key {
		return nil, false, errChanged
	}
	opts := engine.Options{MaxMemoryBytes: cfg.MemoryLimit}
	if cfg.Cached {
		opts.Cache = CachePath
		defer os.NewFile(CacheFD, "cache").Close()
	}
	e, err := engine.New(cfg.Engine, opts)
	if err != nil {
		return nil, false, err
	}
	ctx := context.Background()
	m, err := e.Compile(ctx, wasm)
	if err != nil {
		return nil, false, err
	}
	inst, err := m.Instantiate(ctx, engine.RunConfig{
		Args: cfg.Args, Env: cfg.Env, Root: "/",
		Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr,
	})
	if err != nil {
		return nil, false, err
	}
	// This process instantiates its module once: what the engine keeps for
	// another instantiation can go (wazero's decoded bodies and data).
	if r, ok := inst.(engine.DecodedReleaser); ok {
		r.ReleaseDecoded()
	}
	return inst, m.Cached(), nil
}
