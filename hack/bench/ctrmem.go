package main

import (
	"errors"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/hack/bench/stats"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The per-container memory section (--ctr-mem N): N containers of the same
// long-running program (the WASI test program sleeping until killed) in
// one pod, per wasm engine, and the same Go program built for Linux as a
// native container under runc-sandboxer and under containerd's runc shim,
// all in one run. A container's memory is the summed smaps_rollup of the
// processes of its cgroup (the cgroup path names the container): the
// module process for wasm, the program itself for native containers. The
// sandboxer daemons and holders serve every container and are not
// counted; the shim's pod costs (containerd-shim-runc-v2 and its pause,
// one per pod) are reported apart.

// ctrMemKind is one row of the section.
type ctrMemKind struct {
	Name    string // "wasm (wasmtime)", "native (kuasar-runc)", "native (runc shim)"
	handler string
	engine  string // "" for native
	image   string
	cmd     string
}

func ctrMemKinds(engines []string, withShim bool) []ctrMemKind {
	var out []ctrMemKind
	for _, e := range engines {
		out = append(out, ctrMemKind{"wasm (" + e + ")", wasm, e, testenv.WasmImage, "/app.wasm"})
	}
	out = append(out, ctrMemKind{"native (kuasar-runc)", kuasar, "", testenv.WasmNativeImage, "/app"})
	if withShim {
		out = append(out, ctrMemKind{"native (runc shim)", shim, "", testenv.WasmNativeImage, "/app"})
	}
	return out
}

// ctrMem is the memory of one container (KiB), or, with Pod set, of the
// shim's per-pod processes.
type ctrMem struct {
	Kind  string
	Index int  // 1..N; 0 for the pod's shim + pause
	Pod   bool // the pod's shim processes, not a container
	Procs int
	rollup
}

// ctrMemRun runs the section under its own containerd.
func ctrMemRun(c config, res *results) error {
	t0 := time.Now()
	r := testenv.NewRunner("bench-ctr-mem", os.Stderr)
	if err := r.Run(func(tb testing.TB) { ctrMemRound(tb, c, res) }); err != nil {
		return fmt.Errorf("per-container memory: %w", err)
	}
	fmt.Fprintf(os.Stderr, "bench: per-container memory done (%v)\n", time.Since(t0).Round(time.Millisecond))
	return nil
}

func ctrMemRound(tb testing.TB, c config, res *results) {
	env := startWasmAndNative(tb, c, res)
	b := &bench{env: env, tb: tb, c: c}
	before := env.Snapshot()
	for _, k := range ctrMemKinds(c.wasmEngines, c.ctrMemShim) {
		if stopping.Load() {
			break
		}
		podCfg := env.PodConfig()
		if k.engine != "" {
			podCfg.Annotations = map[string]string{wasmEngineAnnotation: k.engine}
		}
		podID := env.RunPod(tb, k.handler, podCfg)
		ids := make([]string, c.ctrMem)
		for i := range ids {
			ctr := testenv.ContainerConfig(fmt.Sprintf("mem-%d", i+1))
			ctr.Image = &runtime.ImageSpec{Image: k.image}
			ctr.Command = []string{k.cmd}
			ctr.Args = []string{"echo", marker, "forever"}
			ids[i] = env.CreateStartContainer(tb, podID, podCfg, ctr)
			env.WaitLog(tb, podCfg, ctr, marker, c.timeout)
		}
		time.Sleep(c.settle)
		// The sample with the median sum (Go runtimes breathe with GC).
		var samples [][]ctrMem
		for s := 0; s < c.memSamples; s++ {
			if s > 0 {
				time.Sleep(500 * time.Millisecond)
			}
			ms, err := b.measureContainers(k, ids)
			if err != nil {
				tb.Fatalf("bench: %s: %v", k.Name, err)
			}
			samples = append(samples, ms)
		}
		sum := func(ms []ctrMem) (n int64) {
			for _, m := range ms {
				if !m.Pod {
					n += m.PSS
				}
			}
			return n
		}
		sort.SliceStable(samples, func(i, j int) bool { return sum(samples[i]) < sum(samples[j]) })
		ms := samples[(len(samples)-1)/2]
		res.ctrMem = append(res.ctrMem, ms...)
		pss := ctrMemOf(ms, k.Name, false, func(m ctrMem) int64 { return m.PSS })
		tb.Logf("bench: per-container memory %s: %d containers, median %.2f MiB PSS", k.Name, len(pss), stats.Median(pss)/1024)
		env.StopRemovePod(tb, podID)
	}
	env.AssertNoLeaks(tb, before, 30*time.Second)
}

// measureContainers reads the memory of each container of ids (the
// processes of its cgroup) and, for the runc shim, of the pod's shim and
// pause.
func (b *bench) measureContainers(k ctrMemKind, ids []string) ([]ctrMem, error) {
	procs := listProcs()
	cgroups := map[int]string{}
	for _, p := range procs {
		if cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.pid)); err == nil {
			cgroups[p.pid] = string(cg)
		}
	}
	var out []ctrMem
	for i, id := range ids {
		m := ctrMem{Kind: k.Name, Index: i + 1}
		for _, p := range procs {
			if !strings.Contains(cgroups[p.pid], id) {
				continue
			}
			r, err := readRollup(p.pid)
			if errors.Is(err, errGone) {
				continue
			}
			if err != nil {
				return nil, err
			}
			m.Procs++
			m.PSS, m.RSS, m.Anon, m.Private = m.PSS+r.PSS, m.RSS+r.RSS, m.Anon+r.Anon, m.Private+r.Private
		}
		if m.Procs == 0 {
			return nil, fmt.Errorf("container %.12s: no process in a cgroup naming it", id)
		}
		out = append(out, m)
	}
	if k.handler == shim {
		// One pod runs at a time: its shim is the only one of this
		// containerd; its children other than the containers' are the pause.
		mgrs, err := b.managers(shim, procs)
		if err != nil {
			return nil, err
		}
		inCtr := map[int]bool{}
		for _, p := range procs {
			for _, id := range ids {
				if strings.Contains(cgroups[p.pid], id) {
					inCtr[p.pid] = true
				}
			}
		}
		m := ctrMem{Kind: k.Name, Pod: true}
		for pid, cl := range assign(shim, procs, mgrs) {
			if cl == "" || inCtr[pid] {
				continue
			}
			r, err := readRollup(pid)
			if errors.Is(err, errGone) {
				continue
			}
			if err != nil {
				return nil, err
			}
			m.Procs++
			m.PSS, m.RSS, m.Anon, m.Private = m.PSS+r.PSS, m.RSS+r.RSS, m.Anon+r.Anon, m.Private+r.Private
		}
		out = append(out, m)
	}
	return out, nil
}

// ctrMemOf picks one figure of a kind's containers (pod false) or of its
// pod's shim processes (pod true).
func ctrMemOf(ms []ctrMem, kind string, pod bool, f func(ctrMem) int64) []float64 {
	var out []float64
	for _, m := range ms {
		if m.Kind == kind && m.Pod == pod {
			out = append(out, float64(f(m)))
		}
	}
	return out
}

func mib(kib float64) string { return strconv.FormatFloat(kib/1024, 'f', 2, 64) }

// ctrMemMarkdown is the section's report: medians per kind, then every
// container.
func (r *results) ctrMemMarkdown(w func(string, ...any), c config) {
	w("## Per-container memory")
	w("")
	w("%d containers of the same long-running program in one pod per kind (the WASI test program `/app.wasm echo %s forever`, sleeping; native: the same Go program built for Linux, `/app`). "+
		"A container's memory is the sum over the processes of its cgroup (wasm: the module process, kuasar-wasm-runner with the engine; native: the program), from `/proc/<pid>/smaps_rollup`: "+
		"PSS (shared pages divided among the processes mapping them, so with N containers of one image the shared text is split N ways), Anonymous, Private (Private_Clean + Private_Dirty, USS) and RSS. "+
		"Not counted: the sandboxer daemons and holders, which serve every container. MiB.", c.ctrMem, marker)
	w("")
	w("| kind | containers | PSS median | min | max | Anonymous median | Private median | RSS median | processes |")
	w("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
	kinds := ctrMemKinds(c.wasmEngines, c.ctrMemShim)
	for _, k := range kinds {
		pss := ctrMemOf(r.ctrMem, k.Name, false, func(m ctrMem) int64 { return m.PSS })
		if len(pss) == 0 {
			continue
		}
		lo, hi := pss[0], pss[0]
		for _, x := range pss {
			lo, hi = math.Min(lo, x), math.Max(hi, x)
		}
		w("| %s | %d | %s | %s | %s | %s | %s | %s | %s |", k.Name, len(pss), mib(stats.Median(pss)), mib(lo), mib(hi),
			mib(stats.Median(ctrMemOf(r.ctrMem, k.Name, false, func(m ctrMem) int64 { return m.Anon }))),
			mib(stats.Median(ctrMemOf(r.ctrMem, k.Name, false, func(m ctrMem) int64 { return m.Private }))),
			mib(stats.Median(ctrMemOf(r.ctrMem, k.Name, false, func(m ctrMem) int64 { return m.RSS }))),
			strconv.FormatFloat(stats.Median(ctrMemOf(r.ctrMem, k.Name, false, func(m ctrMem) int64 { return int64(m.Procs) })), 'f', 0, 64))
	}
	w("")
	for _, m := range r.ctrMem {
		if m.Pod {
			n := len(ctrMemOf(r.ctrMem, m.Kind, false, func(ctrMem) int64 { return 0 }))
			w("%s: the pod's containerd-shim-runc-v2 and pause (%d processes, not in the table) take %s MiB PSS (%s Anonymous, %s RSS) more, %s MiB per container with %d containers in the pod; the runc-sandboxer daemon and holder are not counted either.",
				m.Kind, m.Procs, mib(float64(m.PSS)), mib(float64(m.Anon)), mib(float64(m.RSS)), mib(float64(m.PSS)/float64(max(n, 1))), n)
			w("")
		}
	}
	w("Per container, PSS MiB (in start order):")
	w("")
	for _, k := range kinds {
		pss := ctrMemOf(r.ctrMem, k.Name, false, func(m ctrMem) int64 { return m.PSS })
		if len(pss) == 0 {
			continue
		}
		var xs []string
		for _, x := range pss {
			xs = append(xs, mib(x))
		}
		w("- %s: %s", k.Name, strings.Join(xs, ", "))
	}
	w("")
}

func (r *results) ctrMemCSV() [][]string {
	rows := [][]string{{"kind", "container", "processes", "pss_kib", "anon_kib", "private_kib", "rss_kib"}}
	for _, m := range r.ctrMem {
		idx := strconv.Itoa(m.Index)
		if m.Pod {
			idx = "pod"
		}
		rows = append(rows, []string{m.Kind, idx, strconv.Itoa(m.Procs), strconv.FormatInt(m.PSS, 10),
			strconv.FormatInt(m.Anon, 10), strconv.FormatInt(m.Private, 10), strconv.FormatInt(m.RSS, 10)})
	}
	return rows
}
