// Package e2e drives runc-sandboxer through stock containerd 2.2 and CRI.
package e2e

import (
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

const handler = "kuasar-runc"

func startEnv(t *testing.T) *testenv.Env {
	t.Helper()
	testenv.RequireRoot(t)
	bin := testenv.Binary("runc-sandboxer")
	testenv.RequireFiles(t, bin)
	return testenv.Start(t, testenv.Options{Sandboxers: []testenv.Sandboxer{{Name: handler, Binary: bin}}})
}

// nsOf returns the namespace link of a process inside a container.
func nsOf(t *testing.T, env *testenv.Env, ctr, ns string) string {
	t.Helper()
	out, stderr, code := env.ExecSync(t, ctr, 10*time.Second, "readlink", "/proc/self/ns/"+ns)
	if code != 0 {
		t.Fatalf("readlink ns/%s in %s: %d %s", ns, ctr, code, stderr)
	}
	return strings.TrimSpace(out)
}

// TestE2ERuncPodLifecycle runs a pod through CRI with runc-sandboxer: IP from
// CNI, a container whose log is read, exec, exit codes, two containers
// sharing the pod's namespaces, one with its own PID namespace, stop and
// removal, and nothing left behind.
func TestE2ERuncPodLifecycle(t *testing.T) {
	env := startEnv(t)
	before := env.Snapshot()

	t0 := time.Now()
	podCfg := env.PodConfig()
	podCfg.Hostname = "kuasar-e2e-pod"
	podID := env.RunPod(t, handler, podCfg)
	tPod := time.Since(t0)

	main := testenv.ContainerConfig("main", "sh", "-c", "echo hello-from-kuasar-runc; hostname; echo to-stderr >&2; exec sleep 3600")
	mainID := env.CreateStartContainer(t, podID, podCfg, main)
	log := env.WaitLog(t, podCfg, main, "hello-from-kuasar-runc", 20*time.Second)
	tFirstLog := time.Since(t0)
	if !strings.Contains(env.WaitLog(t, podCfg, main, "to-stderr", 5*time.Second), "kuasar-e2e-pod\n") {
		t.Errorf("container does not see the pod's hostname; log %q", log)
	}

	env.CheckPodNetwork(t, podID, mainID)
	if out, _, code := env.ExecSync(t, mainID, 10*time.Second, "ping", "-c", "1", "-W", "2", env.Gateway); code != 0 {
		t.Errorf("ping gateway %s: %d %s", env.Gateway, code, out)
	}

	out, _, code := env.ExecSync(t, mainID, 10*time.Second, "sh", "-c", "echo exec-ok; exit 3")
	if out != "exec-ok\n" || code != 3 {
		t.Errorf("ExecSync: %q, exit %d; want exec-ok, 3", out, code)
	}

	// A second container shares the pod's PID, IPC, UTS and network namespaces.
	peer := testenv.ContainerConfig("peer", "sleep", "3600")
	peerID := env.CreateStartContainer(t, podID, podCfg, peer)
	for _, ns := range []string{"pid", "ipc", "uts", "net"} {
		if a, b := nsOf(t, env, mainID, ns), nsOf(t, env, peerID, ns); a != b {
			t.Errorf("%s namespace differs between containers of one pod: %s vs %s", ns, a, b)
		}
	}
	// In the shared PID namespace the holder is PID 1 and the peer sees
	// main's sleep.
	if out, _, _ := env.ExecSync(t, peerID, 10*time.Second, "ps", "-o", "pid,args"); !strings.Contains(out, "sleep 3600") || strings.Count(out, "sleep 3600") < 2 {
		t.Errorf("peer does not see main's processes:\n%s", out)
	}
	if out, _, _ := env.ExecSync(t, peerID, 10*time.Second, "cat", "/proc/1/cmdline"); !strings.Contains(out, "kuasar-holder") {
		t.Errorf("PID 1 of the pod is %q, want the holder", out)
	}

	// A container asking for its own PID namespace gets one, in the same network.
	private := testenv.ContainerConfig("private-pid", "sleep", "3600")
	private.Linux = &runtime.LinuxContainerConfig{SecurityContext: &runtime.LinuxContainerSecurityContext{
		NamespaceOptions: &runtime.NamespaceOption{Pid: runtime.NamespaceMode_CONTAINER},
	}}
	privateID := env.CreateStartContainer(t, podID, podCfg, private)
	if a, b := nsOf(t, env, mainID, "pid"), nsOf(t, env, privateID, "pid"); a == b {
		t.Errorf("container with NamespaceMode_CONTAINER shares the pod's PID namespace %s", a)
	}
	if a, b := nsOf(t, env, mainID, "net"), nsOf(t, env, privateID, "net"); a != b {
		t.Errorf("private-pid container left the pod's network: %s vs %s", a, b)
	}

	// Exit codes pass through.
	exiter := testenv.ContainerConfig("exiter", "sh", "-c", "exit 7")
	exiterID := env.CreateStartContainer(t, podID, podCfg, exiter)
	if code := env.WaitContainerExited(t, exiterID, 20*time.Second); code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}

	// No shim process of this containerd and no pause container serve the pod.
	if shims := shimsOf(env.Address); len(shims) != 0 {
		t.Errorf("shim processes run for this containerd: %v", shims)
	}
	if ctrs, err := env.Ctr("-n", "k8s.io", "containers", "ls", "-q"); err != nil {
		t.Errorf("ctr containers ls: %v", err)
	} else if strings.Contains(ctrs, podID) {
		t.Errorf("containerd holds a container for the pod itself (a pause container): %q", ctrs)
	}

	// Stop and remove one container through CRI, then the pod.
	ctx := t.Context()
	if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: mainID, Timeout: 2}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	st := env.ContainerStatus(t, mainID)
	if st.State != runtime.ContainerState_CONTAINER_EXITED {
		t.Errorf("main after StopContainer: %v", st.State)
	}
	if _, err := env.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: mainID}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
	tStop := time.Now()
	env.StopRemovePod(t, podID)
	tRemove := time.Since(tStop)
	env.AssertNoLeaks(t, before, 15*time.Second)
	t.Logf("RunPodSandbox %v; pod + container to first log line %v; stop+remove pod %v",
		tPod.Round(time.Millisecond), tFirstLog.Round(time.Millisecond), tRemove.Round(time.Millisecond))
}

// TestE2ERuncPodStatsAndStatus checks what CRI reports of a running pod
// placed in a cgroup parent as kubelet does: ready state, the pod's stats
// (CRI reads the parent cgroup, which holds the holder and the containers)
// and the container's stats.
func TestE2ERuncPodStatsAndStatus(t *testing.T) {
	env := startEnv(t)
	before := env.Snapshot()
	podCfg := env.PodConfig()
	parent := "/kuasar-go-e2e/pod" + podCfg.Metadata.Uid
	podCfg.Linux.CgroupParent = parent
	podID := env.RunPod(t, handler, podCfg)
	ctr := testenv.ContainerConfig("worker", "sh", "-c", "dd if=/dev/zero of=/dev/null bs=1M count=64; exec sleep 3600")
	ctrID := env.CreateStartContainer(t, podID, podCfg, ctr)
	if out, _, _ := env.ExecSync(t, ctrID, 10*time.Second, "cat", "/proc/self/cgroup"); !strings.Contains(out, parent+"/") {
		t.Errorf("container is not below the pod's cgroup parent %s:\n%s", parent, out)
	}

	if st := env.PodStatus(t, podID); st.State != runtime.PodSandboxState_SANDBOX_READY {
		t.Errorf("pod state %v, want READY", st.State)
	}
	ctx := t.Context()
	stats, err := env.Runtime.ContainerStats(ctx, &runtime.ContainerStatsRequest{ContainerId: ctrID})
	if err != nil {
		t.Fatalf("ContainerStats: %v", err)
	}
	if stats.GetStats().GetMemory().GetWorkingSetBytes().GetValue() == 0 && stats.GetStats().GetCpu().GetUsageCoreNanoSeconds().GetValue() == 0 {
		t.Errorf("container stats are empty: %+v", stats.GetStats())
	}
	pstats, err := env.Runtime.PodSandboxStats(ctx, &runtime.PodSandboxStatsRequest{PodSandboxId: podID})
	if err != nil {
		t.Fatalf("PodSandboxStats: %v", err)
	}
	if pstats.GetStats().GetLinux().GetCpu().GetUsageCoreNanoSeconds().GetValue() == 0 {
		t.Errorf("pod CPU usage is zero: %+v", pstats.GetStats().GetLinux())
	}

	env.StopRemovePod(t, podID)
	if st, err := env.Runtime.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: podID}); err == nil {
		t.Errorf("removed pod still has a status: %v", st)
	}
	// The parent belongs to kubelet, which removes it after the pod; the
	// sandboxer must have removed everything below it.
	for _, p := range []string{parent, path.Dir(parent)} {
		g, err := cgroup.Load(p)
		if err != nil {
			t.Fatalf("load %s: %v", p, err)
		}
		if err := g.Delete(); err != nil {
			t.Errorf("cgroup parent %s is not empty after RemovePodSandbox: %v", p, err)
		}
	}
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// shimsOf lists containerd shim processes started for the containerd at
// address (shims carry it in their command line).
func shimsOf(address string) []string {
	var found []string
	files, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if strings.Contains(args[0], "containerd-shim") && strings.Contains(string(b), address) {
			found = append(found, filepath.Base(filepath.Dir(p))+":"+args[0])
		}
	}
	return found
}

// TestE2ERuncTerminalAndOOM: a container with a terminal (console socket)
// logs through it, and a container killed by its memory limit is reported
// OOMKilled (a TaskOOM event reached containerd).
func TestE2ERuncTerminalAndOOM(t *testing.T) {
	env := startEnv(t)
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)

	tty := testenv.ContainerConfig("tty", "sh", "-c", "test -t 1 && echo stdout-is-a-terminal; exec sleep 3600")
	tty.Tty = true
	ttyID := env.CreateStartContainer(t, podID, podCfg, tty)
	env.WaitLog(t, podCfg, tty, "stdout-is-a-terminal", 20*time.Second)
	if out, _, code := env.ExecSync(t, ttyID, 10*time.Second, "echo", "exec-in-tty-container"); code != 0 || out != "exec-in-tty-container\n" {
		t.Errorf("exec: %q (%d)", out, code)
	}

	hog := testenv.ContainerConfig("hog", "sh", "-c", "echo allocating; exec dd if=/dev/zero of=/dev/null bs=96M count=1")
	hog.Linux = &runtime.LinuxContainerConfig{Resources: &runtime.LinuxContainerResources{MemoryLimitInBytes: 32 << 20}}
	hogID := env.CreateStartContainer(t, podID, podCfg, hog)
	if code := env.WaitContainerExited(t, hogID, 30*time.Second); code != 137 {
		t.Errorf("memory hog exit code %d, want 137 (SIGKILL by the OOM killer); log %q", code, env.ReadLog(t, podCfg, hog))
	}
	deadline := time.Now().Add(5 * time.Second)
	for env.ContainerStatus(t, hogID).Reason != "OOMKilled" && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if st := env.ContainerStatus(t, hogID); st.Reason != "OOMKilled" {
		t.Errorf("memory hog reason %q, want OOMKilled", st.Reason)
	}

	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestE2ERuncHostNetworkPod: a pod that asks for the node's network gets no
// netns of its own, still a private PID namespace.
func TestE2ERuncHostNetworkPod(t *testing.T) {
	env := startEnv(t)
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podCfg.Linux.SecurityContext.NamespaceOptions.Network = runtime.NamespaceMode_NODE
	podID := env.RunPod(t, handler, podCfg)
	ctr := testenv.ContainerConfig("hostnet", "sleep", "3600")
	ctrID := env.CreateStartContainer(t, podID, podCfg, ctr)
	hostNet, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if got := nsOf(t, env, ctrID, "net"); got != hostNet {
		t.Errorf("host-network pod in %s, want the node's %s", got, hostNet)
	}
	hostPID, _ := os.Readlink("/proc/self/ns/pid")
	if got := nsOf(t, env, ctrID, "pid"); got == hostPID {
		t.Errorf("host-network pod shares the node's PID namespace")
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestE2ERuncTaskOperations drives the task API operations CRI uses rarely
// or not at all, through containerd: UpdateContainerResources, and with ctr
// (containerd's own client) ps, pause, resume and kill.
func TestE2ERuncTaskOperations(t *testing.T) {
	env := startEnv(t)
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)
	ctr := testenv.ContainerConfig("ops", "sleep", "3600")
	ctrID := env.CreateStartContainer(t, podID, podCfg, ctr)
	ctx := t.Context()

	const limit = 48 << 20
	if _, err := env.Runtime.UpdateContainerResources(ctx, &runtime.UpdateContainerResourcesRequest{
		ContainerId: ctrID,
		Linux:       &runtime.LinuxContainerResources{MemoryLimitInBytes: limit},
	}); err != nil {
		t.Fatalf("UpdateContainerResources: %v", err)
	}
	limitFile := "/sys/fs/cgroup/memory/memory.limit_in_bytes"
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		limitFile = "/sys/fs/cgroup/memory.max" // unified hierarchy
	}
	if out, _, _ := env.ExecSync(t, ctrID, 10*time.Second, "cat", limitFile); strings.TrimSpace(out) != "50331648" {
		t.Errorf("memory limit inside the container %q, want %d", out, limit)
	}

	ps, err := env.Ctr("-n", "k8s.io", "tasks", "ps", ctrID)
	if err != nil || !regexp.MustCompile(`(?m)^PID\s.*\n\d+\s`).MatchString(ps) {
		t.Errorf("ctr tasks ps lists no process: %q, %v", ps, err)
	}
	if _, err := env.Ctr("-n", "k8s.io", "tasks", "pause", ctrID); err != nil {
		t.Fatalf("pause: %v", err)
	}
	if ls, _ := env.Ctr("-n", "k8s.io", "tasks", "ls"); !regexp.MustCompile(ctrID + `\s+\d+\s+PAUSED`).MatchString(ls) {
		t.Errorf("after pause, tasks ls:\n%s", ls)
	}
	if _, err := env.Ctr("-n", "k8s.io", "tasks", "resume", ctrID); err != nil {
		t.Fatalf("resume: %v", err)
	}
	if ls, _ := env.Ctr("-n", "k8s.io", "tasks", "ls"); !regexp.MustCompile(ctrID + `\s+\d+\s+RUNNING`).MatchString(ls) {
		t.Errorf("after resume, tasks ls:\n%s", ls)
	}
	if _, err := env.Ctr("-n", "k8s.io", "tasks", "kill", "--signal", "SIGKILL", ctrID); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if code := env.WaitContainerExited(t, ctrID, 20*time.Second); code != 137 {
		t.Errorf("exit code after SIGKILL %d, want 137", code)
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}
