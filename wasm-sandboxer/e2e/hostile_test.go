package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/wasmrt"
)

const (
	hostileImage = "localhost/kuasar-go/wasm-hostile:latest"
	// maxModuleMiB is the daemon's module limit in this test, hugeMiB the
	// size of the image's module past it.
	maxModuleMiB = 8
	hugeMiB      = 48
)

// hostileImageTar is the test program with what a hostile tenant puts
// beside it: symlinks that lead to a module on the host (hostModule), one
// module far past the size limit, a module to swap in.
func hostileImageTar(t *testing.T, hostModule string) []byte {
	t.Helper()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	huge := append([]byte{0, 'a', 's', 'm', 1, 0, 0, 0}, make([]byte, hugeMiB<<20)...)
	tar, err := testenv.ImageTar(testenv.ImageSpec{
		Name: hostileImage,
		Files: []testenv.ImageFile{
			{Path: "/proc", Dir: true, Mode: 0o555},
			{Path: "/dev", Dir: true, Mode: 0o755},
			{Path: "/sys", Dir: true, Mode: 0o555},
			{Path: "/etc", Dir: true, Mode: 0o755},
			{Path: "/data", Dir: true, Mode: 0o777},
			{Path: "/app.wasm", Mode: 0o755, Data: prog},
			{Path: "/empty.wasm", Mode: 0o755, Data: testenv.WasmModules["/empty.wasm"]},
			{Path: "/huge.wasm", Mode: 0o755, Data: huge},
			{Path: "/abs-escape.wasm", Link: hostModule},
			{Path: "/rel-escape.wasm", Link: strings.Repeat("../", 16) + strings.TrimPrefix(hostModule, "/")},
		},
		Entrypoint: []string{"/app.wasm"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return tar
}

func hostileContainer(name string, args ...string) *runtime.ContainerConfig {
	c := testenv.ContainerConfig(name)
	c.Image = &runtime.ImageSpec{Image: hostileImage}
	c.Command = []string{"/app.wasm"}
	c.Args = args
	return c
}

// peakKiB is a process's peak resident memory (VmHWM) in KiB.
func peakKiB(t *testing.T, pid int) int {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimSuffix(testenv.ProcStatus(t, pid)["VmHWM"], " kB"))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rootMountOptions are the options of the mount at a process's "/", as the
// process sees it.
func rootMountOptions(t *testing.T, pid int) string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	opts := ""
	for _, l := range strings.Split(string(data), "\n") {
		// id parent major:minor root mountpoint options ...; the last
		// mount on "/" is the one seen.
		if f := strings.Fields(l); len(f) > 5 && f[4] == "/" {
			opts = f[5]
		}
	}
	return opts
}

// rootfsOf is the host path of a container's root filesystem (where the
// daemon mounted it in its bundle).
func rootfsOf(t *testing.T, env *testenv.Env, id string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(env.Dir, "state", "*", "k8s.io", id, "rootfs"))
	if len(m) != 1 {
		t.Fatalf("rootfs of %s: %v", id, m)
	}
	return m[0]
}

// TestHostileTenantWasm: what a tenant controls (its image, its pod's
// annotations and security context, its rootfs while it runs) gets it no
// host file, no engine the operator did not allow, no more of the daemon
// than the limits allow, and a module process confined as a runc
// container's: each attempt fails clearly, leaves nothing behind, and the
// pod goes on.
func TestHostileTenantWasm(t *testing.T) {
	// The module an escape would run: a valid one, on the host.
	hostModule := filepath.Join(t.TempDir(), "host.wasm")
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(hostModule, prog, 0o644); err != nil {
		t.Fatal(err)
	}
	// Only the default engine is allowed; modules are bounded.
	env := startEnv(t, fmt.Sprintf("[wasm]\nmax_module_size_mib = %d\n", maxModuleMiB))
	env.ImportImage(t, hostileImageTar(t, hostModule), hostileImage)
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)
	ctx := t.Context()

	// start creates and starts a container and returns StartContainer's
	// error; a container that did not start is removed.
	start := func(cfg *runtime.ContainerConfig) (string, error) {
		id := env.CreateContainer(t, podID, podCfg, cfg)
		_, err := env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
		if err != nil {
			if _, rerr := env.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); rerr != nil {
				t.Errorf("RemoveContainer: %v", rerr)
			}
		}
		return id, err
	}
	refused := func(t *testing.T, err error, code codes.Code, msg string) {
		t.Helper()
		if status.Code(err) != code || !strings.Contains(err.Error(), msg) {
			t.Errorf("StartContainer: %v; want %v with %q", err, code, msg)
		}
	}

	t.Run("symlinks out of the root", func(t *testing.T) {
		for _, m := range []string{"/abs-escape.wasm", "/rel-escape.wasm"} {
			c := hostileContainer("escape-"+strings.TrimSuffix(m[1:], ".wasm"), "echo", "escaped")
			c.Command = []string{m}
			_, err := start(c)
			refused(t, err, codes.InvalidArgument, "not found in the container's rootfs")
		}
	})
	t.Run("dot-dot in args[0]", func(t *testing.T) {
		c := hostileContainer("dotdot", "echo", "escaped")
		c.Command = []string{strings.Repeat("/..", 16) + hostModule}
		_, err := start(c)
		refused(t, err, codes.InvalidArgument, "not found in the container's rootfs")
	})
	t.Run("engine not allowed", func(t *testing.T) {
		if otherEngine() == "" {
			t.Skip("this build has one engine")
		}
		c := hostileContainer("other-engine", "echo", "never")
		c.Annotations = map[string]string{wasmrt.EngineAnnotation: otherEngine()}
		_, err := start(c)
		refused(t, err, codes.PermissionDenied, "wasm.allowed_engines")
	})
	t.Run("huge module", func(t *testing.T) {
		pid := env.DaemonPID(handler)
		peak := peakKiB(t, pid)
		c := hostileContainer("huge")
		c.Command = []string{"/huge.wasm"}
		_, err := start(c)
		refused(t, err, codes.InvalidArgument, "wasm.max_module_size_mib")
		// Refused from its size: never read into the daemon.
		grew := peakKiB(t, pid) - peak
		t.Logf("the daemon's peak memory: %d KiB before, %d KiB more after a %d MiB module", peak, grew, hugeMiB)
		if grew > hugeMiB<<10/2 {
			t.Errorf("the daemon's peak memory grew by %d KiB, a %d MiB module refused", grew, hugeMiB)
		}
	})

	t.Run("module swapped between create and exec", func(t *testing.T) {
		long := hostileContainer("long", "forever")
		longID, err := start(long)
		if err != nil {
			t.Fatal(err)
		}
		env.WaitLog(t, podCfg, long, "running until killed", 60*time.Second)
		app := filepath.Join(rootfsOf(t, env, longID), "app.wasm")
		// A symlink to the host's module: it resolves inside the root.
		if err := os.Remove(app); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(hostModule, app); err != nil {
			t.Fatal(err)
		}
		_, err = env.Runtime.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: longID, Cmd: []string{"/app.wasm", "echo", "escaped"}, Timeout: 30})
		if err == nil || !strings.Contains(err.Error(), "not found in the container's rootfs") {
			t.Errorf("exec of a module swapped for a symlink out of the root: %v", err)
		}
		// Another module: what runs is the file as the exec found it.
		empty, _ := os.ReadFile(filepath.Join(filepath.Dir(app), "empty.wasm"))
		os.Remove(app)
		if err := os.WriteFile(app, empty, 0o755); err != nil {
			t.Fatal(err)
		}
		if out, _, code := env.ExecSync(t, longID, 30*time.Second, "/app.wasm", "echo", "old-module"); code != 0 || out != "" {
			t.Errorf("exec of a swapped module: %q, exit %d; want the new module's (nothing, 0)", out, code)
		}
		if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: longID, Timeout: 10}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("confined as a runc container", func(t *testing.T) {
		sc := func(seccomp bool) *runtime.LinuxContainerConfig {
			l := &runtime.LinuxContainerConfig{SecurityContext: &runtime.LinuxContainerSecurityContext{
				ReadonlyRootfs: true,
				RunAsUser:      &runtime.Int64Value{Value: 1000},
				RunAsGroup:     &runtime.Int64Value{Value: 1000},
				Capabilities:   &runtime.Capability{DropCapabilities: []string{"ALL"}},
				NoNewPrivs:     true,
			}}
			if seccomp {
				l.SecurityContext.Seccomp = &runtime.SecurityProfile{ProfileType: runtime.SecurityProfile_RuntimeDefault}
			}
			return l
		}
		// From inside: the root is read-only, /data (mode 777) too. (The
		// engines report EROFS as they will: wasmtime as EIO.)
		w := hostileContainer("writer", "write", "/data/x", "from-the-tenant")
		w.Linux = sc(true)
		wID, err := start(w)
		if err != nil {
			t.Fatal(err)
		}
		code := env.WaitContainerExited(t, wID, 60*time.Second)
		if log := env.ReadLog(t, podCfg, w); code != 1 || !strings.HasPrefix(log, "write: open /data/x: ") {
			t.Errorf("write to the read-only root: exit %d, log %q", code, log)
		}
		// From the host: the module process, with the pod's profile and
		// with none (Unconfined: the runner's own filter).
		for _, seccomp := range []bool{true, false} {
			c := hostileContainer(fmt.Sprintf("confined-%v", seccomp), "forever")
			c.Linux = sc(seccomp)
			id, err := start(c)
			if err != nil {
				t.Fatal(err)
			}
			env.WaitLog(t, podCfg, c, "running until killed", 60*time.Second)
			pid := taskPid(t, env, id)
			st := testenv.ProcStatus(t, pid)
			for k, want := range map[string]string{
				"Uid": "1000 1000 1000 1000", "Gid": "1000 1000 1000 1000",
				"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "CapBnd": "0000000000000000",
				"NoNewPrivs": "1", "Seccomp": "2",
			} {
				if st[k] != want {
					t.Errorf("seccomp profile %v: module process %s: %q, want %q", seccomp, k, st[k], want)
				}
			}
			if nsLink(t, pid, "mnt") == nsLink(t, os.Getpid(), "mnt") {
				t.Error("the module process is in the host's mount namespace")
			}
			if opts := rootMountOptions(t, pid); !slices.Contains(strings.Split(opts, ","), "ro") {
				t.Errorf("the module process's root is mounted %q, want read-only", opts)
			}
			root, err1 := os.Stat(fmt.Sprintf("/proc/%d/root/app.wasm", pid))
			want, err2 := os.Stat(filepath.Join(rootfsOf(t, env, id), "app.wasm"))
			if err1 != nil || err2 != nil || !os.SameFile(root, want) {
				t.Errorf("the module process's root is not the container's rootfs: %v %v", err1, err2)
			}
			if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: id, Timeout: 10}); err != nil {
				t.Fatal(err)
			}
		}
	})

	// The pod still works.
	ok := hostileContainer("after", "echo", "still-fine")
	okID := env.CreateStartContainer(t, podID, podCfg, ok)
	if code := env.WaitContainerExited(t, okID, 60*time.Second); code != 0 || !bytes.Contains([]byte(env.ReadLog(t, podCfg, ok)), []byte("still-fine")) {
		t.Errorf("container after the attempts: exit %d, log %q", code, env.ReadLog(t, podCfg, ok))
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// otherEngine is an engine of the build besides the default one, or "".
func otherEngine() string {
	for _, n := range engines() {
		if n != sandbox.DefaultEngine() {
			return n
		}
	}
	return ""
}
