// Package sandbox holds what only the wasm family has: its configuration.
// Its pods are shared/hostpod pods whose containers are WASI modules run by
// package wasmrt.
package sandbox

import (
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/compile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

// Config is wasm-sandboxer's configuration file.
type Config struct {
	daemon.CommonConfig
	Wasm WasmConfig `toml:"wasm"`
}

// WasmConfig chooses the engine and the compiled-module cache.
type WasmConfig struct {
	// Engine runs containers that do not choose one by annotation:
	// "wasmtime" (default where built in), "wazero", "wasmedge" (build tag).
	Engine string `toml:"engine"`
	// AllowedEngines are the engines the annotation wasm.kuasar-go.io/engine
	// may choose; empty allows Engine only. Pod specs are not trusted: an
	// annotation can only pick among what the operator allowed.
	AllowedEngines []string `toml:"allowed_engines"`
	// Cache keeps compiled modules on disk so that a module is compiled
	// once per engine, not at every start.
	Cache bool `toml:"cache"`
	// CacheDir is where; default <dir>/cache.
	CacheDir string `toml:"cache_dir"`
	// MaxModuleSizeMiB bounds the module a container may run.
	MaxModuleSizeMiB int64 `toml:"max_module_size_mib"`
	// CompileMemoryMiB, CompilePids and CompileTimeoutSeconds bound each
	// compile (a child process in a cgroup of its own), CompileConcurrency
	// how many run at once.
	CompileMemoryMiB      int64 `toml:"compile_memory_mib"`
	CompilePids           int64 `toml:"compile_pids"`
	CompileTimeoutSeconds int   `toml:"compile_timeout_seconds"`
	CompileConcurrency    int   `toml:"compile_concurrency"`
}

// DefaultEngine is wasmtime when the build has it (cgo), else wazero.
func DefaultEngine() string {
	if slices.Contains(engine.Names(), "wasmtime") {
		return "wasmtime"
	}
	return "wazero"
}

// DefaultConfig is the configuration without a config file.
func DefaultConfig() *Config {
	return &Config{
		CommonConfig: daemon.CommonConfig{LogLevel: "info"},
		Wasm: WasmConfig{
			Engine: DefaultEngine(), Cache: true,
			MaxModuleSizeMiB: 128, CompileMemoryMiB: 2048, CompilePids: 256,
			CompileTimeoutSeconds: 120, CompileConcurrency: 2,
		},
	}
}

// Validate reports impossible values, naming the key.
func (c *Config) Validate() error {
	if err := engine.Check(c.Wasm.Engine); err != nil {
		return fmt.Errorf("wasm.engine: %w", err)
	}
	for _, name := range c.Wasm.AllowedEngines {
		if err := engine.Check(name); err != nil {
			return fmt.Errorf("wasm.allowed_engines: %w", err)
		}
	}
	if len(c.Wasm.AllowedEngines) > 0 && !slices.Contains(c.Wasm.AllowedEngines, c.Wasm.Engine) {
		return fmt.Errorf("wasm.allowed_engines %q must include wasm.engine %q", c.Wasm.AllowedEngines, c.Wasm.Engine)
	}
	if c.Wasm.CacheDir != "" && !filepath.IsAbs(c.Wasm.CacheDir) {
		return fmt.Errorf("wasm.cache_dir %q must be an absolute path", c.Wasm.CacheDir)
	}
	for _, v := range []struct {
		key string
		n   int64
	}{
		{"max_module_size_mib", c.Wasm.MaxModuleSizeMiB}, {"compile_memory_mib", c.Wasm.CompileMemoryMiB},
		{"compile_pids", c.Wasm.CompilePids}, {"compile_timeout_seconds", int64(c.Wasm.CompileTimeoutSeconds)},
		{"compile_concurrency", int64(c.Wasm.CompileConcurrency)},
	} {
		if v.n <= 0 {
			return fmt.Errorf("wasm.%s = %d must be positive", v.key, v.n)
		}
	}
	return nil
}

// CompileLimits are the bounds of compiles and modules.
func (c *Config) CompileLimits() compile.Limits {
	return compile.Limits{
		Memory:        c.Wasm.CompileMemoryMiB << 20,
		Pids:          c.Wasm.CompilePids,
		Timeout:       time.Duration(c.Wasm.CompileTimeoutSeconds) * time.Second,
		Concurrent:    c.Wasm.CompileConcurrency,
		MaxModuleSize: c.Wasm.MaxModuleSizeMiB << 20,
	}
}

// Allowed is the list of engines containers may run with: allowed_engines,
// or the default engine alone.
func (c *Config) Allowed() []string {
	if len(c.Wasm.AllowedEngines) == 0 {
		return []string{c.Wasm.Engine}
	}
	return c.Wasm.AllowedEngines
}

// ResolvedCacheDir is the cache directory for state directory dir, or ""
// when the cache is off.
func (c *Config) ResolvedCacheDir(dir string) string {
	switch {
	case !c.Wasm.Cache:
		return ""
	case c.Wasm.CacheDir != "":
		return c.Wasm.CacheDir
	}
	return filepath.Join(dir, "cache")
}
