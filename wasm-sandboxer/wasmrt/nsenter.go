package wasmrt

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"

	runc "github.com/containerd/go-runc"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Why the module process is started this way: a Go process cannot setns
// into a PID namespace for itself (setns(CLONE_NEWPID) only decides where
// the caller's future children go), and setns of the network, IPC and UTS
// namespaces applies to one thread of a multi-threaded Go process. A
// forked child, though, is born into the namespaces of the thread that
// forked it, the PID namespace included (pid_for_children). So the daemon
// locks a thread, switches that one thread into the pod's namespaces,
// forks the child there and switches the thread back: the child is in
// every pod namespace from its first instruction, with no re-exec chain
// and no C constructor. A thread that cannot switch back is never
// unlocked, so Go discards it.

// nsFlags maps the namespaces a module process can join or get.
var nsFlags = map[specs.LinuxNamespaceType]int{
	specs.NetworkNamespace: unix.CLONE_NEWNET,
	specs.IPCNamespace:     unix.CLONE_NEWIPC,
	specs.UTSNamespace:     unix.CLONE_NEWUTS,
	specs.PIDNamespace:     unix.CLONE_NEWPID,
}

// nsProcFile names the namespaces in /proc/<pid>/task/<tid>/ns.
var nsProcFile = map[int]string{
	unix.CLONE_NEWNET: "net",
	unix.CLONE_NEWIPC: "ipc",
	unix.CLONE_NEWUTS: "uts",
	unix.CLONE_NEWPID: "pid_for_children",
}

// podNamespaces sorts the spec's namespaces: paths to join, and flags of new
// ones to create. Mount and cgroup namespaces are not used (the process
// is confined by chroot and its cgroup); a user namespace is refused.
func podNamespaces(spec *specs.Spec) (join map[int]string, newFlags uintptr, err error) {
	join = map[int]string{}
	if spec.Linux == nil {
		return join, 0, nil
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.UserNamespace {
			return nil, 0, errUserNS
		}
		flag, ok := nsFlags[ns.Type]
		if !ok {
			continue
		}
		if ns.Path == "" {
			newFlags |= uintptr(flag)
		} else {
			join[flag] = ns.Path
		}
	}
	return join, newFlags, nil
}

var errUserNS = errors.New("user namespaces are not supported for wasm containers")

// startIn starts cmd with the reaper from a thread switched into the
// namespaces of join (flag -> path).
func startIn(cmd *exec.Cmd, join map[int]string) (chan runc.Exit, error) {
	if len(join) == 0 {
		return reap.Monitor.Start(cmd)
	}
	type result struct {
		ec  chan runc.Exit
		err error
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		ec, err, restored := startLocked(cmd, join)
		if restored {
			runtime.UnlockOSThread()
		}
		done <- result{ec, err}
	}()
	r := <-done
	return r.ec, r.err
}

// startLocked runs on a locked thread; restored tells whether the thread
// is back in the daemon's namespaces.
func startLocked(cmd *exec.Cmd, join map[int]string) (ec chan runc.Exit, err error, restored bool) {
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
	// A fixed order: PID last, so its check (the target must descend from
	// the caller's namespace) never depends on the others.
	for _, flag := range []int{unix.CLONE_NEWNET, unix.CLONE_NEWIPC, unix.CLONE_NEWUTS, unix.CLONE_NEWPID} {
		path, ok := join[flag]
		if !ok {
			continue
		}
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/%s", tid, nsProcFile[flag]))
		if err != nil {
			return nil, fmt.Errorf("open own %s namespace: %w", nsProcFile[flag], err), restore()
		}
		target, err := os.Open(path)
		if err != nil {
			orig.Close()
			return nil, fmt.Errorf("open namespace %s: %w", path, err), restore()
		}
		err = unix.Setns(int(target.Fd()), flag)
		target.Close()
		if err != nil {
			orig.Close()
			return nil, fmt.Errorf("enter namespace %s: %w", path, err), restore()
		}
		done = append(done, entered{flag, orig})
	}
	ec, err = reap.Monitor.Start(cmd)
	return ec, err, restore()
}
