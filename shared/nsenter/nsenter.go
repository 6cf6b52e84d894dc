// Package nsenter starts processes inside namespaces of another process
// from a Go program.
//
// A Go process cannot setns into a PID namespace for itself
// (setns(CLONE_NEWPID) only decides where the caller's future children go),
// and setns of the network, IPC and UTS namespaces applies to one thread of
// a multi-threaded Go process. A forked child, though, is born into the
// namespaces of the thread that forked it, the PID namespace included
// (pid_for_children). So Do locks a thread, switches that one thread into
// the namespaces, runs the caller's start (which forks) there and switches
// the thread back: the child is in every namespace from its first
// instruction, with no re-exec chain and no C constructor. A thread that
// cannot switch back is never unlocked, so Go discards it.
package nsenter

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// procFile names the namespaces of a flag in /proc/<pid>/task/<tid>/ns.
var procFile = map[int]string{
	unix.CLONE_NEWNET: "net",
	unix.CLONE_NEWIPC: "ipc",
	unix.CLONE_NEWUTS: "uts",
	unix.CLONE_NEWPID: "pid_for_children",
}

// Supported reports whether Do can join namespaces of type flag.
func Supported(flag int) bool { _, ok := procFile[flag]; return ok }

// Do runs start on a thread switched into the namespaces of join (CLONE_NEW*
// flag -> namespace file), so that what start forks is born there. Without
// namespaces to join it runs start on the calling goroutine.
func Do(join map[int]string, start func() error) error {
	if len(join) == 0 {
		return start()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err, restored := doLocked(join, start)
		if restored {
			runtime.UnlockOSThread()
		}
		done <- err
	}()
	return <-done
}

// doLocked runs on a locked thread; restored tells whether the thread is
// back in the process's namespaces.
func doLocked(join map[int]string, start func() error) (err error, restored bool) {
	tid := unix.Gettid()
	type entered struct {
		flag int
		orig *os.File
	}
	var done []entered
	restore := func() bool {
		ok := true
		for i := len(done) - 1; i >= 0; i-- {
			if unix.Setns(int(done[i].orig.Fd()), done[i].flag) != nil {
				ok = false
			}
			done[i].orig.Close()
		}
		return ok
	}
	for flag := range join {
		if !Supported(flag) {
			return fmt.Errorf("joining namespaces of type %#x is not supported", flag), true
		}
	}
	// A fixed order: PID last, so its check (the target must descend from
	// the caller's namespace) never depends on the others.
	for _, flag := range []int{unix.CLONE_NEWNET, unix.CLONE_NEWIPC, unix.CLONE_NEWUTS, unix.CLONE_NEWPID} {
		path, ok := join[flag]
		if !ok {
			continue
		}
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/%s", tid, procFile[flag]))
		if err != nil {
			return fmt.Errorf("open own %s namespace: %w", procFile[flag], err), restore()
		}
		target, err := os.Open(path)
		if err != nil {
			orig.Close()
			return fmt.Errorf("open namespace %s: %w", path, err), restore()
		}
		err = unix.Setns(int(target.Fd()), flag)
		target.Close()
		if err != nil {
			orig.Close()
			return fmt.Errorf("enter namespace %s: %w", path, err), restore()
		}
		done = append(done, entered{flag, orig})
	}
	err = start()
	return err, restore()
}
