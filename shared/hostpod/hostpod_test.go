package hostpod

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/holder"
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

// newRig serves the real runc family in-process on temporary sockets.
func newRig(t *testing.T) *testenv.InProcess {
	var stateDir string
	return testenv.ServeInProcess(t, testenv.Family{
		New: func(dir, taskAddress string, log *zap.Logger) controller.Sandboxer {
			stateDir = dir
			return New(taskAddress, log)
		},
		Tasks: func(ctrl *controller.Server, _ controller.Sandboxer, log *zap.Logger) (task.Sandboxes, task.Runtime, error) {
			rt, err := task.NewRuncRuntime(task.RuntimeConfig{Root: filepath.Join(stateDir, "runc")}, log)
			return TaskSandboxes{Controller: ctrl}, rt, err
		},
	})
}

func wantCode(t *testing.T, what string, err error, code codes.Code) {
	t.Helper()
	testenv.WantCode(t, what, err, code, "")
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
		_, err := r.Ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id})
		wantCode(t, "Create "+id, err, codes.InvalidArgument)
		_, err = r.Ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
		wantCode(t, "Start "+id, err, codes.InvalidArgument)
		_, err = r.Ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
		wantCode(t, "Status "+id, err, codes.InvalidArgument)
		_, err = r.Ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id})
		wantCode(t, "Shutdown "+id, err, codes.InvalidArgument)
	}
	if files := stateFiles(t, r.Dir); len(files) != 0 {
		t.Errorf("state files left: %v", files)
	}
}

func TestControllerUnknownSandbox(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	const id = "never-created"
	_, err := r.Ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	wantCode(t, "Start before Create", err, codes.NotFound)
	_, err = r.Ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id})
	wantCode(t, "Stop", err, codes.NotFound)
	_, err = r.Ctrl.Wait(ctx, &sandboxapi.ControllerWaitRequest{SandboxID: id})
	wantCode(t, "Wait", err, codes.NotFound)
	_, err = r.Ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	wantCode(t, "Status", err, codes.NotFound)
	_, err = r.Ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id})
	wantCode(t, "Metrics", err, codes.NotFound)
	_, err = r.Ctrl.Platform(ctx, &sandboxapi.ControllerPlatformRequest{SandboxID: id})
	wantCode(t, "Platform", err, codes.NotFound)
	_, err = r.Ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id})
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
		_, err := r.Ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "netns-test", NetnsPath: p})
		wantCode(t, name, err, codes.InvalidArgument)
		if err != nil && !strings.Contains(err.Error(), "netns") {
			t.Errorf("%s: error %q does not name the netns", name, err)
		}
	}
	_, err := r.Ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{
		SandboxID: "bad-options",
		Options:   &anypb.Any{TypeUrl: "types.containerd.io/runtime.v1.PodSandboxConfig", Value: []byte{0xff, 0xff}},
	})
	wantCode(t, "undecodable options", err, codes.InvalidArgument)
	if files := stateFiles(t, r.Dir); len(files) != 0 {
		t.Errorf("state files left: %v", files)
	}
}

func TestControllerLifecycle(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	netns := testenv.NewNetns(t)
	const id = "lifecycle-pod"
	cfg := &runtimeapi.PodSandboxConfig{Hostname: "kuasar-unit"}
	create := &sandboxapi.ControllerCreateRequest{SandboxID: id, NetnsPath: netns, Options: testenv.PodOptions(t, cfg)}
	if _, err := r.Ctrl.Create(ctx, create); err != nil {
		t.Fatalf("Create: %v", err)
	}
	_, err := r.Ctrl.Create(ctx, create)
	wantCode(t, "Create twice", err, codes.AlreadyExists)

	started, err := r.Ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if started.Version != 3 || !strings.HasPrefix(started.Address, "ttrpc+unix://") {
		t.Errorf("Start address %q version %d", started.Address, started.Version)
	}
	_, err = r.Ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
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

	st, err := r.Ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id, Verbose: true})
	if err != nil || st.State != "SANDBOX_READY" || st.Pid != started.Pid {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	m, err := r.Ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id})
	if err != nil || m.Metrics.GetData() == nil {
		t.Fatalf("Metrics = %+v, %v", m, err)
	}
	if _, err := r.Ctrl.Platform(ctx, &sandboxapi.ControllerPlatformRequest{SandboxID: id}); err != nil {
		t.Errorf("Platform: %v", err)
	}

	waited := make(chan error, 1)
	go func() {
		_, err := r.Ctrl.Wait(ctx, &sandboxapi.ControllerWaitRequest{SandboxID: id})
		waited <- err
	}()
	if _, err := r.Ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
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
	st, err = r.Ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	if err != nil || st.State != "SANDBOX_NOTREADY" || st.ExitedAt == nil {
		t.Fatalf("Status after Stop = %+v, %v", st, err)
	}
	_, err = r.Ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id})
	wantCode(t, "Metrics of stopped", err, codes.FailedPrecondition)
	if _, err := r.Ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := r.Ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	_, err = r.Ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	wantCode(t, "Status after Shutdown", err, codes.NotFound)
	if files := stateFiles(t, r.Dir); len(files) != 0 {
		t.Errorf("state files left: %v", files)
	}
	if _, err := cgroup.Load(filepath.Join(cgroup.OwnRoot, id)); err == nil {
		t.Errorf("pod cgroup %s left behind", filepath.Join(cgroup.OwnRoot, id))
	}
}

func TestTaskRejectsBadRequests(t *testing.T) {
	r := newRig(t)
	ctx := namespaces.WithNamespace(context.Background(), "unit")

	bundle := t.TempDir()
	_, err := r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "bundle without config.json", err, codes.InvalidArgument)

	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "broken config.json", err, codes.InvalidArgument)

	spec := `{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"},"linux":{}}`
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "bundle naming no sandbox", err, codes.FailedPrecondition)

	if err := os.WriteFile(filepath.Join(bundle, "sandbox"), []byte("gone-pod"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "sandbox that is gone", err, codes.NotFound)

	for _, id := range []string{"", "../x", "a/b"} {
		_, err = r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle})
		wantCode(t, "Create id "+id, err, codes.InvalidArgument)
		_, err = r.Tasks.State(ctx, &taskAPI.StateRequest{ID: id})
		wantCode(t, "State id "+id, err, codes.InvalidArgument)
	}
	_, err = r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: "relative/bundle"})
	wantCode(t, "relative bundle", err, codes.InvalidArgument)
	_, err = r.Tasks.State(ctx, &taskAPI.StateRequest{ID: "unknown"})
	wantCode(t, "State of unknown", err, codes.NotFound)
	_, err = r.Tasks.Kill(ctx, &taskAPI.KillRequest{ID: "unknown", Signal: 9})
	wantCode(t, "Kill of unknown", err, codes.NotFound)
	_, err = r.Tasks.Create(context.Background(), &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "no namespace", err, codes.InvalidArgument)

	// A pod that was created but not started takes no tasks.
	if _, err := r.Ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "not-started"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r.Ctrl.Shutdown(context.Background(), &sandboxapi.ControllerShutdownRequest{SandboxID: "not-started"})
	})
	if err := os.WriteFile(filepath.Join(bundle, "sandbox"), []byte("not-started"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = r.Tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle})
	wantCode(t, "sandbox not started", err, codes.FailedPrecondition)
	if _, err := os.Stat(filepath.Join(bundle, "rootfs")); err == nil {
		t.Errorf("rejected Create left a rootfs directory")
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
