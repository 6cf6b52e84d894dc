package proc

import (
	"fmt"
	"syscall"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// ErrFinished is returned by Signal for a process that is gone.
var ErrFinished = fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)

// Signal sends sig to pid only if it still is the process that started at
// startTime: through a pidfd taken before the check, so that the PID
// cannot be reused between the check and the signal. A process that is
// gone, or whose PID now names another process, is ErrFinished.
func Signal(pid int, startTime uint64, sig syscall.Signal) error {
	fd, err := unix.PidfdOpen(pid, 0)
	switch {
	case err == unix.ESRCH:
		return ErrFinished
	case err == unix.ENOSYS:
		fd = -1 // before Linux 5.3: the check then narrows the window only
	case err != nil:
		return fmt.Errorf("pidfd of %d: %w", pid, err)
	default:
		defer unix.Close(fd)
	}
	if st, err := StartTime(pid); err != nil || st != startTime {
		return ErrFinished
	}
	if fd < 0 {
		err = unix.Kill(pid, sig)
	} else {
		err = unix.PidfdSendSignal(fd, sig, nil, 0)
	}
	if err == unix.ESRCH {
		return ErrFinished
	}
	if err != nil {
		return fmt.Errorf("signal %d: %w", pid, err)
	}
	return nil
}
