package testenv

import (
	"net"
	"strings"
	"testing"
	"time"
)

// TestE2EContainerdStockRunc proves the harness with stock containerd and
// containerd-shim-runc-v2 (handler "runc", the local pause image): a pod, a
// container that logs, exec in another, pod IP in the test subnet, removal,
// and no leaks.
func TestE2EContainerdStockRunc(t *testing.T) {
	env := Start(t, Options{})
	before := env.Snapshot()

	t0 := time.Now()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, "runc", podCfg)
	tPod := time.Since(t0)

	echo := ContainerConfig("echo", "sh", "-c", "echo hello-from-runc; echo to-stderr >&2; id -u")
	echoID := env.CreateStartContainer(t, podID, podCfg, echo)
	if code := env.WaitContainerExited(t, echoID, 30*time.Second); code != 0 {
		t.Errorf("echo exit code %d", code)
	}
	tEcho := time.Since(t0)
	log := env.WaitLog(t, podCfg, echo, "hello-from-runc", 10*time.Second)
	if !strings.Contains(log, "to-stderr\n") || !strings.Contains(log, "0\n") {
		t.Errorf("log = %q", log)
	}

	sleeper := ContainerConfig("sleeper", "sleep", "3600")
	sleeperID := env.CreateStartContainer(t, podID, podCfg, sleeper)
	out, _, code := env.ExecSync(t, sleeperID, 10*time.Second, "sh", "-c", "echo exec-ok; exit 3")
	if out != "exec-ok\n" || code != 3 {
		t.Errorf("exec: %q, code %d", out, code)
	}

	ip := env.PodIP(t, podID)
	_, subnet, _ := net.ParseCIDR(env.Subnet)
	if !subnet.Contains(net.ParseIP(ip)) {
		t.Errorf("pod IP %s not in %s", ip, env.Subnet)
	}
	// The pod reaches the host side of the bridge.
	if out, _, code := env.ExecSync(t, sleeperID, 10*time.Second, "ping", "-c", "1", "-W", "2", env.Gateway); code != 0 {
		t.Errorf("ping gateway %s: %d %s", env.Gateway, code, out)
	}

	t1 := time.Now()
	env.StopRemovePod(t, podID)
	tRemove := time.Since(t1)
	env.AssertNoLeaks(t, before, 10*time.Second)
	t.Logf("no leaks %v after remove", time.Since(t1).Round(time.Millisecond))
	t.Logf("containerd start %v; RunPodSandbox %v; pod+echo container exited %v; stop+remove %v",
		env.StartDuration.Round(time.Millisecond), tPod.Round(time.Millisecond),
		tEcho.Round(time.Millisecond), tRemove.Round(time.Millisecond))
}
