// Command vmm-sandboxer serves containerd's sandbox controller for pods
// that each run in their own VM, and a task service per pod that drives
// the containers in it through the guest agent vmm-task.
package main

import (
	"context"
	"os"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/sandbox"
)

const name = "vmm-sandboxer"

func main() {
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
	for _, p := range []string{cfg.Guest.Kernel, cfg.Guest.Initrd} {
		if _, err := os.Stat(p); err != nil {
			log.Warn("guest image missing: pods cannot start until it is installed (make guest; make install SANDBOXER=vmm)", zap.Error(err))
		}
	}
	family := sandbox.New(cfg, base.Flags.Dir, base.Events, base.Keeper, base.Keeper.Spawner(), log.Named("pods"))
	ctrl, err := controller.New(context.Background(), family, base.Store, log.Named("controller"))
	if err != nil {
		return err
	}
	defer base.StopIdleKeeper(ctrl)
	// Here, so that the keeper goes too when no pod needs it.
	if err := cfg.CheckHost(); err != nil {
		return err
	}
	// Each pod has its own task socket (see package sandbox).
	if err := base.Serve(ctrl, nil); err != nil {
		log.Error("exiting", zap.Error(err))
		return err
	}
	return nil
}
