package hypervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
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

// tailBytes is how much of a log's end errors quote.
const tailBytes = 2048

// FileTail is the end of a log file (its last 2 KiB, trimmed), for errors.
// It reads only that much, however large the file: a guest writes the
// console log.
func FileTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	b, err := readTail(f, tailBytes)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	// A log CapFile cut holds a hole where the writer's offset was.
	b = bytes.TrimSpace(bytes.Trim(b, "\x00"))
	if len(b) == 0 {
		return "(empty log)"
	}
	return string(b)
}

// readTail reads the last n bytes of f.
func readTail(f *os.File, n int64) ([]byte, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	m, err := f.ReadAt(b, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:m], nil
}

// CapFile keeps a log that a guest can fill (its console, virtiofsd's
// warnings) under limit bytes of storage: beyond it, the file is cut to
// its last limit/4 bytes. The writer keeps its offset, so what it writes
// next lands past a hole, which takes no storage; FileTail still finds it.
func CapFile(path string, limit int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if st.Blocks*512 <= limit {
		return nil
	}
	tail, err := readTail(f, limit/4)
	if err != nil {
		return err
	}
	tail = bytes.TrimLeft(tail, "\x00")
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err = f.WriteAt(tail, 0)
	return err
}
