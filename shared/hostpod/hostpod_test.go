package hostpod

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/events"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// The test binary doubles as the holder, as the daemon binary does.
func TestMain(m *testing.M) {
	if holder.IsHolder() {
		holder.Main()
		return
	}
	os.Exit(m.Run())
}

type rig struct {
	dir   string
	ctrl  sandboxapi.ControllerClient
	tasks taskAPI.TTRPCTaskService
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates namespaces, cgroups and mounts")
	}
}

// newRig serves the real runc family in-process on temporary sockets.
func newRig(t *testing.T) *rig {
	requireRoot(t)
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
	taskSock := filepath.Join(dir, "task.sock")
	family := New("ttrpc+unix://"+taskSock, log)
	srv, err := controller.New(context.Background(), family, st, log)
	if err != nil {
		t.Fatal(err)
	}
	fwd := events.NewForwarder(filepath.Join(dir, "no-containerd.sock"), log)
	t.Cleanup(func() { fwd.Close() })
	rt, err := task.NewRuncRuntime(task.RuntimeConfig{Root: filepath.Join(dir, "runc")}, log)
	if err != nil {
		t.Fatal(err)
	}
	tasks, err := task.New(TaskSandboxes{Controller: srv}, fwd, rt, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tasks.Close() })

	gl, err := daemon.ListenUnix(filepath.Join(dir, "ctrl.sock"))
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	sandboxapi.RegisterControllerServer(g, srv)
	go g.Serve(gl)
	t.Cleanup(g.Stop)

	tl, err := daemon.ListenUnix(taskSock)
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

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "ctrl.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	tc, err := net.Dial("unix", taskSock)
	if err != nil {
		t.Fatal(err)
	}
	tcl := ttrpc.NewClient(tc)
	t.Cleanup(func() { tcl.Close() })
	return &rig{dir: dir, ctrl: sandboxapi.NewControllerClient(conn), tasks: taskAPI.NewTTRPCTaskClient(tcl)}
}

func podOptions(t *testing.T, cfg *runtimeapi.PodSandboxConfig) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Errorf("%s: got %v (%v), want %v", what, status.Code(err), err, code)
	}
}

func stateFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dir, "sandboxes"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestControllerRejectsBadIDs(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	for _, id := range []string{"", strings.Repeat("a", 200), "a/b", "..", "../etc", "a b"} {
		_, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id})
		wantCode(t, "Create "+id, err, codes.InvalidArgument)
		_, err = r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
		wantCode(t, "Start "+id, err, codes.InvalidArgument)
		_, err = r.ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
		wantCode(t, "Status "+id, err, codes.InvalidArgument)
		_, err = r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id})
		wantCode(t, "Shutdown "+id, err, codes.InvalidArgument)
	}
	if files := stateFiles(t, r.dir); len(files) != 0 {
		t.Errorf("state files left: %v", files)
	}
}

func TestControllerUnknownSandbox(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	const id = "never-created"
	_, err := r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	wantCode(t, "Start before Create", err, codes.NotFound)
	_, err = r.ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id})
	wantCode(t, "Stop", err, codes.NotFound)
	_, err = r.ctrl.Wait(ctx, &sandboxapi.ControllerWaitRequest{SandboxID: id})
	wantCode(t, "Wait", err, codes.NotFound)
	_, err = r.ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	wantCode(t, "Status", err, codes.NotFound)
	_, err = r.ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id})
	wantCode(t, "Metrics", err, codes.NotFound)
	_, err = r.ctrl.Platform(ctx, &sandboxapi.ControllerPlatformRequest{SandboxID: id})
	wantCode(t, "Platform", err, codes.NotFound)
	_, err = r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id})
	wantCode(t, "Shutdown", err, codes.NotFound)
}

func TestControllerRejectsBadNetns(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	regular := filepath.Join(t.TempDir(), "plain-file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]string{
		"missing":     "/run/netns/kuasar-go-does-not-exist",
		"relative":    "run/netns/x",
		"not cleaned": "/run/../run/netns/x",
		"plain file":  regular,
		"uts ns":      "/proc/self/ns/uts",
	} {
		_, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "netns-test", NetnsPath: p})
		wantCode(t, name, err, codes.InvalidArgument)
		if err != nil && !strings.Contains(err.Error(), "netns") {
			t.Errorf("%s: error %q does not name the netns", name, err)
		}
	}
	_, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{
		SandboxID: "bad-options",
		Options:   &anypb.Any{TypeUrl: "types.containerd.io/runtime.v1.PodSandboxConfig", Value: []byte{0xff, 0xff}},
	})
	wantCode(t, "undecodable options", err, codes.InvalidArgument)
	if files := stateFiles(t, r.dir); len(files) != 0 {
		t.Errorf("state files left: %v", files)
	}
}

func TestControllerLifecycle(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	netns := testenv.NewNetns(t)
	const id = "lifecycle-pod"
	cfg := &runtimeapi.PodSandboxConfig{Hostname: "kuasar-unit"}
	create := &sandboxapi.ControllerCreateRequest{SandboxID: id, NetnsPath: netns, Options: podOptions(t, cfg)}
	if _, err := r.ctrl.Create(ctx, create); err != nil {
		t.Fatalf("Create: %v", err)
	}
	_, err := r.ctrl.Create(ctx, create)
	wantCode(t, "Create twice", err, codes.AlreadyExists)

	started, err := r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if started.Version != 3 || !strings.HasPrefix(started.Address, "ttrpc+unix://") {
		t.Errorf("Start address %q version %d", started.Address, started.Version)
	}
	_, err = r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	wantCode(t, "Start twice", err, codes.FailedPrecondition)

	pid := int(started.Pid)
	sameNS := func(ns, want string) bool {
		a, err1 := os.Readlink(filepath.Join("/proc", itoa(pid), "ns", ns))
		b, err2 := os.Readlink(want)
		return err1 == nil && err2 == nil && a == b
	}
	var nsStat, wantStat unix.Stat_t
	if err := unix.Stat(filepath.Join("/proc", itoa(pid), "ns", "net"), &nsStat); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(netns, &wantStat); err != nil {
		t.Fatal(err)
	}
	if nsStat.Ino != wantStat.Ino {
		t.Errorf("holder is not in the pod's netns")
	}
	for _, ns := range []string{"pid", "ipc", "uts"} {
		if sameNS(ns, "/proc/self/ns/"+ns) {
			t.Errorf("holder shares the node's %s namespace", ns)
		}
	}
	// PID 1 of its own PID namespace.
	if data, err := os.ReadFile(filepath.Join("/proc", itoa(pid), "status")); err != nil || !strings.Contains(string(data), "NSpid:\t"+itoa(pid)+"\t1\n") {
		t.Errorf("holder is not PID 1 of a new PID namespace: %q %v", data, err)
	}

	st, err := r.ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id, Verbose: true})
	if err != nil || st.State != "SANDBOX_READY" || st.Pid != started.Pid {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	m, err := r.ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id})
	if err != nil || m.Metrics.GetData() == nil {
		t.Fatalf("Metrics = %+v, %v", m, err)
	}
	if _, err := r.ctrl.Platform(ctx, &sandboxapi.ControllerPlatformRequest{SandboxID: id}); err != nil {
		t.Errorf("Platform: %v", err)
	}

	waited := make(chan error, 1)
	go func() {
		_, err := r.ctrl.Wait(ctx, &sandboxapi.ControllerWaitRequest{SandboxID: id})
		waited <- err
	}()
	if _, err := r.ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Fatalf("Wait: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after Stop")
	}
	if _, err := os.Stat(filepath.Join("/proc", itoa(pid))); err == nil {
		t.Errorf("holder %d still exists after Stop", pid)
	}
	st, err = r.ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	if err != nil || st.State != "SANDBOX_NOTREADY" || st.ExitedAt == nil {
		t.Fatalf("Status after Stop = %+v, %v", st, err)
	}
	_, err = r.ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id})
	wantCode(t, "Metrics of stopped", err, codes.FailedPrecondition)
	if _, err := r.ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	_, err = r.ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	wantCode(t, "Status after Shutdown", err, codes.NotFound)
	if files := stateFiles(t, r.dir); len(files) != 0 {
		t.Errorf("state files left: %v", files)
	}
	if _, err := cgroup.Load(filepath.Join(OwnCgroupRoot, id)); err == nil {
		t.Errorf("pod cgroup %s left behind", filepath.Join(OwnCgroupRoot, id))
	}
}

func TestTaskRejectsBadRequests(t *testing.T) {
	r := newRig(t)
	ctx := namespaces.WithNamespace(context.Background(), "unit")

	bundle := t.TempDir()
	_, err := r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "bundle without config.json", err, codes.InvalidArgument)

	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "broken config.json", err, codes.InvalidArgument)

	spec := `{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"},"linux":{}}`
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "bundle naming no sandbox", err, codes.FailedPrecondition)

	if err := os.WriteFile(filepath.Join(bundle, "sandbox"), []byte("gone-pod"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "sandbox that is gone", err, codes.NotFound)

	for _, id := range []string{"", "../x", "a/b"} {
		_, err = r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle})
		wantCode(t, "Create id "+id, err, codes.InvalidArgument)
		_, err = r.tasks.State(ctx, &taskAPI.StateRequest{ID: id})
		wantCode(t, "State id "+id, err, codes.InvalidArgument)
	}
	_, err = r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: "relative/bundle"})
	wantCode(t, "relative bundle", err, codes.InvalidArgument)
	_, err = r.tasks.State(ctx, &taskAPI.StateRequest{ID: "unknown"})
	wantCode(t, "State of unknown", err, codes.NotFound)
	_, err = r.tasks.Kill(ctx, &taskAPI.KillRequest{ID: "unknown", Signal: 9})
	wantCode(t, "Kill of unknown", err, codes.NotFound)
	_, err = r.tasks.Create(context.Background(), &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "no namespace", err, codes.InvalidArgument)

	// A pod that was created but not started takes no tasks.
	if _, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "not-started"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.ctrl.Shutdown(context.Background(), &sandboxapi.ControllerShutdownRequest{SandboxID: "not-started"})
	})
	if err := os.WriteFile(filepath.Join(bundle, "sandbox"), []byte("not-started"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "sandbox not started", err, codes.FailedPrecondition)
	if _, err := os.Stat(filepath.Join(bundle, "rootfs")); err == nil {
		t.Errorf("rejected Create left a rootfs directory")
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
