package task

import (
	"context"
	"time"

	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/kuasar-go/kuasar-go/shared/spawn"
	"go.uber.org/zap"
)

// Exit is the end of a container process.
type Exit struct {
	Pid int
	// StartTime names the process across PID reuse (see StartTimer); 0
	// when the source does not know it.
	StartTime uint64
	Status    int
	At        time.Time
}

// ExitSource tells the service of the exits of container processes.
type ExitSource interface {
	// Subscribe returns the exits the source recorded before the call (for
	// a daemon that restarted: what ended while it was down) and a channel
	// of the later ones, closed when ctx ends or the source fails.
	Subscribe(ctx context.Context) (recorded []Exit, live <-chan Exit, err error)
}

// ReaperExits is the exit source of a daemon that is itself the reaper of
// its container processes (package reap): it records nothing across
// restarts.
type ReaperExits struct{}

// Subscribe implements ExitSource.
func (ReaperExits) Subscribe(ctx context.Context) ([]Exit, <-chan Exit, error) {
	in := reaper.Default.Subscribe()
	out := make(chan Exit)
	go func() {
		defer close(out)
		defer reaper.Default.Unsubscribe(in)
		for {
			select {
			case e := <-in:
				select {
				case out <- Exit{Pid: e.Pid, Status: e.Status, At: e.Timestamp}:
				case <-ctx.Done():
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	return nil, out, nil
}

// same tells whether an exit is that of process pid started at startTime;
// an unknown start time on either side matches on the PID alone.
func (e Exit) same(pid int, startTime uint64) bool {
	return e.Pid == pid && (e.StartTime == 0 || startTime == 0 || e.StartTime == startTime)
}

func startTimeOf(p any) uint64 {
	if st, ok := p.(StartTimer); ok {
		return st.StartTime()
	}
	return 0
}

// KeeperExits is the exit source of a daemon whose processes the keeper
// starts and reaps (package keeper): it keeps their exits while the daemon
// is down.
type KeeperExits struct {
	Spawner *spawn.Client
	Log     *zap.Logger
}

// Subscribe implements ExitSource.
func (k KeeperExits) Subscribe(ctx context.Context) ([]Exit, <-chan Exit, error) {
	recorded, last, err := k.Spawner.Recorded(ctx)
	if err != nil {
		return nil, nil, err
	}
	in, err := k.Spawner.Subscribe(ctx, last)
	if err != nil {
		return nil, nil, err
	}
	out := make(chan Exit)
	go func() {
		defer close(out)
		for e := range in {
			select {
			case out <- keeperExit(e):
			case <-ctx.Done():
				return
			}
		}
		if ctx.Err() == nil {
			// The keeper is gone, and with it the parent of every
			// container: nothing will report their exits any more.
			k.Log.Error("lost the keeper's exits of container processes")
		}
	}()
	exits := make([]Exit, len(recorded))
	for i, e := range recorded {
		exits[i] = keeperExit(e)
	}
	return exits, out, nil
}

func keeperExit(e spawn.Exit) Exit {
	return Exit{Pid: e.Pid, StartTime: e.StartTime, Status: e.Status, At: e.ExitedAt}
}
