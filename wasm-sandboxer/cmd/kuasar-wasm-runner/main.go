// Command kuasar-wasm-runner is a wasm container's process for the engines
// other than wasmtime (wazero): runc execs it inside the container, from a
// descriptor wasm-sandboxer passes on, to run one WASI module (package
// runner). Built without cgo, it is static, as a program that runs in the
// container's root must be, and a small program of its own (no gRPC,
// protobuf or containerd packages), so that it costs each container little
// memory. It is not meant to be run by hand.
package main

import (
	"fmt"
	"os"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

func main() {
	if !runner.IsChild() {
		fmt.Fprintf(os.Stderr, "%s runs wasm-sandboxer's module processes; it is started by wasm-sandboxer\n", runner.BinaryName)
		os.Exit(2)
	}
	runner.Main()
}
