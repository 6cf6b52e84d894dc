// Package e2e boots real pod VMs: the Debian kernel, an initramfs from
// mkguest with vmm-task as PID 1, QEMU (TCG here), the agent reached over
// the virtio-serial multiplexer.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"go.uber.org/zap/zaptest"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/guest"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/virtiofs"
)

// processesMentioning lists the PIDs whose command line contains s.
func processesMentioning(s string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), s) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// buildGuest builds vmm-task (static) and, with mkguest (as `make guest`
// does; built outside the race detector, which would make compression 10x
// slower), the guest image from the installed kernel into dir. It skips
// when QEMU or the kernel is missing.
func buildGuest(t *testing.T, dir string) (kernelVersion, kernel, initrd string) {
	t.Helper()
	if _, err := exec.LookPath(qemu.DefaultBinary); err != nil {
		t.Skipf("%s not installed (Debian package qemu-system-x86; make deps installs it)", qemu.DefaultBinary)
	}
	ver, err := guest.NewestKernel("/lib/modules", "/boot")
	if err != nil {
		t.Skipf("no guest kernel: %v", err)
	}
	_, self, _, _ := runtime.Caller(0)
	module := filepath.Join(filepath.Dir(self), "..")
	run := func(name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = module
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	t0 := time.Now()
	agentBin, mkguest := filepath.Join(dir, "vmm-task"), filepath.Join(dir, "mkguest")
	run("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", agentBin, "./cmd/vmm-task")
	run("go", "build", "-o", mkguest, "./cmd/mkguest")
	t1 := time.Now()
	out := filepath.Join(dir, "guest")
	msg := run(mkguest, "-agent", agentBin, "-out", out)
	st, _ := os.Stat(agentBin)
	t.Logf("vmm-task %d bytes; tools built in %s; %s", st.Size(), t1.Sub(t0).Round(time.Millisecond), msg)
	return ver, filepath.Join(out, guest.KernelName), filepath.Join(out, guest.InitrdName)
}

// TestE2EVMMBootAndPing boots one pod VM under TCG, reaches vmm-task over
// the virtio-serial multiplexer, checks what the guest reports about itself
// (kernel, modules, mounts), sets it up (with a virtio-fs share served by
// virtiofsd), runs containers in it (subtest ContainerInGuest: the one
// boot serves both), and shuts it down through the agent: QEMU and
// virtiofsd exit by themselves and nothing is left behind.
func TestE2EVMMBootAndPing(t *testing.T) {
	dir := t.TempDir()
	kver, kernel, initrd := buildGuest(t, dir)
	if os.Getuid() != 0 {
		t.Skip("needs root (a tap device in a network namespace)")
	}
	testenv.BootsVMs(t)
	pn, err := newPodNet("10.254.0.1/30")
	if err != nil {
		t.Fatal(err)
	}
	defer pn.Close()
	guestMAC, _ := net.ParseMAC("02:42:0a:fe:00:02")
	vmDir := filepath.Join(dir, "vm")
	// Runs last: after the VM, virtiofsd and the pod network are gone, the
	// VM's directory holds only its logs and the share the test filled.
	t.Cleanup(func() {
		ents, _ := os.ReadDir(vmDir)
		for _, e := range ents {
			if n := e.Name(); n != "console.log" && n != "vmm.log" && n != "shared" {
				t.Errorf("%s left in the VM's directory", n)
			}
		}
	})
	sock := filepath.Join(vmDir, "agent.sock")
	share := agentclient.Share{HostDir: filepath.Join(vmDir, "shared"), GuestDir: "/run/kuasar/shared"}
	if err := os.MkdirAll(share.HostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	fsSock := filepath.Join(vmDir, "virtiofs.sock")
	cfg := hypervisor.Config{
		ID: "e2e", Dir: vmDir, Kernel: kernel, Initrd: initrd,
		Cmdline: "console=ttyS0 quiet panic=-1 kuasar.port=kuasar.agent",
		CPUs:    1, MemoryMiB: 256, Accel: hypervisor.AccelTCG, SharedMemory: true,
		Devices: []hypervisor.Device{
			&hypervisor.Console{ID: "console"},
			&hypervisor.RNG{ID: "rng"},
			&hypervisor.SerialPort{ID: "agent", Name: "kuasar.agent", SocketPath: sock},
			&hypervisor.TapNet{ID: "net0", Files: []*os.File{pn.tap}, MAC: guestMAC},
			&hypervisor.VirtioFS{ID: "fs0", Tag: "kuasar", SocketPath: fsSock},
		},
	}
	vm, err := qemu.New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 180*time.Second) // TCG on a loaded CI machine
	defer cancel()
	t0 := time.Now()
	fsd, err := virtiofs.Start(ctx, virtiofs.Config{SocketPath: fsSock, SharedDir: share.HostDir}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	fsPID := fsd.PID()
	t.Cleanup(func() {
		fsd.Stop(context.Background())
		if _, err := os.Stat(fsSock); !os.IsNotExist(err) {
			t.Errorf("%s left behind", fsSock)
		}
		if pids := processesMentioning(fsSock); len(pids) > 0 {
			t.Errorf("virtiofsd processes %v left behind", pids)
		}
	})
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	pid := vm.PID()
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		vm.Stop(sctx)
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("qemu pid %d left behind", pid)
		}
		for _, p := range []string{sock, cfg.ControlSocket()} {
			if _, err := os.Stat(p); !os.IsNotExist(err) {
				t.Errorf("%s left behind", p)
			}
		}
		if t.Failed() || os.Getenv("KUASAR_SHOW_CONSOLE") != "" {
			b, _ := os.ReadFile(cfg.ConsoleLog())
			t.Logf("guest console:\n%s", b)
		}
	})

	dialer := transport.NewSerialDialer(sock)
	defer dialer.Close()
	conn, err := dialer.Dial(ctx, transport.AgentPort)
	if err != nil {
		t.Fatal(err)
	}
	tc := ttrpc.NewClient(conn)
	defer tc.Close()
	agent := vmmtask.NewAgentClient(tc)
	ping, err := agent.Ping(ctx, &vmmtask.PingRequest{})
	if err != nil {
		t.Fatal(err)
	}
	bootToPing := time.Since(t0)
	t.Logf("boot to ping: %s (guest: kernel start to agent serving %s); agent %s",
		bootToPing.Round(time.Millisecond), time.Duration(ping.BootToServeNs).Round(time.Millisecond), ping.Version)

	info, err := agent.GuestInfo(ctx, &vmmtask.GuestInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.KernelRelease != kver {
		t.Errorf("guest kernel %q, want the image's %q", info.KernelRelease, kver)
	}
	for _, m := range []string{"virtio_console", "virtio_pci", "virtiofs", "overlay", "virtio_net"} {
		if !slices.Contains(info.Modules, m) {
			t.Errorf("module %s not loaded; loaded: %v", m, info.Modules)
		}
	}
	mounts := map[string]string{}
	for _, m := range info.Mounts {
		mounts[m.Target] = m.Type
	}
	for target, typ := range map[string]string{"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs", "/dev/pts": "devpts", "/run": "tmpfs", "/sys/fs/cgroup": "cgroup2"} {
		if mounts[target] != typ {
			t.Errorf("%s: mounted as %q, want %s (mounts: %v)", target, mounts[target], typ, mounts)
		}
	}
	if len(info.BootWarnings) != 0 {
		t.Errorf("boot warnings: %q", info.BootWarnings)
	}
	if info.Cpus != 1 || info.MemoryTotalBytes < 128<<20 || info.MemoryTotalBytes > 256<<20 {
		t.Errorf("guest has %d cpus, %d bytes of memory; want 1 and about 256 MiB", info.Cpus, info.MemoryTotalBytes)
	}
	var lo *vmmtask.Interface
	for _, i := range info.Interfaces {
		if i.Name == "lo" {
			lo = i
		}
	}
	if lo == nil || !lo.Up {
		t.Errorf("loopback not up: %v", info.Interfaces)
	}

	// Hostname, clock and a mount through the agent.
	_, err = agent.SetupSandbox(ctx, &vmmtask.SetupSandboxRequest{
		Hostname: "kuasar-e2e", TimeUnixNs: time.Now().UnixNano(), DnsServers: []string{"10.0.0.53"},
		Mounts: []*vmmtask.MountRequest{
			{Source: "tmpfs", Target: "/run/kuasar/test", Type: "tmpfs", Options: []string{"size=1m"}},
			{Source: "kuasar", Target: share.GuestDir, Type: "virtiofs"},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	info, err = agent.GuestInfo(ctx, &vmmtask.GuestInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Hostname != "kuasar-e2e" {
		t.Errorf("hostname %q after SetupSandbox", info.Hostname)
	}
	if d := time.Since(time.Unix(0, info.TimeUnixNs)); d > 5*time.Second || d < -5*time.Second {
		t.Errorf("guest clock off by %s after SetupSandbox", d)
	}
	found, foundShare := false, false
	for _, m := range info.Mounts {
		found = found || (m.Target == "/run/kuasar/test" && m.Type == "tmpfs")
		foundShare = foundShare || (m.Target == share.GuestDir && m.Type == "virtiofs")
	}
	if !found {
		t.Error("the tmpfs SetupSandbox mounted is not in the guest's mounts")
	}
	if !foundShare {
		t.Errorf("the virtio-fs share is not mounted at %s: %v", share.GuestDir, info.Mounts)
	}
	if _, err := agent.Mount(ctx, &vmmtask.MountRequest{Source: "x", Target: "relative", Type: "tmpfs"}); err == nil ||
		!strings.Contains(err.Error(), "not an absolute path") {
		t.Errorf("mount on a relative target: %v", err)
	}
	if _, err := agent.CreateContainer(ctx, &vmmtask.CreateContainerRequest{ContainerId: "c", Spec: []byte("{")}); err == nil ||
		!strings.Contains(err.Error(), "spec") {
		t.Errorf("CreateContainer with a broken spec: %v", err)
	}

	// The pod's network: the guest's NIC (found by MAC) gets the pod's
	// address and a default route; the host side reaches it.
	_, err = agent.UpdateInterfaces(ctx, &vmmtask.UpdateInterfacesRequest{Interfaces: []*vmmtask.Interface{{
		Name: "eth0", Mac: guestMAC.String(), Addresses: []*vmmtask.IPAddress{{Address: "10.254.0.2/30"}}, Up: true,
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := agent.UpdateRoutes(ctx, &vmmtask.UpdateRoutesRequest{Routes: []*vmmtask.Route{{Gateway: "10.254.0.1", Device: "eth0"}}}); err != nil {
		t.Fatal(err)
	}
	t3 := time.Now()
	if err := pn.ping("10.254.0.2", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("host side pinged the guest's eth0 in %s", time.Since(t3).Round(time.Millisecond))

	t.Run("ContainerInGuest", func(t *testing.T) {
		cl, err := agentclient.Dial(ctx, dialer)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		testContainerInGuest(t, ctx, cl, share)
	})

	// Shutdown: the guest powers off and QEMU exits by itself.
	t2 := time.Now()
	if _, err := agent.Shutdown(ctx, &vmmtask.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	st, err := vm.Wait(wctx)
	if err != nil {
		t.Fatalf("qemu did not exit after the guest's shutdown: %v", err)
	}
	if st.Code != 0 || st.Signal != "" {
		t.Errorf("qemu ended with %s, want exit code 0", st)
	}
	t.Logf("shutdown to qemu exit: %s", time.Since(t2).Round(time.Millisecond))
	select {
	case <-fsd.Exited():
	case <-time.After(5 * time.Second):
		t.Errorf("virtiofsd (pid %d) did not exit when the VM went away", fsPID)
	}
}
