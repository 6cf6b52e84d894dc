// Command wasm-sandboxer serves containerd's sandbox controller and task
// APIs for pods whose containers are WebAssembly (WASI) modules, run by
// wasmtime, wazero or WasmEdge: each container is an OCI container under
// runc whose process is the engine's runner, in the pod's namespaces and
// cgroup. One daemon serves every pod of the node.
package main

import (
	"path/filepath"
	"strings"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/hostpod"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/wasmrt"
)

func main() {
	// The compile child (package compile) is this binary too: it has the
	// engines.
	if runner.IsChild() {
		runner.Main()
		return
	}
	cfg := sandbox.DefaultConfig()
	hostpod.Main("wasm-sandboxer", cfg, func(base *daemon.Base) (task.Runtime, error) {
		return wasmrt.New(wasmrt.Config{
			Engine:         cfg.Wasm.Engine,
			AllowedEngines: cfg.Allowed(),
			CacheDir:       cfg.ResolvedCacheDir(base.Flags.Dir),
			Compile:        cfg.CompileLimits(),
			// containerd's gRPC socket beside its ttrpc one, for the
			// content store (wasm OCI artifacts).
			ContainerdAddress: strings.TrimSuffix(base.Flags.ContainerdAddress, ".ttrpc"),
			ModulesDir:        filepath.Join(base.Flags.Dir, "modules"),
			// runc's state, as runc-sandboxer keeps it.
			Runtime: task.RuntimeConfig{Root: filepath.Join(base.Flags.Dir, "runc")},
		}, base.Log.Named("wasm"))
	})
}
