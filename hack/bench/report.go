package main

import (
	"bytes"
	"encoding/csv"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kuasar-go/kuasar-go/hack/bench/stats"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

type results struct {
	machine    []string // "key: value" lines
	series     []series // in the run's order (replot: in the CSVs' order)
	startup    []sample
	memory     []memRow
	wasm       []wasmStart
	ctrMem     []ctrMem // --ctr-mem
	mainRun    bool     // the startup or memory part ran (under one containerd)
	wall       time.Duration
	incomplete bool
}

// describeMachine returns what the results depend on.
func describeMachine(c config, hs []string) []string {
	first := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return "unknown (" + err.Error() + ")"
		}
		return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	model, virt := "unknown", "no hypervisor flag"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok {
				k, v = strings.TrimSpace(k), strings.TrimSpace(v)
				if k == "model name" && model == "unknown" {
					model = v
				}
				if k == "flags" && strings.Contains(" "+v+" ", " hypervisor ") {
					virt = "virtual machine (hypervisor flag)"
				}
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	mem := "unknown"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0]); len(f) >= 2 {
			if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				mem = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
			}
		}
	}
	rev := "unknown"
	if root, err := testenv.RepoRoot(); err == nil {
		rev = first("git", "-C", root, "describe", "--always", "--dirty")
	}
	out := []string{
		fmt.Sprintf("CPU: %d × %s (%s)", goruntime.NumCPU(), model, virt),
		"memory: " + mem,
		"kernel: " + strings.TrimSpace(string(kernel)),
		"runc: " + first("/usr/bin/runc", "--version"),
		"containerd: " + first(testenv.Binary("containerd"), "--version"),
	}
	for _, h := range hs {
		switch h {
		case kuasar:
			out = append(out, fmt.Sprintf("runc-sandboxer: %s (kuasar-go %s)", first(testenv.Binary(c.sandboxer), "--version"), rev))
		case wasm:
			out = append(out, fmt.Sprintf("wasm-sandboxer: %s (kuasar-go %s)", first(testenv.Binary("wasm-sandboxer"), "--version"), rev))
		case quark:
			out = append(out, fmt.Sprintf("quark-sandboxer: %s (kuasar-go %s)", first(testenv.Binary("quark-sandboxer"), "--version"), rev),
				"runsc: "+first(testenv.Binary("runsc"), "--version"))
		}
	}
	return append(out, "Go: "+goruntime.Version())
}

func (r *results) byMode(rt, mode string) []sample {
	var out []sample
	for _, s := range r.startup {
		if s.Runtime == rt && s.Mode == mode {
			out = append(out, s)
		}
	}
	return out
}

func totals(ss []sample) []float64 {
	var out []float64
	for _, s := range ss {
		out = append(out, s.ms())
	}
	return out
}

func (r *results) memRow(rt string, n int) (memRow, bool) {
	for _, m := range r.memory {
		if m.Runtime == rt && m.Pods == n {
			return m, true
		}
	}
	return memRow{}, false
}

func (r *results) podCounts() []int {
	var out []int
	seen := map[int]bool{}
	for _, m := range r.memory {
		if !seen[m.Pods] {
			seen[m.Pods] = true
			out = append(out, m.Pods)
		}
	}
	sort.Ints(out)
	return out
}

// others are the series compared with the shim (all but the shim).
func others(ss []series) []series {
	var out []series
	for _, s := range ss {
		if s.Handler != shim {
			out = append(out, s)
		}
	}
	return out
}

func f1(x float64) string {
	if math.IsNaN(x) {
		return "–"
	}
	return strconv.FormatFloat(x, 'f', 1, 64)
}

func f2(x float64) string {
	if math.IsNaN(x) {
		return "–"
	}
	return strconv.FormatFloat(x, 'f', 2, 64)
}

// whatCounted says which processes the memory of a handler sums.
var whatCounted = map[string]string{
	kuasar: "kuasar-runc: the runc-sandboxer daemon + one kuasar-holder per pod.",
	shim:   "runc shim: one containerd-shim-runc-v2 per pod + its pause process.",
	wasm: "kuasar-wasm: the wasm-sandboxer daemon + one kuasar-holder per pod; the containers' module processes " +
		"(`kuasar-wasm <container> <module>`, the engine running the module) are the workload, not counted, and shown apart.",
	quark: "kuasar-quark (gVisor): the quark-sandboxer daemon; per pod the runsc-sandbox process (the Sentry) with its descendants, the platform's stub processes " +
		"(systrap's or ptrace's holders of the applications' address spaces: the pause and the container's processes run inside the Sentry, " +
		"not as host processes; their memory is mapped by the Sentry and the stubs and counted there) " +
		"and the pod's runsc-gofer; per container one more runsc-gofer, the kuasar-runsc-wait waiter (the daemon's binary) and its `runsc wait` child.",
}

// title names the run.
func (r *results) title() string {
	if len(r.startup) == 0 && len(r.memory) == 0 && len(r.wasm) > 0 {
		return "Wasm cold and warm start"
	}
	if len(r.startup) == 0 && len(r.memory) == 0 && len(r.ctrMem) > 0 {
		return "Per-container memory: wasm and native"
	}
	if len(r.series) == 2 && hasShim(r.series) && hasHandler(r.series, kuasar) {
		return "kuasar-runc vs containerd's runc shim"
	}
	var ls []string
	for _, s := range r.series {
		ls = append(ls, s.Label())
	}
	if len(ls) == 0 {
		return "kuasar-go benchmark"
	}
	return "Pod start and memory: " + strings.Join(ls, ", ")
}

// markdown renders the tables.
func (r *results) markdown(c config) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	ratio := hasShim(r.series)
	var handlerList []string
	for _, s := range r.series {
		handlerList = append(handlerList, fmt.Sprintf("`%s`", s.Name))
	}
	w("# %s", r.title())
	w("")
	w("Run %s, %v in all%s.", time.Now().UTC().Format("2006-01-02 15:04 UTC"), r.wall.Round(time.Second),
		map[bool]string{true: " — INCOMPLETE (a step failed; partial results)", false: ""}[r.incomplete])
	if len(r.startup) > 0 || len(r.memory) > 0 {
		w("One containerd v2.2 with the series %s; same CNI bridge; busybox containers (the WASI test program for wasm).", strings.Join(handlerList, ", "))
	}
	w("")
	for _, l := range r.machine {
		w("- %s", l)
	}
	if len(r.startup) > 0 || len(r.memory) > 0 {
		w("- flags: runtime %s, serial %d, parallel %d batches × %d, warm-up %d, pod counts %s, poll %v, settle %v, memory samples %d, log level %s",
			c.runtimes, c.serial, c.batches, c.parallel, c.warmup, joinInts(c.podCounts), c.poll, c.settle, c.memSamples, c.logLevel)
	}
	if len(r.wasm) > 0 {
		w("- wasm cold/warm flags: engines %s, cold rounds %d, warm starts %d, log level %s", strings.Join(c.wasmEngines, ","), c.wasmCold, c.wasmWarm, c.logLevel)
	}
	if len(r.ctrMem) > 0 {
		w("- per-container memory flags: engines %s, containers %d, runc shim %v, settle %v, memory samples %d", strings.Join(c.wasmEngines, ","), c.ctrMem, c.ctrMemShim, c.settle, c.memSamples)
	}
	w("")

	if len(r.startup) > 0 {
		w("## Pod start latency")
		w("")
		w("RunPodSandbox + CreateContainer + StartContainer until the container's first log line (ms; nearest-rank percentiles). The series take turns pod by pod (serial) and batch by batch (parallel).")
		w("")
		r.seriesHeader(w, "| mode | percentile |", "|---|---|", []string{"%s (ms)"}, ratio)
		for _, mode := range []string{"serial", "parallel"} {
			ms := map[string][]float64{}
			var ns []string
			any := false
			for _, s := range r.series {
				ms[s.Name] = totals(r.byMode(s.Name, mode))
				ns = append(ns, strconv.Itoa(len(ms[s.Name])))
				any = any || len(ms[s.Name]) > 0
			}
			if !any {
				continue
			}
			name := fmt.Sprintf("%s (n=%s)", mode, strings.Join(ns, "/"))
			if mode == "parallel" {
				name = fmt.Sprintf("parallel, %d at once (n=%s)", c.parallel, strings.Join(ns, "/"))
			}
			for _, p := range []float64{50, 90, 99} {
				row := fmt.Sprintf("| %s | p%g |", name, p)
				for _, s := range r.series {
					row += " " + f1(stats.Percentile(ms[s.Name], p)) + " |"
				}
				if ratio {
					sp := stats.Percentile(ms[shim], p)
					for _, s := range others(r.series) {
						row += " " + f2(stats.Ratio(stats.Percentile(ms[s.Name], p), sp)) + " |"
					}
				}
				w("%s", row)
				name = ""
			}
		}
		w("")
		w("Where the time goes (median of each phase, ms; medians do not add up exactly):")
		w("")
		w("| mode | runtime | RunPodSandbox | CreateContainer | StartContainer | first log after StartContainer | total |")
		w("|---|---|--:|--:|--:|--:|--:|")
		for _, mode := range []string{"serial", "parallel"} {
			for _, s := range r.series {
				ss := r.byMode(s.Name, mode)
				if len(ss) == 0 {
					continue
				}
				var a, cr, st, lg []float64
				for _, x := range ss {
					a = append(a, msOf(x.RunPod))
					cr = append(cr, msOf(x.Create))
					st = append(st, msOf(x.Start))
					lg = append(lg, msOf(x.LogAfterStart))
				}
				w("| %s | %s | %s | %s | %s | %s | %s |", mode, s.Label(),
					f1(stats.Median(a)), f1(stats.Median(cr)), f1(stats.Median(st)), f1(stats.Median(lg)), f1(stats.Median(totals(ss))))
			}
		}
		w("")
		w("Teardown, not part of the latency above (median ms):")
		w("")
		w("| mode | runtime | StopPodSandbox | RemovePodSandbox |")
		w("|---|---|--:|--:|")
		for _, mode := range []string{"serial", "parallel"} {
			for _, s := range r.series {
				ss := r.byMode(s.Name, mode)
				if len(ss) == 0 {
					continue
				}
				var st, rm []float64
				for _, x := range ss {
					st = append(st, msOf(x.StopPod))
					rm = append(rm, msOf(x.RemovePod))
				}
				w("| %s | %s | %s | %s |", mode, s.Label(), f1(stats.Median(st)), f1(stats.Median(rm)))
			}
		}
		w("")
	}

	if len(r.memory) > 0 {
		w("## Memory of the pod management processes")
		w("")
		w("Summed PSS (`/proc/<pid>/smaps_rollup`) with N pods running, each with one container that sleeps. Counted:")
		w("")
		for _, h := range handlers(r.series) {
			w("- %s", whatCounted[h])
		}
		w("")
		w("The containers' own processes are not counted; neither is containerd. One series is measured at a time.")
		w("")
		r.seriesHeader(w, "| pods |", "|--:|", []string{"%s total (MiB)", "per pod (MiB)"}, ratio)
		for _, n := range r.podCounts() {
			tot := map[string]float64{}
			row := fmt.Sprintf("| %d |", n)
			for _, s := range r.series {
				t := math.NaN()
				if m, ok := r.memRow(s.Name, n); ok {
					t = float64(m.TotalPSS())
				}
				tot[s.Name] = t
				row += fmt.Sprintf(" %s | %s |", f1(t/1024), f2(t/1024/float64(n)))
			}
			if ratio {
				for _, s := range others(r.series) {
					row += " " + f2(stats.Ratio(tot[s.Name], tot[shim])) + " |"
				}
			}
			w("%s", row)
		}
		w("")
		var fits []string
		for _, s := range r.series {
			var x, y []float64
			for _, m := range r.memory {
				if m.Runtime == s.Name {
					x = append(x, float64(m.Pods))
					y = append(y, float64(m.TotalPSS()))
				}
			}
			if b0, slope, ok := stats.LinearFit(x, y); ok {
				fits = append(fits, fmt.Sprintf("%s %.2f MiB per extra pod + %.1f MiB fixed", s.Label(), slope/1024, b0/1024))
			}
		}
		if len(fits) > 0 {
			w("Least-squares line through the totals: %s.", strings.Join(fits, "; "))
			w("")
		}
		why := ""
		if hasHandler(r.series, wasm) {
			why = " (a wasm module process is kuasar-wasm-runner, or the wasm-sandboxer binary re-executed where the runner is missing: then the more pods, the more of the daemon's pages PSS puts on the containers)"
		}
		w("Breakdown (PSS MiB, process count). The containers' own processes are not counted; they are shown apart, and with the counted ones, because PSS divides the pages a counted process shares with them between both%s:", why)
		w("")
		for _, s := range r.series {
			rows := 0
			for _, n := range r.podCounts() {
				if _, ok := r.memRow(s.Name, n); ok {
					rows++
				}
			}
			if rows == 0 {
				continue
			}
			classes := procClasses[s.Handler]
			w("%s:", s.Label())
			w("")
			hdr, sep := "| pods |", "|--:|"
			for _, pc := range classes {
				hdr += " " + pc.Label + " |"
				sep += "--:|"
			}
			w("%s containers (not counted) | counted + containers |", hdr)
			w("%s--:|--:|", sep)
			for _, n := range r.podCounts() {
				m, ok := r.memRow(s.Name, n)
				if !ok {
					continue
				}
				row := fmt.Sprintf("| %d |", n)
				for _, pc := range classes {
					cl, _ := m.class(pc.Key)
					row += fmt.Sprintf(" %.1f (%d) |", float64(cl.PSS)/1024, cl.Count)
				}
				w("%s %.1f (%d) | %.1f |", row, float64(m.WorkloadPSS)/1024, m.Workloads, float64(m.TotalPSS()+m.WorkloadPSS)/1024)
			}
			w("")
		}
	}

	if len(r.wasm) > 0 {
		w("## Wasm cold and warm start")
		w("")
		w("A hello-world container (the WASI test program printing \"hello\"; native: the same Go program built for Linux, under runc-sandboxer) in a pod that already runs: CreateContainer + StartContainer until CRI reports the exit. Cold: the first container of a module never compiled (a fresh containerd and daemons per round, so an empty compiled-module cache; native: the first container of the image); warm: the later containers of the first round's pod (module from the cache). Medians, ms.")
		w("")
		w("| kind | cold start median (n) | warm start median (n) | warm CreateContainer+StartContainer RPCs median |")
		w("|---|--:|--:|--:|")
		for _, k := range wasmKinds(c.wasmEngines) {
			var cold, warm, rpc []float64
			for _, s := range r.wasm {
				if s.Kind != k.Name {
					continue
				}
				if s.Cold {
					cold = append(cold, msOf(s.Total))
				} else {
					warm = append(warm, msOf(s.Total))
					rpc = append(rpc, msOf(s.RPC))
				}
			}
			if len(cold)+len(warm) == 0 {
				continue
			}
			w("| %s | %s (%d) | %s (%d) | %s |", k.Name, f1(stats.Median(cold)), len(cold), f1(stats.Median(warm)), len(warm), f1(stats.Median(rpc)))
		}
		w("")
	}
	if len(r.ctrMem) > 0 {
		r.ctrMemMarkdown(w, c)
	}
	return b.String()
}

func joinInts(xs []int) string {
	var s []string
	for _, x := range xs {
		s = append(s, strconv.Itoa(x))
	}
	return strings.Join(s, ",")
}

// write puts every output file under c.out and returns the Markdown.
func (r *results) write(c config) (string, error) {
	md := r.markdown(c)
	if err := os.WriteFile(filepath.Join(c.out, "results.md"), []byte(md), 0o644); err != nil {
		return "", err
	}
	// Each CSV when its part ran (a header only when it ran and failed).
	if len(r.startup) > 0 || !c.skipStart && r.mainRun {
		if err := writeCSV(filepath.Join(c.out, "startup.csv"), r.startupCSV()); err != nil {
			return "", err
		}
	}
	if len(r.memory) > 0 || !c.skipMemory && r.mainRun {
		if err := writeCSV(filepath.Join(c.out, "memory.csv"), r.memoryCSV()); err != nil {
			return "", err
		}
	}
	if len(r.wasm) > 0 {
		if err := writeCSV(filepath.Join(c.out, "wasm-start.csv"), r.wasmCSV()); err != nil {
			return "", err
		}
	}
	if len(r.ctrMem) > 0 {
		if err := writeCSV(filepath.Join(c.out, "container-memory.csv"), r.ctrMemCSV()); err != nil {
			return "", err
		}
	}
	if len(r.startup) > 0 {
		if err := r.plotStartup(filepath.Join(c.out, "startup-cdf.png"), c); err != nil {
			return "", fmt.Errorf("startup plot: %w", err)
		}
	}
	if len(r.memory) > 0 {
		if err := r.plotMemory(filepath.Join(c.out, "memory.png")); err != nil {
			return "", fmt.Errorf("memory plot: %w", err)
		}
	}
	return md, nil
}

func ms3(d time.Duration) string { return strconv.FormatFloat(msOf(d), 'f', 3, 64) }

func (r *results) startupCSV() [][]string {
	rows := [][]string{{"runtime", "mode", "batch", "index", "pod_id", "total_ms", "observed_ms",
		"runpod_ms", "create_ms", "start_ms", "log_after_start_ms", "stop_ms", "remove_ms"}}
	for _, s := range r.startup {
		rows = append(rows, []string{s.Runtime, s.Mode, strconv.Itoa(s.Batch), strconv.Itoa(s.Index), s.PodID,
			ms3(s.Total), ms3(s.Observed), ms3(s.RunPod), ms3(s.Create), ms3(s.Start), ms3(s.LogAfterStart), ms3(s.StopPod), ms3(s.RemovePod)})
	}
	return rows
}

func (r *results) memoryCSV() [][]string {
	rows := [][]string{{"runtime", "pods", "total_pss_kib", "per_pod_pss_kib", "manager_pss_kib", "helper_pss_kib",
		"managers", "helpers", "total_rss_kib", "workload_processes_excluded", "workload_pss_kib", "classes"}}
	for _, m := range r.memory {
		var cls []string
		for _, c := range m.Classes {
			cls = append(cls, fmt.Sprintf("%s:%d:%d:%d", c.Name, c.Count, c.PSS, c.RSS))
		}
		rows = append(rows, []string{m.Runtime, strconv.Itoa(m.Pods), strconv.FormatInt(m.TotalPSS(), 10),
			strconv.FormatFloat(float64(m.TotalPSS())/float64(m.Pods), 'f', 1, 64),
			strconv.FormatInt(m.ManagerPSS(), 10), strconv.FormatInt(m.HelperPSS(), 10),
			strconv.Itoa(m.Managers()), strconv.Itoa(m.Helpers()), strconv.FormatInt(m.TotalRSS(), 10), strconv.Itoa(m.Workloads),
			strconv.FormatInt(m.WorkloadPSS, 10), strings.Join(cls, ";")})
	}
	return rows
}

// parseClasses reads memory.csv's classes column (name:count:pss:rss;...).
func parseClasses(s string) ([]memClass, error) {
	var out []memClass
	for _, f := range splitListSep(s, ";") {
		p := strings.Split(f, ":")
		if len(p) != 4 {
			return nil, fmt.Errorf("bad class %q", f)
		}
		c := memClass{Name: p[0]}
		var err1, err2, err3 error
		c.Count, err1 = strconv.Atoi(p[1])
		c.PSS, err2 = strconv.ParseInt(p[2], 10, 64)
		c.RSS, err3 = strconv.ParseInt(p[3], 10, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("bad class %q: %w", f, err)
		}
		out = append(out, c)
	}
	return out, nil
}

func splitListSep(s, sep string) []string {
	var out []string
	for _, f := range strings.Split(s, sep) {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func (r *results) wasmCSV() [][]string {
	rows := [][]string{{"kind", "round", "start", "index", "total_ms", "rpc_ms"}}
	for _, s := range r.wasm {
		start := "warm"
		if s.Cold {
			start = "cold"
		}
		rows = append(rows, []string{s.Kind, strconv.Itoa(s.Round), start, strconv.Itoa(s.Index), ms3(s.Total), ms3(s.RPC)})
	}
	return rows
}

func writeCSV(path string, rows [][]string) error {
	var buf bytes.Buffer
	w := csv.NewWriter(&buf)
	if err := w.WriteAll(rows); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// seriesHeader writes a table's header: the leading columns, then cols for
// each series (a %s in a column names the series), then a ratio column for
// each series but the shim when ratio is set.
func (r *results) seriesHeader(w func(string, ...any), hdr, sep string, cols []string, ratio bool) {
	for _, s := range r.series {
		for _, c := range cols {
			if strings.Contains(c, "%s") {
				c = fmt.Sprintf(c, s.Label())
			}
			hdr += " " + c + " |"
			sep += "--:|"
		}
	}
	if ratio {
		for _, s := range others(r.series) {
			hdr += fmt.Sprintf(" %s / shim |", s.Label())
			sep += "--:|"
		}
	}
	w("%s", hdr)
	w("%s", sep)
}
