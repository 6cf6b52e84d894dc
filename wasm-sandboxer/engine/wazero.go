package engine

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"github.com/tetratelabs/wazero/sys"
)

// WazeroVersion is the wazero release built in; it names the cache
// directory.
const WazeroVersion = "v1.12.0"

func init() { Register("wazero", WazeroVersion, newWazero) }

type wazeroEngine struct {
	opts     Options
	rt       wazero.Runtime
	cacheDir string
}

func newWazero(opts Options) (Engine, error) {
	ctx := context.Background()
	cfg := wazero.NewRuntimeConfigCompiler().WithCloseOnContextDone(true)
	e := &wazeroEngine{opts: opts}
	if opts.Cache != "" {
		// wazero keys its files by the module's content and its own version.
		e.cacheDir = filepath.Join(opts.Cache, "code")
		cache, err := wazero.NewCompilationCacheWithDir(e.cacheDir)
		if err != nil {
			return nil, fmt.Errorf("wazero cache %s: %w", e.cacheDir, err)
		}
		cfg = cfg.WithCompilationCache(cache)
	}
	if opts.MaxMemoryBytes > 0 {
		pages := opts.MaxMemoryBytes / 65536
		if pages == 0 {
			pages = 1
		}
		if pages > 65536 {
			pages = 65536
		}
		cfg = cfg.WithMemoryLimitPages(uint32(pages))
	}
	e.rt = wazero.NewRuntimeWithConfig(ctx, cfg)
	if _, err := wasi_snapshot_preview1.Instantiate(ctx, e.rt); err != nil {
		e.rt.Close(ctx)
		return nil, fmt.Errorf("wazero: instantiate WASI: %w", err)
	}
	return e, nil
}

func (e *wazeroEngine) Name() string { return "wazero" }

func (e *wazeroEngine) Close(ctx context.Context) error { return e.rt.Close(ctx) }

// cacheEntries counts the files of wazero's cache: a compile that adds
// none was served from the cache.
func (e *wazeroEngine) cacheEntries() int {
	n := 0
	filepath.WalkDir(e.cacheDir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && !strings.HasPrefix(d.Name(), ".") {
			n++
		}
		return nil
	})
	return n
}

func (e *wazeroEngine) Compile(ctx context.Context, wasm []byte) (Module, error) {
	if !IsWasm(wasm) {
		return nil, fmt.Errorf("%w: no \\0asm header", ErrInvalidModule)
	}
	before := -1
	if e.cacheDir != "" {
		before = e.cacheEntries()
	}
	var regions map[codeRegion]bool
	if e.cacheDir != "" {
		regions = codeRegions()
	}
	cm, err := e.rt.CompileModule(ctx, wasm)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidModule, err)
	}
	cached := before > 0 && e.cacheEntries() == before
	// The module's machine code: from a file shared by every process that
	// runs it, rather than private memory (see shareCode).
	shareCode(filepath.Join(filepath.Dir(e.cacheDir), "shared"), regions)
	return &wazeroModule{e: e, cm: cm, cached: cached}, nil
}

type wazeroModule struct {
	e      *wazeroEngine
	cm     wazero.CompiledModule
	cached bool
}

func (m *wazeroModule) Cached() bool { return m.cached }

func (m *wazeroModule) Close(ctx context.Context) error { return m.cm.Close(ctx) }

func (m *wazeroModule) Instantiate(ctx context.Context, cfg RunConfig) (Instance, error) {
	// Imports no host module provides fail instantiation; say which.
	for _, f := range m.cm.ImportedFunctions() {
		mod, name, _ := f.Import()
		if mod != wasi_snapshot_preview1.ModuleName {
			return nil, fmt.Errorf("%w: import %s.%s is not provided (wazero provides %s)", ErrLink, mod, name, wasi_snapshot_preview1.ModuleName)
		}
	}
	if _, ok := m.cm.ExportedFunctions()["_start"]; !ok {
		return nil, fmt.Errorf("%w: the module exports no _start (not a WASI command)", ErrLink)
	}
	mc := wazero.NewModuleConfig().
		WithName("").
		WithStartFunctions(). // Run calls _start
		WithArgs(cfg.Args...).
		WithSysWalltime().
		WithSysNanotime().
		WithSysNanosleep().
		WithRandSource(rand.Reader)
	if cfg.Stdin != nil {
		mc = mc.WithStdin(cfg.Stdin)
	}
	if cfg.Stdout != nil {
		mc = mc.WithStdout(cfg.Stdout)
	}
	if cfg.Stderr != nil {
		mc = mc.WithStderr(cfg.Stderr)
	}
	for _, kv := range cfg.Env {
		k, v, _ := strings.Cut(kv, "=")
		mc = mc.WithEnv(k, v)
	}
	if cfg.Root != "" {
		mc = mc.WithFSConfig(wazero.NewFSConfig().WithDirMount(cfg.Root, "/"))
	}
	// The linear memory: reserved address space rather than Go heap (see
	// mmapMemory).
	mod, err := m.e.rt.InstantiateModule(withMemoryAllocator(ctx), m.cm, mc)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrLink, err)
	}
	return &wazeroInstance{mod: mod, cm: m.cm}, nil
}

type wazeroInstance struct {
	mod api.Module
	cm  wazero.CompiledModule
}

// ReleaseDecoded drops wazero's copies of the module's function bodies and
// active data segments (see releaseDecoded); the module it was
// instantiated from must not be instantiated again. False: wazero's
// types were not as expected, nothing was released.
func (i *wazeroInstance) ReleaseDecoded() bool { return releaseDecoded(i.cm, i.mod) }

func (i *wazeroInstance) Run(ctx context.Context) (int, error) {
	_, err := i.mod.ExportedFunction("_start").Call(ctx)
	if err != nil {
		var exit *sys.ExitError
		if errors.As(err, &exit) {
			return int(exit.ExitCode()), nil
		}
		return 0, fmt.Errorf("%w: %v", ErrTrap, err)
	}
	return 0, nil
}

func (i *wazeroInstance) Close(ctx context.Context) error { return i.mod.Close(ctx) }
