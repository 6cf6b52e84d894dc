package hypervisor

import "fmt"

// KVMDefaults prepares the configuration for a VMM that runs on KVM only
// (Cloud Hypervisor, StratoVirt): what the VM leaves empty comes from the
// driver's own configuration, auto means KVM, and TCG is an error.
func (c *Config) KVMDefaults(vmm, binary string, cpus, memoryMiB int) error {
	if c.Binary == "" {
		c.Binary = binary
	}
	if c.CPUs == 0 {
		c.CPUs = cpus
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = memoryMiB
	}
	switch c.Accel {
	case "", AccelAuto:
		c.Accel = AccelKVM
	case AccelTCG:
		return fmt.Errorf("accelerator tcg: %s runs on kvm only", vmm)
	}
	return nil
}
