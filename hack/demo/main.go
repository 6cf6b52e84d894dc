// Command demo runs the project's main job on a local node: it starts
// containerd and runc-sandboxer under a temporary directory, runs a pod with
// a container through CRI, prints the container's output and the pod's IP,
// and tears everything down. It needs root and `make build tools`.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

func main() {
	handler := flag.String("handler", "kuasar-runc", "CRI runtime handler (and proxy plugin name) of the sandboxer")
	binary := flag.String("sandboxer", "runc-sandboxer", "sandboxer binary in _output/bin")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "demo: must run as root (it creates namespaces, cgroups and mounts)")
		os.Exit(1)
	}
	r := testenv.NewRunner("demo", os.Stdout)
	if err := r.Run(func(tb testing.TB) { demo(tb, *handler, *binary) }); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func demo(tb testing.TB, handler, binary string) {
	bin := testenv.Binary(binary)
	testenv.RequireFiles(tb, bin)
	env := testenv.Start(tb, testenv.Options{
		Sandboxers: []testenv.Sandboxer{{Name: handler, Binary: bin}},
		LogLevel:   "info",
	})
	fmt.Printf("== containerd v2.2.0 and %s running under %s (ready in %v)\n", binary, env.Dir, env.StartDuration.Round(time.Millisecond))

	start := time.Now()
	podCfg := env.PodConfig()
	podCfg.Hostname = "kuasar-demo"
	podID := env.RunPod(tb, handler, podCfg)
	fmt.Printf("== RunPodSandbox (handler %s): pod %.12s in %v\n", handler, podID, time.Since(start).Round(time.Millisecond))

	ctr := testenv.ContainerConfig("hello", "sh", "-c",
		`echo "Hello from a kuasar-go pod"; echo "hostname: $(hostname)"; echo "pid 1 of the pod: $(cat /proc/1/cmdline | tr '\0' ' ')"; ip -4 -o addr show eth0 | awk '{print "eth0:", $4}'`)
	ctrID := env.CreateStartContainer(tb, podID, podCfg, ctr)
	env.WaitLog(tb, podCfg, ctr, "Hello from a kuasar-go pod", 30*time.Second)
	firstLog := time.Since(start)
	code := env.WaitContainerExited(tb, ctrID, 30*time.Second)
	fmt.Printf("== pod IP: %s\n", env.PodIP(tb, podID))
	fmt.Printf("== container output (exit code %d):\n", code)
	for _, line := range strings.Split(strings.TrimRight(env.ReadLog(tb, podCfg, ctr), "\n"), "\n") {
		fmt.Println("   " + line)
	}
	fmt.Printf("== RunPodSandbox + CreateContainer + StartContainer to first log line: %v\n", firstLog.Round(time.Millisecond))

	stop := time.Now()
	env.StopRemovePod(tb, podID)
	fmt.Printf("== pod stopped and removed in %v; tearing down containerd and %s\n", time.Since(stop).Round(time.Millisecond), binary)
}
