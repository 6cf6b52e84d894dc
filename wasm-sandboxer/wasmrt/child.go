package wasmrt

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/containerd/fifo"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

// The daemon re-executes itself for two jobs, told by envChild:
// "compile" fills the compiled-module cache outside any container, "run"
// is a container's process (init or exec'd), living in the pod's
// namespaces and the container's cgroup until the module exits.
const (
	envChild     = "KUASAR_GO_WASM_CHILD"
	childRun     = "run"
	childCompile = "compile"

	// File descriptors of a run child: the control pipe (config line, then
	// one byte that starts the module) and the status pipe (one JSON
	// status once the module is ready to start, or why it is not).
	controlFD = 3
	statusFD  = 4

	// exitInvalidModule is a compile child's exit code for a module the
	// engine rejects.
	exitInvalidModule = 2
	// ExitTrap is a module process's exit code when the module trapped
	// (as a process dying of SIGABRT would report).
	ExitTrap = 134
)

// IsChild reports whether this process was re-executed as a module
// process or a compiler.
func IsChild() bool { return os.Getenv(envChild) != "" }

// ChildMain is a child's whole life; call it first in main when IsChild.
func ChildMain() {
	switch os.Getenv(envChild) {
	case childCompile:
		os.Exit(compileMain())
	case childRun:
		os.Exit(runMain())
	}
	fmt.Fprintf(os.Stderr, "wasm-sandboxer: unknown child mode %q\n", os.Getenv(envChild))
	os.Exit(1)
}

// compileRequest is a compile child's stdin.
type compileRequest struct {
	Engine   string `json:"engine"`
	CacheDir string `json:"cache_dir"`
	Module   string `json:"module"`
}

func compileMain() int {
	var req compileRequest
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
			return exitInvalidModule
		}
		return 1
	}
	m.Close(ctx)
	e.Close(ctx)
	return 0
}

// runConfig is what the daemon tells a module process.
type runConfig struct {
	Engine   string `json:"engine"`
	CacheDir string `json:"cache_dir,omitempty"`
	// Module is the module's host path; Rootfs the container's root
	// filesystem, which becomes the process's root and WASI's "/".
	Module string   `json:"module"`
	Rootfs string   `json:"rootfs"`
	Args   []string `json:"args"`
	Env    []string `json:"env,omitempty"`
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

// childStatus is what a module process reports once ready (Error empty) or
// failed; Invalid marks the container's fault (its module or request).
type childStatus struct {
	Error   string `json:"error,omitempty"`
	Invalid bool   `json:"invalid,omitempty"`
	Cached  bool   `json:"cached,omitempty"`
}

// openTimeout bounds the wait for containerd's side of a FIFO.
const openTimeout = 30 * time.Second

func runMain() int {
	ctl := os.NewFile(controlFD, "control")
	status := os.NewFile(statusFD, "status")
	report := func(st childStatus) {
		json.NewEncoder(status).Encode(st)
		status.Close()
	}
	rd := bufio.NewReader(ctl)
	line, err := rd.ReadBytes('\n')
	if err != nil {
		report(childStatus{Error: fmt.Sprintf("read config: %v", err)})
		return 1
	}
	var cfg runConfig
	if err := json.Unmarshal(line, &cfg); err != nil {
		report(childStatus{Error: fmt.Sprintf("decode config: %v", err)})
		return 1
	}
	inst, cached, err := prepare(cfg)
	if err != nil {
		report(childStatus{Error: err.Error(), Invalid: errors.Is(err, engine.ErrInvalidModule) || errors.Is(err, engine.ErrLink)})
		return 1
	}
	report(childStatus{Cached: cached})

	// Created: wait for Start. The daemon closing the pipe without a byte
	// means the process is deleted unstarted.
	if _, err := rd.ReadByte(); err != nil {
		return 1
	}
	ctl.Close()
	code, err := inst.Run(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "wasm-sandboxer: %v\n", err)
		return ExitTrap
	}
	return code
}

// prepare does everything before the module runs: FIFOs, the engine and
// module (from the cache), the root, the user, and instantiation.
func prepare(cfg runConfig) (engine.Instance, bool, error) {
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
	return inst, m.Cached(), nil
}
