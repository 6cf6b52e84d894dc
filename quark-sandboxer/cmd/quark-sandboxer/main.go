// Command quark-sandboxer serves containerd's sandbox controller for pods
// that run under an application kernel: gVisor (runsc, one sandbox per pod,
// its containers served by the daemon's task service) or Quark (`quark
// sandbox`, which serves its own task API). One daemon serves every pod of
// the node; the engine is chosen by configuration or per pod.
package main

import (
	"context"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/gvisor"
	"github.com/kuasar-go/kuasar-go/quark-sandboxer/quark"
	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

const name = "quark-sandboxer"

func main() {
	// The daemon's binary is also the gVisor pods' pause (copied into the
	// sandbox's rootfs) and the waiter of their containers.
	if holder.IsHolder() {
		holder.Main()
		return
	}
	if gvisor.IsWaiter() {
		gvisor.WaiterMain()
		return
	}
	daemon.Exit(name, run())
}

func run() error {
	cfg := sandbox.DefaultConfig()
	base, err := daemon.Init(name, os.Args[1:], cfg, os.Stdout, os.Stderr)
	if err != nil {
		return err
	}
	log := base.Log
	defer log.Sync()
	// Pods and containers outlive the daemon: the keeper runs runsc, Quark
	// and the containers' waiters, so it is the parent of what they leave
	// running and records their exits for the next instance.
	spawner := base.Keeper.Spawner()
	reap.Use(spawner)
	exits := task.KeeperExits{Spawner: spawner, Log: log.Named("exits")}
	gv := gvisor.New(gvisor.Options{Config: cfg.GVisor, StateDir: base.Flags.Dir, TaskAddress: base.TaskAddress(), Exits: exits}, log.Named("gvisor"))
	engines := []sandbox.Engine{gv, quark.New(cfg.Quark, exits, log.Named("quark"))}
	for _, e := range engines {
		if err := e.Check(); err != nil {
			log.Warn("engine cannot run pods until this is fixed", zap.String("engine", e.Name()), zap.Error(err))
		}
	}
	family := sandbox.New(filepath.Join(base.Flags.Dir, "pods"), cfg, engines, log.Named("pods"))
	ctrl, err := controller.New(context.Background(), family, base.Store, log.Named("controller"))
	if err != nil {
		return err
	}
	defer base.StopIdleKeeper(ctrl)
	pods := sandbox.Tasks{Controller: ctrl, Family: family}
	rt, err := gvisor.NewRuntime(gv, pods, log.Named("runsc"))
	if err != nil {
		return err
	}
	publishers := func(id string) task.Publisher { return base.Events.ForSandbox(id) }
	tasks, err := task.New(pods, publishers, rt, log.Named("task"), task.WithExits(exits),
		task.WithRecords(filepath.Join(base.Flags.Dir, "tasks")))
	if err != nil {
		rt.Close()
		return err
	}
	defer tasks.Close()
	if err := base.Serve(ctrl, tasks.Register); err != nil {
		log.Error("exiting", zap.String("engine", cfg.Engine), zap.Error(err))
		return err
	}
	return nil
}
