package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// TestVMMDaemonRefusesBadConfig runs the built daemon as a user would: it
// prints its version, and a bad config stops it with an error naming the
// key, before it listens.
func TestVMMDaemonRefusesBadConfig(t *testing.T) {
	bin := testenv.Binary("vmm-sandboxer")
	testenv.RequireFiles(t, bin)
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "vmm-sandboxer ") {
		t.Errorf("--version: %q, %v", out, err)
	}
	for _, tc := range []struct {
		name, config, want string
	}{
		{"unknown hypervisor", "hypervisor = \"firecracker\"\n", `hypervisor "firecracker"`},
		{"unknown key", "[qemu]\nacel = \"tcg\"\n", "acel"},
		{"no CPUs", "[cloud_hypervisor]\ncpus = 0\n", "cloud_hypervisor.cpus 0"},
		{"too little memory", "[qemu]\nmemory_mib = 64\n", "qemu.memory_mib 64"},
		{"relative kernel", "[guest]\nkernel = \"vmlinuz\"\n", `guest.kernel "vmlinuz"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "vmm-sandboxer.toml")
			if err := os.WriteFile(cfg, []byte(tc.config), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "--config", cfg, "--dir", filepath.Join(dir, "state"), "--listen", filepath.Join(dir, "ctrl.sock"))
			out, err := cmd.CombinedOutput()
			if code := cmd.ProcessState.ExitCode(); err == nil || code != 1 || !strings.Contains(string(out), tc.want) {
				t.Errorf("exit %d (%v), output %q; want exit 1 naming %q", code, err, out, tc.want)
			}
			if _, err := os.Stat(filepath.Join(dir, "ctrl.sock")); err == nil {
				t.Errorf("the daemon listened despite a bad config")
			}
		})
	}
}
