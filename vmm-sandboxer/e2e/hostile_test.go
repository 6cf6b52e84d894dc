package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/guest"
)

var (
	hostileOnce   sync.Once
	hostileDir    string
	hostileInitrd string
	hostileErr    error
)

// TestMain removes the hostile guest image, built once for the process.
func TestMain(m *testing.M) {
	code := m.Run()
	if hostileDir != "" {
		os.RemoveAll(hostileDir)
	}
	os.Exit(code)
}

// hostileImage builds, once per test binary, a guest image whose agent is
// the hostile guest (e2e/hostileguest) and returns its initramfs.
func hostileImage(t *testing.T) string {
	t.Helper()
	hostileOnce.Do(func() {
		root, err := testenv.RepoRoot()
		if err != nil {
			hostileErr = err
			return
		}
		dir, err := os.MkdirTemp("", "kuasar-hostile-guest-")
		if err == nil {
			// The image is read by QEMU, which runs as a user who owns
			// nothing (qemu.unprivileged).
			err = os.Chmod(dir, 0o755)
		}
		if err != nil {
			hostileErr = err
			return
		}
		agent := filepath.Join(dir, "vmm-task")
		for _, args := range [][]string{
			{"build", "-trimpath", "-o", agent, "./vmm-sandboxer/e2e/hostileguest"},
			{"run", "./vmm-sandboxer/cmd/mkguest", "-agent", agent, "-out", dir},
		} {
			cmd := exec.Command("go", args...)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				hostileErr = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
				return
			}
		}
		hostileInitrd = filepath.Join(dir, guest.InitrdName)
	})
	if hostileErr != nil {
		t.Fatal(hostileErr)
	}
	return hostileInitrd
}

// mountsAt lists the mounts (mountinfo lines without their IDs) on the
// host paths the hostile guest aims its links at.
func mountsAt(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		if p := f[4]; p == "/" || p == "/etc" || strings.HasPrefix(p, "/etc/") {
			out = append(out, strings.Join(f[2:], " "))
		}
	}
	slices.Sort(out)
	return out
}

// consoleOf is the console log of pod id's VM.
func consoleOf(env *testenv.Env, id string) string {
	return filepath.Join(vmDirOf(env, id), "console.log")
}

// waitConsole waits until the pod's guest console matches re and returns
// the last match's groups.
func waitConsole(t *testing.T, env *testenv.Env, id string, re *regexp.Regexp, timeout time.Duration) []string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(consoleOf(env, id))
		if m := re.FindAllStringSubmatch(string(b), -1); len(m) > 0 {
			return m[len(m)-1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest's console never showed %v; its end:\n%s", re, tailString(string(b), 2000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func tailString(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestHostileGuest runs, on one vmm-sandboxer beside a well-behaved VM
// pod, pods whose guest is under an attacker's control (the hostile guest
// agent of e2e/hostileguest, booted under TCG):
//   - Links: the guest plants symlinks to host paths in the share, before
//     and after each of the host's mounts, swaps container directories and
//     writes into a read-only volume, thousands of times: none of it takes,
//     no mount appears on the host paths the links aim at, the
//     pod's own container still sees its volumes;
//   - EventFlood: the guest floods the host with OOM events: exits of the
//     other pod's containers still reach containerd;
//   - Silent: the guest stops answering after its setup: the container's
//     start fails when its caller gives up, and the pod stops and goes;
//   - Link/pings, Link/streams, Link/garbage: the guest floods the serial
//     link with pings, opens streams and fills them, or sends garbage and a
//     frame of 4 GiB: the daemon cuts the link and stops that pod's VM;
//
// and after each, the well-behaved pod's container still runs and takes
// execs; in the end nothing is left.
func TestHostileGuest(t *testing.T) {
	testenv.RequireRoot(t)
	kernel, _ := guestImage(t)
	initrd := hostileImage(t)
	testenv.BootsVMs(t)
	bin := testenv.Binary("vmm-sandboxer")
	testenv.RequireFiles(t, bin)
	env := testenv.Start(t, testenv.Options{Sandboxers: []testenv.Sandboxer{
		{Name: handler, Binary: bin, ConfigTOML: vmmConfig(kernel, initrd, "", bootTimeout, "")},
	}})
	t.Cleanup(func() {
		if !t.Failed() && os.Getenv("KUASAR_SHOW_CONSOLE") == "" {
			return
		}
		logs, _ := filepath.Glob(filepath.Join(env.SandboxerDirs[handler], "vm", "*", "console.log"))
		for _, l := range logs {
			b, _ := os.ReadFile(l)
			t.Logf("guest console %s:\n%s", l, tailString(string(b), 8000))
		}
	})
	before := env.Snapshot()
	mountsBefore := mountsAt(t)
	cronBefore, _ := os.ReadDir("/etc/cron.d")
	daemonPID := env.DaemonPID(handler)

	good := env.PodConfig()
	good.Hostname = "good"
	goodID := env.RunPod(t, handler, good)
	ticker := testenv.ContainerConfig("ticker", "sh", "-c", "while :; do echo tick; sleep 1; done")
	tickerID := env.CreateStartContainer(t, goodID, good, ticker)
	stillServed := func(t *testing.T) {
		t.Helper()
		if pid := env.DaemonPID(handler); pid != daemonPID {
			t.Fatalf("vmm-sandboxer was %d, is now %d: the guest took it down", daemonPID, pid)
		}
		if out, _, code := env.ExecSync(t, tickerID, 60*time.Second, "echo", "alive"); out != "alive\n" || code != 0 {
			t.Fatalf("the well-behaved pod after the hostile one: ExecSync %q, exit %d", out, code)
		}
	}

	t.Run("Links", func(t *testing.T) {
		pod := env.PodConfig()
		pod.Hostname = "hostile-links"
		podID := env.RunPod(t, handler, pod)
		rw, ro := filepath.Join(t.TempDir(), "data"), filepath.Join(t.TempDir(), "ro")
		for _, d := range []string{rw, ro} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(ro, "file"), []byte("read-only content\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		victim := testenv.ContainerConfig("victim", "sleep", "3600")
		victim.Mounts = []*runtime.Mount{
			{ContainerPath: "/data", HostPath: rw},
			{ContainerPath: "/ro", HostPath: ro, Readonly: true},
		}
		victimID := env.CreateStartContainer(t, podID, pod, victim)
		// Each VM's QEMU is a user of its own, who can open neither VM's
		// directory.
		dirs := []string{vmDirOf(env, goodID), vmDirOf(env, podID)}
		if a, b := checkQEMUUser(t, qemuOf(t, goodID), dirs...), checkQEMUUser(t, qemuOf(t, podID), dirs...); a == b {
			t.Errorf("the QEMUs of two pods run as the same user %d", a)
		}
		// Some rounds of the attack with the container's mounts in place.
		report := regexp.MustCompile(`hostile: links: (\d+) tries, (\d+) took (.*)`)
		first := waitConsole(t, env, podID, report, 60*time.Second)
		time.Sleep(3 * time.Second)
		last := waitConsole(t, env, podID, report, 10*time.Second)
		tries, _ := strconv.Atoi(last[1])
		if took, _ := strconv.Atoi(last[2]); took != 0 {
			t.Errorf("%d of the guest's %d writes in the share took: %s", took, tries, last[3])
		}
		if first0, _ := strconv.Atoi(first[1]); tries <= first0 || tries < 100 {
			t.Errorf("the attack made %d tries (first report %s): it did not run", tries, first[1])
		}
		if out, _, code := env.ExecSync(t, victimID, 30*time.Second, "sh", "-c", "cat /ro/file; echo x > /data/x && echo rw-ok; echo y > /ro/y || echo ro-refused"); code != 0 ||
			out != "read-only content\nrw-ok\nro-refused\n" {
			t.Errorf("the pod's container and its volumes: %q, exit %d", out, code)
		}
		if ents, _ := os.ReadDir(ro); len(ents) != 1 {
			t.Errorf("the read-only volume on the host holds %v", ents)
		}
		if got := mountsAt(t); !slices.Equal(got, mountsBefore) {
			t.Errorf("mounts on the host paths the guest aimed at changed:\nbefore %v\nafter  %v", mountsBefore, got)
		}
		env.StopRemovePod(t, podID)
		stillServed(t)
	})

	t.Run("EventFlood", func(t *testing.T) {
		pod := env.PodConfig()
		pod.Hostname = "hostile-events"
		podID := env.RunPod(t, handler, pod)
		waitConsole(t, env, podID, regexp.MustCompile(`hostile: events: flooding`), 60*time.Second)
		// While the flood goes on, the other pod's exits reach containerd.
		for i := 0; i < 3; i++ {
			c := testenv.ContainerConfig(fmt.Sprintf("exiter-%d", i), "sh", "-c", "exit 7")
			id := env.CreateStartContainer(t, goodID, good, c)
			if code := env.WaitContainerExited(t, id, 60*time.Second); code != 7 {
				t.Errorf("exit code %d during the flood, want 7", code)
			}
		}
		env.StopRemovePod(t, podID)
		stillServed(t)
	})

	t.Run("Silent", func(t *testing.T) {
		pod := env.PodConfig()
		pod.Hostname = "hostile-silent"
		podID := env.RunPod(t, handler, pod)
		// containerd makes the task, which the guest must create, at
		// StartContainer.
		id := env.CreateContainer(t, podID, pod, testenv.ContainerConfig("mute", "sleep", "3600"))
		ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
		defer cancel()
		if _, err := env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id}); err == nil {
			t.Error("a container started in a guest that answers nothing")
		}
		stillServed(t)
		env.StopRemovePod(t, podID)
		stillServed(t)
	})

	// The guest breaks the multiplexer's protocol on the serial link: the
	// daemon cuts the link and stops the VM, whose pod is then not ready.
	for _, mode := range []string{"pings", "streams", "garbage"} {
		t.Run("Link/"+mode, func(t *testing.T) {
			pod := env.PodConfig()
			pod.Hostname = "hostile-" + mode
			podID := env.RunPod(t, handler, pod)
			deadline := time.Now().Add(90 * time.Second)
			for env.PodStatus(t, podID).State == runtime.PodSandboxState_SANDBOX_READY {
				if time.Now().After(deadline) {
					t.Fatalf("the pod of a guest that %s on its link is still ready", mode)
				}
				time.Sleep(500 * time.Millisecond)
			}
			if log, _ := os.ReadFile(env.LogPath(handler)); !strings.Contains(string(log), "the guest broke the agent protocol") {
				t.Errorf("the daemon's log does not say why it stopped the VM")
			}
			stillServed(t)
			env.StopRemovePod(t, podID)
		})
	}

	env.StopRemovePod(t, goodID)
	env.AssertNoLeaks(t, before, 60*time.Second)
	if got := mountsAt(t); !slices.Equal(got, mountsBefore) {
		t.Errorf("mounts on the host paths the guest aimed at changed:\nbefore %v\nafter  %v", mountsBefore, got)
	}
	if cron, _ := os.ReadDir("/etc/cron.d"); len(cron) != len(cronBefore) {
		t.Errorf("/etc/cron.d changed: %v, was %v", cron, cronBefore)
	}
}
