// Package testrig serves quark-sandboxer's family in-process on temporary
// sockets for the engines' tests, wired as the daemon wires it.
package testrig

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/events"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/store"
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
type Rig struct {
	Dir      string
	TaskSock string
	Ctrl     sandboxapi.ControllerClient
	Tasks    taskAPI.TTRPCTaskService
	Server   *controller.Server
}

// New serves s; everything stops and every pod is shut down at cleanup.
func New(t *testing.T, s Setup) *Rig {
	t.Helper()
	testenv.RequireRoot(t)
	log := zaptest.NewLogger(t)
	dir, err := os.MkdirTemp("/tmp", "kg-quark-unit-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := reap.Start(log); err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(filepath.Join(dir, "sandboxes"))
	if err != nil {
		t.Fatal(err)
	}
	r := &Rig{Dir: dir, TaskSock: filepath.Join(dir, "task.sock")}
	family := sandbox.New(filepath.Join(dir, "pods"), s.Config, s.Engines(dir, "ttrpc+unix://"+r.TaskSock, log), log)
	r.Server, err = controller.New(context.Background(), family, st, log)
	if err != nil {
		t.Fatal(err)
	}
	gl, err := daemon.ListenUnix(filepath.Join(dir, "ctrl.sock"))
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	sandboxapi.RegisterControllerServer(g, r.Server)
	go g.Serve(gl)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "ctrl.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r.Ctrl = sandboxapi.NewControllerClient(conn)

	if s.Runtime != nil {
		pods := sandbox.Tasks{Controller: r.Server, Family: family}
		rt, err := s.Runtime(pods, log)
		if err != nil {
			t.Fatal(err)
		}
		fwd := events.NewForwarder(filepath.Join(dir, "no-containerd.sock"), log)
		t.Cleanup(func() { fwd.Close() })
		tasks, err := task.New(pods, fwd, rt, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tasks.Close() })
		tl, err := daemon.ListenUnix(r.TaskSock)
		if err != nil {
			t.Fatal(err)
		}
		ts, err := ttrpc.NewServer()
		if err != nil {
			t.Fatal(err)
		}
		tasks.Register(ts)
		go ts.Serve(context.Background(), tl)
		t.Cleanup(func() { ts.Close() })
		r.Tasks = DialTasks(t, r.TaskSock)
	}
	// Whatever a failing test left: stop and remove every pod.
	t.Cleanup(func() {
		for _, id := range r.Server.IDs() {
			r.Ctrl.Shutdown(context.Background(), &sandboxapi.ControllerShutdownRequest{SandboxID: id})
		}
	})
	return r
}

// DialTasks connects a task API client to a unix socket, as containerd does.
func DialTasks(t *testing.T, sock string) taskAPI.TTRPCTaskService {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	cl := ttrpc.NewClient(c)
	t.Cleanup(func() { cl.Close() })
	return taskAPI.NewTTRPCTaskClient(cl)
}

// PodOptions is a CRI pod config as containerd passes it in Create.
func PodOptions(t *testing.T, cfg *runtimeapi.PodSandboxConfig) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// WantCode fails unless err has code and (when mention is set) names it.
func WantCode(t *testing.T, what string, err error, code codes.Code, mention string) {
	t.Helper()
	if status.Code(err) != code {
		t.Errorf("%s: got %v (%v), want %v", what, status.Code(err), err, code)
		return
	}
	if mention != "" && !strings.Contains(err.Error(), mention) {
		t.Errorf("%s: error %q does not name %q", what, err, mention)
	}
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
