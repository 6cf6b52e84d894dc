package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// vmDirOf is the directory of pod id's VM: named after the ID's hash
// (sandbox.Family.vmDir).
func vmDirOf(env *testenv.Env, id string) string {
	h := sha256.Sum256([]byte(id))
	return filepath.Join(env.SandboxerDirs[handler], "vm", hex.EncodeToString(h[:8]))
}

// qemuOf is the PID of pod id's QEMU, whose -name names the pod.
func qemuOf(t *testing.T, id string) int {
	t.Helper()
	var pids []int
	for _, pid := range processesMentioning("kuasar-" + id + ",") {
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.HasPrefix(string(comm), "qemu") {
			pids = append(pids, pid)
		}
	}
	if len(pids) != 1 {
		t.Fatalf("QEMU processes of pod %s: %v, want one", id, pids)
	}
	return pids[0]
}

// checkQEMUUser checks from the host that the QEMU of PID pid runs as a
// user of its own (qemu.unprivileged, the default): not root, no
// capabilities, under its seccomp filter, and that this user can open
// nothing of the VM directories dirs. It returns the user.
func checkQEMUUser(t *testing.T, pid int, dirs ...string) uint32 {
	t.Helper()
	status := testenv.ProcStatus(t, pid)
	ids := func(key string) uint32 {
		f := strings.Fields(status[key])
		if len(f) != 4 || f[0] != f[1] || f[0] != f[2] || f[0] != f[3] {
			t.Fatalf("QEMU pid %d: %s %v: want one ID four times", pid, key, f)
		}
		v, _ := strconv.ParseUint(f[0], 10, 32)
		return uint32(v)
	}
	uid, gid := ids("Uid"), ids("Gid")
	if uid == 0 || gid == 0 {
		t.Errorf("QEMU pid %d runs as user %d, group %d: want neither root", pid, uid, gid)
	}
	for k, want := range map[string]string{"CapPrm": "0000000000000000", "CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"} {
		if got := status[k]; got != want {
			t.Errorf("QEMU pid %d: %s %q, want %q", pid, k, got, want)
		}
	}
	cred := &syscall.Credential{Uid: uid, Gid: gid}
	for _, g := range strings.Fields(status["Groups"]) {
		v, _ := strconv.ParseUint(g, 10, 32)
		cred.Groups = append(cred.Groups, uint32(v))
	}
	for _, dir := range dirs {
		for _, p := range []string{dir, filepath.Join(dir, "console.log"), filepath.Join(dir, "share")} {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("the VM's %s: %v", p, err)
			}
			cmd := exec.Command("ls", "-d", p+"/.")
			if !strings.HasSuffix(p, "share") && p != dir {
				cmd = exec.Command("cat", p)
			}
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
			if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "Permission denied") {
				t.Errorf("QEMU's user %d opens %s: %v %s", uid, p, err, out)
			}
		}
	}
	return uid
}
