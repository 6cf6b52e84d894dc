// Package sandbox is vmm-sandboxer's pod lifecycle: every pod is a VM
// booted from the guest image, with vmm-task as its PID 1, the pod's
// network wired in through taps and a virtio-fs share for the containers'
// root file systems; a task service per pod (package vmtask) serves its
// containers.
package sandbox

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/stratovirt"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/virtiofs"
)

// Hypervisor names for Config.Hypervisor.
const (
	HypervisorQEMU            = "qemu"
	HypervisorCloudHypervisor = "cloud-hypervisor"
	HypervisorStratoVirt      = "stratovirt"
)

// Config is vmm-sandboxer's configuration file.
type Config struct {
	daemon.CommonConfig
	// Hypervisor is the VMM every pod runs under: "qemu",
	// "cloud-hypervisor" or "stratovirt". Its section sets its binary and
	// the size of a VM whose pod sets no limits.
	Hypervisor      string                 `toml:"hypervisor"`
	Guest           GuestConfig            `toml:"guest"`
	QEMU            QEMUConfig             `toml:"qemu"`
	CloudHypervisor cloudhypervisor.Config `toml:"cloud_hypervisor"`
	StratoVirt      stratovirt.Config      `toml:"stratovirt"`
	Virtiofsd       VirtiofsdConfig        `toml:"virtiofsd"`
}

// GuestConfig is the guest image and the default size of a pod's VM.
type GuestConfig struct {
	// Kernel and Initrd are the guest image `make guest` builds and
	// `make install SANDBOXER=vmm` installs.
	Kernel string `toml:"kernel"`
	Initrd string `toml:"initrd"`
	// KernelParams are added to the guest kernel's command line.
	KernelParams string `toml:"kernel_params"`
	// MemoryOverheadMiB is added to a pod's memory limit for the guest's
	// own kernel and agent.
	MemoryOverheadMiB int `toml:"memory_overhead_mib"`
	// MaxCPUs caps the CPUs a pod's CPU limit can ask for.
	MaxCPUs int `toml:"max_cpus"`
	// BootTimeoutSeconds bounds the wait from starting the VMM to the agent
	// answering. Software emulation on a loaded host is slow.
	BootTimeoutSeconds int `toml:"boot_timeout_seconds"`
	// LogMaxKiB bounds each of a VM's logs (its console, which the guest
	// writes, the VMM's, virtiofsd's): past it, a log keeps only its end.
	LogMaxKiB int `toml:"log_max_kib"`
}

// QEMUConfig configures the QEMU driver.
type QEMUConfig struct {
	// Binary is qemu-system-x86_64's name on PATH or its path.
	Binary string `toml:"binary"`
	// Accel is "auto" (KVM when a probe boot under it works, else TCG),
	// "kvm" or "tcg".
	Accel string `toml:"accel"`
	// CPUs and MemoryMiB size a VM whose pod sets no CPU or memory limit.
	CPUs      int `toml:"cpus"`
	MemoryMiB int `toml:"memory_mib"`
	// TCGCacheMiB sizes QEMU's translated-code cache under TCG; 0 keeps
	// QEMU's 1 GiB. 64 saves about 50 MiB per VM for +0.3 s of boot.
	TCGCacheMiB int `toml:"tcg_cache_mib"`
	// Sandbox runs QEMU under its seccomp sandbox (-sandbox on with
	// obsolete, elevateprivileges, spawn and resourcecontrol denied).
	// Default true; false only for a QEMU built without seccomp.
	Sandbox bool `toml:"sandbox"`
	// Unprivileged runs each VM's QEMU as a user of its own, not root: a
	// guest that breaks into QEMU is then a user who owns nothing, cannot
	// touch another VM, and finds the VM's directory (the pod's records,
	// share and sockets, which QEMU gets as descriptors) closed to it.
	// The user and its group are the same number, one per running VM,
	// from RunAsUIDBase on (RunAsUIDCount of them, which bounds the VMs
	// the daemon runs at once).
	Unprivileged  bool   `toml:"unprivileged"`
	RunAsUIDBase  uint32 `toml:"run_as_uid_base"`
	RunAsUIDCount uint32 `toml:"run_as_uid_count"`
}

// VirtiofsdConfig configures the virtio-fs daemon of each pod.
type VirtiofsdConfig struct {
	Binary string `toml:"binary"`
	// Cache is virtiofsd's cache mode: "none", "auto" or "always".
	Cache string `toml:"cache"`
}

// Guest image paths of a default install.
const (
	DefaultKernel = "/usr/share/kuasar-go/vmm/vmlinuz"
	DefaultInitrd = "/usr/share/kuasar-go/vmm/initramfs.img"
)

// minLogMaxKiB keeps enough of a log for its tail to explain a failure.
const minLogMaxKiB = 64

// The IDs QEMU runs as by default: a range that distributions and systemd
// leave unused (systemd's container ranges end below 0x70000000, its
// foreign range is at 0x7FFE0000), below 2^31, from where some tools take
// IDs for negative.
const (
	DefaultRunAsUIDBase  = 0x70000000
	DefaultRunAsUIDCount = 65536
	// minRunAsUID keeps the range above the IDs of the host's own users
	// and groups (and of nobody, 65534).
	minRunAsUID = 65536
	maxRunAsUID = 1<<31 - 2
)

// minGuestMemoryMiB is what the guest kernel, vmm-task and runc need to
// boot and run a small container.
const minGuestMemoryMiB = 128

// DefaultConfig is the configuration without a config file.
func DefaultConfig() *Config {
	return &Config{
		CommonConfig: daemon.CommonConfig{LogLevel: "info"},
		Hypervisor:   HypervisorQEMU,
		Guest: GuestConfig{
			Kernel: DefaultKernel, Initrd: DefaultInitrd,
			MemoryOverheadMiB: 128, MaxCPUs: 8, BootTimeoutSeconds: 120, LogMaxKiB: 1024,
		},
		QEMU: QEMUConfig{
			Binary: qemu.DefaultBinary, Accel: string(hypervisor.AccelAuto), CPUs: 1, MemoryMiB: 256, TCGCacheMiB: 64, Sandbox: true,
			Unprivileged: true, RunAsUIDBase: DefaultRunAsUIDBase, RunAsUIDCount: DefaultRunAsUIDCount,
		},
		CloudHypervisor: cloudhypervisor.DefaultConfig(),
		StratoVirt:      stratovirt.DefaultConfig(),
		Virtiofsd:       VirtiofsdConfig{Binary: virtiofs.DefaultBinary, Cache: "none"},
	}
}

// Validate reports impossible values, naming the key.
func (c *Config) Validate() error {
	var errs []error
	switch c.Hypervisor {
	case HypervisorQEMU, HypervisorCloudHypervisor, HypervisorStratoVirt:
	default:
		errs = append(errs, fmt.Errorf("hypervisor %q: want %q, %q or %q", c.Hypervisor, HypervisorQEMU, HypervisorCloudHypervisor, HypervisorStratoVirt))
	}
	g := c.Guest
	for key, p := range map[string]string{"guest.kernel": g.Kernel, "guest.initrd": g.Initrd, "virtiofsd.binary": c.Virtiofsd.Binary} {
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s %q must be an absolute path", key, p))
		}
	}
	if g.MaxCPUs < 1 {
		errs = append(errs, fmt.Errorf("guest.max_cpus %d: want at least 1", g.MaxCPUs))
	}
	if c.QEMU.CPUs < 1 {
		errs = append(errs, fmt.Errorf("qemu.cpus %d: want at least 1", c.QEMU.CPUs))
	}
	if c.QEMU.TCGCacheMiB < 0 {
		errs = append(errs, fmt.Errorf("qemu.tcg_cache_mib %d: must not be negative", c.QEMU.TCGCacheMiB))
	}
	if c.QEMU.MemoryMiB < minGuestMemoryMiB {
		errs = append(errs, fmt.Errorf("qemu.memory_mib %d: want at least %d", c.QEMU.MemoryMiB, minGuestMemoryMiB))
	}
	if g.MemoryOverheadMiB < 0 {
		errs = append(errs, fmt.Errorf("guest.memory_overhead_mib %d: must not be negative", g.MemoryOverheadMiB))
	}
	if g.LogMaxKiB < minLogMaxKiB {
		errs = append(errs, fmt.Errorf("guest.log_max_kib %d: want at least %d", g.LogMaxKiB, minLogMaxKiB))
	}
	if g.BootTimeoutSeconds < 1 {
		errs = append(errs, fmt.Errorf("guest.boot_timeout_seconds %d: want at least 1", g.BootTimeoutSeconds))
	}
	if c.QEMU.Binary == "" {
		errs = append(errs, errors.New("qemu.binary must not be empty"))
	}
	if _, err := hypervisor.ParseAccel(c.QEMU.Accel); err != nil {
		errs = append(errs, fmt.Errorf("qemu.accel: %w", err))
	}
	if q := c.QEMU; q.RunAsUIDBase < minRunAsUID {
		errs = append(errs, fmt.Errorf("qemu.run_as_uid_base %d: want at least %d", q.RunAsUIDBase, minRunAsUID))
	} else if q.RunAsUIDCount < 1 || uint64(q.RunAsUIDBase)+uint64(q.RunAsUIDCount)-1 > maxRunAsUID {
		errs = append(errs, fmt.Errorf("qemu.run_as_uid_count %d: want 1 to %d from qemu.run_as_uid_base %d",
			q.RunAsUIDCount, maxRunAsUID-q.RunAsUIDBase+1, q.RunAsUIDBase))
	}
	errs = append(errs, c.CloudHypervisor.Validate(), c.StratoVirt.Validate())
	switch c.Virtiofsd.Cache {
	case "none", "auto", "always":
	default:
		errs = append(errs, fmt.Errorf("virtiofsd.cache %q: want none, auto or always", c.Virtiofsd.Cache))
	}
	return errors.Join(errs...)
}

// CheckHost reports, at the daemon's start, what of the configuration
// this host cannot run: an unprivileged QEMU that may use KVM where only
// root can open /dev/kvm. That is an error for the operator to settle,
// not a quiet fall back to QEMU as root.
func (c *Config) CheckHost() error { return c.checkKVM(qemu.KVMDevice) }

func (c *Config) checkKVM(dev string) error {
	if c.Hypervisor != HypervisorQEMU || !c.QEMU.Unprivileged || c.QEMU.Accel == string(hypervisor.AccelTCG) {
		return nil
	}
	if _, err := qemu.KVMGroups(dev); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("qemu.unprivileged: %w; or set qemu.accel = \"tcg\" to run without KVM, or qemu.unprivileged = false to run QEMU as root", err)
	}
	return nil
}

// BootTimeout is Guest.BootTimeoutSeconds as a duration.
func (c *Config) BootTimeout() time.Duration {
	return time.Duration(c.Guest.BootTimeoutSeconds) * time.Second
}
