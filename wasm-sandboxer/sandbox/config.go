// Package sandbox holds what only the wasm family has: its configuration.
// Its pods are shared/hostpod pods whose containers are WASI modules run by
// package wasmrt.
package sandbox

import (
	"fmt"
	"path/filepath"
	"slices"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
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
	// WasmtimeGoRunner runs wasmtime containers with the Go runner
	// (kuasar-wasm-runner) even when kuasar-wasm-runner-wasmtime (C on
	// wasmtime's C API, no Go runtime: less memory per container) lies
	// beside the daemon, which it otherwise does. Default false.
	WasmtimeGoRunner bool `toml:"wasmtime_go_runner"`
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
		Wasm:         WasmConfig{Engine: DefaultEngine(), Cache: true},
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
	return nil
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
