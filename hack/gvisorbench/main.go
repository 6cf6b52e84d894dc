// Command gvisorbench compares pod start latency through CRI of
// quark-sandboxer's gVisor engine (handler "kuasar-quark") with
// runc-sandboxer (handler "kuasar-runc"), both behind ONE containerd in one
// run, with the same image, CNI and machine. It is a benchmark, not a test.
//
//	go run ./hack/gvisorbench [--runs 20] [--warmup 2] [--platform systrap]
//
// Each round starts one pod with one container per handler (in alternating
// order) and measures RunPodSandbox, and RunPodSandbox + CreateContainer +
// StartContainer until the container's first log line; the pod is then
// stopped and removed (timed too). It prints a Markdown table of medians
// and 90th percentiles. It needs root and `make build tools`.
package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

const (
	gvisor = "kuasar-quark"
	runc   = "kuasar-runc"
)

type sample struct{ pod, first, teardown time.Duration }

func main() {
	runs := flag.Int("runs", 20, "timed pods per handler")
	warmup := flag.Int("warmup", 2, "untimed pods per handler first")
	platform := flag.String("platform", "systrap", "gVisor platform: systrap or ptrace (kvm hangs on the machines this was written on)")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "gvisorbench: must run as root")
		os.Exit(1)
	}
	r := testenv.NewRunner("gvisorbench", os.Stderr)
	if err := r.Run(func(tb testing.TB) { bench(tb, *runs, *warmup, *platform) }); err != nil {
		fmt.Fprintln(os.Stderr, "gvisorbench:", err)
		os.Exit(1)
	}
}

func bench(tb testing.TB, runs, warmup int, platform string) {
	quark, runsc, runcSB := testenv.Binary("quark-sandboxer"), testenv.Binary("runsc"), testenv.Binary("runc-sandboxer")
	testenv.RequireFiles(tb, quark, runsc, runcSB)
	env := testenv.Start(tb, testenv.Options{
		Sandboxers: []testenv.Sandboxer{
			{Name: gvisor, Binary: quark, ConfigTOML: fmt.Sprintf("log_level = \"info\"\n[gvisor]\nbinary = %q\nplatform = %q\n", runsc, platform), Args: []string{"--log-level", "info"}},
			{Name: runc, Binary: runcSB, Args: []string{"--log-level", "info"}},
		},
		LogLevel: "info",
	})
	samples := map[string][]sample{}
	for i := 0; i < warmup+runs; i++ {
		order := []string{gvisor, runc}
		if i%2 == 1 {
			order = []string{runc, gvisor}
		}
		for _, h := range order {
			s := one(tb, env, h)
			if i >= warmup {
				samples[h] = append(samples[h], s)
			}
		}
		fmt.Fprintf(os.Stderr, "round %d/%d done\n", i+1, warmup+runs)
	}
	fmt.Printf("Pod start through CRI, containerd 2.2, %d pods per handler after %d warm-up (gVisor platform %s; host kernel %s):\n\n", runs, warmup, platform, hostKernel())
	fmt.Println("| handler | RunPodSandbox median | p90 | pod + container to first log line median | p90 | stop + remove pod median |")
	fmt.Println("|---|---|---|---|---|---|")
	for _, h := range []string{gvisor, runc} {
		pod, first, down := column(samples[h], func(s sample) time.Duration { return s.pod }),
			column(samples[h], func(s sample) time.Duration { return s.first }),
			column(samples[h], func(s sample) time.Duration { return s.teardown })
		name := h + " (runc)"
		if h == gvisor {
			name = h + " (gVisor)"
		}
		fmt.Printf("| %s | %v | %v | %v | %v | %v |\n", name, ms(pct(pod, 50)), ms(pct(pod, 90)), ms(pct(first, 50)), ms(pct(first, 90)), ms(pct(down, 50)))
	}
}

// one runs a pod with a container until its first log line, then removes it.
func one(tb testing.TB, env *testenv.Env, handler string) sample {
	var s sample
	podCfg := env.PodConfig()
	t0 := time.Now()
	podID := env.RunPod(tb, handler, podCfg)
	s.pod = time.Since(t0)
	ctr := testenv.ContainerConfig("bench", "sh", "-c", "echo first-line; exec sleep 3600")
	env.CreateStartContainer(tb, podID, podCfg, ctr)
	log := testenv.LogFile(podCfg, ctr)
	for deadline := time.Now().Add(30 * time.Second); ; {
		if b, _ := os.ReadFile(log); strings.Contains(string(b), "first-line") {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s: no first log line within 30s", handler)
		}
		time.Sleep(time.Millisecond)
	}
	s.first = time.Since(t0)
	t1 := time.Now()
	env.StopRemovePod(tb, podID)
	s.teardown = time.Since(t1)
	return s
}

func column(ss []sample, f func(sample) time.Duration) []time.Duration {
	out := make([]time.Duration, len(ss))
	for i, s := range ss {
		out[i] = f(s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// pct is the nearest-rank percentile of sorted durations.
func pct(sorted []time.Duration, p int) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := (p*len(sorted)+99)/100 - 1
	if i < 0 {
		i = 0
	}
	return sorted[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }

func hostKernel() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}
