package hostpod

import (
	"context"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// NewRuntime makes the family's container runtime once flags and config
// are read.
type NewRuntime func(base *daemon.Base) (task.Runtime, error)

// Main is the whole main function of a sandboxer whose pods run on the host
// (runc, wasm): it serves as the pods' holder when re-executed as one,
// otherwise it runs the daemon until SIGTERM. cfg holds the defaults.
func Main(name string, cfg daemon.Config, newRuntime NewRuntime) {
	if holder.IsHolder() {
		holder.Main()
		return
	}
	daemon.Exit(name, run(name, cfg, newRuntime))
}

func run(name string, cfg daemon.Config, newRuntime NewRuntime) error {
	base, err := daemon.Init(name, os.Args[1:], cfg, os.Stdout, os.Stderr)
	if err != nil {
		return err
	}
	defer base.Log.Sync()
	// Pods and containers outlive the daemon: the keeper starts the
	// holders, the runtime CLI and the module processes, so it is the
	// parent of the container processes and records their exits; the
	// task service records its containers for the next instance, which
	// restores them.
	spawner := base.Keeper.Spawner()
	reap.Use(spawner)
	ctrl, err := controller.New(context.Background(), New(base.TaskAddress(), base.Log.Named("pods")), base.Store, base.Log.Named("controller"))
	if err != nil {
		return err
	}
	defer base.StopIdleKeeper(ctrl)
	rt, err := newRuntime(base)
	if err != nil {
		return err
	}
	publishers := func(id string) task.Publisher { return base.Events.ForSandbox(id) }
	tasks, err := task.New(TaskSandboxes{Controller: ctrl}, publishers, rt, base.Log.Named("task"),
		task.WithExits(task.KeeperExits{Spawner: spawner, Log: base.Log.Named("exits")}),
		task.WithRecords(filepath.Join(base.Flags.Dir, "tasks")))
	if err != nil {
		rt.Close()
		return err
	}
	defer tasks.Close()
	if err := base.Serve(ctrl, tasks.Register); err != nil {
		base.Log.Error("exiting", zap.Error(err))
		return err
	}
	return nil
}
