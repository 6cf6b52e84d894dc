package sandbox

import (
	"fmt"
	"path/filepath"
	"testing"

	"go.uber.org/zap/zaptest"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/stratovirt"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// The hypervisor key picks the driver, the device the agent is reached
// through and the dialer for it.
func TestNewVMSelectsTheConfiguredHypervisor(t *testing.T) {
	vsock := transport.HostHasVsock()
	for _, c := range []struct {
		hypervisor string
		wantVM     string
		wantDialer string
	}{
		{HypervisorQEMU, "*qemu.QEMU", map[bool]string{true: "*transport.VsockDialer", false: "*transport.SerialDialer"}[vsock]},
		{HypervisorCloudHypervisor, "*cloudhypervisor.CloudHypervisor", "*transport.HybridVsockDialer"},
		{HypervisorStratoVirt, "*stratovirt.StratoVirt", map[bool]string{true: "*transport.VsockDialer", false: "*transport.SerialDialer"}[vsock]},
	} {
		t.Run(c.hypervisor, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Hypervisor = c.hypervisor
			cfg.QEMU.Accel = string(hypervisor.AccelTCG) // no probe boot
			f := New(cfg, t.TempDir(), nil, nil, nil, zaptest.NewLogger(t))
			dir := t.TempDir()
			vmCfg := hypervisor.Config{
				ID: "pod", Dir: dir, Kernel: "/boot/vmlinuz", CPUs: 1, MemoryMiB: 256, SharedMemory: true,
				Devices: []hypervisor.Device{
					f.agentDevice("pod", filepath.Join(dir, "agent.sock")),
					&hypervisor.VirtioFS{ID: "fs0", Tag: shareTag, SocketPath: filepath.Join(dir, "fs.sock")},
				},
			}
			if c.hypervisor != HypervisorQEMU {
				vmCfg.Accel = hypervisor.AccelKVM
			}
			vm, dialer, err := f.newVM(t.Context(), vmCfg, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprintf("%T", vm); got != c.wantVM {
				t.Errorf("VM %s, want %s", got, c.wantVM)
			}
			if got := fmt.Sprintf("%T", dialer); got != c.wantDialer {
				t.Errorf("dialer %s, want %s", got, c.wantDialer)
			}
		})
	}
	var (
		_ hypervisor.Hypervisor = (*qemu.QEMU)(nil)
		_ hypervisor.Hypervisor = (*cloudhypervisor.CloudHypervisor)(nil)
		_ hypervisor.Hypervisor = (*stratovirt.StratoVirt)(nil)
	)
}

// A VM's size comes from the pod's limits, else the hypervisor's section.
func TestVMSize(t *testing.T) {
	res := func(quota, period, mem int64) *runtimeapi.PodSandboxConfig {
		return &runtimeapi.PodSandboxConfig{Linux: &runtimeapi.LinuxPodSandboxConfig{
			Resources: &runtimeapi.LinuxContainerResources{CpuQuota: quota, CpuPeriod: period, MemoryLimitInBytes: mem}}}
	}
	for _, c := range []struct {
		name       string
		hypervisor string
		pod        *runtimeapi.PodSandboxConfig
		cpus, mem  int
	}{
		{"no limits: qemu's defaults", HypervisorQEMU, &runtimeapi.PodSandboxConfig{}, 1, 256},
		{"no limits: cloud-hypervisor's defaults", HypervisorCloudHypervisor, &runtimeapi.PodSandboxConfig{}, 1, 512},
		{"1.5 CPUs round up", HypervisorQEMU, res(150000, 100000, 0), 2, 256},
		{"CPUs capped by max_cpus", HypervisorQEMU, res(64*100000, 100000, 0), 8, 256},
		{"memory limit plus overhead", HypervisorQEMU, res(0, 0, 300<<20), 1, 300 + 128},
		{"a tiny memory limit still boots", HypervisorQEMU, res(0, 0, 1<<20), 1, 1 + 128},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.Hypervisor = c.hypervisor
			f := New(cfg, t.TempDir(), nil, nil, nil, zaptest.NewLogger(t))
			if cpus, mem := f.size(c.pod); cpus != c.cpus || mem != c.mem {
				t.Errorf("size %d CPUs, %d MiB; want %d, %d", cpus, mem, c.cpus, c.mem)
			}
		})
	}
}

func TestGuestCIDIsStableAndValid(t *testing.T) {
	seen := map[uint32]string{}
	for i := 0; i < 1000; i++ {
		id := fmt.Sprintf("pod-%d", i)
		cid := guestCID(id)
		if cid < 3 || cid >= 1<<31 {
			t.Fatalf("CID %d of %s out of range", cid, id)
		}
		if cid != guestCID(id) {
			t.Fatalf("CID of %s changes", id)
		}
		if other, ok := seen[cid]; ok {
			t.Errorf("CID %d of both %s and %s", cid, other, id)
		}
		seen[cid] = id
	}
}
