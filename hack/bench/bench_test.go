package main

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func names(ss []series) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Name)
	}
	return out
}

func TestParseSeries(t *testing.T) {
	ss, err := parseSeries("kuasar-runc,runc", "wasmtime", "systrap")
	if err != nil || !reflect.DeepEqual(names(ss), []string{"kuasar-runc", "runc"}) {
		t.Fatalf("default: %v %v", names(ss), err)
	}
	ss, err = parseSeries(" kuasar-wasm,kuasar-runc,kuasar-quark,kuasar-runc", "wazero, wasmtime", "systrap,ptrace")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"kuasar-wasm/wazero", "kuasar-wasm/wasmtime", "kuasar-runc", "kuasar-quark/systrap", "kuasar-quark/ptrace"}
	if !reflect.DeepEqual(names(ss), want) {
		t.Fatalf("got %v, want %v", names(ss), want)
	}
	if got := ss[0].annotations()[wasmEngineAnnotation]; got != "wazero" {
		t.Errorf("wasm engine annotation %q", got)
	}
	if got := ss[4].annotations()[gvisorPlatformAnnotation]; got != "ptrace" {
		t.Errorf("gVisor platform annotation %q", got)
	}
	if ss[2].annotations() != nil {
		t.Errorf("kuasar-runc has annotations")
	}
	if ss[0].container().Image.Image == ss[2].container().Image.Image {
		t.Errorf("wasm series runs the busybox image")
	}
	if !reflect.DeepEqual(handlers(ss), []string{wasm, kuasar, quark}) || hasShim(ss) {
		t.Errorf("handlers %v, shim %v", handlers(ss), hasShim(ss))
	}
	for _, bad := range [][3]string{{"kuasar-vmm", "a", "b"}, {"", "a", "b"}, {"kuasar-wasm", "", "b"}, {"kuasar-quark", "a", " "}, {"kuasar-wasm", "a/b", "c"}} {
		if _, err := parseSeries(bad[0], bad[1], bad[2]); err == nil {
			t.Errorf("parseSeries(%q) accepted", bad)
		}
	}
}

func TestLabels(t *testing.T) {
	for name, want := range map[string]string{
		"kuasar-runc":          "kuasar-runc",
		"runc":                 "runc shim + pause",
		"kuasar-wasm/wazero":   "kuasar-wasm (wazero)",
		"kuasar-quark/systrap": "kuasar-quark (gVisor systrap)",
	} {
		if got := seriesOf(name).Label(); got != want {
			t.Errorf("%s: label %q, want %q", name, got, want)
		}
	}
}

func TestOrderRotates(t *testing.T) {
	ss, _ := parseSeries("kuasar-runc,runc", "", "")
	if got := names(order(ss, 1)); !reflect.DeepEqual(got, []string{"runc", "kuasar-runc"}) {
		t.Errorf("two series must alternate: %v", got)
	}
	ss, _ = parseSeries("kuasar-runc,runc,kuasar-wasm", "a", "")
	firsts := map[string]bool{}
	for i := 0; i < 3; i++ {
		o := order(ss, i)
		if len(o) != 3 {
			t.Fatalf("order %v", names(o))
		}
		firsts[o[0].Name] = true
	}
	if len(firsts) != 3 {
		t.Errorf("every series should go first once in three rounds: %v", firsts)
	}
}

// A process tree as quark-sandboxer leaves it with one pod of one
// container (from ps on a real run), plus kuasar-runc's and the shim's.
func TestAssignClasses(t *testing.T) {
	procs := []proc{
		{pid: 10, ppid: 1, argv: []string{"quark-sandboxer", "--listen", "/x/kuasar-quark.sock"}},
		{pid: 11, ppid: 10, argv: []string{"runsc-gofer", "gofer"}},
		{pid: 12, ppid: 10, argv: []string{"runsc-sandbox", "boot"}},
		{pid: 13, ppid: 12, comm: "exe"},
		{pid: 14, ppid: 13, comm: "exe"},
		{pid: 15, ppid: 10, argv: []string{"runsc-gofer", "gofer"}},
		{pid: 16, ppid: 10, argv: []string{"kuasar-runsc-wait", "/bin/runsc", "wait", "c"}},
		{pid: 17, ppid: 16, argv: []string{"/bin/runsc", "wait", "c"}},
		{pid: 18, ppid: 10, argv: []string{"runc", "kill"}},         // a passing runc call: not counted
		{pid: 99, ppid: 1, argv: []string{"runsc-sandbox", "boot"}}, // another daemon's
	}
	got := assign(quark, procs, map[int]bool{10: true})
	want := map[int]string{10: "daemon", 11: "gofer", 12: "sentry", 13: "stub", 14: "stub", 15: "gofer", 16: "waiter", 17: "runsc-wait", 18: ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("quark: got %v, want %v", got, want)
	}

	procs = []proc{
		{pid: 20, ppid: 1, argv: []string{"wasm-sandboxer"}},
		{pid: 21, ppid: 20, argv: []string{"kuasar-holder"}},
		{pid: 22, ppid: 20, argv: []string{"kuasar-wasm", "c", "/app.wasm"}},
		{pid: 23, ppid: 22, argv: []string{"kuasar-holder"}}, // below a workload: a workload
	}
	got = assign(wasm, procs, map[int]bool{20: true})
	want = map[int]string{20: "daemon", 21: "holder", 22: "", 23: ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("wasm: got %v, want %v", got, want)
	}

	procs = []proc{
		{pid: 30, ppid: 1, argv: []string{"containerd-shim-runc-v2"}},
		{pid: 31, ppid: 30, comm: "pause", argv: []string{"/pause"}},
		{pid: 32, ppid: 30, comm: "sleep"},
		{pid: 40, ppid: 1, argv: []string{"containerd-shim-runc-v2"}},
		{pid: 41, ppid: 40, comm: "pause"},
	}
	got = assign(shim, procs, map[int]bool{30: true, 40: true})
	want = map[int]string{30: "shim", 31: "pause", 32: "", 40: "shim", 41: "pause"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("shim: got %v, want %v", got, want)
	}
}

func TestCheckCounts(t *testing.T) {
	m := memRow{Classes: []memClass{{Name: "daemon", Count: 1}, {Name: "sentry", Count: 2}, {Name: "stub", Count: 9},
		{Name: "gofer", Count: 4}, {Name: "waiter", Count: 2}, {Name: "runsc-wait", Count: 2}}}
	if bad := checkCounts(quark, m, 2); bad != "" {
		t.Errorf("2 pods: %s", bad)
	}
	if bad := checkCounts(quark, m, 3); !strings.Contains(bad, "runsc-gofer (want 6)") {
		t.Errorf("3 pods: %q", bad)
	}
}

func testResults(ss []series) *results {
	r := &results{series: ss}
	for i, s := range ss {
		for k := 1; k <= 10; k++ {
			d := time.Duration((i+1)*k) * time.Millisecond
			r.startup = append(r.startup, sample{Runtime: s.Name, Mode: "serial", Index: k, Total: d, RunPod: d / 2},
				sample{Runtime: s.Name, Mode: "parallel", Index: k % 5, Batch: k / 5, Total: 3 * d})
		}
		for _, n := range []int{1, 5} {
			var cls []memClass
			for j, pc := range procClasses[s.Handler] {
				cls = append(cls, memClass{Name: pc.Key, PSS: int64(1024 * (i + 1) * (j + 1) * n), Count: n})
			}
			r.memory = append(r.memory, memRow{Runtime: s.Name, Pods: n, Classes: cls, Workloads: n, WorkloadPSS: 512})
		}
	}
	return r
}

func TestMarkdownRatiosOnlyWithShim(t *testing.T) {
	c := config{parallel: 5, podCounts: []int{1, 5}}
	ss, _ := parseSeries("kuasar-runc,runc", "", "")
	md := testResults(ss).markdown(c)
	for _, want := range []string{
		"# kuasar-runc vs containerd's runc shim",
		"| mode | percentile | kuasar-runc (ms) | runc shim + pause (ms) | kuasar-runc / shim |",
		"| serial (n=10/10) | p50 | 5.0 | 10.0 | 0.50 |",
		"| pods | kuasar-runc total (MiB) | per pod (MiB) | runc shim + pause total (MiB) | per pod (MiB) | kuasar-runc / shim |",
		"| 1 | 3.0 | 3.00 | 6.0 | 6.00 | 0.50 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("missing %q in:\n%s", want, md)
		}
	}

	ss, _ = parseSeries("kuasar-runc,kuasar-wasm,kuasar-quark", "wazero", "systrap")
	md = testResults(ss).markdown(c)
	if strings.Contains(md, "/ shim") {
		t.Errorf("ratios without the shim:\n%s", md)
	}
	for _, want := range []string{
		"| mode | percentile | kuasar-runc (ms) | kuasar-wasm (wazero) (ms) | kuasar-quark (gVisor systrap) (ms) |",
		"| pods | quark-sandboxer daemon | runsc-sandbox (Sentry) | Sentry's stub processes | runsc-gofer | kuasar-runsc-wait | runsc wait | containers (not counted) | counted + containers |",
		"kuasar-quark (gVisor): the quark-sandboxer daemon",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("missing %q in:\n%s", want, md)
		}
	}
}

func TestWriteAndReplot(t *testing.T) {
	dir := t.TempDir()
	ss, _ := parseSeries("kuasar-runc,runc,kuasar-wasm,kuasar-quark", "wasmtime,wazero", "systrap")
	r := testResults(ss)
	r.mainRun = true
	r.wasm = []wasmStart{{Kind: "wasm (wazero)", Cold: true, Total: time.Second}, {Kind: "wasm (wazero)", Index: 1, Total: 90 * time.Millisecond, RPC: 80 * time.Millisecond}}
	c := config{out: dir, parallel: 5, podCounts: []int{1, 5}, wasmEngines: []string{"wasmtime", "wazero"}}
	md, err := r.write(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(md, "| wasm (wazero) | 1000.0 (1) | 90.0 (1) | 80.0 |") {
		t.Errorf("wasm table missing:\n%s", md)
	}
	for _, f := range []string{"results.md", "startup.csv", "memory.csv", "wasm-start.csv", "startup-cdf.png", "memory.png"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Error(err)
		}
	}
	os.Remove(filepath.Join(dir, "memory.png"))
	if err := replot(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "memory.png")); err != nil {
		t.Error(err)
	}
	rows, err := readCSV(filepath.Join(dir, "memory.csv"))
	if err != nil {
		t.Fatal(err)
	}
	cls, err := parseClasses(rows[len(rows)-1]["classes"])
	if err != nil || !reflect.DeepEqual(cls, r.memory[len(r.memory)-1].Classes) {
		t.Errorf("classes round trip: %v %v", cls, err)
	}
}

func TestWasmColdOnly(t *testing.T) {
	dir := t.TempDir()
	ss, _ := parseSeries("kuasar-runc,runc", "", "")
	r := &results{series: ss, wasm: []wasmStart{{Kind: "native (runc)", Cold: true, Total: time.Second}}}
	c := config{out: dir, skipStart: true, skipMemory: true, wasmCold: 1, wasmEngines: []string{"wazero"}}
	md, err := r.write(c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(md, "# Wasm cold and warm start") || strings.Contains(md, "serial") {
		t.Errorf("cold-only report:\n%s", md)
	}
	for _, f := range []string{"startup.csv", "memory.csv"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("%s written without a startup or memory part", f)
		}
	}
}
