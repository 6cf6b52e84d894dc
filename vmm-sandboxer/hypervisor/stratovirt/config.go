package stratovirt

import (
	"errors"
	"fmt"
	"time"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// Section is the name of this driver's section in vmm-sandboxer's
// configuration file; errors name fields as section.key.
const Section = "stratovirt"

// Machine types.
const (
	// MachineMicroVM is the light machine: virtio-mmio devices, direct
	// kernel boot, block and net hot-plug into reserved mmio slots.
	MachineMicroVM = "microvm"
	// MachineQ35 is the standard x86 machine: PCIe devices, hot-plug into
	// pcie-root-ports, a firmware when the build needs one.
	MachineQ35 = "q35"
)

// MinMemoryMiB is StratoVirt's own lower bound for guest memory.
const MinMemoryMiB = 128

// Config is the [stratovirt] section of vmm-sandboxer's configuration.
type Config struct {
	// Binary is the stratovirt executable, a name looked up in PATH or a path.
	Binary string `toml:"binary"`
	// Machine is microvm or q35.
	Machine string `toml:"machine"`
	// Firmware is a pflash code image (OVMF_CODE.fd) for q35, given as
	// -drive if=pflash; empty boots the kernel directly.
	Firmware string `toml:"firmware"`
	// QMPTimeout is how long Start waits for the QMP socket to answer
	// before the VMM is killed.
	QMPTimeout hypervisor.Duration `toml:"qmp_timeout"`
	// CPUs and MemoryMiB size VMs whose pod asks for nothing else.
	CPUs      int `toml:"cpus"`
	MemoryMiB int `toml:"memory_mib"`
}

// DefaultConfig is the configuration when the file says nothing.
func DefaultConfig() Config {
	return Config{
		Binary:     "stratovirt",
		Machine:    MachineMicroVM,
		QMPTimeout: hypervisor.Duration(10 * time.Second),
		CPUs:       1,
		MemoryMiB:  512,
	}
}

// Validate checks every field and names the ones that are wrong.
func (c Config) Validate() error {
	var errs []error
	if c.Binary == "" {
		errs = append(errs, errors.New(Section+".binary: empty"))
	}
	switch c.Machine {
	case MachineMicroVM:
		if c.Firmware != "" {
			errs = append(errs, fmt.Errorf("%s.firmware: only the %s machine boots a firmware", Section, MachineQ35))
		}
	case MachineQ35:
	default:
		errs = append(errs, fmt.Errorf("%s.machine %q: want %s or %s", Section, c.Machine, MachineMicroVM, MachineQ35))
	}
	if c.QMPTimeout <= 0 {
		errs = append(errs, fmt.Errorf("%s.qmp_timeout %s: want more than 0", Section, time.Duration(c.QMPTimeout)))
	}
	if c.CPUs < 1 || c.CPUs > 254 {
		errs = append(errs, fmt.Errorf("%s.cpus %d: want 1 to 254", Section, c.CPUs))
	}
	if c.MemoryMiB < MinMemoryMiB {
		errs = append(errs, fmt.Errorf("%s.memory_mib %d: want at least %d", Section, c.MemoryMiB, MinMemoryMiB))
	}
	return errors.Join(errs...)
}
