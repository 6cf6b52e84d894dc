//go:build cgo

package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/bytecodealliance/wasmtime-go/v39"
)

// WasmtimeVersion is the wasmtime release built in (wasmtime-go ships its
// static library); it names the cache directory, and wasmtime itself
// refuses serialized code of another version or configuration.
const WasmtimeVersion = "v39.0.1"

func init() { Register("wasmtime", WasmtimeVersion, newWasmtime) }

type wasmtimeEngine struct {
	engine *wasmtime.Engine
	opts   Options
}

func newWasmtime(opts Options) (Engine, error) {
	cfg := wasmtime.NewConfig()
	return &wasmtimeEngine{engine: wasmtime.NewEngineWithConfig(cfg), opts: opts}, nil
}

func (e *wasmtimeEngine) Name() string { return "wasmtime" }

func (e *wasmtimeEngine) Close(ctx context.Context) error {
	e.engine.Close()
	return nil
}

// Compile loads the cache entry's WasmtimeCodeFile (wasmtime's serialized
// code) or compiles the module and stores it there.
func (e *wasmtimeEngine) Compile(ctx context.Context, wasm []byte) (Module, error) {
	if !IsWasm(wasm) {
		return nil, fmt.Errorf("%w: no \\0asm header", ErrInvalidModule)
	}
	var path string
	if e.opts.Cache != "" {
		path = filepath.Join(e.opts.Cache, WasmtimeCodeFile)
		if _, err := os.Stat(path); err == nil {
			m, err := wasmtime.NewModuleDeserializeFile(e.engine, path)
			if err == nil {
				return &wasmtimeModule{e: e, m: m, cached: true}, nil
			}
			// Stale or foreign: compile again and replace it.
			os.Remove(path)
		}
	}
	m, err := wasmtime.NewModule(e.engine, wasm)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidModule, err)
	}
	if path != "" {
		// A cache that cannot be written costs only the next compile.
		if data, err := m.Serialize(); err == nil {
			_ = cacheFile(path, data)
		}
	}
	return &wasmtimeModule{e: e, m: m}, nil
}

type wasmtimeModule struct {
	e      *wasmtimeEngine
	m      *wasmtime.Module
	cached bool
}

func (m *wasmtimeModule) Cached() bool { return m.cached }

func (m *wasmtimeModule) Close(ctx context.Context) error {
	m.m.Close()
	return nil
}

// Instantiate links WASI. wasmtime's WASI takes file paths or the
// process's own streams, so cfg's streams must be the process's 0, 1, 2.
func (m *wasmtimeModule) Instantiate(ctx context.Context, cfg RunConfig) (Instance, error) {
	for _, f := range []*os.File{cfg.Stdin, cfg.Stdout, cfg.Stderr} {
		if f != nil && f != os.Stdin && f != os.Stdout && f != os.Stderr {
			return nil, fmt.Errorf("wasmtime: WASI streams must be the process's own (got %s)", f.Name())
		}
	}
	linker := wasmtime.NewLinker(m.e.engine)
	if err := linker.DefineWasi(); err != nil {
		linker.Close()
		return nil, fmt.Errorf("wasmtime: define WASI: %w", err)
	}
	store := wasmtime.NewStore(m.e.engine)
	inst := &wasmtimeInstance{linker: linker, store: store}
	if m.e.opts.MaxMemoryBytes > 0 {
		store.Limiter(int64(m.e.opts.MaxMemoryBytes), -1, -1, -1, -1)
	}
	wasi := wasmtime.NewWasiConfig()
	wasi.SetArgv(cfg.Args)
	keys, values := make([]string, 0, len(cfg.Env)), make([]string, 0, len(cfg.Env))
	for _, kv := range cfg.Env {
		k, v, _ := strings.Cut(kv, "=")
		keys, values = append(keys, k), append(values, v)
	}
	wasi.SetEnv(keys, values)
	if cfg.Stdin != nil {
		wasi.InheritStdin()
	}
	if cfg.Stdout != nil {
		wasi.InheritStdout()
	}
	if cfg.Stderr != nil {
		wasi.InheritStderr()
	}
	if cfg.Root != "" {
		if err := wasi.PreopenDir(cfg.Root, "/", wasmtime.DIR_READ|wasmtime.DIR_WRITE, wasmtime.FILE_READ|wasmtime.FILE_WRITE); err != nil {
			inst.Close(ctx)
			return nil, fmt.Errorf("wasmtime: pre-open %s: %w", cfg.Root, err)
		}
	}
	store.SetWasi(wasi)
	in, err := linker.Instantiate(store, m.m)
	if err != nil {
		inst.Close(ctx)
		return nil, fmt.Errorf("%w: %v", ErrLink, err)
	}
	if inst.start = in.GetFunc(store, "_start"); inst.start == nil {
		inst.Close(ctx)
		return nil, fmt.Errorf("%w: the module exports no _start (not a WASI command)", ErrLink)
	}
	return inst, nil
}

type wasmtimeInstance struct {
	linker *wasmtime.Linker
	store  *wasmtime.Store
	start  *wasmtime.Func
}

func (i *wasmtimeInstance) Run(ctx context.Context) (int, error) {
	if _, err := i.start.Call(i.store); err != nil {
		var werr *wasmtime.Error
		if errors.As(err, &werr) {
			if code, ok := werr.ExitStatus(); ok {
				return int(code), nil
			}
		}
		return 0, fmt.Errorf("%w: %v", ErrTrap, err)
	}
	return 0, nil
}

func (i *wasmtimeInstance) Close(ctx context.Context) error {
	i.store.Close()
	i.linker.Close()
	return nil
}
