// Command wasmbench measures the start of a hello-world container through
// CRI with wasm-sandboxer, per engine, and of the same program built for
// Linux as a native container under runc-sandboxer, both behind ONE
// containerd in one run. It is a benchmark, not a test.
//
//	go run ./hack/wasmbench [--runs 10] [--cold 3]
//
// A start is CreateContainer + StartContainer until CRI reports the
// container exited (the program printed "hello" and returned), in a pod that
// already runs. "cold" is the first container of a module the daemon has
// never compiled (an empty compiled-module cache: the compile is part of
// it); for the native container, the first container of the image. "warm"
// are the later containers, which load the compiled module from the cache.
// It prints a Markdown table of medians. It needs root and `make build tools`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sort"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

const (
	wasmHandler = "kuasar-wasm"
	runcHandler = "kuasar-runc"
	// engineAnnotation is wasm-sandboxer's wasmrt.EngineAnnotation.
	engineAnnotation = "io.kuasar-go.wasm.engine"
)

type kind struct {
	name, handler, engine, image, cmd string
}

var kinds = []kind{
	{"wasm (wasmtime)", wasmHandler, "wasmtime", testenv.WasmImage, "/app.wasm"},
	{"wasm (wazero)", wasmHandler, "wazero", testenv.WasmImage, "/app.wasm"},
	{"native (runc)", runcHandler, "", testenv.WasmNativeImage, "/app"},
}

type result struct {
	cold, warm, warmRPC []time.Duration
}

func main() {
	runs := flag.Int("runs", 10, "warm starts per kind")
	cold := flag.Int("cold", 3, "cold starts per kind (a fresh containerd and daemons each)")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "wasmbench: must run as root")
		os.Exit(1)
	}
	results := map[string]*result{}
	for _, k := range kinds {
		results[k.name] = &result{}
	}
	for i := 0; i < *cold; i++ {
		r := testenv.NewRunner("wasmbench", os.Stderr)
		if err := r.Run(func(tb testing.TB) { round(tb, results, i == 0, *runs) }); err != nil {
			fmt.Fprintln(os.Stderr, "wasmbench:", err)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "round %d/%d done\n", i+1, *cold)
	}
	fmt.Printf("Start of a hello-world container through CRI (containerd 2.2, pod already running; %d cold and %d warm starts per kind):\n\n", *cold, *runs)
	fmt.Println("| kind | cold start median | warm start median | warm CreateContainer+StartContainer RPCs median |")
	fmt.Println("|---|---|---|---|")
	for _, k := range kinds {
		r := results[k.name]
		fmt.Printf("| %s | %s | %s | %s |\n", k.name, median(r.cold), median(r.warm), median(r.warmRPC))
	}
}

// round starts a fresh containerd with both daemons (so the compiled-module
// cache is empty), takes one cold start per kind, and warm starts in the
// first round.
func round(tb testing.TB, results map[string]*result, warm bool, runs int) {
	wasmSB, runcSB := testenv.Binary("wasm-sandboxer"), testenv.Binary("runc-sandboxer")
	testenv.RequireFiles(tb, wasmSB, runcSB)
	env := testenv.Start(tb, testenv.Options{
		Sandboxers: []testenv.Sandboxer{
			{Name: wasmHandler, Binary: wasmSB, Args: []string{"--log-level", "info"},
				RuntimeTOML: "  pod_annotations = [\"io.kuasar-go.wasm.*\"]"},
			{Name: runcHandler, Binary: runcSB, Args: []string{"--log-level", "info"}},
		},
		LogLevel: "info",
	})
	for _, build := range []struct {
		tar func() ([]byte, error)
		ref string
	}{{testenv.WasmImageTar, testenv.WasmImage}, {testenv.WasmNativeImageTar, testenv.WasmNativeImage}} {
		b, err := build.tar()
		if err != nil {
			tb.Fatal(err)
		}
		env.ImportImage(tb, b, build.ref)
	}
	for _, k := range kinds {
		podCfg := env.PodConfig()
		if k.engine != "" {
			podCfg.Annotations = map[string]string{engineAnnotation: k.engine}
		}
		podID := env.RunPod(tb, k.handler, podCfg)
		total, _ := start(tb, env, podID, podCfg, k, 0)
		results[k.name].cold = append(results[k.name].cold, total)
		if warm {
			for i := 1; i <= runs; i++ {
				total, rpc := start(tb, env, podID, podCfg, k, i)
				results[k.name].warm = append(results[k.name].warm, total)
				results[k.name].warmRPC = append(results[k.name].warmRPC, rpc)
			}
		}
		env.StopRemovePod(tb, podID)
	}
}

// start runs one hello-world container to its exit and returns the time
// to the exit and the time of the two RPCs.
func start(tb testing.TB, env *testenv.Env, podID string, podCfg *runtime.PodSandboxConfig, k kind, i int) (total, rpc time.Duration) {
	c := testenv.ContainerConfig(fmt.Sprintf("hello-%d", i))
	c.Image = &runtime.ImageSpec{Image: k.image}
	c.Command = []string{k.cmd}
	c.Args = []string{"echo", "hello"}
	t0 := time.Now()
	id := env.CreateStartContainer(tb, podID, podCfg, c)
	rpc = time.Since(t0)
	for {
		st := env.ContainerStatus(tb, id)
		if st.State == runtime.ContainerState_CONTAINER_EXITED {
			total = time.Since(t0)
			if st.ExitCode != 0 {
				tb.Fatalf("%s: exit %d: %s", k.name, st.ExitCode, env.ReadLog(tb, podCfg, c))
			}
			break
		}
		if time.Since(t0) > time.Minute {
			tb.Fatalf("%s: container still %v after a minute", k.name, st.State)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if _, err := env.Runtime.RemoveContainer(context.Background(), &runtime.RemoveContainerRequest{ContainerId: id}); err != nil {
		tb.Fatalf("RemoveContainer: %v", err)
	}
	return total, rpc
}

func median(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return m.Round(100 * time.Microsecond).String()
}
