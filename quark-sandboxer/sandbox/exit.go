package sandbox

import (
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	runc "github.com/containerd/go-runc"

	"github.com/kuasar-go/kuasar-go/shared/controller"
)

// ExitWatch reports the exit of a sandbox process that this daemon reaps:
// an orphan of the command that launched it (`runsc create`, `quark
// sandbox`), re-parented to the daemon, a child subreaper. It subscribes
// before the launch so that no exit is missed while the PID is unknown.
type ExitWatch struct {
	exits chan runc.Exit
	pid   chan int
	out   chan controller.Exit
}

// WatchExit subscribes to the daemon's reaper. Call Pid once the PID is
// known, or Cancel.
func WatchExit() *ExitWatch {
	w := &ExitWatch{
		exits: reaper.Default.Subscribe(),
		pid:   make(chan int, 1),
		out:   make(chan controller.Exit, 1),
	}
	go w.run()
	return w
}

func (w *ExitWatch) run() {
	defer reaper.Default.Unsubscribe(w.exits)
	var early []runc.Exit
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
		case e := <-w.exits:
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

func (w *ExitWatch) deliver(e runc.Exit) {
	w.out <- controller.Exit{Status: uint32(e.Status), ExitedAt: e.Timestamp}
}

// Pid names the process to watch and returns the channel of its exit.
func (w *ExitWatch) Pid(pid int) <-chan controller.Exit {
	w.pid <- pid
	return w.out
}

// Cancel ends a watch whose process never started.
func (w *ExitWatch) Cancel() { close(w.pid) }
