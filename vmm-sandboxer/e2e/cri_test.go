package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/guest"
)

const handler = "kuasar-vmm"

// guestImage is the kernel and initramfs `make guest` built.
func guestImage(t *testing.T) (kernel, initrd string) {
	t.Helper()
	out, err := testenv.OutputDir()
	if err != nil {
		t.Fatal(err)
	}
	kernel, initrd = filepath.Join(out, "guest", guest.KernelName), filepath.Join(out, "guest", guest.InitrdName)
	testenv.RequireFiles(t, kernel, initrd)
	return kernel, initrd
}

// bootTimeout is the daemons' boot timeout: within the CRI call's, so
// that a slow boot fails with the daemon's error and the end of the
// guest's console rather than the call's DeadlineExceeded.
var bootTimeout = int((testenv.CallTimeout - 20*time.Second) / time.Second)

// vmmConfig is a vmm-sandboxer config booting the guest under TCG (auto:
// the KVM probe fails here) with extra kernel parameters and the boot
// timeout, then extra TOML.
func vmmConfig(kernel, initrd, kernelParams string, bootTimeout int, extra string) string {
	return fmt.Sprintf("[guest]\nkernel = %q\ninitrd = %q\nkernel_params = %q\nboot_timeout_seconds = %d\n%s", kernel, initrd, kernelParams, bootTimeout, extra)
}

// TestE2EVMMPodLifecycle runs a VM pod through containerd's CRI under TCG:
// a container whose output shows the guest's kernel (not the host's), its
// pod IP on the guest's eth0 and reachable from the host, the host's
// bridge reachable from it, ExecSync, a second container in the same VM, a
// container the guest refuses, exit codes, the VM sized by the pod's
// limits, stop and removal, a VM killed from outside reported exited with
// its container; then no QEMU,
// virtiofsd, tap, mount or file is left. Beside it, pods of four broken
// configurations fail with the cause and leave nothing: a missing guest
// image, a VMM that cannot start, a guest that panics at boot and an agent
// that never answers (the console's end is in the error).
func TestE2EVMMPodLifecycle(t *testing.T) {
	testenv.RequireRoot(t)
	kernel, initrd := guestImage(t)
	bin := testenv.Binary("vmm-sandboxer")
	testenv.RequireFiles(t, bin)
	testenv.BootsVMs(t)
	env := testenv.Start(t, testenv.Options{Sandboxers: []testenv.Sandboxer{
		{Name: handler, Binary: bin, ConfigTOML: vmmConfig(kernel, initrd, os.Getenv("KUASAR_KERNEL_PARAMS"), bootTimeout, "")},
		{Name: "kuasar-vmm-noimage", Binary: bin, ConfigTOML: vmmConfig(kernel+".missing", initrd, "", bootTimeout, "")},
		{Name: "kuasar-vmm-panic", Binary: bin, ConfigTOML: vmmConfig(kernel, initrd, "rdinit=/no-such-init", bootTimeout, "")},
		{Name: "kuasar-vmm-noqemu", Binary: bin, ConfigTOML: vmmConfig(kernel, initrd, "", bootTimeout, "[qemu]\nbinary = \"/no/such/qemu\"\naccel = \"tcg\"\n")},
		// The agent waits for a port the VM does not have.
		{Name: "kuasar-vmm-noagent", Binary: bin, ConfigTOML: vmmConfig(kernel, initrd, "kuasar.port=no-such-port", 15, "")},
	}})
	// Runs before the environment's cleanup removes the VMs' directories.
	t.Cleanup(func() {
		if !t.Failed() && os.Getenv("KUASAR_SHOW_CONSOLE") == "" {
			return
		}
		logs, _ := filepath.Glob(filepath.Join(env.SandboxerDirs[handler], "vm", "*", "console.log"))
		for _, l := range logs {
			b, _ := os.ReadFile(l)
			t.Logf("guest console %s:\n%s", l, b)
		}
	})
	before := env.Snapshot()

	t.Run("BrokenConfigurations", func(t *testing.T) {
		for _, c := range []struct{ handler, want string }{
			{"kuasar-vmm-noimage", "guest image"},
			{"kuasar-vmm-panic", "Kernel panic"},
			{"kuasar-vmm-noqemu", "/no/such/qemu"},
			{"kuasar-vmm-noagent", "did not answer within 15s"},
		} {
			t.Run(c.handler, func(t *testing.T) {
				t.Parallel()
				_, err := env.TryRunPod(c.handler, nil)
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Errorf("RunPodSandbox: %v; want an error naming %q", err, c.want)
				}
			})
		}
	})

	t0 := time.Now()
	podCfg := env.PodConfig()
	podCfg.Hostname = "kuasar-vm-pod"
	// The pod's limits size the VM: 2 CPUs, 256 MiB plus the guest's 128.
	podCfg.Linux = &runtime.LinuxPodSandboxConfig{Resources: &runtime.LinuxContainerResources{
		CpuQuota: 150000, CpuPeriod: 100000, MemoryLimitInBytes: 256 << 20}}
	podID := env.RunPod(t, handler, podCfg)
	tPod := time.Since(t0)

	main := testenv.ContainerConfig("main", "sh", "-c", "echo hello-from-the-vm; uname -r; hostname; echo to-stderr >&2; exec sleep 3600")
	mainID := env.CreateStartContainer(t, podID, podCfg, main)
	env.WaitLog(t, podCfg, main, "to-stderr", 60*time.Second)
	tFirstLog := time.Since(t0)
	// QEMU runs as a user of its own, who cannot open the VM's directory.
	qemuPID := qemuOf(t, podID)
	qemuUser := checkQEMUUser(t, qemuPID, vmDirOf(env, podID))
	guestKernel, err := guest.NewestKernel("/lib/modules", "/boot")
	if err != nil {
		t.Fatal(err)
	}
	var host unix.Utsname
	_ = unix.Uname(&host)
	hostKernel := unix.ByteSliceToString(host.Release[:])
	env.WaitLog(t, podCfg, main, "kuasar-vm-pod\n", 10*time.Second)
	raw, err := os.ReadFile(testenv.LogFile(podCfg, main))
	if err != nil {
		t.Fatal(err)
	}
	lines, err := testenv.ParseCRILog(raw)
	if err != nil {
		t.Fatal(err)
	}
	if want := "hello-from-the-vm\n" + guestKernel + "\nkuasar-vm-pod\n"; testenv.LogText(lines, "stdout") != want {
		t.Errorf("container stdout %q, want %q", testenv.LogText(lines, "stdout"), want)
	}
	if got := testenv.LogText(lines, "stderr"); got != "to-stderr\n" {
		t.Errorf("container stderr %q, want %q", got, "to-stderr\n")
	}
	if guestKernel == hostKernel {
		t.Logf("the guest runs the host's kernel release %s: the kernel check proves less", hostKernel)
	}

	// The pod's IP is on the guest's eth0; the VM reaches the host's bridge
	// and the host reaches the VM.
	podIP := env.CheckPodNetwork(t, podID, mainID)
	if out, _, code := env.ExecSync(t, mainID, 30*time.Second, "ping", "-c", "1", "-W", "5", env.Gateway); code != 0 {
		t.Errorf("ping the bridge %s from the VM: exit %d %s", env.Gateway, code, out)
	}
	icmp, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		t.Fatal(err)
	}
	defer icmp.Close()
	if err := icmpPing(icmp, podIP, 20*time.Second); err != nil {
		t.Errorf("ping the pod %s from the host: %v", podIP, err)
	}

	out, _, _ := env.ExecSync(t, mainID, 30*time.Second, "sh", "-c", "nproc; sed -n 's/MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo")
	var cpus, memKiB int
	if _, err := fmt.Sscan(out, &cpus, &memKiB); err != nil || cpus != 2 || memKiB < 300<<10 || memKiB > 384<<10 {
		t.Errorf("the VM has %d CPUs and %d KiB (%q); want 2 and about 384 MiB from the pod's limits", cpus, memKiB, out)
	}

	out, _, code := env.ExecSync(t, mainID, 30*time.Second, "sh", "-c", "echo exec-ok; exit 3")
	if out != "exec-ok\n" || code != 3 {
		t.Errorf("ExecSync: %q, exit %d; want exec-ok, 3", out, code)
	}

	// A second container runs in the same VM: same kernel, network, hostname.
	peer := testenv.ContainerConfig("peer", "sleep", "3600")
	peerID := env.CreateStartContainer(t, podID, podCfg, peer)
	if out, _, _ := env.ExecSync(t, peerID, 30*time.Second, "sh", "-c", "hostname; ip -o -4 addr show eth0"); !strings.HasPrefix(out, "kuasar-vm-pod\n") || !strings.Contains(out, podIP+"/") {
		t.Errorf("peer container: %q; want the pod's hostname and IP %s", out, podIP)
	}

	// Container stats come from the guest's cgroups.
	if stats, err := env.Runtime.ContainerStats(t.Context(), &runtime.ContainerStatsRequest{ContainerId: peerID}); err != nil {
		t.Errorf("ContainerStats: %v", err)
	} else if stats.GetStats().GetMemory().GetWorkingSetBytes().GetValue() == 0 {
		t.Errorf("container stats show no memory: %+v", stats.GetStats())
	}

	// A container the guest cannot run fails with the guest's reason; the
	// pod goes on.
	bad := testenv.ContainerConfig("bad", "/no/such/binary")
	ctx := t.Context()
	resp, err := env.Runtime.CreateContainer(ctx, &runtime.CreateContainerRequest{PodSandboxId: podID, Config: bad, SandboxConfig: podCfg})
	if err == nil {
		_, err = env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: resp.ContainerId})
	}
	if err == nil || !strings.Contains(err.Error(), "no/such/binary") {
		t.Errorf("a container of a missing binary: %v; want the guest's error naming it", err)
	}

	exiter := testenv.ContainerConfig("exiter", "sh", "-c", "exit 7")
	exiterID := env.CreateStartContainer(t, podID, podCfg, exiter)
	if code := env.WaitContainerExited(t, exiterID, 60*time.Second); code != 7 {
		t.Errorf("exit code %d, want 7", code)
	}

	if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: mainID, Timeout: 2}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if st := env.ContainerStatus(t, mainID); st.State != runtime.ContainerState_CONTAINER_EXITED {
		t.Errorf("main after StopContainer: %v", st.State)
	}
	if _, err := env.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: mainID}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}

	// The daemon restarts while the pod runs: the VM goes on, the new
	// instance reattaches to it and its agent, and the keeper kept
	// containerd's connection to the pod's task address: the pod stays
	// ready, its container runs on and takes execs, and new containers
	// start.
	env.RestartSandboxer(t, handler, 2*time.Second)
	env.WaitPodReady(t, podID, 20*time.Second)
	if pid := qemuOf(t, podID); pid != qemuPID || checkQEMUUser(t, pid, vmDirOf(env, podID)) != qemuUser {
		t.Errorf("after the daemon's restart the pod's QEMU is pid %d, was %d as user %d", pid, qemuPID, qemuUser)
	}
	if st := env.ContainerStatus(t, peerID); st.State != runtime.ContainerState_CONTAINER_RUNNING {
		t.Errorf("peer container after the daemon's restart: %v (exit %d), want RUNNING", st.State, st.ExitCode)
	} else if out, _, code := env.ExecSync(t, peerID, 30*time.Second, "sh", "-c", "echo still-here"); out != "still-here\n" || code != 0 {
		t.Errorf("ExecSync after the daemon's restart: %q, exit %d", out, code)
	}
	after := testenv.ContainerConfig("after-restart", "sh", "-c", "echo after-restart; uname -r")
	env.CreateStartContainer(t, podID, podCfg, after)
	if log := env.WaitLog(t, podCfg, after, guestKernel, 60*time.Second); !strings.Contains(log, "after-restart\n") {
		t.Errorf("a container started after the daemon's restart logged %q", log)
	}

	tStop := time.Now()
	env.StopRemovePod(t, podID)
	tRemove := time.Since(tStop)

	t.Run("VMKilledFromOutside", func(t *testing.T) {
		podCfg := env.PodConfig()
		// In a cgroup parent as kubelet gives: CRI's pod stats read it, and
		// it holds the VM.
		parent := "/kuasar-go-e2e/pod" + podCfg.Metadata.Uid
		podCfg.Linux = &runtime.LinuxPodSandboxConfig{CgroupParent: parent}
		t.Cleanup(func() {
			// kubelet's to remove, after the sandboxer removed what it made below.
			for _, p := range []string{parent, filepath.Dir(parent)} {
				if g, err := cgroup.Load(p); err == nil {
					if err := g.Delete(); err != nil {
						t.Errorf("cgroup %s: %v (the sandboxer left something below it)", p, err)
					}
				}
			}
		})
		podID := env.RunPod(t, handler, podCfg)
		ctrID := env.CreateStartContainer(t, podID, podCfg, testenv.ContainerConfig("sleeper", "sleep", "3600"))
		if st, err := env.Runtime.PodSandboxStats(ctx, &runtime.PodSandboxStatsRequest{PodSandboxId: podID}); err != nil {
			t.Errorf("PodSandboxStats: %v", err)
		} else if st.GetStats().GetLinux().GetCpu().GetUsageCoreNanoSeconds().GetValue() == 0 {
			t.Errorf("the VM's CPU usage is zero: %+v", st.GetStats().GetLinux())
		}
		killed := 0
		for _, pid := range processesMentioning(filepath.Join(env.SandboxerDirs[handler], "vm") + "/") {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.HasPrefix(string(comm), "qemu") {
				if err := unix.Kill(pid, unix.SIGKILL); err == nil {
					killed++
				}
			}
		}
		if killed != 1 {
			t.Fatalf("killed %d QEMU processes, want the pod's one", killed)
		}
		if code := env.WaitContainerExited(t, ctrID, 60*time.Second); code == 0 {
			t.Errorf("the container of a killed VM exited with 0")
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			st, err := env.Runtime.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: podID})
			if err != nil {
				t.Fatal(err)
			}
			if st.Status.State == runtime.PodSandboxState_SANDBOX_NOTREADY {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the pod of a killed VM is still %v", st.Status.State)
			}
			time.Sleep(100 * time.Millisecond)
		}
		env.StopRemovePod(t, podID)
	})
	env.AssertNoLeaks(t, before, 30*time.Second)
	if pids := processesMentioning(filepath.Join(env.SandboxerDirs[handler], "vm") + "/"); len(pids) > 0 {
		t.Errorf("processes of the pod's VM left behind: %v", pids)
	}
	if ents, _ := os.ReadDir(filepath.Join(env.SandboxerDirs[handler], "vm")); len(ents) > 0 {
		t.Errorf("VM directories left behind: %v", ents)
	}
	t.Logf("RunPodSandbox %v; pod + container to first log line %v; stop+remove pod %v",
		tPod.Round(time.Millisecond), tFirstLog.Round(time.Millisecond), tRemove.Round(time.Millisecond))
}
