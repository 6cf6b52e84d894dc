// Package runner is a wasm container's process, and the compiler that
// fills the compiled-module cache: the small kuasar-wasm-runner binary
// (cmd/kuasar-wasm-runner) or, when it is not installed beside the daemon,
// the daemon's binary re-executed. It imports only the engines and what
// the process needs, so that a module process does not pay for the
// daemon's packages (gRPC, protobuf registries, containerd, zap) in
// initialisation time and memory.
package runner

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/containerd/fifo"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

// The daemon starts a runner for two jobs, told by EnvMode: "compile"
// fills the compiled-module cache outside any container, "run" is a
// container's process (init or exec'd), living in the pod's namespaces and
// the container's cgroup until the module exits.
const (
	EnvMode     = "KUASAR_GO_WASM_CHILD"
	ModeRun     = "run"
	ModeCompile = "compile"

	// BinaryName is the runner binary the daemon looks for beside its own.
	BinaryName = "kuasar-wasm-runner"
	// WasmtimeBinaryName is the runner without a Go runtime, for the
	// wasmtime engine's module processes only (C, on wasmtime's C API:
	// cmd/kuasar-wasm-runner-wasmtime). It speaks this package's "run"
	// protocol; compiling stays with BinaryName.
	WasmtimeBinaryName = "kuasar-wasm-runner-wasmtime"

	// File descriptors of a run child: the control pipe (config line, then
	// one byte that starts the module) and the status pipe (one JSON
	// status once the module is ready to start, or why it is not).
	ControlFD = 3
	StatusFD  = 4

	// ExitInvalidModule is a compile child's exit code for a module the
	// engine rejects.
	ExitInvalidModule = 2
	// ExitTrap is a module process's exit code when the module trapped
	// (as a process dying of SIGABRT would report).
	ExitTrap = 134

	// maxProcs bounds the Go scheduler's Ps of a module process: a WASI
	// preview 1 module runs on one thread (wasmtime's in a cgo call, which
	// gives its P back; wazero's on a goroutine). Each P costs a cache of
	// heap spans and more threads: 1 instead of 2 saves 0.1 MiB per
	// container with wasmtime, 0.35 MiB with wazero. The daemon starts the
	// process with GOMAXPROCS=1 already, so that the second P is never made.
	maxProcs = 1
)

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

// CompileRequest is a compile child's stdin.
type CompileRequest struct {
	Engine   string `json:"engine"`
	CacheDir string `json:"cache_dir"`
	Module   string `json:"module"`
}

func compileMain() int {
	var req CompileRequest
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintf(os.Stderr, "decode compile request: %v", err)
		return 1
	}
	wasm, err := os.ReadFile(req.Module)
	if err != nil {
		fmt.Fprint(os.Stderr, err)
		return 1
	}
	ctx := context.Background()
	e, err := engine.New(req.Engine, engine.Options{CacheDir: req.CacheDir})
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
	return 0
}

// RunConfig is what the daemon tells a module process (one JSON line on
// the control pipe).
type RunConfig struct {
	Engine   string `json:"engine"`
	CacheDir string `json:"cache_dir,omitempty"`
	// Module is the module's host path; Rootfs the container's root
	// filesystem, which becomes the process's root and WASI's "/".
	Module string `json:"module"`
	// Compiled is the module's compiled code in the cache, for runners
	// that do not find it themselves (kuasar-wasm-runner-wasmtime); this
	// package's runner ignores it.
	Compiled string   `json:"compiled,omitempty"`
	Rootfs   string   `json:"rootfs"`
	Args     []string `json:"args"`
	Env      []string `json:"env,omitempty"`
	// Stdin, Stdout and Stderr are containerd's FIFOs ("" keeps /dev/null).
	Stdin  string   `json:"stdin,omitempty"`
	Stdout string   `json:"stdout,omitempty"`
	Stderr string   `json:"stderr,omitempty"`
	UID    uint32   `json:"uid,omitempty"`
	GID    uint32   `json:"gid,omitempty"`
	Groups []uint32 `json:"groups,omitempty"`
	// MemoryLimit is the container's memory limit in bytes (0: none).
	MemoryLimit uint64 `json:"memory_limit,omitempty"`
	Hostname    string `json:"hostname,omitempty"`
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

// openTimeout bounds the wait for containerd's side of a FIFO.
const openTimeout = 30 * time.Second

func runMain() int {
	if runtime.GOMAXPROCS(0) > maxProcs {
		runtime.GOMAXPROCS(maxProcs)
	}
	ctl := os.NewFile(ControlFD, "control")
	status := os.NewFile(StatusFD, "status")
	report := func(st Status) {
		json.NewEncoder(status).Encode(st)
		status.Close()
	}
	rd := bufio.NewReader(ctl)
	line, err := rd.ReadBytes('\n')
	if err != nil {
		report(Status{Error: fmt.Sprintf("read config: %v", err)})
		return 1
	}
	var cfg RunConfig
	if err := json.Unmarshal(line, &cfg); err != nil {
		report(Status{Error: fmt.Sprintf("decode config: %v", err)})
		return 1
	}
	procSelf := openProcSelf() // before prepare chroots
	inst, cached, err := prepare(cfg)
	if err != nil {
		report(Status{Error: err.Error(), Invalid: errors.Is(err, engine.ErrInvalidModule) || errors.Is(err, engine.ErrLink)})
		return 1
	}
	report(Status{Cached: cached})
	// The file pages that loading and instantiating mapped leave this
	// process's page tables (they stay in the page cache; see
	// releaseStartupPages). What they left behind on the heap (the
	// module's bytes, the engine's decoding buffers) goes back to the
	// kernel now, while the process waits: else the Go heap keeps it
	// resident for the life of the container.
	releaseStartupPages(procSelf)
	debug.FreeOSMemory()

	// Created: wait for Start. The daemon closing the pipe without a byte
	// means the process is deleted unstarted.
	if _, err := rd.ReadByte(); err != nil {
		return 1
	}
	ctl.Close()
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

// prepare does everything before the module runs: FIFOs, the engine and
// module (from the cache), the root, the user, and instantiation.
func prepare(cfg RunConfig) (engine.Instance, bool, error) {
	if cfg.MemoryLimit > 0 {
		// The Go heap (wazero's linear memory lives there) then collects
		// before the cgroup kills.
		debug.SetMemoryLimit(int64(cfg.MemoryLimit) * 9 / 10)
	}
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	for _, s := range []struct {
		path string
		flag int
		fd   int
	}{{cfg.Stdin, unix.O_RDONLY, 0}, {cfg.Stdout, unix.O_WRONLY, 1}, {cfg.Stderr, unix.O_WRONLY, 2}} {
		if s.path == "" {
			continue
		}
		if _, err := fifo.OpenFifoDup2(ctx, s.path, s.flag, 0, s.fd); err != nil {
			return nil, false, fmt.Errorf("open %s: %w", s.path, err)
		}
	}
	e, err := engine.New(cfg.Engine, engine.Options{CacheDir: cfg.CacheDir, MaxMemoryBytes: cfg.MemoryLimit})
	if err != nil {
		return nil, false, err
	}
	wasm, err := os.ReadFile(cfg.Module)
	if err != nil {
		return nil, false, err
	}
	m, err := e.Compile(ctx, wasm)
	if err != nil {
		return nil, false, err
	}
	// The module sees the rootfs only: paths it opens resolve inside it
	// whatever the engine does with symlinks.
	if err := syscall.Chroot(cfg.Rootfs); err != nil {
		return nil, false, fmt.Errorf("chroot %s: %w", cfg.Rootfs, err)
	}
	if err := os.Chdir("/"); err != nil {
		return nil, false, err
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			return nil, false, fmt.Errorf("set hostname: %w", err)
		}
	}
	if cfg.UID != 0 || cfg.GID != 0 || len(cfg.Groups) > 0 {
		groups := make([]int, len(cfg.Groups))
		for i, g := range cfg.Groups {
			groups[i] = int(g)
		}
		if err := syscall.Setgroups(groups); err != nil {
			return nil, false, fmt.Errorf("setgroups: %w", err)
		}
		if err := syscall.Setgid(int(cfg.GID)); err != nil {
			return nil, false, fmt.Errorf("setgid %d: %w", cfg.GID, err)
		}
		if err := syscall.Setuid(int(cfg.UID)); err != nil {
			return nil, false, fmt.Errorf("setuid %d: %w", cfg.UID, err)
		}
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
