package sandbox

import (
	"context"
	"fmt"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// ExitWatch reports the exit of a sandbox process: an orphan of the
// command that launched it (`runsc create`, `quark sandbox`), re-parented
// to whoever reaps the daemon's processes (the keeper, or the daemon
// itself), which src reports. It subscribes before the launch so that no
// exit is missed while the PID is unknown. If src stops reporting (the
// keeper is gone, and with it the parent that could collect the status),
// it watches the process itself, as after a restart (Family.Recover).
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
	// Closed without an exit, out tells the controller the exit is unknown.
	defer close(w.out)
	var early []task.Exit
	exits := w.exits
	pid := 0
	var sandbox holder.Holder // pid, named across PID reuse
	for {
		select {
		case p, ok := <-w.pid:
			if !ok {
				return
			}
			pid = p
			start, _ := proc.StartTime(pid)
			sandbox = holder.Holder{Pid: pid, StartTime: start}
			for _, e := range early {
				if e.Pid == pid {
					w.deliver(e)
					return
				}
			}
			early = nil
			if exits == nil {
				w.follow(sandbox)
				return
			}
		case e, ok := <-exits:
			if !ok {
				if pid == 0 {
					exits = nil // watch the process once its PID is known
					continue
				}
				w.follow(sandbox)
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

// follow reports the end of the sandbox process, which src no longer
// reports, with the unknown status; nothing if it cannot be watched.
func (w *ExitWatch) follow(sandbox holder.Holder) {
	if sandbox.StartTime == 0 {
		return // ended before its PID was known
	}
	in, err := watchProcess(sandbox)
	if err != nil {
		return
	}
	w.out <- <-in
}

// watchProcess reports the end of a process that is not ours to reap,
// whose exit status is therefore unknown.
func watchProcess(h holder.Holder) (<-chan controller.Exit, error) {
	in, err := holder.Watch(h)
	if err != nil {
		return nil, err
	}
	out := make(chan controller.Exit, 1)
	go func() {
		e := <-in
		out <- controller.Exit{Status: uint32(e.Status), ExitedAt: e.At}
	}()
	return out, nil
}

// Pid names the process to watch and returns the channel of its exit.
func (w *ExitWatch) Pid(pid int) <-chan controller.Exit {
	w.pid <- pid
	return w.out
}

// Cancel ends a watch whose process never started.
func (w *ExitWatch) Cancel() { close(w.pid) }
