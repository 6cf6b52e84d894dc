// Package sandbox holds what only the runc family has: its configuration.
// Its pods are shared/hostpod pods whose containers run under an OCI runtime
// CLI through shared/task.
package sandbox

import (
	"fmt"
	"path/filepath"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
)

// Config is runc-sandboxer's configuration file.
type Config struct {
	daemon.CommonConfig
	Runtime RuntimeConfig `toml:"runtime"`
}

// RuntimeConfig chooses the OCI runtime containers run under.
type RuntimeConfig struct {
	// Binary is "runc" (default), "crun" or a path to either.
	Binary string `toml:"binary"`
	// Root is the runtime's state directory; default <dir>/runc.
	Root string `toml:"root"`
	// SystemdCgroup makes the runtime use systemd's cgroup driver.
	SystemdCgroup bool `toml:"systemd_cgroup"`
}

// DefaultConfig is the configuration without a config file.
func DefaultConfig() *Config {
	return &Config{
		CommonConfig: daemon.CommonConfig{LogLevel: "info"},
		Runtime:      RuntimeConfig{Binary: "runc"},
	}
}

// Validate reports impossible values, naming the key.
func (c *Config) Validate() error {
	if c.Runtime.Binary == "" {
		return fmt.Errorf("runtime.binary must not be empty")
	}
	if c.Runtime.Root != "" && !filepath.IsAbs(c.Runtime.Root) {
		return fmt.Errorf("runtime.root %q must be an absolute path", c.Runtime.Root)
	}
	return nil
}
