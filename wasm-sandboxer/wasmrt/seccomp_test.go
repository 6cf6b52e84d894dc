package wasmrt

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	runc "github.com/containerd/go-runc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// TestDefaultSeccomp: the filter a wasm container gets when its spec has
// none refuses what a runner never needs, to a process that has every
// capability: without it the same calls succeed.
func TestDefaultSeccomp(t *testing.T) {
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("runc is not installed")
	}
	script := `unshare -n true; echo unshare=$?; mount -t tmpfs none /mnt; echo mount=$?; ` +
		`unshare -m true; echo unshare-mnt=$?; echo done`
	run := func(seccomp *specs.LinuxSeccomp) string {
		bundle := t.TempDir()
		rootfs := filepath.Join(bundle, "rootfs")
		if err := testenv.WriteBusyboxRootfs(rootfs); err != nil {
			t.Skip(err)
		}
		os.Mkdir(filepath.Join(rootfs, "mnt"), 0o755)
		var caps []string
		for _, c := range []string{"CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID", "SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"} {
			caps = append(caps, "CAP_"+c)
		}
		spec := specs.Spec{
			Version: specs.Version,
			Root:    &specs.Root{Path: "rootfs"},
			Process: &specs.Process{Args: []string{"sh", "-c", script}, Env: []string{"PATH=/bin"}, Cwd: "/",
				Capabilities: &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}},
			Mounts: []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc"}},
			Linux: &specs.Linux{
				Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace},
					{Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}, {Type: specs.NetworkNamespace}},
				Seccomp: seccomp,
			},
		}
		data, _ := json.Marshal(spec)
		if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		root, id := t.TempDir(), "seccomp-"+filepath.Base(bundle)
		t.Cleanup(func() {
			r := &runc.Runc{Root: root}
			_ = r.Delete(context.Background(), id, &runc.DeleteOpts{Force: true})
		})
		var out bytes.Buffer
		cmd := exec.Command("runc", "--root", root, "run", "--bundle", bundle, id)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			t.Fatalf("runc run: %v: %s", err, out.String())
		}
		return out.String()
	}
	without := run(nil)
	if !strings.Contains(without, "unshare=0\nmount=0\nunshare-mnt=0\n") {
		t.Fatalf("without a filter the calls should succeed (the test's premise):\n%s", without)
	}
	with := run(defaultSeccomp())
	for _, want := range []string{"unshare=1", "mount=1", "unshare-mnt=1", "done"} {
		if !strings.Contains(with, want+"\n") {
			t.Errorf("with the filter, output lacks %q:\n%s", want, with)
		}
	}
	if !strings.Contains(with, "Operation not permitted") {
		t.Errorf("with the filter, no EPERM:\n%s", with)
	}
}
