package sandbox

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// TestConfigValidate loads each case as a config file over the defaults,
// through the daemon's own loader, so the cases name keys as users write
// them; Validate's error must name the key.
func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		toml string
		// wantKey is the key Validate's error must name; "" means valid.
		wantKey string
	}{
		{"defaults", "", ""},
		{"tcg", "[qemu]\naccel = \"tcg\"\n", ""},
		{"cache always", "[virtiofsd]\ncache = \"always\"\n", ""},
		{"zero cpus", "[qemu]\ncpus = 0\n", "qemu.cpus"},
		{"zero max_cpus", "[guest]\nmax_cpus = 0\n", "guest.max_cpus"},
		{"memory below 128", "[qemu]\nmemory_mib = 127\n", "qemu.memory_mib"},
		{"memory 128", "[qemu]\nmemory_mib = 128\n", ""},
		{"cloud-hypervisor", "hypervisor = \"cloud-hypervisor\"\n", ""},
		{"stratovirt", "hypervisor = \"stratovirt\"\n", ""},
		{"cloud_hypervisor zero cpus", "[cloud_hypervisor]\ncpus = 0\n", "cloud_hypervisor.cpus"},
		{"cloud_hypervisor memory below 128", "[cloud_hypervisor]\nmemory_mib = 64\n", "cloud_hypervisor.memory_mib"},
		{"stratovirt zero cpus", "[stratovirt]\ncpus = 0\n", "stratovirt.cpus"},
		{"stratovirt bad machine", "[stratovirt]\nmachine = \"virt\"\n", "stratovirt.machine"},
		{"negative overhead", "[guest]\nmemory_overhead_mib = -1\n", "guest.memory_overhead_mib"},
		{"zero boot timeout", "[guest]\nboot_timeout_seconds = 0\n", "guest.boot_timeout_seconds"},
		{"relative kernel", "[guest]\nkernel = \"vmlinuz\"\n", "guest.kernel"},
		{"relative initrd", "[guest]\ninitrd = \"guest/initramfs.img\"\n", "guest.initrd"},
		{"relative virtiofsd", "[virtiofsd]\nbinary = \"virtiofsd\"\n", "virtiofsd.binary"},
		{"empty qemu binary", "[qemu]\nbinary = \"\"\n", "qemu.binary"},
		{"bad accel", "[qemu]\naccel = \"hvf\"\n", "qemu.accel"},
		{"bad cache", "[virtiofsd]\ncache = \"never\"\n", "virtiofsd.cache"},
		{"unknown hypervisor", "hypervisor = \"firecracker\"\n", "hypervisor"},
		{"QEMU as root", "[qemu]\nunprivileged = false\n", ""},
		{"another uid range", "[qemu]\nrun_as_uid_base = 0x10000\nrun_as_uid_count = 1\n", ""},
		{"uids of the host's users", "[qemu]\nrun_as_uid_base = 1000\n", "qemu.run_as_uid_base"},
		{"no uids", "[qemu]\nrun_as_uid_count = 0\n", "qemu.run_as_uid_count"},
		{"uids past 2^31-2", "[qemu]\nrun_as_uid_base = 0x7fff0000\nrun_as_uid_count = 65536\n", "qemu.run_as_uid_count"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "vmm-sandboxer.toml")
			if err := os.WriteFile(path, []byte(tc.toml), 0o600); err != nil {
				t.Fatal(err)
			}
			c := DefaultConfig()
			if err := (daemon.Flags{Config: path}).LoadConfig(c); err != nil {
				t.Fatalf("load %q: %v", tc.toml, err)
			}
			err := c.Validate()
			switch {
			case tc.wantKey == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tc.wantKey != "" && err == nil:
				t.Errorf("Validate() = nil, want an error naming %s", tc.wantKey)
			case tc.wantKey != "" && !strings.HasPrefix(err.Error(), tc.wantKey+" ") && !strings.HasPrefix(err.Error(), tc.wantKey+":"):
				// One error per bad key, each starting with the key.
				t.Errorf("Validate() = %q, want one error that starts with %q", err, tc.wantKey)
			}
		})
	}
}

func TestDeployedConfigDocumentsDefaults(t *testing.T) {
	testenv.CheckDocumentedConfig(t, "../../deploy/config/vmm-sandboxer.toml", &Config{}, DefaultConfig())
}
