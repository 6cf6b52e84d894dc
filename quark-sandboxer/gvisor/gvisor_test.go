package gvisor_test

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
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
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/gvisor"
	"github.com/kuasar-go/kuasar-go/quark-sandboxer/internal/testrig"
	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

var pauseBinary string

// The test binary doubles as the containers' waiter, as the daemon does.
func TestMain(m *testing.M) {
	if gvisor.IsWaiter() {
		gvisor.WaiterMain()
		return
	}
	os.Exit(run(m))
}

func run(m *testing.M) int {
	// The test binary is not static (-race): the sandbox's pause is the
	// harness's static pause program instead of the daemon itself.
	if os.Geteuid() == 0 {
		b, err := testenv.BuildPauseBinary()
		if err == nil {
			f, ferr := os.CreateTemp("", "kg-gvisor-pause-")
			if ferr == nil {
				f.Write(b)
				f.Chmod(0o755)
				f.Close()
				pauseBinary = f.Name()
				defer os.Remove(pauseBinary)
			}
		}
	}
	return m.Run()
}

type rig struct {
	*testrig.Rig
	dir   string
	root  string
	ctrl  sandboxapi.ControllerClient
	tasks taskAPI.TTRPCTaskService
}

// newRig serves the gVisor engine in-process on temporary sockets, as the
// daemon does; mutate adjusts the configuration.
func newRig(t *testing.T, mutate func(*sandbox.Config)) *rig {
	t.Helper()
	testenv.RequireRoot(t)
	runsc := testenv.Binary("runsc")
	testenv.RequireFiles(t, runsc)
	if pauseBinary == "" {
		t.Skip("no static pause binary (needs the go toolchain)")
	}
	cfg := sandbox.DefaultConfig()
	cfg.GVisor.Binary = runsc
	if mutate != nil {
		mutate(cfg)
	}
	var gv *gvisor.Engine
	r := testrig.New(t, testrig.Setup{
		Config: cfg,
		Engines: func(dir, taskAddress string, log *zap.Logger) []sandbox.Engine {
			gv = gvisor.New(gvisor.Options{Config: cfg.GVisor, StateDir: dir, TaskAddress: taskAddress, Pause: pauseBinary}, log)
			return []sandbox.Engine{gv}
		},
		Runtime: func(pods sandbox.Tasks, log *zap.Logger) (task.Runtime, error) {
			return gvisor.NewRuntime(gv, pods, log)
		},
	})
	return &rig{Rig: r, dir: r.Dir, root: filepath.Join(r.Dir, "runsc"), ctrl: r.Ctrl, tasks: r.Tasks}
}

func podOptions(t *testing.T, cfg *runtimeapi.PodSandboxConfig) *anypb.Any {
	return testenv.PodOptions(t, cfg)
}

func wantCode(t *testing.T, what string, err error, code codes.Code, mention string) {
	t.Helper()
	testenv.WantCode(t, what, err, code, mention)
}

// leftovers lists what a pod may leave: host processes naming it, runsc
// state, its directory and its cgroup.
func (r *rig) leftovers(id string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil && strings.Contains(string(cmd), id) {
			out = append(out, "process "+e.Name()+": "+strings.ReplaceAll(string(cmd), "\x00", " "))
		}
	}
	states, _ := filepath.Glob(filepath.Join(r.root, id+"*"))
	out = append(out, states...)
	if _, err := os.Stat(filepath.Join(r.dir, "pods", id)); err == nil {
		out = append(out, "directory pods/"+id)
	}
	for _, cg := range []string{filepath.Join(cgroup.OwnRoot, id), filepath.Join(cgroup.OwnRoot, id, id)} {
		if _, err := cgroup.Load(cg); err == nil {
			out = append(out, "cgroup "+cg)
		}
	}
	return out
}

func (r *rig) assertNothingLeft(t *testing.T, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := r.leftovers(id)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("pod %s left behind:\n  %s", id, strings.Join(left, "\n  "))
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestGVisorPodLifecycle runs a pod's sandbox through the controller:
// runsc's sandbox in the pod's netns, status and metrics, a polite stop
// (the pause exits on SIGTERM), and a shutdown that leaves nothing.
func TestGVisorPodLifecycle(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	netns := testenv.NewNetns(t)
	const id = "gvisor-lifecycle"
	cfg := &runtimeapi.PodSandboxConfig{Hostname: "gvisor-unit"}
	if _, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id, NetnsPath: netns, Options: podOptions(t, cfg)}); err != nil {
		t.Fatalf("Create: %v", err)
	}
	started, err := r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if started.Version != 3 || started.Address != "ttrpc+unix://"+filepath.Join(r.dir, "task.sock") {
		t.Errorf("Start address %q version %d, want the daemon's task socket, 3", started.Address, started.Version)
	}
	pid := strconv.Itoa(int(started.Pid))
	cmdline, _ := os.ReadFile("/proc/" + pid + "/cmdline")
	if !strings.HasPrefix(string(cmdline), "runsc-sandbox\x00") || !strings.Contains(string(cmdline), "--platform=systrap") {
		t.Errorf("pod pid %s is not a systrap runsc sandbox: %q", pid, cmdline)
	}
	var got, want unix.Stat_t
	if err := unix.Stat("/proc/"+pid+"/ns/net", &got); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(netns, &want); err != nil {
		t.Fatal(err)
	}
	if got.Ino != want.Ino {
		t.Errorf("the sandbox is not in the pod's network namespace")
	}
	st, err := r.ctrl.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id, Verbose: true})
	if err != nil || st.State != "SANDBOX_READY" || !strings.Contains(st.Info["family"], `"engine":"gvisor"`) {
		t.Fatalf("Status = %+v, %v", st, err)
	}
	if m, err := r.ctrl.Metrics(ctx, &sandboxapi.ControllerMetricsRequest{SandboxID: id}); err != nil || m.Metrics.GetData() == nil {
		t.Errorf("Metrics = %+v, %v", m, err)
	}
	if _, err := r.ctrl.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id, TimeoutSecs: 5}); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	w, err := r.ctrl.Wait(ctx, &sandboxapi.ControllerWaitRequest{SandboxID: id})
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	// The pause ends on SIGTERM (exit 0 once its handler is installed,
	// 143 if the signal came first), and the sandbox with it: no SIGKILL.
	if w.ExitStatus != 0 && w.ExitStatus != 143 {
		t.Errorf("sandbox exit status %d after a polite stop, want 0 or 143 (SIGTERM)", w.ExitStatus)
	}
	if _, err := r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	r.assertNothingLeft(t, id)
}

// TestGVisorBadInput: requests the daemon must refuse with a clear error
// and the right code, leaving nothing behind.
func TestGVisorBadInput(t *testing.T) {
	r := newRig(t, func(c *sandbox.Config) {
		c.AllowedEngines = []string{sandbox.EngineGVisor, sandbox.EngineQuark}
		c.GVisor.AllowedPlatforms = []string{sandbox.PlatformSystrap, sandbox.PlatformPtrace}
	})
	ctx := context.Background()
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		code        codes.Code
		mention     string
	}{
		{name: "unknown engine", annotations: map[string]string{sandbox.AnnotationEngine: "firecracker"}, code: codes.InvalidArgument, mention: `"firecracker"`},
		{name: "unknown platform", annotations: map[string]string{sandbox.AnnotationPlatform: "hypervisor"}, code: codes.InvalidArgument, mention: `unknown gVisor platform "hypervisor"`},
		{name: "engine not in this daemon", annotations: map[string]string{sandbox.AnnotationEngine: "quark"}, code: codes.FailedPrecondition, mention: "quark"},
		{name: "platform not allowed", annotations: map[string]string{sandbox.AnnotationPlatform: sandbox.PlatformKVM}, code: codes.PermissionDenied, mention: "gvisor.allowed_platforms"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "bad-" + strings.ReplaceAll(tc.name, " ", "-")
			cfg := &runtimeapi.PodSandboxConfig{Annotations: tc.annotations}
			_, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id, Options: podOptions(t, cfg)})
			wantCode(t, "Create", err, tc.code, tc.mention)
			r.assertNothingLeft(t, id)
		})
	}
}

// TestGVisorMissingRunsc: a daemon whose runsc is missing refuses pods,
// naming the binary.
func TestGVisorMissingRunsc(t *testing.T) {
	r := newRig(t, func(c *sandbox.Config) { c.GVisor.Binary = "/nonexistent/runsc" })
	_, err := r.ctrl.Create(context.Background(), &sandboxapi.ControllerCreateRequest{SandboxID: "no-runsc"})
	wantCode(t, "Create", err, codes.FailedPrecondition, "/nonexistent/runsc")
	r.assertNothingLeft(t, "no-runsc")
}

// TestGVisorPauseMustBeStatic: a dynamically linked pause cannot run in
// the sandbox; pods are refused, naming it.
func TestGVisorPauseMustBeStatic(t *testing.T) {
	testenv.RequireRoot(t)
	dynamic := "/bin/true"
	if out, err := exec.Command("ldd", dynamic).CombinedOutput(); err != nil || strings.Contains(string(out), "not a dynamic") {
		t.Skipf("%s is not dynamically linked here", dynamic)
	}
	e := gvisor.New(gvisor.Options{Config: sandbox.DefaultConfig().GVisor, StateDir: t.TempDir(), Pause: dynamic}, zap.NewNop())
	if err := e.Check(); err == nil || !strings.Contains(err.Error(), "dynamically linked") || !strings.Contains(err.Error(), dynamic) {
		t.Errorf("Check with a dynamic pause: %v", err)
	}
}

// TestGVisorFailedStartLeavesNothing: runsc fails to start a pod's sandbox
// (its network namespace vanished between Create and Start); the error
// says why, nothing of the pod stays, and the daemon runs the next pod.
func TestGVisorFailedStartLeavesNothing(t *testing.T) {
	r := newRig(t, nil)
	ctx := context.Background()
	netns := testenv.NewNetns(t)
	const id = "netns-vanishes"
	if _, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id, NetnsPath: netns}); err != nil {
		t.Fatalf("Create: %v", err)
	}
	if err := unix.Unmount(netns, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(netns); err != nil {
		t.Fatal(err)
	}
	_, err := r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	wantCode(t, "Start", err, codes.Internal, "netns")
	t.Logf("Start error: %v", err)
	// A failed start releases the sandbox and forgets it (containerd drops
	// it without a Shutdown).
	_, err = r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id})
	wantCode(t, "Shutdown after a failed start", err, codes.NotFound, "not found")
	r.assertNothingLeft(t, id)

	// The daemon still serves pods.
	if _, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "next-pod"}); err != nil {
		t.Fatalf("Create next pod: %v", err)
	}
	if _, err := r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: "next-pod"}); err != nil {
		t.Fatalf("Start next pod: %v", err)
	}
	if _, err := r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: "next-pod"}); err != nil {
		t.Fatalf("Shutdown next pod: %v", err)
	}
	r.assertNothingLeft(t, "next-pod")
}

// TestGVisorTaskBadInput: containers that cannot join a pod.
func TestGVisorTaskBadInput(t *testing.T) {
	r := newRig(t, nil)
	ctx := namespaces.WithNamespace(context.Background(), "unit")
	if _, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "stopped-pod"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: "live-pod"}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: "live-pod"}); err != nil {
		t.Fatal(err)
	}
	bundle := func(t *testing.T, pod string, annotations map[string]string) string {
		b := t.TempDir()
		spec := map[string]any{
			"ociVersion":  "1.0.2",
			"process":     map[string]any{"args": []string{"true"}, "cwd": "/"},
			"root":        map[string]any{"path": "rootfs"},
			"linux":       map[string]any{},
			"annotations": annotations,
		}
		data, _ := json.Marshal(spec)
		if err := os.WriteFile(filepath.Join(b, "config.json"), data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(b, "sandbox"), []byte(pod), 0o600); err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name        string
		pod         string
		annotations map[string]string
		code        codes.Code
		mention     string
	}{
		{name: "pod that is gone", pod: "gone-pod", code: codes.NotFound, mention: "gone-pod"},
		{name: "pod not running", pod: "stopped-pod", code: codes.FailedPrecondition, mention: "stopped-pod"},
		{name: "claims to be the sandbox", pod: "live-pod", annotations: map[string]string{"io.kubernetes.cri.container-type": "sandbox"}, code: codes.InvalidArgument, mention: "sandbox container"},
		{name: "names another pod", pod: "live-pod", annotations: map[string]string{"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "other-pod"}, code: codes.InvalidArgument, mention: "other-pod"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := r.tasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle(t, tc.pod, tc.annotations)})
			wantCode(t, "task Create", err, tc.code, tc.mention)
			if _, err := r.tasks.State(ctx, &taskAPI.StateRequest{ID: "c1"}); status.Code(err) != codes.NotFound {
				t.Errorf("refused container is known: %v", err)
			}
		})
	}
	for _, id := range []string{"live-pod", "stopped-pod"} {
		if _, err := r.ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
			t.Fatalf("Shutdown %s: %v", id, err)
		}
		r.assertNothingLeft(t, id)
	}
}

// TestGVisorPodSurvivesDaemonRestart: a second controller over the same
// state (a restarted daemon) finds the running pod, watches its sandbox,
// stops and removes it.
func TestGVisorPodSurvivesDaemonRestart(t *testing.T) {
	testenv.RequireRoot(t)
	runsc := testenv.Binary("runsc")
	testenv.RequireFiles(t, runsc)
	if pauseBinary == "" {
		t.Skip("no static pause binary")
	}
	dir := t.TempDir()
	log := zap.NewNop()
	cfg := sandbox.DefaultConfig()
	cfg.GVisor.Binary = runsc
	daemon := func() *controller.Server {
		st, err := store.Open(filepath.Join(dir, "sandboxes"))
		if err != nil {
			t.Fatal(err)
		}
		gv := gvisor.New(gvisor.Options{Config: cfg.GVisor, StateDir: dir, TaskAddress: "ttrpc+unix://" + filepath.Join(dir, "task.sock"), Pause: pauseBinary}, log)
		srv, err := controller.New(context.Background(), sandbox.New(filepath.Join(dir, "pods"), cfg, []sandbox.Engine{gv}, log), st, log)
		if err != nil {
			t.Fatal(err)
		}
		return srv
	}
	if err := reap.Start(log); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	const id = "survivor"
	first := daemon()
	if _, err := first.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id}); err != nil {
		t.Fatal(err)
	}
	started, err := first.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { first.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}) })

	second := daemon()
	st, err := second.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	if err != nil || st.State != "SANDBOX_READY" || st.Pid != started.Pid {
		t.Fatalf("restarted daemon: Status = %+v, %v; want READY, pid %d", st, err, started.Pid)
	}
	if _, err := second.Stop(ctx, &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if st, err := second.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id}); err != nil || st.State != "SANDBOX_NOTREADY" {
		t.Errorf("after Stop: %+v, %v", st, err)
	}
	if _, err := second.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	r := &rig{dir: dir, root: filepath.Join(dir, "runsc")}
	r.assertNothingLeft(t, id)
}
