// Package e2e drives wasm-sandboxer through stock containerd 2.2 and CRI.
package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/wasmrt"
)

const handler = "kuasar-wasm"

var (
	imageOnce sync.Once
	imageTar  []byte
	imageErr  error
)

// startEnv runs containerd and wasm-sandboxer with the wasm test image.
// The runtime handler passes the engine annotation through from pods and
// containers, as deploy/containerd/wasm-sandboxer.toml does.
func startEnv(t *testing.T, configTOML string) *testenv.Env {
	t.Helper()
	testenv.RequireRoot(t)
	bin := testenv.Binary("wasm-sandboxer")
	testenv.RequireFiles(t, bin)
	imageOnce.Do(func() { imageTar, imageErr = testenv.WasmImageTar() })
	if imageErr != nil {
		t.Fatalf("build wasm image: %v", imageErr)
	}
	env := testenv.Start(t, testenv.Options{Sandboxers: []testenv.Sandboxer{{
		Name: handler, Binary: bin, ConfigTOML: configTOML,
		RuntimeTOML: "  pod_annotations = [\"wasm.kuasar-go.io/*\"]\n  container_annotations = [\"wasm.kuasar-go.io/*\"]",
		// The compiled-module cache is the daemon's to keep.
	}}, LeakIgnore: []string{`/(cache|modules)(/|$)`}})
	env.ImportImage(t, imageTar, testenv.WasmImage)
	return env
}

// engines are the engines of the sandboxer binary under test: the same
// build as this test's (make build builds it with cgo, so with wasmtime).
func engines() []string { return engine.Names() }

// allEngines is a configuration that lets the engine annotation choose
// any engine of the build.
func allEngines() string {
	return fmt.Sprintf("[wasm]\nallowed_engines = [\"%s\"]\n", strings.Join(engines(), `", "`))
}

func wasmContainer(name string, args ...string) *runtime.ContainerConfig {
	c := testenv.ContainerConfig(name)
	c.Image = &runtime.ImageSpec{Image: testenv.WasmImage}
	c.Command = []string{"/app.wasm"}
	c.Args = args
	return c
}

func podWithEngine(env *testenv.Env, eng string) *runtime.PodSandboxConfig {
	cfg := env.PodConfig()
	cfg.Annotations = map[string]string{wasmrt.EngineAnnotation: eng}
	return cfg
}

// TestE2EWasmPod runs a pod per engine: a container that prints its args,
// env and a file of its rootfs and exits with a chosen code, a
// long-running one stopped by StopContainer, ExecSync, and nothing left
// behind.
func TestE2EWasmPod(t *testing.T) {
	env := startEnv(t, allEngines())
	for _, eng := range engines() {
		t.Run(eng, func(t *testing.T) {
			before := env.Snapshot()
			podCfg := podWithEngine(env, eng)
			t0 := time.Now()
			podID := env.RunPod(t, handler, podCfg)

			printer := wasmContainer("printer", "args", "env", "cwd", "cat", "/etc/greeting", "stderr", "to-stderr", "exit", "3")
			printer.Envs = []*runtime.KeyValue{{Key: "GREETING", Value: "hello from CRI"}}
			printer.WorkingDir = "/data"
			printerID := env.CreateStartContainer(t, podID, podCfg, printer)
			if code := env.WaitContainerExited(t, printerID, 60*time.Second); code != 3 {
				t.Errorf("exit code %d, want 3; log:\n%s", code, env.ReadLog(t, podCfg, printer))
			}
			tFirst := time.Since(t0)
			log := env.ReadLog(t, podCfg, printer)
			for _, want := range []string{
				"arg[0]=/app.wasm\n", "arg[1]=args\n", "arg[9]=3\n",
				"env:GREETING=hello from CRI\n", "env:IMAGE_ENV=from-image\n",
				"cwd=/data <nil>\n", testenv.WasmGreeting + "\n", "to-stderr\n",
			} {
				if !strings.Contains(log, want) {
					t.Errorf("log lacks %q:\n%s", want, log)
				}
			}

			long := wasmContainer("long", "forever")
			longID := env.CreateStartContainer(t, podID, podCfg, long)
			env.WaitLog(t, podCfg, long, "running until killed", 30*time.Second)
			out, stderr, code := env.ExecSync(t, longID, 30*time.Second, "/app.wasm", "echo", "exec-ok", "cat", "/etc/greeting", "exit", "5")
			if out != "exec-ok\n"+testenv.WasmGreeting+"\n" || code != 5 {
				t.Errorf("ExecSync: %q %q exit %d; want exec-ok, the greeting, 5", out, stderr, code)
			}
			ctx := t.Context()
			t1 := time.Now()
			if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: longID, Timeout: 10}); err != nil {
				t.Fatalf("StopContainer: %v", err)
			}
			if d := time.Since(t1); d > 5*time.Second {
				t.Errorf("StopContainer took %v: SIGTERM did not end the module", d)
			}
			if st := env.ContainerStatus(t, longID); st.State != runtime.ContainerState_CONTAINER_EXITED || st.ExitCode != 143 {
				t.Errorf("after StopContainer: %v exit %d, want EXITED 143 (SIGTERM)", st.State, st.ExitCode)
			}
			// Three module processes, one compile: the others loaded the
			// compiled module from the cache.
			if n := compiles(t, env, eng); n != 1 {
				t.Errorf("%s compiled the test program %d times, want once", eng, n)
			}
			env.StopRemovePod(t, podID)
			env.AssertNoLeaks(t, before, 15*time.Second)
			t.Logf("%s: pod + first container run to exit %v (compile included)", eng, tFirst.Round(time.Millisecond))
		})
	}
}

// compiles counts the daemon's "module compiled" log lines for an engine.
func compiles(t *testing.T, env *testenv.Env, eng string) int {
	t.Helper()
	b, err := os.ReadFile(env.LogPath(handler))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "module compiled") && strings.Contains(l, `"engine":"`+eng+`"`) {
			n++
		}
	}
	return n
}

// taskPid returns a running container's init PID as containerd knows it.
func taskPid(t *testing.T, env *testenv.Env, id string) int {
	t.Helper()
	out, err := env.Ctr("tasks", "ls")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[0] == id {
			pid, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatalf("tasks ls: %q", l)
			}
			return pid
		}
	}
	t.Fatalf("task %s not listed:\n%s", id, out)
	return 0
}

func nsLink(t *testing.T, pid int, ns string) string {
	t.Helper()
	l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// expectedRunner is the binary of an engine's module processes.
func expectedRunner(eng string) string {
	if eng == "wasmtime" {
		return runner.WasmtimeBinaryName
	}
	return runner.BinaryName
}

// runs reports whether a process's executable is the program at path (runc
// execs it from a read-only clone of the file, which names no path).
func runs(t *testing.T, pid int, path string) bool {
	t.Helper()
	exe, err1 := os.Stat(fmt.Sprintf("/proc/%d/exe", pid))
	want, err2 := os.Stat(path)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	return os.SameFile(exe, want)
}

// TestE2EWasmIsolation: the module processes of a pod's containers share
// the pod's network, PID, IPC and UTS namespaces (not the node's), each
// sits in its own cgroup below the pod's, a memory limit holds (a module
// allocating past it fails, a smaller one succeeds), and pause, resume,
// ps and kill work through containerd's own client.
func TestE2EWasmIsolation(t *testing.T) {
	env := startEnv(t, allEngines())
	before := env.Snapshot()
	for _, eng := range engines() {
		t.Run(eng, func(t *testing.T) {
			podCfg := podWithEngine(env, eng)
			podID := env.RunPod(t, handler, podCfg)
			a := wasmContainer("a", "forever")
			aID := env.CreateStartContainer(t, podID, podCfg, a)
			b := wasmContainer("b", "forever")
			bID := env.CreateStartContainer(t, podID, podCfg, b)
			env.WaitLog(t, podCfg, a, "running until killed", 30*time.Second)
			env.WaitLog(t, podCfg, b, "running until killed", 30*time.Second)
			pa, pb := taskPid(t, env, aID), taskPid(t, env, bID)
			for _, ns := range []string{"net", "pid", "ipc", "uts"} {
				la, lb, host := nsLink(t, pa, ns), nsLink(t, pb, ns), nsLink(t, os.Getpid(), ns)
				if la != lb || la == host {
					t.Errorf("%s namespace: container a %s, b %s, node %s; want a = b != node", ns, la, lb, host)
				}
			}
			// The module process is the runner meant for the engine:
			// kuasar-wasm-runner-wasmtime (no Go runtime) for wasmtime.
			if want := expectedRunner(eng); !runs(t, pa, testenv.Binary(want)) {
				t.Errorf("%s module process does not run %s", eng, want)
			}
			cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pa))
			if !strings.Contains(string(cg), "/"+aID+"\n") || !strings.Contains(string(cg), podID) {
				t.Errorf("container a is not in its cgroup below the pod %s:\n%s", podID, cg)
			}

			// ctr: ps, pause, resume, kill.
			if ps, err := env.Ctr("tasks", "ps", aID); err != nil || !strings.Contains(ps, strconv.Itoa(pa)) {
				t.Errorf("tasks ps: %q %v", ps, err)
			}
			if _, err := env.Ctr("tasks", "pause", aID); err != nil {
				t.Fatalf("pause: %v", err)
			}
			if ls, _ := env.Ctr("tasks", "ls"); !regexp.MustCompile(aID + `\s+\d+\s+PAUSED`).MatchString(ls) {
				t.Errorf("after pause, tasks ls:\n%s", ls)
			}
			if _, err := env.Ctr("tasks", "resume", aID); err != nil {
				t.Fatalf("resume: %v", err)
			}
			if _, err := env.Ctr("tasks", "kill", "--signal", "SIGKILL", aID); err != nil {
				t.Fatalf("kill: %v", err)
			}
			if code := env.WaitContainerExited(t, aID, 20*time.Second); code != 137 {
				t.Errorf("exit code after SIGKILL %d, want 137", code)
			}

			// Memory: 96 MiB for the container.
			const limit = 96 << 20
			for _, tc := range []struct {
				mib     string
				succeed bool
			}{{"16", true}, {"256", false}} {
				c := wasmContainer("alloc-"+tc.mib, "alloc", tc.mib)
				c.Linux = &runtime.LinuxContainerConfig{Resources: &runtime.LinuxContainerResources{MemoryLimitInBytes: limit}}
				id := env.CreateStartContainer(t, podID, podCfg, c)
				code := env.WaitContainerExited(t, id, 60*time.Second)
				log := env.ReadLog(t, podCfg, c)
				allocated := strings.Contains(log, "allocated "+tc.mib+" MiB")
				if tc.succeed != (code == 0 && allocated) {
					t.Errorf("alloc %s MiB under a %d MiB limit: exit %d, log %q", tc.mib, limit>>20, code, log)
				}
				t.Logf("alloc %s MiB under a %d MiB limit: exit %d, reason %q, log %q", tc.mib, limit>>20, code, env.ContainerStatus(t, id).Reason, log)
			}
			env.StopRemovePod(t, podID)
		})
	}
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestE2EWasmBadInput: what cannot run fails clearly (StartContainer's
// error or the exit code and log), leaves nothing behind, and the pod goes
// on running containers.
func TestE2EWasmBadInput(t *testing.T) {
	env := startEnv(t, allEngines())
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)
	ctx := t.Context()

	startErrors := []struct {
		name    string
		cfg     *runtime.ContainerConfig
		wantErr string
	}{
		{"missing module", wasmContainer("missing"), "not found in the container's rootfs"},
		{"not wasm", func() *runtime.ContainerConfig {
			c := wasmContainer("notwasm")
			c.Command = []string{"/notwasm.wasm"}
			return c
		}(), "is not a WebAssembly module"},
		{"import the engine lacks", func() *runtime.ContainerConfig {
			c := wasmContainer("badimport")
			c.Command = []string{"/badimport.wasm"}
			return c
		}(), "nosuch"},
		{"unknown engine", func() *runtime.ContainerConfig {
			c := wasmContainer("unknown-engine", "echo", "never")
			c.Annotations = map[string]string{wasmrt.EngineAnnotation: "nosuch"}
			return c
		}(), `unknown wasm engine "nosuch"`},
		{"terminal", func() *runtime.ContainerConfig {
			c := wasmContainer("tty", "echo", "never")
			c.Tty = true
			return c
		}(), "no terminal"},
	}
	for _, tc := range startErrors {
		if tc.name == "missing module" {
			tc.cfg.Command = []string{"/nosuch.wasm"}
		}
		id := env.CreateContainer(t, podID, podCfg, tc.cfg)
		_, err := env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: StartContainer error %v, want %q", tc.name, err, tc.wantErr)
		}
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: StartContainer error code %v, want InvalidArgument", tc.name, status.Code(err))
		}
		if _, err := env.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: id}); err != nil {
			t.Errorf("%s: RemoveContainer: %v", tc.name, err)
		}
	}

	// A module that traps runs and exits non-zero, saying why.
	trap := wasmContainer("trap")
	trap.Command = []string{"/trap.wasm"}
	trapID := env.CreateStartContainer(t, podID, podCfg, trap)
	if code := env.WaitContainerExited(t, trapID, 30*time.Second); code != runner.ExitTrap {
		t.Errorf("trapping module: exit %d, want %d", code, runner.ExitTrap)
	}
	if log := env.ReadLog(t, podCfg, trap); !strings.Contains(log, "wasm trap") || !strings.Contains(log, "unreachable") {
		t.Errorf("trapping module's log: %q", log)
	}

	// ExecSync of a module that is not there fails without harming the container.
	long := wasmContainer("long", "forever")
	longID := env.CreateStartContainer(t, podID, podCfg, long)
	if _, err := env.Runtime.ExecSync(ctx, &runtime.ExecSyncRequest{ContainerId: longID, Cmd: []string{"/nosuch.wasm"}, Timeout: 10}); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("ExecSync of a missing module: %v", err)
	}

	// The pod still works.
	ok := wasmContainer("after", "echo", "still-fine")
	okID := env.CreateStartContainer(t, podID, podCfg, ok)
	if code := env.WaitContainerExited(t, okID, 30*time.Second); code != 0 || !strings.Contains(env.ReadLog(t, podCfg, ok), "still-fine") {
		t.Errorf("container after bad input: exit %d, log %q", code, env.ReadLog(t, podCfg, ok))
	}
	if out, _, code := env.ExecSync(t, longID, 10*time.Second, "/app.wasm", "echo", "exec-fine"); code != 0 || out != "exec-fine\n" {
		t.Errorf("exec after bad input: %q exit %d", out, code)
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestE2EWasmOCIArtifact: images whose layer is the raw module (wasm OCI
// artifacts, which containerd stores but does not unpack: the container's
// rootfs is empty) run their module, read from containerd's content store;
// a WASI component is refused clearly.
func TestE2EWasmOCIArtifact(t *testing.T) {
	env := startEnv(t, allEngines())
	before := env.Snapshot()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)
	ctx := t.Context()
	for i, tc := range []struct {
		name, config, layer string
		wantErr             string
	}{
		{"CNCF wasm artifact", testenv.MediaTypeWasmConfig, testenv.MediaTypeWasmLayer, ""},
		{"runwasi module layer", "application/vnd.oci.image.config.v1+json", testenv.MediaTypeWasmModuleLayer, ""},
		{"component", testenv.MediaTypeWasmConfig, testenv.MediaTypeWasmComponentLayer, "WASI component"},
	} {
		ref := fmt.Sprintf("localhost/kuasar-go/wasm-artifact-%d:latest", i)
		tar, err := testenv.WasmArtifactTar(ref, tc.config, tc.layer, prog)
		if err != nil {
			t.Fatal(err)
		}
		env.ImportImage(t, tar, ref, "--all-platforms")
		c := wasmContainer(fmt.Sprintf("artifact-%d", i), "echo", "from-an-artifact", "args")
		c.Image = &runtime.ImageSpec{Image: ref}
		c.Command = []string{"app.wasm"}
		id := env.CreateContainer(t, podID, podCfg, c)
		_, err = env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: id})
		if tc.wantErr != "" {
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: StartContainer: %v, want InvalidArgument %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: StartContainer: %v", tc.name, err)
			continue
		}
		if code := env.WaitContainerExited(t, id, 60*time.Second); code != 0 {
			t.Errorf("%s: exit %d", tc.name, code)
		}
		if log := env.ReadLog(t, podCfg, c); !strings.Contains(log, "from-an-artifact\narg[0]=app.wasm\n") {
			t.Errorf("%s: log %q", tc.name, log)
		}
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}

// TestE2EWasmBadCache: with kuasar-wasm-runner-wasmtime, a cached compiled
// module that wasmtime cannot load (another version or configuration, or
// damaged) fails the container's start clearly, is dropped from the cache,
// and the next start compiles the module again and runs it.
func TestE2EWasmBadCache(t *testing.T) {
	if !slices.Contains(engines(), "wasmtime") {
		t.Skip("needs wasmtime (cgo)")
	}
	cache := t.TempDir()
	env := startEnv(t, fmt.Sprintf("[wasm]\nengine = \"wasmtime\"\ncache_dir = %q\n", cache))
	before := env.Snapshot()
	podCfg := env.PodConfig()
	podID := env.RunPod(t, handler, podCfg)
	ctx := t.Context()

	first := wasmContainer("first", "echo", "compiled")
	firstID := env.CreateStartContainer(t, podID, podCfg, first)
	if code := env.WaitContainerExited(t, firstID, 60*time.Second); code != 0 {
		t.Fatalf("first container: exit %d, log %q", code, env.ReadLog(t, podCfg, first))
	}
	code, _ := filepath.Glob(filepath.Join(cache, "wasmtime-"+engine.Version("wasmtime"), "*", engine.WasmtimeCodeFile))
	if len(code) != 1 {
		t.Fatalf("compiled modules in the cache: %v, want one", code)
	}
	entry := filepath.Dir(code[0])
	// Same size, not wasmtime's serialized code any more.
	data, err := os.ReadFile(code[0])
	if err != nil {
		t.Fatal(err)
	}
	for i := range data {
		data[i] = 0x5a
	}
	if err := os.WriteFile(code[0], data, 0o600); err != nil {
		t.Fatal(err)
	}

	bad := wasmContainer("bad-cache", "echo", "never")
	badID := env.CreateContainer(t, podID, podCfg, bad)
	_, err = env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: badID})
	if err == nil || !strings.Contains(err.Error(), "cannot load the compiled module") || !strings.Contains(err.Error(), entry) {
		t.Errorf("StartContainer with a bad cached module: %v; want it to name the cache entry", err)
	}
	t.Logf("StartContainer with a bad cached module: %v", err)
	if _, err := env.Runtime.RemoveContainer(ctx, &runtime.RemoveContainerRequest{ContainerId: badID}); err != nil {
		t.Errorf("RemoveContainer: %v", err)
	}

	again := wasmContainer("again", "echo", "recompiled")
	againID := env.CreateStartContainer(t, podID, podCfg, again)
	if code := env.WaitContainerExited(t, againID, 60*time.Second); code != 0 || !strings.Contains(env.ReadLog(t, podCfg, again), "recompiled") {
		t.Errorf("after the bad cache entry: exit %d, log %q", code, env.ReadLog(t, podCfg, again))
	}
	if n := compiles(t, env, "wasmtime"); n != 2 {
		t.Errorf("the module was compiled %d times, want 2 (once more after the bad entry was dropped)", n)
	}
	env.StopRemovePod(t, podID)
	env.AssertNoLeaks(t, before, 15*time.Second)
}
