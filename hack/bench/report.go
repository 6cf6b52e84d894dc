package main

import (
	"bytes"
	"encoding/csv"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"
	"time"

	"github.com/kuasar-go/kuasar-go/hack/bench/stats"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

type results struct {
	machine    []string // "key: value" lines
	startup    []sample
	memory     []memRow
	wall       time.Duration
	incomplete bool
}

// describeMachine returns what the results depend on.
func describeMachine(sandboxer string) []string {
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
	return []string{
		fmt.Sprintf("CPU: %d × %s (%s)", goruntime.NumCPU(), model, virt),
		"memory: " + mem,
		"kernel: " + strings.TrimSpace(string(kernel)),
		"runc: " + first("/usr/bin/runc", "--version"),
		"containerd: " + first(testenv.Binary("containerd"), "--version"),
		fmt.Sprintf("runc-sandboxer: %s (kuasar-go %s)", first(sandboxer, "--version"), rev),
		"Go: " + goruntime.Version(),
	}
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

// markdown renders the tables.
func (r *results) markdown(c config) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	w("# kuasar-runc vs containerd's runc shim")
	w("")
	w("Run %s, %v in all%s. One containerd v2.2 with both CRI handlers: `kuasar-runc` (runc-sandboxer) and `runc` (containerd-shim-runc-v2 with a pause container); same busybox image, same CNI bridge.",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), r.wall.Round(time.Second),
		map[bool]string{true: " — INCOMPLETE (a step failed; partial results)", false: ""}[r.incomplete])
	w("")
	for _, l := range r.machine {
		w("- %s", l)
	}
	w("- flags: serial %d, parallel %d batches × %d, warm-up %d, pod counts %s, poll %v, settle %v, memory samples %d, log level %s",
		c.serial, c.batches, c.parallel, c.warmup, joinInts(c.podCounts), c.poll, c.settle, c.memSamples, c.logLevel)
	w("")

	if len(r.startup) > 0 {
		w("## Pod start latency")
		w("")
		w("RunPodSandbox + CreateContainer + StartContainer until the container's first log line (ms; nearest-rank percentiles). The two runtimes alternate pod by pod (serial) and batch by batch (parallel).")
		w("")
		w("| mode | percentile | kuasar-runc (ms) | runc shim + pause (ms) | kuasar / shim |")
		w("|---|---|--:|--:|--:|")
		for _, mode := range []string{"serial", "parallel"} {
			k, s := totals(r.byMode(kuasar, mode)), totals(r.byMode(shim, mode))
			if len(k) == 0 && len(s) == 0 {
				continue
			}
			name := fmt.Sprintf("%s (n=%d/%d)", mode, len(k), len(s))
			if mode == "parallel" {
				name = fmt.Sprintf("parallel, %d at once (n=%d/%d)", c.parallel, len(k), len(s))
			}
			for _, p := range []float64{50, 90, 99} {
				kp, sp := stats.Percentile(k, p), stats.Percentile(s, p)
				w("| %s | p%g | %s | %s | %s |", name, p, f1(kp), f1(sp), f2(stats.Ratio(kp, sp)))
				name = ""
			}
		}
		w("")
		w("Where the time goes (median of each phase, ms; medians do not add up exactly):")
		w("")
		w("| mode | runtime | RunPodSandbox | CreateContainer | StartContainer | first log after StartContainer | total |")
		w("|---|---|--:|--:|--:|--:|--:|")
		for _, mode := range []string{"serial", "parallel"} {
			for _, rt := range runtimes {
				ss := r.byMode(rt, mode)
				if len(ss) == 0 {
					continue
				}
				var a, cr, st, lg []float64
				for _, s := range ss {
					a = append(a, msOf(s.RunPod))
					cr = append(cr, msOf(s.Create))
					st = append(st, msOf(s.Start))
					lg = append(lg, msOf(s.LogAfterStart))
				}
				w("| %s | %s | %s | %s | %s | %s | %s |", mode, label(rt),
					f1(stats.Median(a)), f1(stats.Median(cr)), f1(stats.Median(st)), f1(stats.Median(lg)), f1(stats.Median(totals(ss))))
			}
		}
		w("")
		w("Teardown, not part of the latency above (median ms):")
		w("")
		w("| mode | runtime | StopPodSandbox | RemovePodSandbox |")
		w("|---|---|--:|--:|")
		for _, mode := range []string{"serial", "parallel"} {
			for _, rt := range runtimes {
				ss := r.byMode(rt, mode)
				if len(ss) == 0 {
					continue
				}
				var st, rm []float64
				for _, s := range ss {
					st = append(st, msOf(s.StopPod))
					rm = append(rm, msOf(s.RemovePod))
				}
				w("| %s | %s | %s | %s |", mode, label(rt), f1(stats.Median(st)), f1(stats.Median(rm)))
			}
		}
		w("")
	}

	if len(r.memory) > 0 {
		w("## Memory of the pod management processes")
		w("")
		w("Summed PSS (`/proc/<pid>/smaps_rollup`) with N pods running, each with one sleeping container. kuasar-runc: the runc-sandboxer daemon + one kuasar-holder per pod. runc shim: one containerd-shim-runc-v2 per pod + its pause process. The containers' own processes are not counted; neither is containerd.")
		w("")
		w("| pods | kuasar-runc total (MiB) | per pod (MiB) | runc shim + pause total (MiB) | per pod (MiB) | kuasar / shim |")
		w("|--:|--:|--:|--:|--:|--:|")
		for _, n := range r.podCounts() {
			k, okK := r.memRow(kuasar, n)
			s, okS := r.memRow(shim, n)
			kt, st := math.NaN(), math.NaN()
			if okK {
				kt = float64(k.TotalPSS())
			}
			if okS {
				st = float64(s.TotalPSS())
			}
			w("| %d | %s | %s | %s | %s | %s |", n, f1(kt/1024), f2(kt/1024/float64(n)), f1(st/1024), f2(st/1024/float64(n)), f2(stats.Ratio(kt, st)))
		}
		w("")
		var fits []string
		for _, rt := range runtimes {
			var x, y []float64
			for _, m := range r.memory {
				if m.Runtime == rt {
					x = append(x, float64(m.Pods))
					y = append(y, float64(m.TotalPSS()))
				}
			}
			if b0, slope, ok := stats.LinearFit(x, y); ok {
				fits = append(fits, fmt.Sprintf("%s %.2f MiB per extra pod + %.1f MiB fixed", label(rt), slope/1024, b0/1024))
			}
		}
		if len(fits) > 0 {
			w("Least-squares line through the totals: %s.", strings.Join(fits, "; "))
			w("")
		}
		w("Breakdown (PSS MiB, process count):")
		w("")
		w("| pods | runc-sandboxer daemon | kuasar-holders | containerd-shim-runc-v2 | pause |")
		w("|--:|--:|--:|--:|--:|")
		for _, n := range r.podCounts() {
			k, okK := r.memRow(kuasar, n)
			s, okS := r.memRow(shim, n)
			cell := func(ok bool, kib int64, cnt int) string {
				if !ok {
					return "–"
				}
				return fmt.Sprintf("%.1f (%d)", float64(kib)/1024, cnt)
			}
			w("| %d | %s | %s | %s | %s |", n, cell(okK, k.ManagerPSS, k.Managers), cell(okK, k.HelperPSS, k.Helpers),
				cell(okS, s.ManagerPSS, s.Managers), cell(okS, s.HelperPSS, s.Helpers))
		}
		w("")
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
	if err := writeCSV(filepath.Join(c.out, "startup.csv"), r.startupCSV()); err != nil {
		return "", err
	}
	if err := writeCSV(filepath.Join(c.out, "memory.csv"), r.memoryCSV()); err != nil {
		return "", err
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
		"managers", "helpers", "total_rss_kib", "workload_processes_excluded"}}
	for _, m := range r.memory {
		rows = append(rows, []string{m.Runtime, strconv.Itoa(m.Pods), strconv.FormatInt(m.TotalPSS(), 10),
			strconv.FormatFloat(float64(m.TotalPSS())/float64(m.Pods), 'f', 1, 64),
			strconv.FormatInt(m.ManagerPSS, 10), strconv.FormatInt(m.HelperPSS, 10),
			strconv.Itoa(m.Managers), strconv.Itoa(m.Helpers), strconv.FormatInt(m.TotalRSS(), 10), strconv.Itoa(m.Workloads)})
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
