package sandbox

import (
	"context"
	"fmt"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// ExitWatch reports the exit of a sandbox process: an orphan of the
// command that launched it (`runsc create`, `quark sandbox`), re-parented
// to whoever reaps the daemon's processes (the keeper, or the daemon
// itself), which src reports. It subscribes before the launch so that no
// exit is missed while the PID is unknown.
type ExitWatch struct {
	exits  <-chan task.Exit
	cancel context.CancelFunc
	pid    chan int
	out    chan controller.Exit
}

// WatchExit subscribes to src (nil: the daemon's own reaper). Call Pid once
// the PID is known, or Cancel.
func WatchExit(src task.ExitSource) (*ExitWatch, error) {
	if src == nil {
		src = task.ReaperExits{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	_, exits, err := src.Subscribe(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("watch the sandbox process: %w", err)
	}
	w := &ExitWatch{
		exits:  exits,
		cancel: cancel,
		pid:    make(chan int, 1),
		out:    make(chan controller.Exit, 1),
	}
	go w.run()
	return w, nil
}

func (w *ExitWatch) run() {
	defer w.cancel()
	var early []task.Exit
	pid := 0
	for {
		select {
		case p, ok := <-w.pid:
			if !ok {
				return
			}
			pid = p
			for _, e := range early {
				if e.Pid == pid {
					w.deliver(e)
					return
				}
			}
			early = nil
		case e, ok := <-w.exits:
			if !ok {
				return
			}
			if pid == 0 {
				early = append(early, e)
				continue
			}
			if e.Pid == pid {
				w.deliver(e)
				return
			}
		}
	}
}

func (w *ExitWatch) deliver(e task.Exit) {
	w.out <- controller.Exit{Status: uint32(e.Status), ExitedAt: e.At}
}

// Pid names the process to watch and returns the channel of its exit.
func (w *ExitWatch) Pid(pid int) <-chan controller.Exit {
	w.pid <- pid
	return w.out
}

// Cancel ends a watch whose process never started.
func (w *ExitWatch) Cancel() { close(w.pid) }
