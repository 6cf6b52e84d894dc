// Package e2e drives wasm-sandboxer through stock containerd 2.2 and CRI.
package e2e

import (
	"strings"
	"sync"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
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
		RuntimeTOML: "  pod_annotations = [\"io.kuasar-go.wasm.*\"]\n  container_annotations = [\"io.kuasar-go.wasm.*\"]",
		// The compiled-module cache is the daemon's to keep.
	}}, LeakIgnore: []string{`/cache(/|$)`}})
	env.ImportImage(t, imageTar, testenv.WasmImage)
	return env
}

// engines are the engines of the sandboxer binary under test: the same
// build as this test's (make build builds it with cgo, so with wasmtime).
func engines() []string { return engine.Names() }

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
	env := startEnv(t, "")
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
			env.StopRemovePod(t, podID)
			env.AssertNoLeaks(t, before, 15*time.Second)
			t.Logf("%s: pod + first container run to exit %v", eng, tFirst.Round(time.Millisecond))
		})
	}
}
