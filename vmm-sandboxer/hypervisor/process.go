package hypervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"go.uber.org/zap"
)

// Process is a VMM process under supervision: in a session of its own, its
// output in a log file, reaped by a goroutine of its own so that its exit is
// known (Exited) without anyone calling Wait.
type Process struct {
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	status  ExitStatus // set before exited is closed
}

// StartProcess runs bin with args, stdout and stderr to logPath (truncated),
// files inherited as fds 3, 4, ... in order.
func StartProcess(bin string, args []string, logPath string, files []*os.File, log *zap.Logger) (*Process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = files
	// Its own session: the VM outlives the daemon and is not hit by
	// signals sent to the daemon's process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p := &Process{cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	log.Info("vmm started", zap.String("binary", bin), zap.Int("pid", cmd.Process.Pid))
	go p.reap(log)
	return p, nil
}

func (p *Process) reap(log *zap.Logger) {
	err := p.cmd.Wait()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		p.status.Code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			p.status.Signal = ws.Signal().String()
		}
	default:
		p.status.Code = -1
	}
	close(p.exited)
	log.Info("vmm exited", zap.Stringer("status", p.status))
}

// PID is the process's ID.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited is closed once the process has exited and been reaped.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// Status is how the process ended; valid once Exited is closed.
func (p *Process) Status() ExitStatus {
	<-p.exited
	return p.status
}

// Wait blocks until the process exits or ctx ends.
func (p *Process) Wait(ctx context.Context) (ExitStatus, error) {
	select {
	case <-p.exited:
		return p.status, nil
	case <-ctx.Done():
		return ExitStatus{}, ctx.Err()
	}
}

// Kill sends SIGKILL and waits until the process is reaped.
func (p *Process) Kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// LogTail is the end of the process's log, for errors.
func (p *Process) LogTail() string { return FileTail(p.logPath) }

// FileTail is the end of a log file (its last 2 KiB, trimmed), for errors.
func FileTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	b = bytes.TrimSpace(b)
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	if len(b) == 0 {
		return "(empty log)"
	}
	return string(b)
}
