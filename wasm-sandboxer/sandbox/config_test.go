package sandbox

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/compile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

func TestConfig(t *testing.T) {
	// An engine besides wazero, where the build has one (cgo: wasmtime).
	other := ""
	for _, n := range engine.Names() {
		if n != "wazero" {
			other = n
		}
	}
	tests := []struct {
		name     string
		toml     string
		wantErr  string
		engine   string
		cacheDir string
		allowed  []string
		limits   *compile.Limits
		// needOther: the case needs an engine besides wazero.
		needOther bool
	}{
		{name: "defaults", toml: "", engine: DefaultEngine(), cacheDir: "/state/cache", allowed: []string{DefaultEngine()}},
		{name: "allowed engines", toml: "[wasm]\nengine = \"wazero\"\nallowed_engines = [\"wazero\"]\n", engine: "wazero", cacheDir: "/state/cache", allowed: []string{"wazero"}},
		{name: "allowed engines empty", toml: "[wasm]\nengine = \"wazero\"\nallowed_engines = []\n", engine: "wazero", cacheDir: "/state/cache", allowed: []string{"wazero"}},
		{name: "unknown allowed engine", toml: "[wasm]\nengine = \"wazero\"\nallowed_engines = [\"wazero\", \"v8\"]\n", wantErr: `wasm.allowed_engines: unknown wasm engine "v8"`},
		{name: "allowed engines without the default", toml: "[wasm]\nengine = \"wazero\"\nallowed_engines = [\"" + other + "\"]\n", wantErr: "must include wasm.engine", needOther: true},
		{name: "limits", toml: "[wasm]\nmax_module_size_mib = 4\ncompile_memory_mib = 64\ncompile_pids = 16\ncompile_timeout_seconds = 5\ncompile_concurrency = 1\n",
			engine: DefaultEngine(), cacheDir: "/state/cache",
			limits: &compile.Limits{MaxModuleSize: 4 << 20, Memory: 64 << 20, Pids: 16, Timeout: 5 * time.Second, Concurrent: 1}},
		{name: "no memory for compiles", toml: "[wasm]\ncompile_memory_mib = 0\n", wantErr: "wasm.compile_memory_mib = 0 must be positive"},
		{name: "negative module size", toml: "[wasm]\nmax_module_size_mib = -1\n", wantErr: "wasm.max_module_size_mib = -1 must be positive"},
		{name: "Go runner for wasmtime (gone)", toml: "[wasm]\nwasmtime_go_runner = true\n", wantErr: "unknown key"},
		{name: "wazero, cache elsewhere", toml: "[wasm]\nengine = \"wazero\"\ncache_dir = \"/var/cache/wasm\"\n", engine: "wazero", cacheDir: "/var/cache/wasm"},
		{name: "cache off", toml: "[wasm]\ncache = false\n", engine: DefaultEngine(), cacheDir: ""},
		{name: "unknown engine", toml: "[wasm]\nengine = \"nosuch\"\n", wantErr: `wasm.engine: unknown wasm engine "nosuch"`},
		{name: "relative cache dir", toml: "[wasm]\ncache_dir = \"cache\"\n", wantErr: "must be an absolute path"},
		{name: "unknown key", toml: "[wasm]\nengines = \"wazero\"\n", wantErr: "unknown key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needOther && other == "" {
				t.Skip("this build has wazero only")
			}
			p := filepath.Join(t.TempDir(), "c.toml")
			if err := os.WriteFile(p, []byte(tc.toml), 0o644); err != nil {
				t.Fatal(err)
			}
			flags, err := daemon.ParseFlags("wasm-sandboxer", []string{"--config", p}, os.Stderr)
			if err != nil {
				t.Fatal(err)
			}
			cfg := DefaultConfig()
			err = flags.LoadConfig(cfg)
			if err == nil {
				err = cfg.Validate()
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Wasm.Engine != tc.engine || cfg.ResolvedCacheDir("/state") != tc.cacheDir {
				t.Errorf("engine %q cache %q; want %q %q", cfg.Wasm.Engine, cfg.ResolvedCacheDir("/state"), tc.engine, tc.cacheDir)
			}
			if tc.allowed != nil && !slices.Equal(cfg.Allowed(), tc.allowed) {
				t.Errorf("allowed engines %q, want %q", cfg.Allowed(), tc.allowed)
			}
			if tc.limits != nil && cfg.CompileLimits() != *tc.limits {
				t.Errorf("limits %+v, want %+v", cfg.CompileLimits(), *tc.limits)
			}
		})
	}
}

func TestDeployedConfigDocumentsDefaults(t *testing.T) {
	if !slices.Contains(engine.Names(), "wasmtime") {
		t.Skip("built without cgo: no wasmtime, whose defaults the file documents")
	}
	testenv.CheckDocumentedConfig(t, "../../deploy/config/wasm-sandboxer.toml", &Config{}, DefaultConfig())
}
