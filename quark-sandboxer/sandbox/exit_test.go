package sandbox

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/task"
)

// lostSource is an exit source whose stream the test ends, as when the
// connection to the keeper goes.
type lostSource struct{ live chan task.Exit }

func (s lostSource) Subscribe(context.Context) ([]task.Exit, <-chan task.Exit, error) {
	return nil, s.live, nil
}

// TestExitWatchSourceLost: when the exit source stops (the keeper is gone,
// and with it the parent of the sandbox process), the watch still reports
// the sandbox's end, when the process ends, with the unknown status;
// before, the pod never ended.
func TestExitWatchSourceLost(t *testing.T) {
	for _, tc := range []struct {
		name string
		// lostFirst: the source ends before the PID is known.
		lostFirst bool
	}{
		{name: "after the pid is known"},
		{name: "before the pid is known", lostFirst: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := lostSource{live: make(chan task.Exit)}
			w, err := WatchExit(src)
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("sleep", "600")
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				cmd.Process.Kill()
				cmd.Wait()
			})
			if tc.lostFirst {
				close(src.live)
			}
			exited := w.Pid(cmd.Process.Pid)
			if !tc.lostFirst {
				close(src.live)
			}
			killed := time.Now()
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			select {
			case e, ok := <-exited:
				if !ok {
					t.Fatal("exit channel closed without the exit of a process that was watchable")
				}
				if e.Status != 255 {
					t.Errorf("exit status %d, want 255 (unknown: the keeper that could collect it is gone)", e.Status)
				}
				if e.ExitedAt.Before(killed) {
					t.Errorf("exit reported at %v, before the process was killed at %v", e.ExitedAt, killed)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("no exit reported: the pod would never end")
			}
		})
	}
}
