// Command bench measures pod start latency and the memory of the pod
// management processes of the kuasar-go sandboxers and of containerd's own
// runc shim with a pause container, all under ONE containerd, with the
// same CNI and machine. By default it compares runc-sandboxer (CRI handler
// "kuasar-runc") with the shim (handler "runc"); --runtime adds or chooses
// wasm-sandboxer ("kuasar-wasm", one series per engine) and quark-sandboxer's
// gVisor engine ("kuasar-quark", one series per platform). --wasm-cold N
// adds the cold/warm start of a hello-world wasm container per engine;
// --ctr-mem N the memory of N containers of one long-running program per
// wasm engine and as a native container (runc-sandboxer, runc shim).
//
//	go run ./hack/bench --out DIR [--quick] [--runtime kuasar-runc,runc,kuasar-wasm,kuasar-quark] [flags]
//
// It needs root and `make build tools`. Results go to DIR: results.md,
// startup.csv, memory.csv, startup-cdf.png, memory.png (and wasm-start.csv);
// the Markdown is also printed to stdout, progress to stderr. See
// docs/performance.md.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

type config struct {
	out        string
	quick      bool
	serial     int
	parallel   int
	batches    int
	warmup     int
	podCounts  []int
	poll       time.Duration
	settle     time.Duration
	memSamples int
	timeout    time.Duration
	logLevel   string
	sandboxer  string
	skipStart  bool
	skipMemory bool
	keepLogs   bool
	replot     bool

	runtimes    string // --runtime as given
	series      []series
	wasmEngines []string
	platforms   string
	wasmCold    int
	wasmWarm    int
	ctrMem      int
	ctrMemShim  bool
	vmm         int
	vmmCounts   []int
}

// stopping is set by SIGINT/SIGTERM: the loops end, the harness tears down.
var stopping atomic.Bool

func main() {
	var c config
	var counts, engines, vmmCounts string
	flag.StringVar(&c.out, "out", "", "output directory (created); required")
	flag.StringVar(&c.runtimes, "runtime", kuasar+","+shim, "comma-separated CRI runtime handlers measured in one run: kuasar-runc, runc (containerd's shim + pause; ratios are given against it), kuasar-wasm, kuasar-quark")
	flag.StringVar(&engines, "wasm-engines", "wasmtime,wazero", "kuasar-wasm and --wasm-cold: one series per engine, chosen per pod by the annotation "+wasmEngineAnnotation)
	flag.StringVar(&c.platforms, "gvisor-platforms", "systrap", "kuasar-quark: one series per gVisor platform (systrap, ptrace, kvm), chosen per pod by the annotation "+gvisorPlatformAnnotation)
	flag.IntVar(&c.wasmCold, "wasm-cold", 0, "if > 0: the wasm cold/warm start section, N cold rounds (each a fresh containerd and daemons: empty module cache) per engine and for the native program under runc-sandboxer")
	flag.IntVar(&c.wasmWarm, "wasm-warm", 10, "warm starts per kind in the first --wasm-cold round")
	flag.IntVar(&c.ctrMem, "ctr-mem", 0, "if > 0: the per-container memory section: N containers of the same long-running program in one pod per wasm engine of --wasm-engines, and the same program built for Linux under runc-sandboxer (and containerd's runc shim, see --ctr-mem-shim); PSS, anonymous and private memory of each container's processes")
	flag.BoolVar(&c.ctrMemShim, "ctr-mem-shim", true, "--ctr-mem: also the native program under containerd's runc shim (the shim and pause of its pod reported apart)")
	flag.IntVar(&c.vmm, "vmm", 0, "if > 0: the VM pod section: N pods under vmm-sandboxer started one after another (RunPodSandbox to first output, split into VM boot, the rest of the pod's start and the container's start), then the daemon's PSS with --vmm-pod-counts pods running; needs make guest")
	flag.StringVar(&vmmCounts, "vmm-pod-counts", "1,5,10", "--vmm: numbers of running VM pods at which the daemon's memory is measured")
	flag.BoolVar(&c.quick, "quick", false, "small run (under two minutes): --serial 20 --parallel 5 --batches 2 --pod-counts 1,5,10 --warmup 1 --settle 1s --mem-samples 2, unless those flags are given")
	flag.IntVar(&c.serial, "serial", 100, "pods per runtime started one after another")
	flag.IntVar(&c.parallel, "parallel", 20, "pods per batch started at once")
	flag.IntVar(&c.batches, "batches", 5, "parallel batches per runtime")
	flag.IntVar(&c.warmup, "warmup", 2, "untimed pods per runtime before the startup runs")
	flag.StringVar(&counts, "pod-counts", "1,5,10,20,50", "comma-separated numbers of running pods at which memory is measured")
	flag.DurationVar(&c.poll, "poll", 2*time.Millisecond, "how often the container log is polled for the first line")
	flag.DurationVar(&c.settle, "settle", 2*time.Second, "wait after starting pods before measuring memory")
	flag.IntVar(&c.memSamples, "mem-samples", 3, "memory samples per pod count (500ms apart; the median total is kept)")
	flag.DurationVar(&c.timeout, "timeout", 60*time.Second, "limit for one pod to show its first log line")
	flag.StringVar(&c.logLevel, "log-level", "info", "log level of containerd and the sandboxers (the shim follows containerd)")
	flag.StringVar(&c.sandboxer, "sandboxer", "runc-sandboxer", "kuasar-runc's sandboxer binary in _output/bin")
	flag.BoolVar(&c.skipStart, "skip-startup", false, "skip the startup latency runs")
	flag.BoolVar(&c.skipMemory, "skip-memory", false, "skip the memory runs")
	flag.BoolVar(&c.keepLogs, "keep-logs", false, "copy the containerd and sandboxer logs to DIR/logs before teardown")
	flag.BoolVar(&c.replot, "replot", false, "only redraw the PNGs in --out DIR from its CSVs (no root needed)")
	flag.Parse()

	if c.quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		def := func(name string, apply func()) {
			if !set[name] {
				apply()
			}
		}
		def("serial", func() { c.serial = 20 })
		def("parallel", func() { c.parallel = 5 })
		def("batches", func() { c.batches = 2 })
		def("pod-counts", func() { counts = "1,5,10" })
		def("warmup", func() { c.warmup = 1 })
		def("settle", func() { c.settle = time.Second })
		def("mem-samples", func() { c.memSamples = 2 })
	}
	if c.out == "" {
		fatalf("--out DIR is required")
	}
	if c.replot {
		if err := replot(c.out); err != nil {
			fatalf("replot: %v", err)
		}
		return
	}
	var err error
	if c.podCounts, err = parseCounts(counts); err != nil {
		fatalf("--pod-counts: %v", err)
	}
	if c.vmmCounts, err = parseCounts(vmmCounts); err != nil {
		fatalf("--vmm-pod-counts: %v", err)
	}
	if c.series, err = parseSeries(c.runtimes, engines, c.platforms); err != nil {
		fatalf("--runtime: %v", err)
	}
	c.wasmEngines = splitList(engines)
	if (c.wasmCold > 0 || c.ctrMem > 0) && len(c.wasmEngines) == 0 {
		fatalf("--wasm-cold, --ctr-mem: no --wasm-engines given")
	}
	if c.serial < 0 || c.parallel < 1 || c.batches < 0 || c.warmup < 0 || c.memSamples < 1 || c.poll <= 0 || c.wasmCold < 0 || c.wasmWarm < 0 || c.ctrMem < 0 || c.vmm < 0 {
		fatalf("bad flags: --serial, --batches, --warmup, --wasm-cold, --wasm-warm and --ctr-mem must be >= 0, --parallel and --mem-samples >= 1, --poll > 0")
	}
	if c.skipStart && c.skipMemory && c.wasmCold == 0 && c.ctrMem == 0 && c.vmm == 0 {
		fatalf("nothing to do: --skip-startup, --skip-memory and no --wasm-cold, --ctr-mem or --vmm")
	}
	if os.Geteuid() != 0 {
		fatalf("must run as root: it starts containerd, creates namespaces, cgroups, mounts and network devices (try: sudo make bench)")
	}
	if err := os.MkdirAll(c.out, 0o755); err != nil {
		fatalf("%v", err)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "bench: %v: stopping after the current step, then tearing down (again to abort without cleanup)\n", s)
		stopping.Store(true)
		<-sigs
		os.Exit(130)
	}()

	began := time.Now()
	res := &results{incomplete: true, series: c.series}
	var runErr error
	if !c.skipStart || !c.skipMemory {
		res.mainRun = true
		r := testenv.NewRunner("bench", os.Stderr)
		runErr = r.Run(func(tb testing.TB) { run(tb, c, res) })
	}
	if runErr == nil && c.wasmCold > 0 {
		res.incomplete = true
		runErr = wasmCold(c, res)
		if runErr == nil {
			res.incomplete = false
		}
	}
	if runErr == nil && c.ctrMem > 0 {
		res.incomplete = true
		runErr = ctrMemRun(c, res)
		if runErr == nil {
			res.incomplete = false
		}
	}
	if runErr == nil && c.vmm > 0 {
		var vr *vmmResults
		if vr, runErr = vmmRun(c, c.vmmCounts); len(vr.starts) > 0 {
			md, err := vr.report(c.out)
			if err != nil {
				fmt.Fprintln(os.Stderr, "bench: write VM results:", err)
				os.Exit(1)
			}
			fmt.Print(md)
		}
	}
	if len(res.startup) > 0 || len(res.memory) > 0 || len(res.wasm) > 0 || len(res.ctrMem) > 0 {
		res.wall = time.Since(began)
		md, err := res.write(c)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench: write results:", err)
			os.Exit(1)
		}
		fmt.Print(md)
		fmt.Fprintf(os.Stderr, "bench: results in %s (%v in all)\n", c.out, res.wall.Round(time.Second))
	}
	if runErr != nil {
		fmt.Fprintln(os.Stderr, "bench:", runErr)
		os.Exit(1)
	}
}

func fatalf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", a...)
	os.Exit(2)
}

func parseCounts(s string) ([]int, error) {
	var out []int
	seen := map[int]bool{}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	sort.Ints(out)
	return out, nil
}

// sandboxers are the daemons the series need (the shim needs none).
func sandboxers(c config) []testenv.Sandboxer {
	var out []testenv.Sandboxer
	for _, h := range handlers(c.series) {
		switch h {
		case kuasar:
			out = append(out, testenv.Sandboxer{
				Name:   kuasar,
				Binary: testenv.Binary(c.sandboxer),
				// After the harness's --log-level debug: the last one wins.
				Args: []string{"--log-level", c.logLevel},
			})
		case wasm:
			out = append(out, wasmSandboxer(testenv.Binary("wasm-sandboxer"), c.logLevel, c.wasmEngines))
		case quark:
			// The gVisor engine with the first platform as the default;
			// each series names its own by annotation.
			out = append(out, testenv.Sandboxer{
				Name:   quark,
				Binary: testenv.Binary("quark-sandboxer"),
				ConfigTOML: fmt.Sprintf("log_level = %q\nengine = \"gvisor\"\n[gvisor]\nbinary = %q\nplatform = %q\n",
					c.logLevel, testenv.Binary("runsc"), splitList(c.platforms)[0]),
				Args: []string{"--log-level", c.logLevel},
			})
		}
	}
	return out
}

// run starts containerd with the series' handlers and runs the benchmarks
// into res, which keeps what was measured when a later step fails, so
// partial results are still written.
func run(tb testing.TB, c config, res *results) {
	sbs := sandboxers(c)
	var need []string
	for _, sb := range sbs {
		need = append(need, sb.Binary)
	}
	for _, h := range handlers(c.series) {
		if h == quark {
			need = append(need, testenv.Binary("runsc"))
		}
	}
	testenv.RequireFiles(tb, need...)
	var wasmTar []byte
	var ignore []string
	if hasHandler(c.series, wasm) {
		var err error
		if wasmTar, err = testenv.WasmImageTar(); err != nil {
			tb.Fatalf("bench: build %s: %v", testenv.WasmImage, err)
		}
		ignore = wasmLeakIgnore
	}
	env := testenv.Start(tb, testenv.Options{
		Sandboxers:   sbs,
		LogLevel:     c.logLevel,
		StartTimeout: 60 * time.Second,
		LeakIgnore:   ignore,
	})
	if wasmTar != nil {
		env.ImportImage(tb, wasmTar, testenv.WasmImage)
	}
	res.machine = describeMachine(c, handlers(c.series))
	if c.keepLogs {
		// Registered after Start's teardown, so it runs before it.
		tb.Cleanup(func() {
			dir := filepath.Join(c.out, "logs")
			_ = os.MkdirAll(dir, 0o755)
			names := []string{"containerd"}
			for _, sb := range sbs {
				names = append(names, sb.Name)
			}
			for _, name := range names {
				if b, err := os.ReadFile(env.LogPath(name)); err == nil {
					_ = os.WriteFile(filepath.Join(dir, name+".log"), b, 0o644)
				}
			}
		})
	}
	tb.Logf("bench: containerd and %d sandboxers up under %s; series: %s", len(sbs), env.Dir, seriesNames(c.series))
	b := &bench{env: env, tb: tb, c: c}
	before := env.Snapshot()

	if !c.skipStart {
		b.warm()
		b.serial(res)
		b.parallelRuns(res)
	}
	if !c.skipMemory {
		for _, s := range c.series {
			b.memory(s, res)
		}
	}
	res.incomplete = false

	// Hygiene: everything the pods made is gone again (teardown is partly
	// asynchronous, hence the wait).
	env.AssertNoLeaks(tb, before, 30*time.Second)
}

func hasHandler(ss []series, h string) bool {
	for _, x := range handlers(ss) {
		if x == h {
			return true
		}
	}
	return false
}

func seriesNames(ss []series) string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Name)
	}
	return strings.Join(out, ", ")
}
