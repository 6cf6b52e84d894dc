// Command runc-sandboxer serves containerd's sandbox controller and task
// APIs for pods whose containers run under runc (or crun) on the host: one
// daemon for every pod of the node, no shim and no pause container.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/runc-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/hostpod"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

const name = "runc-sandboxer"

func main() {
	if holder.IsHolder() {
		holder.Main()
		return
	}
	if err := run(); err != nil {
		if errors.Is(err, daemon.ErrVersionPrinted) {
			return
		}
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		}
		os.Exit(1)
	}
}

func run() error {
	cfg := sandbox.DefaultConfig()
	base, err := daemon.Init(name, os.Args[1:], cfg, os.Stdout, os.Stderr)
	if err != nil {
		return err
	}
	defer base.Log.Sync()
	root := cfg.Runtime.Root
	if root == "" {
		root = filepath.Join(base.Flags.Dir, "runc")
	}
	family := hostpod.New(base.TaskAddress(), base.Log.Named("pods"))
	ctrl, err := controller.New(context.Background(), family, base.Store, base.Log.Named("controller"))
	if err != nil {
		return err
	}
	rt, err := task.NewRuncRuntime(task.RuntimeConfig{
		Binary:        cfg.Runtime.Binary,
		Root:          root,
		SystemdCgroup: cfg.Runtime.SystemdCgroup,
	}, base.Log.Named("runc"))
	if err != nil {
		return err
	}
	tasks, err := task.New(hostpod.TaskSandboxes{Controller: ctrl}, base.Events, rt, base.Log.Named("task"))
	if err != nil {
		return err
	}
	defer tasks.Close()
	if err := base.Serve(ctrl, tasks.Register); err != nil {
		base.Log.Error("exiting", zap.Error(err))
		return err
	}
	return nil
}
