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
