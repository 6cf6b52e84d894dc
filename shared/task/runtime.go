package task

import (
	"context"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
)

// Container is one container as a Runtime made it: its init process and
// the processes exec'd into it. Processes follow containerd's runc process
// model (process.Process), whatever runs them.
type Container interface {
	ID() string
	Bundle() string
	// Pid is the init process's PID (0 before it exists).
	Pid() int
	// Process returns the init (execID "") or an exec'd process.
	Process(execID string) (process.Process, error)
	ExecdProcesses() []process.Process
	// ReserveProcess claims an exec ID; cancel releases it.
	ReserveProcess(execID string) (ok bool, cancel func())
	Start(ctx context.Context, r *taskAPI.StartRequest) (process.Process, error)
	Delete(ctx context.Context, r *taskAPI.DeleteRequest) (process.Process, error)
	Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (process.Process, error)
	Kill(ctx context.Context, r *taskAPI.KillRequest) error
	ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) error
	CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) error
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
	Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) error
	// Pids lists the container's processes.
	Pids(ctx context.Context) ([]int, error)
	// Cgroup is the container's cgroup1.Cgroup or *cgroup2.Manager, or nil.
	Cgroup() any
	// InitExited is called when the init has exited, before its exit is
	// published: it ends what else runs of the container.
	InitExited(ctx context.Context)
}

// Runtime makes containers: an OCI runtime CLI (runc, crun, runsc) or a
// family's own (wasm). Every process it starts must be reaped through
// containerd's reaper so the service sees its exit.
type Runtime interface {
	// Create creates the container's init process, not yet started, from
	// the bundle containerd prepared. It mounts the rootfs and undoes its
	// work on error.
	Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (Container, error)
	Close() error
}

// Recorded is a Container that can describe itself, so that a new daemon
// instance can rebuild it (Restorer) after a restart.
type Recorded interface {
	Record() ([]byte, error)
}

// Restorer is a Runtime that rebuilds containers from what their Record
// returned. The rebuilt container's processes are in their recorded state;
// the service finds out which of them still run.
type Restorer interface {
	Restore(ctx context.Context, record []byte) (Container, error)
}

// StartTimer is a process that knows its start time (clock ticks since
// boot, /proc/<pid>/stat field 22), which with its PID names it across PID
// reuse.
type StartTimer interface {
	StartTime() uint64
}
