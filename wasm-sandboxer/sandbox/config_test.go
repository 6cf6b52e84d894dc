package sandbox

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

func TestConfig(t *testing.T) {
	tests := []struct {
		name     string
		toml     string
		wantErr  string
		engine   string
		cacheDir string
		goRunner bool
	}{
		{name: "defaults", toml: "", engine: DefaultEngine(), cacheDir: "/state/cache"},
		{name: "Go runner for wasmtime", toml: "[wasm]\nwasmtime_go_runner = true\n", engine: DefaultEngine(), cacheDir: "/state/cache", goRunner: true},
		{name: "wazero, cache elsewhere", toml: "[wasm]\nengine = \"wazero\"\ncache_dir = \"/var/cache/wasm\"\n", engine: "wazero", cacheDir: "/var/cache/wasm"},
		{name: "cache off", toml: "[wasm]\ncache = false\n", engine: DefaultEngine(), cacheDir: ""},
		{name: "unknown engine", toml: "[wasm]\nengine = \"nosuch\"\n", wantErr: `wasm.engine: unknown wasm engine "nosuch"`},
		{name: "relative cache dir", toml: "[wasm]\ncache_dir = \"cache\"\n", wantErr: "must be an absolute path"},
		{name: "unknown key", toml: "[wasm]\nengines = \"wazero\"\n", wantErr: "unknown key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
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
			if cfg.Wasm.WasmtimeGoRunner != tc.goRunner {
				t.Errorf("wasmtime_go_runner %v, want %v", cfg.Wasm.WasmtimeGoRunner, tc.goRunner)
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
