// Package e2e drives quark-sandboxer's gVisor engine through stock
// containerd 2.2 and CRI.
package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

const handler = "kuasar-quark"

// startEnv runs quark-sandboxer with gVisor by default; top are more
// top-level config keys, gvisor more keys of [gvisor] (and tables after).
func startEnv(t *testing.T, top, gvisor string) *testenv.Env {
	t.Helper()
	testenv.RequireRoot(t)
	bin, runsc := testenv.Binary("quark-sandboxer"), testenv.Binary("runsc")
	testenv.RequireFiles(t, bin, runsc)
	return testenv.Start(t, testenv.Options{Sandboxers: []testenv.Sandboxer{{
		Name:       handler,
		Binary:     bin,
		ConfigTOML: fmt.Sprintf("engine = \"gvisor\"\n%s\n[gvisor]\nbinary = %q\n%s", top, runsc, gvisor),
	}}})
}

// sandboxProcs lists the host processes of a pod's gVisor sandbox: runsc's
// sandbox (the Sentry) and gofer processes name the pod id.
func sandboxProcs(podID string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if strings.HasPrefix(args[0], "runsc-") && args[len(args)-1] == podID {
			out = append(out, args[0])
		}
	}
	return out
}

// hostProcessesRunning lists host processes whose command line contains s.
func hostProcessesRunning(s string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(strings.ReplaceAll(string(cmdline), "\x00", " "), s) {
			out = append(out, e.Name()+": "+strings.ReplaceAll(string(cmdline), "\x00", " "))
		}
	}
	return out
}

var dmesgRe = regexp.MustCompile(`(?m)^\[\s*[0-9.]+\] .*$`)

// TestE2EGVisorPodLifecycle runs a pod through CRI under gVisor: output
// from the application kernel, the pod's CNI IP, exec with exit codes, two
// containers in one sandbox, exit codes of containers, stop and removal,
// and nothing left behind.
func TestE2EGVisorPodLifecycle(t *testing.T) {
	env := startEnv(t, "", "")
	before := env.Snapshot()

	t0 := time.Now()
	podCfg := env.PodConfig()
	podCfg.Hostname = "kuasar-gvisor-pod"
	podID := env.RunPod(t, handler, podCfg)
	tPod := time.Since(t0)

	// One sandbox process (the Sentry) for the pod, no shim, no pause
	// container in containerd.
	if procs := sandboxProcs(podID); len(procs) == 0 || !contains(procs, "runsc-sandbox") {
		t.Fatalf("no runsc sandbox runs for pod %s: %v", podID, procs)
	}

	main := testenv.ContainerConfig("main", "sh", "-c",
		"echo hello-from-gvisor; uname -v; hostname; dmesg; echo to-stderr >&2; exec sleep 3600")
	mainID := env.CreateStartContainer(t, podID, podCfg, main)
	log := env.WaitLog(t, podCfg, main, "to-stderr", 20*time.Second)
	tFirstLog := time.Since(t0)
	// The workload's system calls are served by gVisor: its kernel log is
	// gVisor's and uname reports gVisor's build, not the host's.
	if !strings.Contains(log, "Starting gVisor") {
		t.Errorf("dmesg in the container is not gVisor's; log:\n%s", log)
	}
	var uts unixName
	if err := uts.read(); err == nil && strings.Contains(log, uts.version) {
		t.Errorf("the container sees the host's kernel version %q; log:\n%s", uts.version, log)
	}
	if !strings.Contains(log, "kuasar-gvisor-pod\n") {
		t.Errorf("container does not see the pod's hostname; log:\n%s", log)
	}
	if hostProcs := hostProcessesRunning("hello-from-gvisor"); len(hostProcs) != 0 {
		t.Errorf("the workload runs as host processes: %v", hostProcs)
	}

	ip := env.CheckPodNetwork(t, podID, mainID)

	out, _, code := env.ExecSync(t, mainID, 10*time.Second, "sh", "-c", "echo exec-ok; exit 3")
	if out != "exec-ok\n" || code != 3 {
		t.Errorf("ExecSync: %q, exit %d; want exec-ok, 3", out, code)
	}

	// A second container joins the same sandbox: the same application
	// kernel (its boot log is random per sandbox), the same network, and
	// still one Sentry on the host.
	peer := testenv.ContainerConfig("peer", "sleep", "3600")
	peerID := env.CreateStartContainer(t, podID, podCfg, peer)
	mainDmesg, _, _ := env.ExecSync(t, mainID, 10*time.Second, "dmesg")
	peerDmesg, _, _ := env.ExecSync(t, peerID, 10*time.Second, "dmesg")
	if a, b := dmesgRe.FindAllString(mainDmesg, 4), dmesgRe.FindAllString(peerDmesg, 4); len(a) < 2 || strings.Join(a, "\n") != strings.Join(b, "\n") {
		t.Errorf("containers of one pod do not share a kernel:\n%s\nvs\n%s", mainDmesg, peerDmesg)
	}
	if out, _, _ := env.ExecSync(t, peerID, 10*time.Second, "ip", "-o", "-4", "addr", "show", "eth0"); !strings.Contains(out, ip+"/") {
		t.Errorf("peer is not in the pod's network: %q", out)
	}
	if n := strings.Count(strings.Join(sandboxProcs(podID), " "), "runsc-sandbox"); n != 1 {
		t.Errorf("%d runsc sandboxes for one pod, want 1: %v", n, sandboxProcs(podID))
	}

	// Exit codes pass through.
	exiter := testenv.ContainerConfig("exiter", "sh", "-c", "exit 7")
	exiterID := env.CreateStartContainer(t, podID, podCfg, exiter)
	if code := env.WaitContainerExited(t, exiterID, 20*time.Second); code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}

	ctx := t.Context()
	if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: mainID, Timeout: 2}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if st := env.ContainerStatus(t, mainID); st.State != runtime.ContainerState_CONTAINER_EXITED {
		t.Errorf("main after StopContainer: %v", st.State)
	}
	if _, err := env.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: mainID}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
	tStop := time.Now()
	env.StopRemovePod(t, podID)
	tRemove := time.Since(tStop)
	if procs := sandboxProcs(podID); len(procs) != 0 {
		t.Errorf("runsc processes of the pod after RemovePodSandbox: %v", procs)
	}
	env.AssertNoLeaks(t, before, 15*time.Second)
	t.Logf("RunPodSandbox %v; pod + container to first log line %v; stop+remove pod %v",
		tPod.Round(time.Millisecond), tFirstLog.Round(time.Millisecond), tRemove.Round(time.Millisecond))
}

// TestE2EGVisorPerPodChoicesAndBadInput: a pod picks its gVisor platform
// by annotation among those allowed; an unknown platform, and an engine
// whose binary is missing, fail RunPodSandbox with the cause; the daemon
// keeps serving pods and nothing is left behind.
func TestE2EGVisorPerPodChoicesAndBadInput(t *testing.T) {
	env := startEnv(t, `allowed_engines = ["gvisor", "quark"]`,
		"allowed_platforms = [\"systrap\", \"ptrace\"]\n[quark]\nbinary = \"/nonexistent/quark\"\n")
	before := env.Snapshot()

	for _, tc := range []struct {
		name        string
		annotations map[string]string
		mention     string
	}{
		{name: "unknown platform", annotations: map[string]string{sandbox.AnnotationPlatform: "hypervisor"}, mention: `unknown gVisor platform "hypervisor"`},
		{name: "unknown engine", annotations: map[string]string{sandbox.AnnotationEngine: "kata"}, mention: `unknown engine "kata"`},
		{name: "missing quark binary", annotations: map[string]string{sandbox.AnnotationEngine: sandbox.EngineQuark}, mention: `Quark binary "/nonexistent/quark" not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := env.PodConfig()
			cfg.Annotations = tc.annotations
			_, err := env.TryRunPod(handler, cfg)
			if err == nil || !strings.Contains(err.Error(), tc.mention) {
				t.Errorf("RunPodSandbox: %v; want an error naming %s", err, tc.mention)
			}
		})
	}

	// A pod on the ptrace platform, chosen by annotation.
	podCfg := env.PodConfig()
	podCfg.Annotations = map[string]string{sandbox.AnnotationPlatform: sandbox.PlatformPtrace}
	podID := env.RunPod(t, handler, podCfg)
	if cmd := hostProcessesRunning("runsc-sandbox"); !anyContains(cmd, podID) || !anyContains(cmd, "--platform=ptrace") {
		t.Errorf("no ptrace sandbox for pod %s: %v", podID, cmd)
	}
	ctr := testenv.ContainerConfig("ptrace", "sh", "-c", "dmesg | head -1; echo ptrace-ok")
	ctrID := env.CreateStartContainer(t, podID, podCfg, ctr)
	if log := env.WaitLog(t, podCfg, ctr, "ptrace-ok", 20*time.Second); !strings.Contains(log, "Starting gVisor") {
		t.Errorf("container log under ptrace: %q", log)
	}
	if code := env.WaitContainerExited(t, ctrID, 20*time.Second); code != 0 {
		t.Errorf("exit code %d", code)
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestE2EGVisorTerminalContainer: a container with a terminal (CRI tty)
// gets one on stdin and stdout from runsc's console socket; its output
// reaches the CRI log and its exit code passes through.
func TestE2EGVisorTerminalContainer(t *testing.T) {
	env := startEnv(t, "", "")
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)
	ctr := testenv.ContainerConfig("tty", "sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo terminal-ok; exit 4")
	ctr.Tty = true
	id := env.CreateStartContainer(t, podID, podCfg, ctr)
	env.WaitLog(t, podCfg, ctr, "terminal-ok", 20*time.Second)
	if code := env.WaitContainerExited(t, id, 20*time.Second); code != 4 {
		t.Errorf("exit code %d, want 4", code)
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestHostileTenantQuarkIsolationChoice: a pod's annotations cannot pick
// an engine or a gVisor platform the operator did not allow (by default
// only the configured ones): RunPodSandbox fails with PermissionDenied
// naming the config key, nothing of the pod is left (no netns, cgroup,
// process, state, mount), and the daemon serves the next pod.
func TestHostileTenantQuarkIsolationChoice(t *testing.T) {
	env := startEnv(t, "", "")
	before := env.Snapshot()
	podsDir := filepath.Join(env.SandboxerDirs[handler], "pods")
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		code        codes.Code
		mention     string
	}{
		{name: "engine quark", annotations: map[string]string{sandbox.AnnotationEngine: sandbox.EngineQuark},
			code: codes.PermissionDenied, mention: "allowed_engines"},
		{name: "platform kvm", annotations: map[string]string{sandbox.AnnotationPlatform: sandbox.PlatformKVM},
			code: codes.PermissionDenied, mention: "gvisor.allowed_platforms"},
		{name: "platform ptrace", annotations: map[string]string{sandbox.AnnotationPlatform: sandbox.PlatformPtrace},
			code: codes.PermissionDenied, mention: "gvisor.allowed_platforms"},
		{name: "unknown platform", annotations: map[string]string{sandbox.AnnotationPlatform: "hypervisor"},
			code: codes.InvalidArgument, mention: `unknown gVisor platform "hypervisor"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := env.PodConfig()
			cfg.Annotations = tc.annotations
			id, err := env.TryRunPod(handler, cfg)
			if err != nil {
				testenv.WantCode(t, "RunPodSandbox", err, tc.code, tc.mention)
			} else {
				t.Errorf("RunPodSandbox with %v: pod %s runs; want %v naming %s", tc.annotations, id, tc.code, tc.mention)
				env.StopRemovePod(t, id)
			}
			if ents, _ := os.ReadDir(podsDir); len(ents) != 0 {
				t.Errorf("pod directories left: %v", ents)
			}
		})
	}
	// The daemon still serves pods, on the configured platform.
	podID := env.RunPod(t, handler, env.PodConfig())
	if cmd := hostProcessesRunning("runsc-sandbox"); !anyContains(cmd, podID) || !anyContains(cmd, "--platform=systrap") {
		t.Errorf("no systrap sandbox for pod %s: %v", podID, cmd)
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

func anyContains(list []string, s string) bool {
	for _, x := range list {
		if strings.Contains(x, s) {
			return true
		}
	}
	return false
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// unixName is the host's uname.
type unixName struct{ version string }

func (u *unixName) read() error {
	b, err := os.ReadFile("/proc/sys/kernel/version")
	u.version = strings.TrimSpace(string(b))
	return err
}
