package wasmrt

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// The daemon runs kuasar-wasm-runner when it lies, executable, beside it,
// and re-executes itself otherwise.
func TestRunnerBeside(t *testing.T) {
	dir := t.TempDir()
	self := filepath.Join(dir, "wasm-sandboxer")
	runnerPath := filepath.Join(dir, runner.BinaryName)
	if got := runnerBeside(self); got != self {
		t.Errorf("no runner: got %s, want %s", got, self)
	}
	if err := os.WriteFile(runnerPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := runnerBeside(self); got != self {
		t.Errorf("runner not executable: got %s, want %s", got, self)
	}
	if err := os.Chmod(runnerPath, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := runnerBeside(self); got != runnerPath {
		t.Errorf("got %s, want %s", got, runnerPath)
	}
}

// kuasar-wasm-runner-wasmtime is used when it lies, executable, beside the
// daemon; nothing else stands in for it.
func TestWasmtimeRunnerBeside(t *testing.T) {
	dir := t.TempDir()
	self := filepath.Join(dir, "wasm-sandboxer")
	if got := wasmtimeRunnerBeside(self); got != "" {
		t.Errorf("no runner: got %q", got)
	}
	p := filepath.Join(dir, runner.WasmtimeBinaryName)
	if err := os.WriteFile(p, nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := wasmtimeRunnerBeside(self); got != p {
		t.Errorf("got %q, want %s", got, p)
	}
	rt := &Runtime{self: self, wasmtimeRunner: p}
	if got := rt.runnerFor("wasmtime"); got != p {
		t.Errorf("wasmtime runs %s, want %s", got, p)
	}
	if got := rt.runnerFor("wazero"); got != self {
		t.Errorf("wazero runs %s, want %s", got, self)
	}
}
