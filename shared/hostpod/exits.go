package hostpod

import (
	"context"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/shared/spawn"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// keeperExits is the exit source of a daemon whose container processes the
// keeper starts and reaps (package keeper): it records their exits while
// the daemon is down.
type keeperExits struct {
	spawner *spawn.Client
	log     *zap.Logger
}

// Subscribe implements task.ExitSource.
func (k keeperExits) Subscribe(ctx context.Context) ([]task.Exit, <-chan task.Exit, error) {
	recorded, last, err := k.spawner.Recorded(ctx)
	if err != nil {
		return nil, nil, err
	}
	in, err := k.spawner.Subscribe(ctx, last)
	if err != nil {
		return nil, nil, err
	}
	out := make(chan task.Exit)
	go func() {
		defer close(out)
		for e := range in {
			select {
			case out <- exitOf(e):
			case <-ctx.Done():
				return
			}
		}
		if ctx.Err() == nil {
			// The keeper is gone, and with it the parent of every
			// container: nothing will report their exits any more.
			k.log.Error("lost the keeper's exits of container processes")
		}
	}()
	exits := make([]task.Exit, len(recorded))
	for i, e := range recorded {
		exits[i] = exitOf(e)
	}
	return exits, out, nil
}

func exitOf(e spawn.Exit) task.Exit {
	return task.Exit{Pid: e.Pid, StartTime: e.StartTime, Status: e.Status, At: e.ExitedAt}
}
