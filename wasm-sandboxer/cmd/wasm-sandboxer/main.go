// Command wasm-sandboxer serves containerd's sandbox controller and task
// APIs for pods whose containers are WebAssembly (WASI) modules, run by
// wasmtime, wazero or WasmEdge in a process per container inside the pod's
// namespaces and cgroup: one daemon for every pod of the node.
package main

import (
	"path/filepath"
	"strings"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/hostpod"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/wasmrt"
)

func main() {
	// A container's module process (or a compiler) is this binary too.
	if wasmrt.IsChild() {
		wasmrt.ChildMain()
		return
	}
	cfg := sandbox.DefaultConfig()
	hostpod.Main("wasm-sandboxer", cfg, func(base *daemon.Base) (task.Runtime, error) {
		return wasmrt.New(wasmrt.Config{
			Engine:         cfg.Wasm.Engine,
			AllowedEngines: cfg.Allowed(),
			CacheDir:       cfg.ResolvedCacheDir(base.Flags.Dir),
			// containerd's gRPC socket beside its ttrpc one, for the
			// content store (wasm OCI artifacts).
			ContainerdAddress: strings.TrimSuffix(base.Flags.ContainerdAddress, ".ttrpc"),
			ModulesDir:        filepath.Join(base.Flags.Dir, "modules"),
			GoRunnerOnly:      cfg.Wasm.WasmtimeGoRunner,
		}, base.Log.Named("wasm"))
	})
}
