package testenv

import (
	"os/exec"
	"runtime"
	"sync"
)

// Daemons are started with Pdeathsig so that they die with the test binary
// (a test timeout skips t.Cleanup). Pdeathsig fires when the *thread* that
// forked exits, so every fork happens on one locked thread that lives as long
// as the process.
var (
	spawnOnce sync.Once
	spawnCh   chan spawnReq
)

type spawnReq struct {
	cmd *exec.Cmd
	res chan error
}

func spawn(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnCh = make(chan spawnReq)
		go func() {
			runtime.LockOSThread()
			for r := range spawnCh {
				r.res <- r.cmd.Start()
			}
		}()
	})
	res := make(chan error, 1)
	spawnCh <- spawnReq{cmd: cmd, res: res}
	return <-res
}
