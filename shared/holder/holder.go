// Package holder runs the small per-pod process that owns a pod's
// namespaces: PID 1 of a new PID namespace (reaping orphans), with new IPC
// and UTS namespaces, inside the network namespace CRI made. Containers join
// its namespaces through /proc/<pid>/ns/*. It is the sandboxer binary itself,
// re-executed, so no extra binary has to be installed.
package holder

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/holder/pid1"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/reap"
)

// envMarker tells a re-executed sandboxer binary to act as a holder, when
// no kuasar-holder binary lies beside it.
const envMarker = "KUASAR_GO_HOLDER"

// BinaryName is the holder binary looked for beside the sandboxer's own.
const BinaryName = "kuasar-holder"

// Spec says which namespaces the holder owns.
type Spec struct {
	// NetnsPath is the network namespace to join; empty keeps the node's.
	NetnsPath string
	// NewPID, NewIPC, NewUTS create private namespaces; false shares the node's.
	NewPID, NewIPC, NewUTS bool
	// Hostname is set in the new UTS namespace.
	Hostname string
}

// Exit is how a holder ended.
type Exit struct {
	Status int
	At     time.Time
}

// Holder is a running holder process.
type Holder struct {
	Pid int
	// StartTime is the process's start time in clock ticks since boot
	// (/proc/<pid>/stat field 22); with Pid it names the process across
	// PID reuse.
	StartTime uint64
}

// IsHolder reports whether this process was started as a holder.
func IsHolder() bool { return os.Getenv(envMarker) == "1" }

// Main is the holder's whole life in a re-executed sandboxer binary. Call
// it first in main when IsHolder.
func Main() { pid1.Main() }

// binary returns the program to run as holder and whether it is the
// sandboxer itself. The separate kuasar-holder costs a pod about a quarter
// of the memory of a re-executed sandboxer (no package initialisation of
// gRPC, protobuf and containerd).
func binary() (string, bool, error) {
	self, err := os.Executable()
	if err != nil {
		return "", false, fmt.Errorf("find own executable: %w", err)
	}
	candidate := filepath.Join(filepath.Dir(self), BinaryName)
	if fi, err := os.Stat(candidate); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
		return candidate, false, nil
	}
	return self, true, nil
}

// Start launches a holder for spec and returns once its namespaces exist
// and its hostname is set. The channel yields the holder's exit. The
// process must reap through containerd's reaper (package reap).
func Start(ctx context.Context, spec Spec) (*Holder, <-chan Exit, error) {
	bin, reexec, err := binary()
	if err != nil {
		return nil, nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	defer r.Close()
	cmd := exec.Command(bin)
	cmd.Args = []string{BinaryName}
	cmd.Env = []string{"GOMAXPROCS=1"}
	if reexec {
		cmd.Env = append(cmd.Env, envMarker+"=1")
	}
	if spec.NewUTS && spec.Hostname != "" {
		cmd.Env = append(cmd.Env, pid1.EnvHostname+"="+spec.Hostname)
	}
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{w} // pid1.ReadyFD
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if spec.NewPID {
		cmd.SysProcAttr.Cloneflags |= unix.CLONE_NEWPID
	}
	if spec.NewIPC {
		cmd.SysProcAttr.Cloneflags |= unix.CLONE_NEWIPC
	}
	if spec.NewUTS {
		cmd.SysProcAttr.Cloneflags |= unix.CLONE_NEWUTS
	}
	// Born in the pod's network namespace (package nsenter).
	join := map[int]string{}
	if spec.NetnsPath != "" {
		join[unix.CLONE_NEWNET] = spec.NetnsPath
	}
	ec, err := reap.Monitor.StartIn(cmd, join)
	w.Close()
	if err != nil {
		return nil, nil, err
	}
	pid := cmd.Process.Pid
	exited := make(chan Exit, 1)
	go func() {
		status, _ := reap.Monitor.Wait(cmd, ec)
		exited <- Exit{Status: status, At: time.Now()}
	}()

	// cmd.Process signals through a pidfd: a holder that died and was
	// reaped meanwhile is not mistaken for whatever reused its PID.
	if err := waitReady(ctx, r); err != nil {
		_ = cmd.Process.Kill()
		<-exited
		return nil, nil, fmt.Errorf("holder did not start: %w", err)
	}
	st, err := proc.StartTime(pid)
	if err != nil {
		_ = cmd.Process.Kill()
		<-exited
		return nil, nil, err
	}
	return &Holder{Pid: pid, StartTime: st}, exited, nil
}

func waitReady(ctx context.Context, r *os.File) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(10 * time.Second)
	}
	if err := r.SetReadDeadline(deadline); err != nil {
		return err
	}
	buf := make([]byte, 1)
	if _, err := r.Read(buf); err != nil {
		return err
	}
	return nil
}

// Stop ends the holder. With its own PID namespace, killing it kills every
// process of the namespace; otherwise it is asked to exit first. Each
// signal goes to the holder only if its PID still names it (proc.Signal):
// a holder found after a restart is not this process's child, so its PID
// may be reused once it ends.
func Stop(h Holder, timeout time.Duration) error {
	if timeout > 0 {
		err := proc.Signal(h.Pid, h.StartTime, unix.SIGTERM)
		if errors.Is(err, proc.ErrFinished) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("stop holder %d: %w", h.Pid, err)
		}
		deadline := time.Now().Add(timeout)
		for time.Now().Before(deadline) {
			if ok, _ := Alive(h); !ok {
				return nil
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err := proc.Signal(h.Pid, h.StartTime, unix.SIGKILL); err != nil && !errors.Is(err, proc.ErrFinished) {
		return fmt.Errorf("kill holder %d: %w", h.Pid, err)
	}
	return nil
}

// Alive reports whether h still runs (and is not a zombie).
func Alive(h Holder) (bool, error) { return proc.Alive(h.Pid, h.StartTime) }

// exitStatusUnknown is reported for a holder that ended while it was not
// this process's child, whose status cannot be collected.
const exitStatusUnknown = 255

// Watch reports the end of a holder that is not this process's child, as
// after a daemon restart: it polls a pidfd through Go's netpoller, so no
// thread blocks per pod.
func Watch(h Holder) (<-chan Exit, error) {
	exited := make(chan Exit, 1)
	alive, err := Alive(h)
	if err != nil {
		return nil, err
	}
	if !alive {
		exited <- Exit{Status: exitStatusUnknown, At: time.Now()}
		return exited, nil
	}
	fd, err := unix.PidfdOpen(h.Pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd of holder %d: %w", h.Pid, err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	// The PID may have been reused between Alive and PidfdOpen.
	if ok, _ := Alive(h); !ok {
		f.Close()
		exited <- Exit{Status: exitStatusUnknown, At: time.Now()}
		return exited, nil
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	go func() {
		defer f.Close()
		// A pidfd turns readable when its process exits.
		rc.Read(func(fd uintptr) bool {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(fds, 0)
			return n > 0
		})
		exited <- Exit{Status: exitStatusUnknown, At: time.Now()}
	}()
	return exited, nil
}
