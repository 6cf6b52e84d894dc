// Command kuasar-wasm-runner is a wasm container's process: wasm-sandboxer
// starts it in the pod's namespaces and the container's cgroup to run one
// WASI module (and, outside any container, to compile a module into the
// cache). It is installed beside wasm-sandboxer, which otherwise
// re-executes itself for the same job; being a small program of its own
// (the engines, no gRPC, protobuf or containerd packages) it costs each
// container less memory. It is not meant to be run by hand.
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
