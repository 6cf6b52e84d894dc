// Package install holds tests only: the deployment files of every
// sandboxer under deploy/ (systemd unit, containerd drop-in) and the
// installer hack/install.sh, one table for all of them.
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
	deployDir     = "../../deploy"
	installScript = "../../hack/install.sh"
)

// sandboxers are those with deployment files; the handler and proxy plugin
// names are kuasar-<family>.
var sandboxers = []string{"runc", "wasm", "vmm", "quark"}

// usesHolder: the families whose installation brings kuasar-holder.
var usesHolder = map[string]bool{"runc": true, "wasm": true, "quark": true}

// helpers: the binaries each family's installation brings beside its
// sandboxer, besides the holder (wasm: its module processes' runner).
var helpers = map[string][]string{"wasm": {"kuasar-wasm-runner", "kuasar-wasm-runner-wasmtime"}}

// guestDir is where vmm's guest image is installed (the defaults of its
// config's [guest] kernel and initrd), whatever the prefix.
const guestDir = "usr/share/kuasar-go/vmm"

// guestFiles: the guest image each family's installation brings from
// <output>/guest (built by make guest).
var guestFiles = map[string][]string{"vmm": {"vmlinuz", "initramfs.img"}}

// fakeOutput fills output with what make build (and make guest) would
// have put there for families: executables, and guest image files with
// recognisable contents.
func fakeOutput(t *testing.T, output string, families ...string) {
	t.Helper()
	copyExecutable(t, filepath.Join(output, "bin", shimStub))
	for _, family := range families {
		copyExecutable(t, filepath.Join(output, "bin", family+"-sandboxer"))
		if usesHolder[family] {
			copyExecutable(t, filepath.Join(output, "bin", "kuasar-holder"))
		}
		for _, h := range helpers[family] {
			copyExecutable(t, filepath.Join(output, "bin", h))
		}
		for _, g := range guestFiles[family] {
			writeGuestFile(t, filepath.Join(output, "guest", g))
		}
	}
}

func writeGuestFile(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	// make guest's files are 0644 or 0600; the installer sets 0644 anyway.
	if err := os.WriteFile(path, []byte("fake "+filepath.Base(path)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// shimStub is what containerd finds, by each sandboxer's runtime name
// (a link to it), to reload their tasks after its restart.
const shimStub = "containerd-shim-kuasar-v1"

// installedFiles are the files installing family under --prefix /opt/kg
// puts into DESTDIR, with their modes.
func installedFiles(family string) map[string]os.FileMode {
	name := family + "-sandboxer"
	files := map[string]os.FileMode{
		"opt/kg/bin/" + name:                      0o755,
		"etc/systemd/system/" + name + ".service": 0o644,
		"etc/kuasar-go/" + name + ".toml":         0o644,
		"etc/containerd/conf.d/" + name + ".toml": 0o644,
		"opt/kg/bin/" + shimStub:                  0o755,
	}
	if usesHolder[family] {
		files["opt/kg/bin/kuasar-holder"] = 0o755
	}
	for _, h := range helpers[family] {
		files["opt/kg/bin/"+h] = 0o755
	}
	for _, g := range guestFiles[family] {
		files[guestDir+"/"+g] = 0o644
	}
	return files
}

// checkInstalled checks that files are in dest with their modes.
func checkInstalled(t *testing.T, dest string, files map[string]os.FileMode) {
	t.Helper()
	for f, mode := range files {
		fi, err := os.Stat(filepath.Join(dest, f))
		if err != nil {
			t.Errorf("not installed: %v", err)
		} else if fi.Mode() != mode {
			t.Errorf("%s: mode %v, want %v", f, fi.Mode(), mode)
		}
	}
}

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

func unitPath(family string) string {
	return filepath.Join(deployDir, "systemd", family+"-sandboxer.service")
}
func dropinPath(family string) string {
	return filepath.Join(deployDir, "containerd", family+"-sandboxer.toml")
}
func listenSocket(family string) string { return "/run/kuasar-go/" + family + "-sandboxer.sock" }

func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found (install systemd): cannot verify the units")
	}
	for _, family := range sandboxers {
		t.Run(family, func(t *testing.T) {
			name := family + "-sandboxer"
			defaultBinary := "/usr/local/bin/" + name
			unit := string(readFile(t, unitPath(family)))
			for _, want := range []string{
				"ExecStart=" + defaultBinary + " ", "Type=notify", "WatchdogSec=30", "Restart=always",
				// Pods must outlive a restart of the daemon.
				"KillMode=process", "Delegate=yes", "Before=containerd.service",
				"--listen " + listenSocket(family), "--dir /run/kuasar-go/" + name, "--config /etc/kuasar-go/" + name + ".toml",
			} {
				if !strings.Contains(unit, want) {
					t.Errorf("%s lacks %q", unitPath(family), want)
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
			cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
			}
			// verify exits 0 on warnings such as unknown keys: any line about
			// our unit is a failure; lines about host units are only logged.
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
		})
	}
}

// The subset of containerd's config version 3 that the drop-ins set.
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
					RuntimeType          string   `toml:"runtime_type"`
					Sandboxer            string   `toml:"sandboxer"`
					IOType               string   `toml:"io_type"`
					PodAnnotations       []string `toml:"pod_annotations"`
					ContainerAnnotations []string `toml:"container_annotations"`
				} `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"io.containerd.cri.v1.runtime"`
	} `toml:"plugins"`
}

func TestContainerdDropIns(t *testing.T) {
	for _, family := range sandboxers {
		t.Run(family, func(t *testing.T) {
			handler := "kuasar-" + family
			var cfg containerdConfig
			dec := toml.NewDecoder(bytes.NewReader(readFile(t, dropinPath(family))))
			dec.DisallowUnknownFields() // only keys this test knows, all valid in containerd 2.2
			if err := dec.Decode(&cfg); err != nil {
				t.Fatalf("%s: %v", dropinPath(family), err)
			}
			p, ok := cfg.ProxyPlugins[handler]
			if cfg.Version != 3 || len(cfg.ProxyPlugins) != 1 || !ok || p.Type != "sandbox" || p.Address != listenSocket(family) {
				t.Errorf("version %d, proxy plugins %+v; want version 3 and one sandbox plugin %s at %s (the unit's --listen)",
					cfg.Version, cfg.ProxyPlugins, handler, listenSocket(family))
			}
			rt, ok := cfg.Plugins.CRIRuntime.Containerd.Runtimes[handler]
			if !ok {
				t.Fatalf("no runtime handler %s; have %v", handler, cfg.Plugins.CRIRuntime.Containerd.Runtimes)
			}
			if rt.Sandboxer != handler || rt.RuntimeType != "io.containerd."+handler+".v1" {
				t.Errorf("runtime handler %s = %+v: sandboxer must name the proxy plugin, runtime_type must be io.containerd.%s.v1", handler, rt, handler)
			}
			if rt.IOType != "" && rt.IOType != "fifo" && rt.IOType != "streaming" {
				t.Errorf("io_type = %q, want fifo or streaming", rt.IOType)
			}
		})
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

func TestInstallScript(t *testing.T) {
	for _, family := range sandboxers {
		t.Run(family, func(t *testing.T) {
			name := family + "-sandboxer"
			output := t.TempDir()
			fakeOutput(t, output, family)
			dest := t.TempDir()
			common := []string{"--destdir", dest, "--output", output, "--prefix", "/opt/kg"}
			files := installedFiles(family)
			config := "etc/kuasar-go/" + name + ".toml"

			// --dry-run writes nothing.
			runInstall(t, append(common, "--dry-run", family)...)
			if entries, _ := os.ReadDir(dest); len(entries) != 0 {
				t.Fatalf("--dry-run wrote %v", entries)
			}
			out := runInstall(t, append(common, family)...)
			if !strings.Contains(out, `imports = ["/etc/containerd/conf.d/*.toml"]`) {
				t.Errorf("no hint about containerd's imports line:\n%s", out)
			}
			checkInstalled(t, dest, files)
			// containerd looks the stub up by the runtime name in the drop-in.
			if target, err := os.Readlink(filepath.Join(dest, "opt/kg/bin/containerd-shim-kuasar-"+family+"-v1")); err != nil || target != shimStub {
				t.Errorf("runtime-name link: %q, %v; want a link to %s", target, err, shimStub)
			}
			for _, g := range guestFiles[family] {
				if got, want := readFile(t, filepath.Join(dest, guestDir, g)), readFile(t, filepath.Join(output, "guest", g)); !bytes.Equal(got, want) {
					t.Errorf("installed %s differs from the build output's", g)
				}
			}
			unit := readFile(t, filepath.Join(dest, "etc/systemd/system", name+".service"))
			if !bytes.Contains(unit, []byte("ExecStart=/opt/kg/bin/"+name+" ")) {
				t.Errorf("installed unit does not follow --prefix:\n%s", unit)
			}
			if got, want := readFile(t, filepath.Join(dest, "etc/containerd/conf.d", name+".toml")), readFile(t, dropinPath(family)); !bytes.Equal(got, want) {
				t.Error("installed drop-in differs from deploy/")
			}

			// Idempotent, and an edited config is kept.
			if err := os.WriteFile(filepath.Join(dest, config), []byte("log_level = \"debug\"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dest, "etc/containerd/config.toml"),
				[]byte("version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			out = runInstall(t, append(common, family)...)
			if strings.Contains(out, "installed ") || strings.Contains(out, "NOTE:") {
				t.Errorf("second install changed something or still asks for imports:\n%s", out)
			}
			if got := string(readFile(t, filepath.Join(dest, config))); got != "log_level = \"debug\"\n" {
				t.Errorf("config overwritten: %q", got)
			}

			// Errors: unknown name, missing binary, missing helper, missing
			// guest image file (the error names make guest); each installs
			// nothing.
			bad := [][]string{
				append(common, "nosuch"),
				{"--destdir", t.TempDir(), "--output", t.TempDir(), family},
			}
			for _, h := range helpers[family] {
				partial := t.TempDir()
				fakeOutput(t, partial, family)
				if err := os.Remove(filepath.Join(partial, "bin", h)); err != nil {
					t.Fatal(err)
				}
				bad = append(bad, []string{"--destdir", t.TempDir(), "--output", partial, family})
			}
			for _, g := range guestFiles[family] {
				partial := t.TempDir()
				fakeOutput(t, partial, family)
				if err := os.Remove(filepath.Join(partial, "guest", g)); err != nil {
					t.Fatal(err)
				}
				args := []string{"--destdir", t.TempDir(), "--output", partial, family}
				out, err := exec.Command("bash", append([]string{installScript}, args...)...).CombinedOutput()
				if err == nil || !strings.Contains(string(out), "make guest") || !strings.Contains(string(out), g) {
					t.Errorf("install.sh %v without guest/%s: %v, want an error naming it and make guest:\n%s", args, g, err, out)
				}
				bad = append(bad, args)
			}
			for _, args := range bad {
				if out, err := exec.Command("bash", append([]string{installScript}, args...)...).CombinedOutput(); err == nil {
					t.Errorf("install.sh %v succeeded:\n%s", args, out)
				}
				if d := args[1]; d != dest {
					if entries, _ := os.ReadDir(d); len(entries) != 0 {
						t.Errorf("failed install.sh %v wrote %v", args, entries)
					}
				}
			}

			// Uninstall keeps the config, and twice is fine.
			runInstall(t, append(common, "--uninstall", family)...)
			runInstall(t, append(common, "--uninstall", family)...)
			for f := range files {
				_, err := os.Stat(filepath.Join(dest, f))
				if keep := f == config; keep != (err == nil) {
					t.Errorf("after uninstall %s: stat error %v", f, err)
				}
			}
			if len(guestFiles[family]) > 0 {
				if _, err := os.Stat(filepath.Join(dest, "usr/share/kuasar-go")); err == nil {
					t.Error("uninstall left the empty guest image directory")
				}
			}
		})
	}
}

// TestInstallAll: "all" installs every family (vmm's guest image
// included) through hack/install.sh and through make, idempotently; its
// --dry-run changes nothing; uninstalling "all" keeps only the configs.
func TestInstallAll(t *testing.T) {
	output := t.TempDir()
	fakeOutput(t, output, sandboxers...)
	files := map[string]os.FileMode{}
	for _, family := range sandboxers {
		for f, mode := range installedFiles(family) {
			files[f] = mode
		}
	}
	isConfig := func(f string) bool { return strings.HasPrefix(f, "etc/kuasar-go/") }
	makeBin, makeErr := exec.LookPath("make")

	for _, via := range []string{"install.sh", "make"} {
		t.Run(via, func(t *testing.T) {
			dest := t.TempDir()
			// run installs (or uninstalls) "all" into dest.
			run := func(uninstall, dryRun bool) string {
				t.Helper()
				if via == "install.sh" {
					args := []string{"--destdir", dest, "--output", output, "--prefix", "/opt/kg"}
					if uninstall {
						args = append(args, "--uninstall")
					}
					if dryRun {
						args = append(args, "--dry-run")
					}
					return runInstall(t, append(args, "all")...)
				}
				if makeErr != nil {
					t.Skip("make not found")
				}
				target := "install"
				if uninstall {
					target = "uninstall"
				}
				if dryRun {
					t.Fatal("make has no dry-run target")
				}
				cmd := exec.Command(makeBin, "-C", "../..", "--no-print-directory", target,
					"SANDBOXER=all", "DESTDIR="+dest, "OUT="+output, "PREFIX=/opt/kg")
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("make %s SANDBOXER=all: %v\n%s", target, err, out)
				}
				return string(out)
			}

			if via == "install.sh" {
				out := run(false, true)
				if entries, _ := os.ReadDir(dest); len(entries) != 0 {
					t.Fatalf("--dry-run wrote %v", entries)
				}
				for _, family := range sandboxers {
					if !strings.Contains(out, family+"-sandboxer") {
						t.Errorf("--dry-run all does not mention %s-sandboxer:\n%s", family, out)
					}
				}
			}
			run(false, false)
			checkInstalled(t, dest, files)
			if out := run(false, false); strings.Contains(out, "installed ") {
				t.Errorf("second install of all changed something:\n%s", out)
			}
			run(true, false)
			for f := range files {
				_, err := os.Stat(filepath.Join(dest, f))
				if keep := isConfig(f); keep != (err == nil) {
					t.Errorf("after uninstall of all %s: stat error %v", f, err)
				}
			}
		})
	}
}

// kuasar-holder stays while another sandboxer that uses it is installed.
func TestUninstallKeepsSharedHolder(t *testing.T) {
	output := t.TempDir()
	for _, f := range []string{"runc-sandboxer", "wasm-sandboxer", "kuasar-holder", "kuasar-wasm-runner", "kuasar-wasm-runner-wasmtime", shimStub} {
		copyExecutable(t, filepath.Join(output, "bin", f))
	}
	dest := t.TempDir()
	common := []string{"--destdir", dest, "--output", output, "--prefix", "/opt/kg"}
	runInstall(t, append(common, "runc", "wasm")...)
	holder := filepath.Join(dest, "opt/kg/bin/kuasar-holder")
	runInstall(t, append(common, "--uninstall", "runc")...)
	if _, err := os.Stat(holder); err != nil {
		t.Errorf("uninstalling runc removed the holder wasm still needs: %v", err)
	}
	runnerPath := filepath.Join(dest, "opt/kg/bin/kuasar-wasm-runner")
	if _, err := os.Stat(runnerPath); err != nil {
		t.Errorf("uninstalling runc removed wasm's runner: %v", err)
	}
	runInstall(t, append(common, "--uninstall", "wasm")...)
	if _, err := os.Stat(holder); err == nil {
		t.Error("the holder stayed after the last sandboxer using it was uninstalled")
	}
	if _, err := os.Stat(runnerPath); err == nil {
		t.Error("kuasar-wasm-runner stayed after wasm was uninstalled")
	}
	if _, err := os.Lstat(filepath.Join(dest, "opt/kg/bin", shimStub)); err == nil {
		t.Errorf("%s stayed after the last sandboxer was uninstalled", shimStub)
	}
}
