// Package testrig serves quark-sandboxer's family in-process on temporary
// sockets for the engines' tests, wired as the daemon wires it.
package testrig

import (
	"context"
	"path/filepath"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// Setup says what the rig serves.
type Setup struct {
	Config *sandbox.Config
	// Engines makes the engines; dir is the daemon's --dir.
	Engines func(dir, taskAddress string, log *zap.Logger) []sandbox.Engine
	// Runtime makes the task service's runtime; nil serves no task API.
	Runtime func(pods sandbox.Tasks, log *zap.Logger) (task.Runtime, error)
}

// Rig is a running family.
type Rig = testenv.InProcess

// New serves s; everything stops and every pod is shut down at cleanup.
func New(t *testing.T, s Setup) *Rig {
	t.Helper()
	f := testenv.Family{
		New: func(dir, taskAddress string, log *zap.Logger) controller.Sandboxer {
			return sandbox.New(filepath.Join(dir, "pods"), s.Config, s.Engines(dir, taskAddress, log), log)
		},
	}
	if s.Runtime != nil {
		f.Tasks = func(ctrl *controller.Server, family controller.Sandboxer, log *zap.Logger) (task.Sandboxes, task.Runtime, error) {
			pods := sandbox.Tasks{Controller: ctrl, Family: family.(*sandbox.Family)}
			rt, err := s.Runtime(pods, log)
			return pods, rt, err
		}
	}
	return testenv.ServeInProcess(t, f)
}

// Unimplemented is a task service that serves nothing; stand-ins embed it
// and override what they serve.
type Unimplemented struct{}

func unimplemented(what string) error {
	return errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "%s is not served by this stand-in", what)
}

var _ taskAPI.TTRPCTaskService = Unimplemented{}

func (Unimplemented) State(context.Context, *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	return nil, unimplemented("State")
}

func (Unimplemented) Create(context.Context, *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	return nil, unimplemented("Create")
}

func (Unimplemented) Start(context.Context, *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	return nil, unimplemented("Start")
}

func (Unimplemented) Delete(context.Context, *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	return nil, unimplemented("Delete")
}

func (Unimplemented) Pids(context.Context, *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	return nil, unimplemented("Pids")
}

func (Unimplemented) Pause(context.Context, *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Pause")
}

func (Unimplemented) Resume(context.Context, *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Resume")
}

func (Unimplemented) Checkpoint(context.Context, *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Checkpoint")
}

func (Unimplemented) Kill(context.Context, *taskAPI.KillRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Kill")
}

func (Unimplemented) Exec(context.Context, *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Exec")
}

func (Unimplemented) ResizePty(context.Context, *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("ResizePty")
}

func (Unimplemented) CloseIO(context.Context, *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return nil, unimplemented("CloseIO")
}

func (Unimplemented) Update(context.Context, *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Update")
}

func (Unimplemented) Wait(context.Context, *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	return nil, unimplemented("Wait")
}

func (Unimplemented) Stats(context.Context, *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	return nil, unimplemented("Stats")
}

func (Unimplemented) Connect(context.Context, *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return nil, unimplemented("Connect")
}

func (Unimplemented) Shutdown(context.Context, *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return nil, unimplemented("Shutdown")
}
