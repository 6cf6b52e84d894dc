package cloudhypervisor

import (
	"errors"
	"fmt"
	"time"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// Section is the name of this driver's section in vmm-sandboxer's
// configuration file; errors name fields as section.key.
const Section = "cloud_hypervisor"

// MinMemoryMiB is the least guest memory this driver accepts: the
// distribution kernel, the initramfs unpacked in RAM and vmm-task.
const MinMemoryMiB = 128

// Config is the [cloud_hypervisor] section of vmm-sandboxer's configuration.
type Config struct {
	// Binary is the cloud-hypervisor executable, a name looked up in PATH
	// or a path.
	Binary string `toml:"binary"`
	// APISocketTimeout is how long Start waits for the API socket to
	// appear and answer before the VMM is killed.
	APISocketTimeout hypervisor.Duration `toml:"api_socket_timeout"`
	// CPUs and MemoryMiB size VMs whose pod asks for nothing else.
	CPUs      int `toml:"cpus"`
	MemoryMiB int `toml:"memory_mib"`
}

// DefaultConfig is the configuration when the file says nothing.
func DefaultConfig() Config {
	return Config{
		Binary:           "cloud-hypervisor",
		APISocketTimeout: hypervisor.Duration(10 * time.Second),
		CPUs:             1,
		MemoryMiB:        512,
	}
}

// Validate checks every field and names the ones that are wrong.
func (c Config) Validate() error {
	var errs []error
	if c.Binary == "" {
		errs = append(errs, errors.New(Section+".binary: empty"))
	}
	if c.APISocketTimeout <= 0 {
		errs = append(errs, fmt.Errorf("%s.api_socket_timeout %s: want more than 0", Section, time.Duration(c.APISocketTimeout)))
	}
	if c.CPUs < 1 {
		errs = append(errs, fmt.Errorf("%s.cpus %d: want at least 1", Section, c.CPUs))
	}
	if c.MemoryMiB < MinMemoryMiB {
		errs = append(errs, fmt.Errorf("%s.memory_mib %d: want at least %d", Section, c.MemoryMiB, MinMemoryMiB))
	}
	return errors.Join(errs...)
}
