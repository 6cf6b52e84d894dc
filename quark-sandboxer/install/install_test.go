// Package install holds tests only: it checks quark-sandboxer's deployment
// files under ../../deploy and `hack/install.sh quark`.
package install

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
)

const (
	name          = "quark-sandboxer"
	unitPath      = "../../deploy/systemd/quark-sandboxer.service"
	dropinPath    = "../../deploy/containerd/quark-sandboxer.toml"
	configPath    = "../../deploy/config/quark-sandboxer.toml"
	installScript = "../../hack/install.sh"
	defaultBinary = "/usr/local/bin/quark-sandboxer"
	listenSocket  = "/run/kuasar-go/quark-sandboxer.sock"
	handler       = "kuasar-quark"
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

func TestQuarkUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found (install systemd): cannot verify the unit")
	}
	unit := string(readFile(t, unitPath))
	for _, want := range []string{
		"ExecStart=" + defaultBinary + " ", "Type=notify", "WatchdogSec=30", "Restart=always",
		"KillMode=process", "Delegate=yes", "Before=containerd.service", "--listen " + listenSocket,
		"--dir /run/kuasar-go/quark-sandboxer", "--config /etc/kuasar-go/quark-sandboxer.toml",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("%s lacks %q", unitPath, want)
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, name)
	copyExecutable(t, bin)
	unitCopy := filepath.Join(dir, name+".service")
	if err := os.WriteFile(unitCopy, []byte(strings.ReplaceAll(unit, defaultBinary, bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(analyze, "verify", unitCopy)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line != "" && (strings.Contains(line, name) || strings.Contains(line, dir)) {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
}

func TestQuarkContainerdDropIn(t *testing.T) {
	var cfg struct {
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
	dec := toml.NewDecoder(bytes.NewReader(readFile(t, dropinPath)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("%s: %v", dropinPath, err)
	}
	p, ok := cfg.ProxyPlugins[handler]
	if cfg.Version != 3 || len(cfg.ProxyPlugins) != 1 || !ok || p.Type != "sandbox" || p.Address != listenSocket {
		t.Errorf("%s: version %d, proxy plugins %+v; want version 3 and one sandbox plugin %s at %s", dropinPath, cfg.Version, cfg.ProxyPlugins, handler, listenSocket)
	}
	rt, ok := cfg.Plugins.CRIRuntime.Containerd.Runtimes[handler]
	if !ok || rt.Sandboxer != handler || rt.RuntimeType == "" || rt.IOType != "fifo" {
		t.Errorf("%s: runtime handler %s = %+v, %v", dropinPath, handler, rt, ok)
	}
}

// The default config: every key commented out with the daemon's default,
// and the file with them uncommented is a valid config equal to the
// defaults.
func TestQuarkDefaultConfig(t *testing.T) {
	raw := string(readFile(t, configPath))
	var set map[string]any
	if err := toml.Unmarshal([]byte(raw), &set); err != nil {
		t.Fatalf("%s: %v", configPath, err)
	}
	for k, v := range set {
		if m, ok := v.(map[string]any); !ok || len(m) != 0 {
			t.Errorf("%s sets %s = %v; want only commented defaults", configPath, k, v)
		}
	}
	var lines []string
	for _, line := range strings.Split(raw, "\n") {
		if strings.HasPrefix(line, "# ") && strings.Contains(line, " = ") {
			line = strings.TrimPrefix(line, "# ")
		}
		lines = append(lines, line)
	}
	got := &sandbox.Config{}
	dec := toml.NewDecoder(strings.NewReader(strings.Join(lines, "\n")))
	dec.DisallowUnknownFields()
	if err := dec.Decode(got); err != nil {
		t.Fatalf("%s with defaults uncommented: %v", configPath, err)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("documented defaults do not validate: %v", err)
	}
	want := sandbox.DefaultConfig()
	want.GVisor.ExtraArgs = got.GVisor.ExtraArgs // [] documented, nil by default
	if len(got.GVisor.ExtraArgs) != 0 || !reflect.DeepEqual(got, want) {
		t.Errorf("documented defaults %+v, daemon defaults %+v", got, want)
	}
}

func TestQuarkInstallScript(t *testing.T) {
	output := t.TempDir()
	copyExecutable(t, filepath.Join(output, "bin", name))
	copyExecutable(t, filepath.Join(output, "bin", "kuasar-holder"))
	dest := t.TempDir()
	common := []string{installScript, "--destdir", dest, "--output", output, "--prefix", "/opt/kg"}
	out, err := exec.Command("bash", append(common, "quark")...).CombinedOutput()
	if err != nil {
		t.Fatalf("install.sh quark: %v\n%s", err, out)
	}
	for _, f := range []string{"opt/kg/bin/quark-sandboxer", "etc/systemd/system/quark-sandboxer.service",
		"etc/kuasar-go/quark-sandboxer.toml", "etc/containerd/conf.d/quark-sandboxer.toml", "opt/kg/bin/kuasar-holder"} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	if unit := readFile(t, filepath.Join(dest, "etc/systemd/system/quark-sandboxer.service")); !bytes.Contains(unit, []byte("ExecStart=/opt/kg/bin/quark-sandboxer ")) {
		t.Errorf("installed unit does not follow --prefix")
	}
	if out, err := exec.Command("bash", append(common, "--uninstall", "quark")...).CombinedOutput(); err != nil {
		t.Fatalf("install.sh --uninstall quark: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dest, "opt/kg/bin/quark-sandboxer")); err == nil {
		t.Errorf("uninstall left the binary")
	}
}
