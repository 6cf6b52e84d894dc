package quark_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/internal/testrig"
	"github.com/kuasar-go/kuasar-go/quark-sandboxer/quark"
	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// The test binary is also the stand-in for the quark binary.
func TestMain(m *testing.M) {
	if os.Getenv(standinSandboxEnv) == "1" {
		standinSandbox()
		return
	}
	if filepath.Base(os.Args[0]) == "quark" {
		os.Exit(standinCLI())
	}
	os.Exit(m.Run())
}

type rig struct {
	*testrig.Rig
	quark string
}

// newRig serves the Quark engine with the stand-in as its quark binary.
func newRig(t *testing.T, binary string) *rig {
	t.Helper()
	testenv.RequireRoot(t)
	if binary == "" {
		self, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		binary = filepath.Join(t.TempDir(), "quark")
		if err := os.Symlink(self, binary); err != nil {
			t.Fatal(err)
		}
	}
	cfg := sandbox.DefaultConfig()
	cfg.Engine = sandbox.EngineQuark
	cfg.Quark.Binary = binary
	r := testrig.New(t, testrig.Setup{
		Config: cfg,
		Engines: func(dir, taskAddress string, log *zap.Logger) []sandbox.Engine {
			return []sandbox.Engine{quark.New(cfg.Quark, nil, log)}
		},
	})
	return &rig{Rig: r, quark: binary}
}

func (r *rig) podDir(id string) string { return filepath.Join(r.Dir, "pods", id) }

func (r *rig) run(t *testing.T, id string, cfg *runtimeapi.PodSandboxConfig, netns string) *sandboxapi.ControllerStartResponse {
	t.Helper()
	ctx := context.Background()
	if cfg == nil {
		cfg = &runtimeapi.PodSandboxConfig{}
	}
	if _, err := r.Ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id, NetnsPath: netns, Options: testenv.PodOptions(t, cfg)}); err != nil {
		t.Fatalf("Create %s: %v", id, err)
	}
	started, err := r.Ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	if err != nil {
		t.Fatalf("Start %s: %v", id, err)
	}
	return started
}

func (r *rig) shutdown(t *testing.T, id string) {
	t.Helper()
	if _, err := r.Ctrl.Shutdown(context.Background(), &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
		t.Fatalf("Shutdown %s: %v", id, err)
	}
}

// update sends the pod's container list as Kuasar's containerd does.
func (r *rig) update(id string, tasks ...quark.TaskResource) error {
	if tasks == nil {
		tasks = []quark.TaskResource{}
	}
	b, err := json.Marshal(quark.TaskResources{Tasks: tasks})
	if err != nil {
		return err
	}
	_, err = r.Ctrl.Update(context.Background(), &sandboxapi.ControllerUpdateRequest{
		SandboxID: id,
		Sandbox:   &types.Sandbox{SandboxID: id, Extensions: map[string]*anypb.Any{quark.TasksExtension: {TypeUrl: "kuasar.tasks", Value: b}}},
		Fields:    []string{"extensions." + quark.TasksExtension},
	})
	return err
}

// engineState reads what the engine recorded of the pod's containers.
func (r *rig) engineState(t *testing.T, id string) map[string]*quark.ContainerState {
	t.Helper()
	st, err := r.Ctrl.Status(context.Background(), &sandboxapi.ControllerStatusRequest{SandboxID: id, Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	var fam struct {
		EngineState struct {
			Containers map[string]*quark.ContainerState `json:"containers"`
		} `json:"engine_state"`
	}
	if err := json.Unmarshal([]byte(st.Info["family"]), &fam); err != nil {
		t.Fatalf("family state %q: %v", st.Info["family"], err)
	}
	return fam.EngineState.Containers
}

func mountsBelow(t *testing.T, dir string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, m.Mountpoint)
	}
	return out
}

// busyboxRootfs is a container image: busybox and its applets.
func busyboxRootfs(t *testing.T) string {
	t.Helper()
	testenv.RequireFiles(t, testenv.BusyboxPath)
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(testenv.BusyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"sh", "cat", "echo"} {
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", app)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func processSpec(args ...string) *specs.Process {
	return &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}}
}

func waitFile(t *testing.T, path, want string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) || time.Now().After(deadline) {
			return string(b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestContractQuarkPodLifecycle drives a pod through Kuasar's Quark
// contract against the stand-in: the sandbox bundle, the exact command
// line and PID file, Quark's own task socket as the task address,
// containers prepared through Update (rootfs mounted, bind mounts
// resolved, IO bound into the bundle) and run through Quark's task API,
// Update keeping containers and processes in step, stop killing the
// sandbox process, and nothing left behind.
func TestContractQuarkPodLifecycle(t *testing.T) {
	r := newRig(t, "")
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	netns := testenv.NewNetns(t)
	const id = "quark-pod"
	mem := int64(256 << 20)
	started := r.run(t, id, &runtimeapi.PodSandboxConfig{
		Hostname: "quark-unit",
		Linux:    &runtimeapi.LinuxPodSandboxConfig{Resources: &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: mem}},
	}, netns)
	dir := r.podDir(id)

	// The sandbox bundle Quark runs from.
	var spec specs.Spec
	if b, err := os.ReadFile(filepath.Join(dir, "sandbox", "config.json")); err != nil || json.Unmarshal(b, &spec) != nil {
		t.Fatalf("sandbox config.json: %v %s", err, b)
	}
	if spec.Root.Path != "rootfs" || spec.Hostname != "quark-unit" || spec.Linux.Resources.Memory == nil || *spec.Linux.Resources.Memory.Limit != mem ||
		len(spec.Linux.Namespaces) != 1 || spec.Linux.Namespaces[0].Type != specs.NetworkNamespace || spec.Linux.Namespaces[0].Path != netns {
		t.Errorf("sandbox spec does not follow the pod: %+v %+v", spec.Root, spec.Linux)
	}

	// The sandbox process runs in the pod's cgroup, not the daemon's, and
	// the bundle tells Quark which it is.
	podCgroup := path.Join(cgroup.OwnRoot, id, id)
	if got := cgroupOf(t, int(started.Pid)); got != podCgroup {
		t.Errorf("sandbox process %d runs in cgroup %s, want the pod's %s", started.Pid, got, podCgroup)
	}
	if spec.Linux.CgroupsPath != podCgroup {
		t.Errorf("sandbox spec's cgroupsPath %q, want %s", spec.Linux.CgroupsPath, podCgroup)
	}
	if m, err := r.Ctrl.Metrics(context.Background(), &sandboxapi.ControllerMetricsRequest{SandboxID: id}); err != nil || m.GetMetrics().GetData() == nil {
		t.Errorf("Metrics of the pod's cgroup: %+v, %v", m, err)
	}

	// The sandbox process runs with exactly Kuasar's command line, and the
	// task address is Quark's own socket.
	sock := filepath.Join(dir, "quark-task.sock")
	if started.Address != "ttrpc+unix://"+sock || started.Version != 3 {
		t.Errorf("task address %q version %d, want Quark's socket %s, 3", started.Address, started.Version, sock)
	}
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(int(started.Pid)) + "/cmdline")
	want := []string{r.quark, "-r", filepath.Join(dir, "sandbox"), "sandbox", "--task-socket", sock, "--id", id, "--pid-file", filepath.Join(dir, "pid")}
	if got := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"); !slices.Equal(got, want) {
		t.Errorf("sandbox process %d runs %q, want %q", started.Pid, got, want)
	}
	quarkTasks := testenv.DialTasks(t, sock)
	if c, err := quarkTasks.Connect(ctx, &taskAPI.ConnectRequest{ID: id}); err != nil || c.ShimPid != started.Pid {
		t.Errorf("Connect to Quark's task socket: %+v, %v; want pid %d", c, err, started.Pid)
	}

	// A container arrives in an update.
	image := busyboxRootfs(t)
	data := t.TempDir()
	if err := os.WriteFile(filepath.Join(data, "msg"), []byte("hello-from-a-host-volume\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	logs := t.TempDir()
	stdout, stderr, execOut := filepath.Join(logs, "stdout"), filepath.Join(logs, "stderr"), filepath.Join(logs, "exec-stdout")
	for _, f := range []string{stdout, stderr, execOut} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c1 := quark.TaskResource{
		TaskID: "c1",
		Spec: &specs.Spec{
			Version: specs.Version,
			Process: processSpec("/bin/sh", "-c", "cat /data/msg; echo out-ok; echo err-ok >&2; exit 5"),
			Mounts: []specs.Mount{
				{Destination: "/data", Type: "bind", Source: data, Options: []string{"rbind", "ro"}},
				{Destination: "/proc", Type: "proc", Source: "proc"},
			},
		},
		Rootfs: []quark.Mount{{Type: "bind", Source: image, Options: []string{"rbind"}}},
		Stdout: stdout,
		Stderr: stderr,
	}
	if err := r.update(id, c1); err != nil {
		t.Fatalf("Update adding c1: %v", err)
	}
	bundle := filepath.Join(dir, "sandbox", "c1")
	if _, err := os.Stat(filepath.Join(bundle, "rootfs", "bin", "busybox")); err != nil {
		t.Errorf("c1's rootfs is not mounted in its bundle: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(bundle, "rootfs", "data", "msg")); err != nil || !bytes.Contains(b, []byte("hello-from")) {
		t.Errorf("c1's bind mount is not resolved into its rootfs: %q %v", b, err)
	}
	var cspec specs.Spec
	if b, err := os.ReadFile(filepath.Join(bundle, "config.json")); err != nil || json.Unmarshal(b, &cspec) != nil {
		t.Fatalf("c1 config.json: %v", err)
	}
	if len(cspec.Mounts) != 1 || cspec.Mounts[0].Destination != "/proc" || cspec.Root.Path != "rootfs" {
		t.Errorf("c1's spec keeps resolved bind mounts or lost others: %+v root %+v", cspec.Mounts, cspec.Root)
	}
	st := r.engineState(t, id)
	if c := st["c1"]; c == nil || c.Bundle != bundle || c.IO.Stdout != "/c1/stdout" || c.IO.Stderr != "/c1/stderr" || c.IO.Stdin != "" {
		t.Fatalf("engine state of c1: %+v", st["c1"])
	}
	for _, m := range []string{filepath.Join(bundle, "stdout"), filepath.Join(bundle, "stderr"), filepath.Join(bundle, "rootfs"), filepath.Join(bundle, "rootfs", "data")} {
		if !slices.Contains(mountsBelow(t, bundle), m) {
			t.Errorf("%s is not a mount point", m)
		}
	}

	// Quark runs it from the prepared bundle with the bound IO.
	if _, err := quarkTasks.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle, Stdout: st["c1"].IO.Stdout, Stderr: st["c1"].IO.Stderr}); err != nil {
		t.Fatalf("task Create: %v", err)
	}
	if _, err := quarkTasks.Start(ctx, &taskAPI.StartRequest{ID: "c1"}); err != nil {
		t.Fatalf("task Start: %v", err)
	}
	w, err := quarkTasks.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"})
	if err != nil || w.ExitStatus != 5 {
		t.Errorf("task Wait: %+v, %v; want exit 5", w, err)
	}
	if out := waitFile(t, stdout, "out-ok"); out != "hello-from-a-host-volume\nout-ok\n" {
		t.Errorf("host stdout %q", out)
	}
	if out := waitFile(t, stderr, "err-ok"); out != "err-ok\n" {
		t.Errorf("host stderr %q", out)
	}

	// An exec'd process arrives in an update too: its IO is bound in.
	c1.Processes = []quark.ProcessResource{{ExecID: "e1", Spec: processSpec("/bin/echo", "exec-ok"), Stdout: execOut}}
	if err := r.update(id, c1); err != nil {
		t.Fatalf("Update adding e1: %v", err)
	}
	e1 := r.engineState(t, id)["c1"].Processes["e1"]
	if e1.Stdout != "/c1/e1-stdout" {
		t.Fatalf("e1's IO as Quark sees it: %+v", e1)
	}
	specAny := &anypb.Any{Value: mustJSON(t, c1.Processes[0].Spec)}
	if _, err := quarkTasks.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: specAny, Stdout: e1.Stdout}); err != nil {
		t.Fatalf("task Exec: %v", err)
	}
	if _, err := quarkTasks.Start(ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Fatalf("task Start e1: %v", err)
	}
	if out := waitFile(t, execOut, "exec-ok"); out != "exec-ok\n" {
		t.Errorf("exec stdout %q", out)
	}
	c1.Processes = nil
	if err := r.update(id, c1); err != nil {
		t.Fatalf("Update removing e1: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(bundle, "e1-stdout")); err == nil {
		t.Errorf("e1's IO is still bound after its removal")
	}

	// The container leaves: its bundle goes, the host's files stay.
	if err := r.update(id); err != nil {
		t.Fatalf("Update removing c1: %v", err)
	}
	if _, err := os.Stat(bundle); err == nil {
		t.Errorf("c1's bundle is still there")
	}
	if left := mountsBelow(t, dir); len(left) != 0 {
		t.Errorf("mounts left in the pod: %v", left)
	}
	for _, f := range []string{filepath.Join(image, "bin", "busybox"), filepath.Join(data, "msg"), stdout} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("host file %s harmed by the container's removal: %v", f, err)
		}
	}
	if st := r.engineState(t, id); len(st) != 0 {
		t.Errorf("containers still recorded: %v", st)
	}

	// Stop kills the sandbox process.
	if _, err := r.Ctrl.Stop(context.Background(), &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if w, err := r.Ctrl.Wait(context.Background(), &sandboxapi.ControllerWaitRequest{SandboxID: id}); err != nil || w.ExitStatus != 137 {
		t.Errorf("Wait: %+v, %v; want the sandbox killed (137)", w, err)
	}
	r.shutdown(t, id)
	assertNothingLeft(t, r, id)
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cgroupOf is the cgroup of process pid: in the pids hierarchy on cgroup
// v1 hosts, the unified one on v2 hosts.
func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	unified := ""
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		switch {
		case len(f) != 3:
		case f[1] == "pids":
			return f[2]
		case f[0] == "0" && f[1] == "":
			unified = f[2]
		}
	}
	return unified
}

// cgroupExists tells whether cgroup p is there (pids hierarchy on v1).
func cgroupExists(p string) bool {
	root := "/sys/fs/cgroup"
	if _, err := os.Stat(filepath.Join(root, "pids")); err == nil {
		root = filepath.Join(root, "pids")
	}
	_, err := os.Stat(filepath.Join(root, p))
	return err == nil
}

// assertNothingLeft: no process naming the pod, no directory, no mount,
// no cgroup.
func assertNothingLeft(t *testing.T, r *rig, id string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []string
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			if cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil && bytes.Contains(cmd, []byte(r.podDir(id))) {
				left = append(left, "process "+e.Name())
			}
		}
		if _, err := os.Stat(r.podDir(id)); err == nil {
			left = append(left, "directory "+r.podDir(id))
		}
		left = append(left, mountsBelow(t, r.podDir(id))...)
		if cg := path.Join(cgroup.OwnRoot, id); cgroupExists(cg) {
			left = append(left, "cgroup "+cg)
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("pod %s left behind: %v", id, left)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestContractQuarkBadInput: a missing binary, a quark that fails or
// breaks the contract, and updates that cannot be applied are refused with
// the cause and the right code, leave nothing behind, and the daemon keeps
// serving pods.
func TestContractQuarkBadInput(t *testing.T) {
	t.Run("missing binary", func(t *testing.T) {
		r := newRig(t, "/nonexistent/quark")
		_, err := r.Ctrl.Create(context.Background(), &sandboxapi.ControllerCreateRequest{SandboxID: "no-quark"})
		testenv.WantCode(t, "Create", err, codes.FailedPrecondition, "/nonexistent/quark")
		assertNothingLeft(t, r, "no-quark")
	})

	r := newRig(t, "")
	for _, tc := range []struct {
		id, mention string
	}{
		{id: "fail-start-1", mention: "no memory for the guest kernel"},
		{id: "no-pid-1", mention: "no pid file"},
		{id: "no-socket-1", mention: "serves no task socket"},
	} {
		t.Run(tc.id, func(t *testing.T) {
			ctx := context.Background()
			if _, err := r.Ctrl.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: tc.id}); err != nil {
				t.Fatalf("Create: %v", err)
			}
			_, err := r.Ctrl.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: tc.id})
			testenv.WantCode(t, "Start", err, codes.Internal, tc.mention)
			// Released and forgotten by the failed start itself.
			_, err = r.Ctrl.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: tc.id})
			testenv.WantCode(t, "Shutdown after a failed start", err, codes.NotFound, "not found")
			assertNothingLeft(t, r, tc.id)
		})
	}

	// The daemon still serves pods; updates it cannot apply are refused.
	const id = "healthy"
	r.run(t, id, nil, "")
	image := busyboxRootfs(t)
	good := quark.TaskResource{TaskID: "c1", Spec: &specs.Spec{Process: processSpec("/bin/true")}, Rootfs: []quark.Mount{{Type: "bind", Source: image, Options: []string{"rbind"}}}}
	for _, tc := range []struct {
		name    string
		tasks   []quark.TaskResource
		code    codes.Code
		mention string
	}{
		{name: "bad container id", tasks: []quark.TaskResource{{TaskID: "../escape", Spec: good.Spec}}, code: codes.InvalidArgument, mention: "../escape"},
		{name: "bad exec id", tasks: []quark.TaskResource{{TaskID: "c1", Spec: good.Spec, Processes: []quark.ProcessResource{{ExecID: "a/b"}}}}, code: codes.InvalidArgument, mention: "a/b"},
		{name: "container listed twice", tasks: []quark.TaskResource{good, good}, code: codes.InvalidArgument, mention: "twice"},
		{name: "no spec", tasks: []quark.TaskResource{{TaskID: "c1", Rootfs: good.Rootfs}}, code: codes.InvalidArgument, mention: "no spec"},
		{name: "rootfs source missing", tasks: []quark.TaskResource{{TaskID: "c1", Spec: good.Spec, Rootfs: []quark.Mount{{Type: "bind", Source: "/nonexistent/image", Options: []string{"rbind"}}}}}, code: codes.InvalidArgument, mention: "rootfs"},
		{name: "volume source missing", tasks: []quark.TaskResource{{TaskID: "c1", Rootfs: good.Rootfs, Spec: &specs.Spec{Process: good.Spec.Process, Mounts: []specs.Mount{{Destination: "/v", Type: "bind", Source: "/nonexistent/volume"}}}}}, code: codes.InvalidArgument, mention: "/nonexistent/volume"},
		{name: "IO path missing", tasks: []quark.TaskResource{{TaskID: "c1", Spec: good.Spec, Rootfs: good.Rootfs, Stdout: "/nonexistent/fifo"}}, code: codes.InvalidArgument, mention: "/nonexistent/fifo"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := r.update(id, tc.tasks...)
			testenv.WantCode(t, "Update", err, tc.code, tc.mention)
			if st := r.engineState(t, id); len(st) != 0 {
				t.Errorf("a refused container is recorded: %v", st)
			}
			if ents, _ := os.ReadDir(filepath.Join(r.podDir(id), "sandbox")); len(ents) != 2 { // config.json, rootfs
				t.Errorf("sandbox bundle holds more than its own files: %v", ents)
			}
			if left := mountsBelow(t, r.podDir(id)); len(left) != 0 {
				t.Errorf("mounts left: %v", left)
			}
		})
	}
	_, err := r.Ctrl.Update(context.Background(), &sandboxapi.ControllerUpdateRequest{SandboxID: id, Sandbox: &types.Sandbox{SandboxID: id}, Fields: []string{"extensions.tasks"}})
	testenv.WantCode(t, "Update without the tasks extension", err, codes.InvalidArgument, "tasks")
	err = r.update("gone-pod", good)
	testenv.WantCode(t, "Update of a pod that is gone", err, codes.NotFound, "gone-pod")

	// A container cannot join a stopped pod.
	if _, err := r.Ctrl.Stop(context.Background(), &sandboxapi.ControllerStopRequest{SandboxID: id}); err != nil {
		t.Fatal(err)
	}
	err = r.update(id, good)
	testenv.WantCode(t, "Update of a stopped pod", err, codes.FailedPrecondition, "not running")
	r.shutdown(t, id)
	assertNothingLeft(t, r, id)
}
