package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// memClass is the summed memory of one kind of management process.
type memClass struct {
	Name     string // a procClass key
	PSS, RSS int64  // KiB
	Count    int
}

// memRow is the management memory of one series with some pods running.
type memRow struct {
	Runtime string // series name
	Pods    int
	// Classes in the family's order; the first is the manager (the
	// sandboxer daemon, or the shims), the rest are per-pod helpers.
	Classes []memClass
	// Workloads are the other descendants of the managers (the
	// containers' own processes): not counted, reported apart.
	Workloads   int
	WorkloadPSS int64 // KiB
}

func (m memRow) TotalPSS() int64 {
	var n int64
	for _, c := range m.Classes {
		n += c.PSS
	}
	return n
}

func (m memRow) TotalRSS() int64 {
	var n int64
	for _, c := range m.Classes {
		n += c.RSS
	}
	return n
}

func (m memRow) class(name string) (memClass, bool) {
	for _, c := range m.Classes {
		if c.Name == name {
			return c, true
		}
	}
	return memClass{}, false
}

// ManagerPSS, HelperPSS, Managers and Helpers split the total into the
// first class and the others (memory.csv's columns).
func (m memRow) ManagerPSS() int64 {
	if len(m.Classes) == 0 {
		return 0
	}
	return m.Classes[0].PSS
}

func (m memRow) HelperPSS() int64 { return m.TotalPSS() - m.ManagerPSS() }

func (m memRow) Managers() int {
	if len(m.Classes) == 0 {
		return 0
	}
	return m.Classes[0].Count
}

func (m memRow) Helpers() int {
	n := 0
	for _, c := range m.Classes[min(1, len(m.Classes)):] {
		n += c.Count
	}
	return n
}

// procClass is a kind of process a family's memory counts.
type procClass struct {
	Key   string // in memory.csv's classes column
	Label string // table header
	// Want is the expected count with n pods of one container each; -1
	// for no expectation.
	Want func(n int) int
}

func exactlyOne(int) int { return 1 }
func perPod(n int) int   { return n }
func anyCount(int) int   { return -1 }

// families: what each runtime handler's memory counts. Classes[0] is the
// manager, found by findManagers; the managers' descendants get a class
// from classify, given their parent's class ("" for a workload, whose
// descendants are workloads too).
var procClasses = map[string][]procClass{
	kuasar: {
		{"daemon", "runc-sandboxer daemon", exactlyOne},
		{"holder", "kuasar-holder", perPod},
	},
	shim: {
		{"shim", "containerd-shim-runc-v2", perPod},
		{"pause", "pause", perPod},
	},
	wasm: {
		{"daemon", "wasm-sandboxer daemon", exactlyOne},
		{"holder", "kuasar-holder", perPod},
	},
	quark: {
		{"daemon", "quark-sandboxer daemon", exactlyOne},
		{"sentry", "runsc-sandbox (Sentry)", perPod},
		{"stub", "Sentry's stub processes", anyCount},
		{"gofer", "runsc-gofer", func(n int) int { return 2 * n }},
		{"waiter", "kuasar-runsc-wait", perPod},
		{"runsc-wait", "runsc wait", perPod},
	},
}

func classLabel(handler, key string) string {
	for _, c := range procClasses[handler] {
		if c.Key == key {
			return c.Label
		}
	}
	return key
}

// classify names the class of a descendant of the managers of handler,
// given its parent's class; "" is a workload (not counted).
func classify(handler string, p proc, parent string) string {
	arg0 := ""
	if len(p.argv) > 0 {
		arg0 = p.argv[0]
	}
	switch handler {
	case kuasar, wasm:
		// The pod's namespace holder (shared/holder). A wasm pod's module
		// processes (the engines' runners, which runc starts as
		// containers) and compile children are the workload.
		if parent == "daemon" && arg0 == "kuasar-holder" {
			return "holder"
		}
	case shim:
		// The local pause image's /pause.
		if parent == "shim" && p.comm == "pause" {
			return "pause"
		}
	case quark:
		// quark-sandboxer/gvisor: runsc's sandbox (Sentry) and gofer
		// processes are re-parented to the daemon (a child subreaper) when
		// `runsc create` exits; the waiter is the daemon's binary
		// re-executed as "kuasar-runsc-wait", whose child is `runsc wait`.
		// The Sentry's descendants (the platform's stub processes, systrap's
		// or ptrace's, which hold the address spaces of the sandbox's
		// applications) are counted as stubs.
		switch parent {
		case "daemon":
			switch arg0 {
			case "runsc-sandbox":
				return "sentry"
			case "runsc-gofer":
				return "gofer"
			case "kuasar-runsc-wait":
				return "waiter"
			}
		case "sentry", "stub":
			return "stub"
		case "waiter":
			return "runsc-wait"
		}
	}
	return ""
}

// memory runs s's pods up to each pod count, measures, and removes them.
func (b *bench) memory(s series, res *results) {
	var pods []*pod
	defer func() {
		if err := b.stopPods(pods); err != nil {
			b.tb.Errorf("bench: %s: remove memory pods: %v", s.Name, err)
		}
	}()
	for _, n := range b.c.podCounts {
		t0 := time.Now()
		for len(pods) < n {
			b.checkStop()
			p, err := b.startPod(s)
			if p != nil {
				pods = append(pods, p)
			}
			if err != nil {
				b.tb.Fatalf("bench: %s: memory pod %d: %v", s.Name, len(pods)+1, err)
			}
		}
		started := time.Since(t0)
		time.Sleep(b.c.settle)
		var rows []memRow
		for k := 0; k < b.c.memSamples; k++ {
			if k > 0 {
				time.Sleep(500 * time.Millisecond)
			}
			m, err := b.measure(s.Handler, listProcs())
			if err != nil {
				b.tb.Fatalf("bench: %s: measure: %v", s.Name, err)
			}
			m.Runtime, m.Pods = s.Name, n
			rows = append(rows, m)
		}
		// The sample with the median total (Go daemons breathe with GC).
		sort.Slice(rows, func(i, j int) bool { return rows[i].TotalPSS() < rows[j].TotalPSS() })
		m := rows[(len(rows)-1)/2]
		if bad := checkCounts(s.Handler, m, n); bad != "" {
			b.tb.Logf("bench: WARNING: %s with %d pods: %s", s.Name, n, bad)
		}
		res.memory = append(res.memory, m)
		var counts []string
		for _, c := range m.Classes {
			counts = append(counts, strconv.Itoa(c.Count))
		}
		b.tb.Logf("bench: memory %s %d pods: %.1f MiB PSS (%s processes; pods started in %v)",
			s.Name, n, float64(m.TotalPSS())/1024, strings.Join(counts, "+"), started.Round(time.Millisecond))
	}
}

// checkCounts compares the process counts with what n pods should have.
func checkCounts(handler string, m memRow, n int) string {
	var bad []string
	for _, pc := range procClasses[handler] {
		want := pc.Want(n)
		got, _ := m.class(pc.Key)
		if want >= 0 && got.Count != want {
			bad = append(bad, fmt.Sprintf("%d %s (want %d)", got.Count, pc.Label, want))
		}
	}
	return strings.Join(bad, ", ")
}

// proc is what /proc says about a process.
type proc struct {
	pid, ppid int
	comm      string
	argv      []string
}

func (p proc) cmdline() string { return strings.Join(p.argv, " ") }

func listProcs() []proc {
	var out []proc
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		i, j := bytes.IndexByte(stat, '('), bytes.LastIndexByte(stat, ')')
		if i < 0 || j < i {
			continue
		}
		f := strings.Fields(string(stat[j+1:]))
		if len(f) < 2 || f[0] == "Z" {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		cl, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		var argv []string
		if len(cl) > 0 {
			argv = strings.Split(strings.TrimRight(string(cl), "\x00"), "\x00")
		}
		out = append(out, proc{pid: pid, ppid: ppid, comm: string(stat[i+1 : j]), argv: argv})
	}
	return out
}

// errGone is a process that ended between listing and reading.
var errGone = errors.New("process gone")

// rollup is a process's /proc/<pid>/smaps_rollup, in KiB.
type rollup struct {
	PSS, RSS int64
	// Anon is Anonymous: (the process's heap, stacks, anonymous mappings,
	// and copied-on-write pages of private file mappings).
	Anon int64
	// Private is Private_Clean + Private_Dirty (USS): what only this
	// process maps, freed if it ended.
	Private int64
}

// smapsRollup returns a process's Pss and Rss in KiB.
func smapsRollup(pid int) (pss, rss int64, err error) {
	r, err := readRollup(pid)
	return r.PSS, r.RSS, err
}

// readRollup reads a process's smaps_rollup.
func readRollup(pid int) (rollup, error) {
	var r rollup
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return r, errGone
	}
	if err != nil {
		return r, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	found := false
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		v, err := strconv.ParseInt(fs[1], 10, 64)
		if err != nil {
			continue
		}
		switch fs[0] {
		case "Pss:":
			r.PSS, found = v, true
		case "Rss:":
			r.RSS = v
		case "Anonymous:":
			r.Anon = v
		case "Private_Clean:", "Private_Dirty:":
			r.Private += v
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, syscall.ESRCH) {
			return rollup{}, errGone
		}
		return rollup{}, err
	}
	if !found {
		// A kernel thread, or a process that exited while read.
		return rollup{}, errGone
	}
	return r, nil
}

// managers finds handler's manager processes: the sandboxer daemon (the
// benchmark's child with its --listen socket on its command line), or every
// containerd-shim-runc-v2 whose command line names this containerd's
// -address.
func (b *bench) managers(handler string, procs []proc) (map[int]bool, error) {
	out := map[int]bool{}
	if handler == shim {
		for _, p := range procs {
			if len(p.argv) > 0 && filepath.Base(p.argv[0]) == "containerd-shim-runc-v2" &&
				strings.Contains(p.cmdline(), "-address "+b.env.Address) {
				out[p.pid] = true
			}
		}
		return out, nil
	}
	sock := b.env.SandboxerSockets[handler]
	for _, p := range procs {
		if p.ppid == os.Getpid() && strings.Contains(p.cmdline(), "--listen "+sock) {
			out[p.pid] = true
		}
	}
	if len(out) != 1 {
		return nil, fmt.Errorf("found %d %s daemons listening on %s", len(out), handler, sock)
	}
	return out, nil
}

// assign gives each manager and each of their descendants its class
// (workloads: "").
func assign(handler string, procs []proc, managers map[int]bool) map[int]string {
	children := map[int][]proc{}
	for _, p := range procs {
		children[p.ppid] = append(children[p.ppid], p)
	}
	out := map[int]string{}
	var queue []int
	top := procClasses[handler][0].Key
	for pid := range managers {
		out[pid] = top
		queue = append(queue, pid)
	}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		for _, c := range children[pid] {
			if _, done := out[c.pid]; done || managers[c.pid] {
				continue
			}
			cl := ""
			if parent := out[pid]; parent != "" {
				cl = classify(handler, c, parent)
			}
			out[c.pid] = cl
			queue = append(queue, c.pid)
		}
	}
	return out
}

// measure sums the PSS of handler's management processes (see procClasses
// and classify); the containers' own processes are summed apart.
func (b *bench) measure(handler string, procs []proc) (memRow, error) {
	var m memRow
	mgrs, err := b.managers(handler, procs)
	if err != nil {
		return m, err
	}
	classes := assign(handler, procs, mgrs)
	idx := map[string]int{}
	for i, pc := range procClasses[handler] {
		idx[pc.Key] = i
		m.Classes = append(m.Classes, memClass{Name: pc.Key})
	}
	for pid, cl := range classes {
		pss, rss, err := smapsRollup(pid)
		if errors.Is(err, errGone) {
			continue
		}
		if err != nil {
			return m, err
		}
		if cl == "" {
			m.Workloads++
			m.WorkloadPSS += pss
			continue
		}
		c := &m.Classes[idx[cl]]
		c.PSS += pss
		c.RSS += rss
		c.Count++
	}
	return m, nil
}
