// Package reap decides who starts and reaps the processes a daemon starts
// (through Monitor and go-runc). Container processes outlive the runtime
// CLI that created them and are re-parented to the nearest child
// subreaper: with Start, the process itself (the guest agent, tests),
// which collects their exit statuses on SIGCHLD and hands them to
// subscribers of containerd's reaper; with Use, the daemon's keeper.
package reap

import (
	"fmt"
	"os"
	"os/exec"
	"os/signal"

	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	runc "github.com/containerd/go-runc"
	"github.com/kuasar-go/kuasar-go/shared/nsenter"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Start makes the process a child subreaper and starts reaping. Every child
// the daemon starts afterwards must go through reaper.Default (Start/Wait),
// as go-runc does once Start has run, or its exit status is lost.
func Start(log *zap.Logger) error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become child subreaper: %w", err)
	}
	runc.Monitor = Monitor
	sigs := make(chan os.Signal, 128)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		for range sigs {
			if err := reaper.Reap(); err != nil {
				log.Debug("reap", zap.Error(err))
			}
		}
	}()
	return nil
}

// Use makes m start (and wait for) every process started through this
// package or go-runc: a daemon hands them to its keeper (package keeper),
// which is then the parent of the container processes and keeps their
// exits while the daemon is down.
func Use(m ProcessMonitor) {
	Monitor = m
	runc.Monitor = m
}

// ProcessMonitor starts processes, also born in namespaces of another
// process (StartIn, flag -> namespace file; see package nsenter), and
// waits for them. The daemon's reaper and the keeper (package spawn) are
// both one.
type ProcessMonitor interface {
	runc.ProcessMonitor
	StartIn(cmd *exec.Cmd, join map[int]string) (chan runc.Exit, error)
}

// Monitor starts and waits for the daemon's children through containerd's
// reaper, and releases each process handle once its exit is collected: Go
// keeps a pidfd per started process until Wait, Release or the garbage
// collector, and the reaper never calls Wait. A daemon whose keeper starts
// its processes replaces it.
var Monitor ProcessMonitor = releasing{reaper.Default}

type releasing struct{ runc.ProcessMonitor }

func (r releasing) StartIn(cmd *exec.Cmd, join map[int]string) (ec chan runc.Exit, err error) {
	err = nsenter.Do(join, func() error {
		ec, err = r.Start(cmd)
		return err
	})
	return ec, err
}

func (r releasing) Wait(cmd *exec.Cmd, ec chan runc.Exit) (int, error) {
	status, err := r.ProcessMonitor.Wait(cmd, ec)
	if cmd.Process != nil {
		_ = cmd.Process.Release()
	}
	return status, err
}
