//go:build wasmedge && cgo

// WasmEdge needs its C library (libwasmedge, with headers) at build and
// run time, which no package registry here offers: it is built only with
// `-tags wasmedge` (docs/wasm.md says how).

package engine

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/second-state/WasmEdge-go/wasmedge"
)

// WasmEdgeVersion is the WasmEdge-go release (and libwasmedge series) the
// engine is written against; it names the cache directory.
const WasmEdgeVersion = "v0.14.0"

func init() { Register("wasmedge", WasmEdgeVersion, newWasmEdge) }

type wasmEdgeEngine struct {
	opts     Options
	cacheDir string
}

func newWasmEdge(opts Options) (Engine, error) {
	wasmedge.SetLogErrorLevel()
	e := &wasmEdgeEngine{opts: opts}
	if opts.Cache != "" {
		e.cacheDir = opts.Cache
	}
	return e, nil
}

func (e *wasmEdgeEngine) Name() string { return "wasmedge" }

func (e *wasmEdgeEngine) Close(ctx context.Context) error { return nil }

func (e *wasmEdgeEngine) config() *wasmedge.Configure {
	conf := wasmedge.NewConfigure(wasmedge.WASI)
	if e.opts.MaxMemoryBytes > 0 {
		pages := e.opts.MaxMemoryBytes / 65536
		if pages == 0 {
			pages = 1
		}
		if pages > 65536 {
			pages = 65536
		}
		conf.SetMaxMemoryPage(uint(pages))
	}
	return conf
}

// Compile validates the module and, with a cache, compiles it ahead of
// time into the entry's module.wasm (a universal wasm file: the module plus
// WasmEdge's native code, which its loader prefers). A libwasmedge built
// without the AOT compiler runs modules in its interpreter.
func (e *wasmEdgeEngine) Compile(ctx context.Context, wasm []byte) (Module, error) {
	if !IsWasm(wasm) {
		return nil, fmt.Errorf("%w: no \\0asm header", ErrInvalidModule)
	}
	conf := e.config()
	defer conf.Release()
	loader := wasmedge.NewLoaderWithConfig(conf)
	defer loader.Release()
	ast, err := loader.LoadBuffer(wasm)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidModule, err)
	}
	defer ast.Release()
	validator := wasmedge.NewValidatorWithConfig(conf)
	defer validator.Release()
	if err := validator.Validate(ast); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidModule, err)
	}
	m := &wasmEdgeModule{e: e, wasm: wasm}
	if e.cacheDir == "" {
		return m, nil
	}
	path := filepath.Join(e.cacheDir, "module.wasm")
	if _, err := os.Stat(path); err == nil {
		m.path, m.cached = path, true
		return m, nil
	}
	if err := os.MkdirAll(e.cacheDir, 0o700); err != nil {
		return m, nil
	}
	tmp := path + fmt.Sprintf(".tmp-%d", os.Getpid())
	compiler := wasmedge.NewCompilerWithConfig(conf)
	defer compiler.Release()
	if err := compiler.CompileBuffer(wasm, tmp); err != nil {
		os.Remove(tmp)
		return m, nil // interpreter
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return m, nil
	}
	m.path = path
	return m, nil
}

type wasmEdgeModule struct {
	e      *wasmEdgeEngine
	wasm   []byte
	path   string // AOT-compiled file, when there is one
	cached bool
}

func (m *wasmEdgeModule) Cached() bool { return m.cached }

func (m *wasmEdgeModule) Close(ctx context.Context) error { return nil }

// Instantiate links WASI; WasmEdge's WASI uses the process's 0, 1, 2.
func (m *wasmEdgeModule) Instantiate(ctx context.Context, cfg RunConfig) (Instance, error) {
	for _, f := range []*os.File{cfg.Stdin, cfg.Stdout, cfg.Stderr} {
		if f != nil && f != os.Stdin && f != os.Stdout && f != os.Stderr {
			return nil, fmt.Errorf("wasmedge: WASI streams must be the process's own (got %s)", f.Name())
		}
	}
	conf := m.e.config()
	vm := wasmedge.NewVMWithConfig(conf)
	conf.Release()
	inst := &wasmEdgeInstance{vm: vm, wasi: vm.GetImportModule(wasmedge.WASI)}
	var preopens []string
	if cfg.Root != "" {
		preopens = []string{"/:" + cfg.Root}
	}
	inst.wasi.InitWasi(cfg.Args, cfg.Env, preopens)
	var err error
	if m.path != "" {
		err = vm.LoadWasmFile(m.path)
	} else {
		err = vm.LoadWasmBuffer(m.wasm)
	}
	if err == nil {
		err = vm.Validate()
	}
	if err != nil {
		vm.Release()
		return nil, fmt.Errorf("%w: %v", ErrInvalidModule, err)
	}
	if err := vm.Instantiate(); err != nil {
		vm.Release()
		return nil, fmt.Errorf("%w: %v", ErrLink, err)
	}
	if vm.GetFunctionType("_start") == nil {
		vm.Release()
		return nil, fmt.Errorf("%w: the module exports no _start (not a WASI command)", ErrLink)
	}
	return inst, nil
}

type wasmEdgeInstance struct {
	vm   *wasmedge.VM
	wasi *wasmedge.Module
}

// Run calls _start; WasmEdge reports proc_exit as success and keeps the
// code in the WASI module.
func (i *wasmEdgeInstance) Run(ctx context.Context) (int, error) {
	if _, err := i.vm.Execute("_start"); err != nil {
		return 0, fmt.Errorf("%w: %v", ErrTrap, err)
	}
	return int(i.wasi.WasiGetExitCode()), nil
}

func (i *wasmEdgeInstance) Close(ctx context.Context) error {
	i.vm.Release()
	return nil
}
