// Command runc-sandboxer serves containerd's sandbox controller and task
// APIs for pods whose containers run under runc (or crun) on the host: one
// daemon for every pod of the node, no shim and no pause container. Its
// keeper (package keeper) runs runc and holds containerd's connections, so
// pods and containers outlive a restart of the daemon.
package main

import (
	"path/filepath"

	"github.com/kuasar-go/kuasar-go/runc-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/hostpod"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/task/oci"
)

func main() {
	cfg := sandbox.DefaultConfig()
	hostpod.Main("runc-sandboxer", cfg, func(base *daemon.Base) (task.Runtime, error) {
		root := cfg.Runtime.Root
		if root == "" {
			root = filepath.Join(base.Flags.Dir, "runc")
		}
		// Containers get containerd's FIFOs directly and are recorded, so
		// that they outlive the daemon (package oci).
		return oci.NewRuntime(task.RuntimeConfig{
			Binary:        cfg.Runtime.Binary,
			Root:          root,
			SystemdCgroup: cfg.Runtime.SystemdCgroup,
		}, base.Log.Named("runc"))
	})
}
