package wasmrt

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// ExitTrap is a module process's exit code when the module trapped.
const ExitTrap = runner.ExitTrap

// IsChild reports whether this process was re-executed as a module
// process or a compiler.
func IsChild() bool { return runner.IsChild() }

// ChildMain is a re-executed child's whole life; call it first in main
// when IsChild.
func ChildMain() { runner.Main() }

// runnerBinary is the program module processes and compilers run:
// kuasar-wasm-runner beside the daemon's executable, else the daemon's
// executable itself (re-executed, it acts as the runner when told by the
// environment). The separate runner costs each container a few MiB less
// (no initialisation of the daemon's packages, a smaller heap).
func runnerBinary() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("find own executable: %w", err)
	}
	return runnerBeside(self), nil
}

// runnerBeside returns the runner binary in self's directory, or self.
func runnerBeside(self string) string {
	if candidate := besideExecutable(self, runner.BinaryName); candidate != "" {
		return candidate
	}
	return self
}

// wasmtimeRunnerBeside returns kuasar-wasm-runner-wasmtime in self's
// directory (the wasmtime engine's module processes without a Go runtime),
// or "" when it is not there.
func wasmtimeRunnerBeside(self string) string {
	return besideExecutable(self, runner.WasmtimeBinaryName)
}

// besideExecutable returns name in self's directory if it is an executable
// regular file, else "".
func besideExecutable(self, name string) string {
	candidate := filepath.Join(filepath.Dir(self), name)
	if fi, err := os.Stat(candidate); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
		return candidate
	}
	return ""
}
