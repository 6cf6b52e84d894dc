package sandbox

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"go.uber.org/zap/zaptest"

	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/store"
)

// An unprivileged QEMU that may use KVM needs /dev/kvm open to a group
// (or anyone): where it is root's alone the daemon does not start, and
// says what to change. A file stands in for the host's /dev/kvm.
func TestCheckKVM(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a file another group")
	}
	for _, tc := range []struct {
		name    string
		edit    func(c *Config)
		mode    os.FileMode // 0: no device
		wantErr bool
	}{
		{"kvm group", nil, 0o660, false},
		{"root alone", nil, 0o600, true},
		{"root alone, kvm asked for", func(c *Config) { c.QEMU.Accel = "kvm" }, 0o600, true},
		{"root alone, tcg", func(c *Config) { c.QEMU.Accel = "tcg" }, 0o600, false},
		{"root alone, QEMU as root", func(c *Config) { c.QEMU.Unprivileged = false }, 0o600, false},
		{"root alone, another VMM", func(c *Config) { c.Hypervisor = HypervisorStratoVirt }, 0o600, false},
		{"no device", nil, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := filepath.Join(t.TempDir(), "kvm")
			if tc.mode != 0 {
				if err := os.WriteFile(dev, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Chown(dev, 0, 4242); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(dev, tc.mode); err != nil {
					t.Fatal(err)
				}
			}
			c := DefaultConfig()
			if tc.edit != nil {
				tc.edit(c)
			}
			err := c.checkKVM(dev)
			if tc.wantErr != (err != nil) {
				t.Fatalf("checkKVM: %v, want an error: %v", err, tc.wantErr)
			}
			if err != nil && (!strings.HasPrefix(err.Error(), "qemu.unprivileged: ") || !strings.Contains(err.Error(), "qemu.unprivileged = false")) {
				t.Errorf("the error names neither the key nor the way out: %v", err)
			}
		})
	}
}

// Each pod's QEMU gets a user of its own, recorded in its state, held
// across a restart of the daemon (Recover) and freed with the pod.
func TestVMMUsers(t *testing.T) {
	cfg := DefaultConfig()
	cfg.QEMU.RunAsUIDBase, cfg.QEMU.RunAsUIDCount = 0x7c000000, 2
	f := New(cfg, t.TempDir(), nil, nil, nil, zaptest.NewLogger(t))

	var a, b state
	credA, err := f.runAs("a", &a)
	if err != nil {
		t.Fatal(err)
	}
	credB, err := f.runAs("b", &b)
	if err != nil {
		t.Fatal(err)
	}
	if credA.Uid != a.VMMUid || credA.Gid != a.VMMUid || len(credA.Groups) != 0 || credB.Uid != b.VMMUid {
		t.Fatalf("credentials %+v, %+v for states with users %d, %d", credA, credB, a.VMMUid, b.VMMUid)
	}
	if a.VMMUid == b.VMMUid || a.VMMUid-0x7c000000 > 1 || b.VMMUid-0x7c000000 > 1 {
		t.Fatalf("users %d and %d: want two of the range", a.VMMUid, b.VMMUid)
	}
	if _, err := f.runAs("c", &state{}); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("a third VM of a range of two: %v, want ResourceExhausted", err)
	}

	// A restarted daemon: pod a's record names its user, whose VM no
	// longer runs; its user stays held until the pod is released.
	f = New(cfg, t.TempDir(), nil, nil, nil, zaptest.NewLogger(t))
	sb := &store.Sandbox{ID: "a"}
	if err := sb.EncodeFamily(a); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Recover(t.Context(), sb); !errdefs.IsNotFound(err) {
		t.Fatalf("recovering a pod whose VM is gone: %v, want NotFound", err)
	}
	var d state
	if _, err := f.runAs("d", &d); err != nil || d.VMMUid == a.VMMUid {
		t.Fatalf("a new pod got user %d (%v) while pod a holds %d", d.VMMUid, err, a.VMMUid)
	}
	f.releaseUID("a", a)
	var e state
	if _, err := f.runAs("e", &e); err != nil || e.VMMUid != a.VMMUid {
		t.Fatalf("after pod a's release, a new pod got user %d (%v), want %d", e.VMMUid, err, a.VMMUid)
	}

	// QEMU as root, or another VMM: no user.
	for _, edit := range []func(c *Config){
		func(c *Config) { c.QEMU.Unprivileged = false },
		func(c *Config) { c.Hypervisor = HypervisorStratoVirt },
	} {
		c := DefaultConfig()
		edit(c)
		var st state
		if cred, err := New(c, t.TempDir(), nil, nil, nil, zaptest.NewLogger(t)).runAs("p", &st); cred != nil || err != nil || st.VMMUid != 0 {
			t.Errorf("runAs: %+v, %v, user %d; want none", cred, err, st.VMMUid)
		}
	}
}

// A VMM is known by its PID and start time, not by its command line,
// which a VMM can rewrite: one that did would outlive its pod.
func TestVMMOf(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	start, err := proc.StartTime(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	st := state{VMDir: "/run/nowhere/vm/0123", VMMPid: cmd.Process.Pid, VMMStartTime: start}
	if !vmmOf(st) {
		t.Error("the VMM, whose command line names no path of its VM, is not known as the pod's")
	}
	st.VMMStartTime++
	if vmmOf(st) {
		t.Error("another process of the VMM's PID is taken for the pod's VMM")
	}
}
