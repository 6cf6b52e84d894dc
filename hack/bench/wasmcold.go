package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The wasm cold/warm start section (--wasm-cold N): the start of a
// hello-world container in a pod that already runs, per wasm engine, and of
// the same program built for Linux as a native container under
// runc-sandboxer. A start is CreateContainer + StartContainer until CRI
// reports the container exited (it printed "hello" and returned). "cold"
// is the first container of a module the daemon has never compiled: each
// of the N rounds starts a fresh containerd and fresh daemons in a new
// temporary directory, so the compiled-module cache is empty and the
// compile is part of the start (for the native container: the first
// container of the image). "warm" are the --wasm-warm later containers of
// the first round's pod, which load the compiled module from the cache.

// wasmKind is one row of the section.
type wasmKind struct {
	Name    string // "wasm (wasmtime)", "native (runc)"
	handler string
	engine  string // "" for native
	image   string
	cmd     string
}

func wasmKinds(engines []string) []wasmKind {
	var out []wasmKind
	for _, e := range engines {
		out = append(out, wasmKind{"wasm (" + e + ")", wasm, e, testenv.WasmImage, "/app.wasm"})
	}
	return append(out, wasmKind{"native (runc)", kuasar, "", testenv.WasmNativeImage, "/app"})
}

// wasmStart is one hello-world container start.
type wasmStart struct {
	Kind  string
	Round int
	Cold  bool
	Index int // 0 for the cold start, 1.. for warm ones
	// Total is CreateContainer until CRI reports the exit; RPC is
	// CreateContainer + StartContainer.
	Total, RPC time.Duration
}

// wasmCold runs the section's rounds, each under its own containerd.
func wasmCold(c config, res *results) error {
	for i := 0; i < c.wasmCold; i++ {
		if stopping.Load() {
			return fmt.Errorf("interrupted")
		}
		t0 := time.Now()
		r := testenv.NewRunner("bench-wasm-cold", os.Stderr)
		if err := r.Run(func(tb testing.TB) { wasmRound(tb, c, res, i) }); err != nil {
			return fmt.Errorf("wasm cold round %d: %w", i+1, err)
		}
		fmt.Fprintf(os.Stderr, "bench: wasm cold/warm round %d/%d done (%v)\n", i+1, c.wasmCold, time.Since(t0).Round(time.Millisecond))
	}
	return nil
}

// wasmRound starts a fresh containerd with wasm-sandboxer and
// runc-sandboxer (an empty compiled-module cache), takes one cold start per
// kind and, in the first round, the warm starts.
func wasmRound(tb testing.TB, c config, res *results, round int) {
	env := startWasmAndNative(tb, c, res)
	before := env.Snapshot()
	for _, k := range wasmKinds(c.wasmEngines) {
		podCfg := env.PodConfig()
		if k.engine != "" {
			podCfg.Annotations = map[string]string{wasmEngineAnnotation: k.engine}
		}
		podID := env.RunPod(tb, k.handler, podCfg)
		s := helloStart(tb, env, c, podID, podCfg, k, 0)
		s.Round, s.Cold = round, true
		res.wasm = append(res.wasm, s)
		if round == 0 {
			for i := 1; i <= c.wasmWarm; i++ {
				if stopping.Load() {
					break
				}
				s := helloStart(tb, env, c, podID, podCfg, k, i)
				s.Round = round
				res.wasm = append(res.wasm, s)
			}
		}
		env.StopRemovePod(tb, podID)
	}
	env.AssertNoLeaks(tb, before, 30*time.Second)
}

// startWasmAndNative starts containerd with wasm-sandboxer and
// runc-sandboxer, and imports the WASI test program's image and the same
// program built for Linux: what the wasm sections compare.
func startWasmAndNative(tb testing.TB, c config, res *results) *testenv.Env {
	wasmSB, runcSB := testenv.Binary("wasm-sandboxer"), testenv.Binary(c.sandboxer)
	testenv.RequireFiles(tb, wasmSB, runcSB)
	env := testenv.Start(tb, testenv.Options{
		Sandboxers: []testenv.Sandboxer{
			wasmSandboxer(wasmSB, c.logLevel, c.wasmEngines),
			{Name: kuasar, Binary: runcSB, Args: []string{"--log-level", c.logLevel}},
		},
		LogLevel:     c.logLevel,
		StartTimeout: 60 * time.Second,
		LeakIgnore:   wasmLeakIgnore,
	})
	if res.machine == nil {
		res.machine = describeMachine(c, []string{kuasar, wasm})
	}
	for _, img := range []struct {
		tar func() ([]byte, error)
		ref string
	}{{testenv.WasmImageTar, testenv.WasmImage}, {testenv.WasmNativeImageTar, testenv.WasmNativeImage}} {
		b, err := img.tar()
		if err != nil {
			tb.Fatalf("bench: build %s: %v", img.ref, err)
		}
		env.ImportImage(tb, b, img.ref)
	}
	return env
}

// helloStart runs one hello-world container to its exit and removes it.
func helloStart(tb testing.TB, env *testenv.Env, c config, podID string, podCfg *runtime.PodSandboxConfig, k wasmKind, i int) wasmStart {
	ctr := testenv.ContainerConfig(fmt.Sprintf("hello-%d", i))
	ctr.Image = &runtime.ImageSpec{Image: k.image}
	ctr.Command = []string{k.cmd}
	ctr.Args = []string{"echo", "hello"}
	t0 := time.Now()
	id := env.CreateStartContainer(tb, podID, podCfg, ctr)
	s := wasmStart{Kind: k.Name, Index: i, RPC: time.Since(t0)}
	for {
		st := env.ContainerStatus(tb, id)
		if st.State == runtime.ContainerState_CONTAINER_EXITED {
			s.Total = time.Since(t0)
			if st.ExitCode != 0 {
				tb.Fatalf("bench: %s: exit %d: %s", k.Name, st.ExitCode, env.ReadLog(tb, podCfg, ctr))
			}
			break
		}
		if time.Since(t0) > c.timeout {
			tb.Fatalf("bench: %s: container still %v after %v", k.Name, st.State, c.timeout)
		}
		time.Sleep(c.poll)
	}
	if _, err := env.Runtime.RemoveContainer(context.Background(), &runtime.RemoveContainerRequest{ContainerId: id}); err != nil {
		tb.Fatalf("bench: RemoveContainer: %v", err)
	}
	return s
}

// wasmSandboxer is wasm-sandboxer as the benchmark runs it: engine chosen
// per pod by annotation (which CRI passes on only when listed) among
// engines, which the daemon must allow.
func wasmSandboxer(bin, logLevel string, engines []string) testenv.Sandboxer {
	return testenv.Sandboxer{
		Name: wasm, Binary: bin, Args: []string{"--log-level", logLevel},
		ConfigTOML:  fmt.Sprintf("[wasm]\nengine = %q\nallowed_engines = [\"%s\"]\n", engines[0], strings.Join(engines, `", "`)),
		RuntimeTOML: "  pod_annotations = [\"wasm.kuasar-go.io/*\"]\n  container_annotations = [\"wasm.kuasar-go.io/*\"]",
	}
}

// wasmLeakIgnore: the compiled-module cache and kept artifact modules are
// the daemon's to keep.
var wasmLeakIgnore = []string{`/(cache|modules)(/|$)`}
