package testenv

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/events"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/unixsock"
)

// Family is what InProcess serves, wired as a daemon wires it.
type Family struct {
	// New makes the family; dir is the daemon's --dir, taskAddress where
	// its task service listens.
	New func(dir, taskAddress string, log *zap.Logger) controller.Sandboxer
	// Tasks makes the task service's sandbox lookup and runtime once the
	// controller exists; nil serves no task API.
	Tasks func(ctrl *controller.Server, family controller.Sandboxer, log *zap.Logger) (task.Sandboxes, task.Runtime, error)
}

// InProcess is a sandbox family served in the test process on temporary
// sockets: the controller over gRPC and, when asked, the task API over
// ttrpc, as containerd reaches them.
type InProcess struct {
	Dir      string
	TaskSock string
	Server   *controller.Server
	Ctrl     sandboxapi.ControllerClient
	Tasks    taskAPI.TTRPCTaskService
}

// ServeInProcess serves f until the test ends, then shuts down every pod
// that is left. It needs root; the process becomes a child subreaper.
func ServeInProcess(t *testing.T, f Family) *InProcess {
	t.Helper()
	RequireRoot(t)
	log := zaptest.NewLogger(t)
	dir, err := os.MkdirTemp("/tmp", "kg-unit-")
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
	r := &InProcess{Dir: dir, TaskSock: filepath.Join(dir, "task.sock")}
	family := f.New(dir, "ttrpc+unix://"+r.TaskSock, log)
	if r.Server, err = controller.New(context.Background(), family, st, log); err != nil {
		t.Fatal(err)
	}
	ctrlSock := filepath.Join(dir, "ctrl.sock")
	gl, err := unixsock.Listen(ctrlSock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	sandboxapi.RegisterControllerServer(g, r.Server)
	go g.Serve(gl)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+ctrlSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r.Ctrl = sandboxapi.NewControllerClient(conn)

	if f.Tasks != nil {
		pods, rt, err := f.Tasks(r.Server, family, log)
		if err != nil {
			t.Fatal(err)
		}
		fwd := events.NewForwarder(filepath.Join(dir, "no-containerd.sock"), log)
		t.Cleanup(func() { fwd.Close() })
		tasks, err := task.New(pods, func(id string) task.Publisher { return fwd.ForSandbox(id) }, rt, log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tasks.Close() })
		tl, err := unixsock.Listen(r.TaskSock)
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

// PodOptions is a CRI pod config as containerd passes it to Create.
func PodOptions(t *testing.T, cfg *runtimeapi.PodSandboxConfig) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// WantCode fails unless err has the gRPC code and, when mention is set,
// names it.
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
