// Package install holds tests only: it checks the deployment files of
// runc-sandboxer under ../../deploy and the installer hack/install.sh.
package install

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

const (
	name          = "runc-sandboxer"
	unitPath      = "../../deploy/systemd/runc-sandboxer.service"
	dropinPath    = "../../deploy/containerd/runc-sandboxer.toml"
	configPath    = "../../deploy/config/runc-sandboxer.toml"
	installScript = "../../hack/install.sh"
	defaultBinary = "/usr/local/bin/runc-sandboxer"
	listenSocket  = "/run/kuasar-go/runc-sandboxer.sock"
)

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// copyExecutable copies /bin/true to path: systemd-analyze verify and the
// installer only need an executable file.
func copyExecutable(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, readFile(t, "/bin/true"), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found (install systemd): cannot verify the unit")
	}
	unit := string(readFile(t, unitPath))
	if !strings.Contains(unit, "ExecStart="+defaultBinary+" ") {
		t.Fatalf("%s: ExecStart does not run %s", unitPath, defaultBinary)
	}
	for _, want := range []string{
		"Type=notify", "WatchdogSec=30", "Restart=always", "KillMode=process",
		"Delegate=yes", "LimitNOFILE=1048576", "TasksMax=infinity",
		"Before=containerd.service", "--listen " + listenSocket,
		"--dir /run/kuasar-go/runc-sandboxer", "--config /etc/kuasar-go/runc-sandboxer.toml",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("%s lacks %q", unitPath, want)
		}
	}

	// verify insists that ExecStart names an existing executable.
	dir := t.TempDir()
	bin := filepath.Join(dir, name)
	copyExecutable(t, bin)
	unitCopy := filepath.Join(dir, name+".service")
	if err := os.WriteFile(unitCopy, []byte(strings.ReplaceAll(unit, defaultBinary, bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(analyze, "verify", unitCopy)
	// Plain output, one message a line.
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// verify exits 0 on warnings such as unknown keys: any line about our
	// unit is a failure; other lines (about host units) are only logged.
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line == "" {
			continue
		}
		if strings.Contains(line, name) || strings.Contains(line, dir) {
			t.Errorf("systemd-analyze verify: %s", line)
		} else {
			t.Logf("systemd-analyze verify (not about our unit): %s", line)
		}
	}
}

// The subset of containerd's config version 3 that the drop-in sets.
type containerdConfig struct {
	Version      int `toml:"version"`
	ProxyPlugins map[string]struct {
		Type    string `toml:"type"`
		Address string `toml:"address"`
	} `toml:"proxy_plugins"`
	Plugins struct {
		CRIRuntime struct {
			Containerd struct {
				Runtimes map[string]struct {
					RuntimeType string `toml:"runtime_type"`
					Sandboxer   string `toml:"sandboxer"`
					IOType      string `toml:"io_type"`
				} `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"io.containerd.cri.v1.runtime"`
	} `toml:"plugins"`
}

func TestContainerdDropIn(t *testing.T) {
	var cfg containerdConfig
	dec := toml.NewDecoder(bytes.NewReader(readFile(t, dropinPath)))
	dec.DisallowUnknownFields() // only keys this test knows, all of them valid in containerd 2.2
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("%s: %v", dropinPath, err)
	}
	if cfg.Version != 3 {
		t.Errorf("version = %d, want 3", cfg.Version)
	}
	if len(cfg.ProxyPlugins) != 1 {
		t.Fatalf("want exactly one proxy plugin, got %v", cfg.ProxyPlugins)
	}
	var proxyName string
	for n, p := range cfg.ProxyPlugins {
		proxyName = n
		if p.Type != "sandbox" {
			t.Errorf("proxy_plugins.%s.type = %q, want sandbox", n, p.Type)
		}
		if p.Address != listenSocket {
			t.Errorf("proxy_plugins.%s.address = %q, want %q (the unit's --listen)", n, p.Address, listenSocket)
		}
	}
	rt, ok := cfg.Plugins.CRIRuntime.Containerd.Runtimes["kuasar-runc"]
	if !ok {
		t.Fatalf("no runtime handler kuasar-runc; have %v", cfg.Plugins.CRIRuntime.Containerd.Runtimes)
	}
	if rt.Sandboxer != proxyName {
		t.Errorf("runtimes.kuasar-runc.sandboxer = %q, want the proxy plugin name %q", rt.Sandboxer, proxyName)
	}
	if rt.RuntimeType == "" {
		t.Error("runtimes.kuasar-runc.runtime_type is empty")
	}
	if rt.IOType != "" && rt.IOType != "fifo" && rt.IOType != "streaming" {
		t.Errorf("runtimes.kuasar-runc.io_type = %q, want fifo or streaming", rt.IOType)
	}
}

// The default config: valid TOML whose keys are all commented out (so the
// file changes no default), and each documented key parses once uncommented.
func TestDefaultConfig(t *testing.T) {
	raw := string(readFile(t, configPath))
	var empty map[string]any
	if err := toml.Unmarshal([]byte(raw), &empty); err != nil {
		t.Fatalf("%s: %v", configPath, err)
	}
	if rt, ok := empty["runtime"].(map[string]any); len(empty) != 1 || !ok || len(rt) != 0 {
		t.Errorf("%s sets values; want only commented defaults, got %v", configPath, empty)
	}

	var uncommented []string
	for _, line := range strings.Split(raw, "\n") {
		if strings.HasPrefix(line, "# ") && strings.Contains(line, " = ") {
			line = strings.TrimPrefix(line, "# ")
		}
		uncommented = append(uncommented, line)
	}
	var cfg struct {
		LogLevel string `toml:"log_level"`
		Runtime  struct {
			Binary        string `toml:"binary"`
			Root          string `toml:"root"`
			SystemdCgroup bool   `toml:"systemd_cgroup"`
		} `toml:"runtime"`
	}
	dec := toml.NewDecoder(strings.NewReader(strings.Join(uncommented, "\n")))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("%s with defaults uncommented: %v", configPath, err)
	}
	if cfg.LogLevel != "info" || cfg.Runtime.Binary != "runc" || cfg.Runtime.Root != "" || cfg.Runtime.SystemdCgroup {
		t.Errorf("documented defaults = %+v", cfg)
	}
}

func runInstall(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("bash", append([]string{installScript}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("install.sh %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

type fileWant struct {
	path string
	mode os.FileMode
}

func TestInstallScript(t *testing.T) {
	output := t.TempDir()
	copyExecutable(t, filepath.Join(output, "bin", name))
	copyExecutable(t, filepath.Join(output, "bin", "kuasar-holder"))
	dest := t.TempDir()
	common := []string{"--destdir", dest, "--output", output, "--prefix", "/opt/kg"}

	files := []fileWant{
		{"opt/kg/bin/runc-sandboxer", 0o755},
		{"etc/systemd/system/runc-sandboxer.service", 0o644},
		{"etc/kuasar-go/runc-sandboxer.toml", 0o644},
		{"etc/containerd/conf.d/runc-sandboxer.toml", 0o644},
		{"opt/kg/bin/kuasar-holder", 0o755},
	}

	// --dry-run writes nothing.
	runInstall(t, append(common, "--dry-run", "runc")...)
	if entries, _ := os.ReadDir(dest); len(entries) != 0 {
		t.Fatalf("--dry-run wrote %v", entries)
	}

	out := runInstall(t, append(common, "runc")...)
	if !strings.Contains(out, `imports = ["/etc/containerd/conf.d/*.toml"]`) {
		t.Errorf("no hint about containerd's imports line:\n%s", out)
	}
	for _, f := range files {
		fi, err := os.Stat(filepath.Join(dest, f.path))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.path, fi.Mode(), f.mode)
		}
	}
	unit := string(readFile(t, filepath.Join(dest, files[1].path)))
	if !strings.Contains(unit, "ExecStart=/opt/kg/bin/runc-sandboxer ") {
		t.Errorf("installed unit does not follow --prefix:\n%s", unit)
	}
	if got, want := readFile(t, filepath.Join(dest, files[3].path)), readFile(t, dropinPath); !bytes.Equal(got, want) {
		t.Error("installed drop-in differs from deploy/")
	}

	// Idempotent, and an edited config is kept.
	conf := filepath.Join(dest, files[2].path)
	if err := os.WriteFile(conf, []byte("log_level = \"debug\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dest, "etc/containerd/config.toml"),
		[]byte("version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out = runInstall(t, append(common, "runc")...)
	if strings.Contains(out, "installed ") || strings.Contains(out, "NOTE:") {
		t.Errorf("second install changed something or still asks for imports:\n%s", out)
	}
	if got := string(readFile(t, conf)); got != "log_level = \"debug\"\n" {
		t.Errorf("config overwritten: %q", got)
	}

	// Errors: unknown name, missing binary.
	for _, args := range [][]string{
		append(common, "nosuch"),
		{"--destdir", dest, "--output", t.TempDir(), "runc"},
	} {
		if out, err := exec.Command("bash", append([]string{installScript}, args...)...).CombinedOutput(); err == nil {
			t.Errorf("install.sh %v succeeded:\n%s", args, out)
		}
	}

	// Uninstall keeps the config, and twice is fine.
	runInstall(t, append(common, "--uninstall", "runc")...)
	runInstall(t, append(common, "--uninstall", "runc")...)
	for _, f := range files {
		_, err := os.Stat(filepath.Join(dest, f.path))
		if keep := f.path == files[2].path; keep != (err == nil) {
			t.Errorf("after uninstall %s: stat error %v", f.path, err)
		}
	}
}
