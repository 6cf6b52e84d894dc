package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// memRow is the management memory of one runtime with some pods running.
type memRow struct {
	Runtime string
	Pods    int
	// Manager: the runc-sandboxer daemon, or the containerd-shim-runc-v2
	// processes. Helper: the per-pod holders, or the pause processes.
	ManagerPSS, HelperPSS int64 // KiB
	ManagerRSS, HelperRSS int64 // KiB
	Managers, Helpers     int   // process counts
	Workloads             int   // other children of the managers (the containers' processes), not counted
}

func (m memRow) TotalPSS() int64 { return m.ManagerPSS + m.HelperPSS }
func (m memRow) TotalRSS() int64 { return m.ManagerRSS + m.HelperRSS }

// memory runs rt's pods up to each pod count, measures, and removes them.
func (b *bench) memory(rt string, res *results) {
	var pods []*pod
	defer func() {
		if err := b.stopPods(pods); err != nil {
			b.tb.Errorf("bench: %s: remove memory pods: %v", rt, err)
		}
	}()
	for _, n := range b.c.podCounts {
		t0 := time.Now()
		for len(pods) < n {
			b.checkStop()
			p, err := b.startPod(rt)
			if p != nil {
				pods = append(pods, p)
			}
			if err != nil {
				b.tb.Fatalf("bench: %s: memory pod %d: %v", rt, len(pods)+1, err)
			}
		}
		started := time.Since(t0)
		time.Sleep(b.c.settle)
		var rows []memRow
		for k := 0; k < b.c.memSamples; k++ {
			if k > 0 {
				time.Sleep(500 * time.Millisecond)
			}
			m, err := b.measure(rt)
			if err != nil {
				b.tb.Fatalf("bench: %s: measure: %v", rt, err)
			}
			m.Pods = n
			rows = append(rows, m)
		}
		// The sample with the median total (Go daemons breathe with GC).
		sort.Slice(rows, func(i, j int) bool { return rows[i].TotalPSS() < rows[j].TotalPSS() })
		m := rows[(len(rows)-1)/2]
		if want := wantProcs(rt, n); m.Helpers != n || m.Managers != want {
			b.tb.Logf("bench: WARNING: %s with %d pods: %d management and %d helper processes (want %d and %d)",
				rt, n, m.Managers, m.Helpers, want, n)
		}
		res.memory = append(res.memory, m)
		b.tb.Logf("bench: memory %s %d pods: %.1f MiB PSS (%d+%d processes; pods started in %v)",
			rt, n, float64(m.TotalPSS())/1024, m.Managers, m.Helpers, started.Round(time.Millisecond))
	}
}

func wantProcs(rt string, pods int) int {
	if rt == kuasar {
		return 1
	}
	return pods
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

// smapsRollup returns a process's Pss and Rss in KiB.
func smapsRollup(pid int) (pss, rss int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0, err
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
			pss, found = v, true
		case "Rss:":
			rss = v
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	if !found {
		return 0, 0, fmt.Errorf("no Pss in /proc/%d/smaps_rollup", pid)
	}
	return pss, rss, nil
}

// measure sums the PSS of rt's management processes:
//   - kuasar-runc: the runc-sandboxer daemon (our child, its --listen
//     socket on its command line) and its children named kuasar-holder;
//   - runc: every containerd-shim-runc-v2 whose command line names this
//     containerd's address, and their children whose comm is "pause" (the
//     local pause image's binary is /pause).
//
// The containers' own processes (children of the daemon or the shims too)
// are not counted.
func (b *bench) measure(rt string) (memRow, error) {
	m := memRow{Runtime: rt}
	procs := listProcs()
	managers := map[int]bool{}
	switch rt {
	case kuasar:
		sock := b.env.SandboxerSockets[kuasar]
		for _, p := range procs {
			if p.ppid == os.Getpid() && strings.Contains(p.cmdline(), "--listen "+sock) {
				managers[p.pid] = true
			}
		}
		if len(managers) != 1 {
			return m, fmt.Errorf("found %d runc-sandboxer daemons listening on %s", len(managers), sock)
		}
	case shim:
		for _, p := range procs {
			if len(p.argv) > 0 && filepath.Base(p.argv[0]) == "containerd-shim-runc-v2" &&
				strings.Contains(p.cmdline(), "-address "+b.env.Address) {
				managers[p.pid] = true
			}
		}
	}
	isHelper := func(p proc) bool {
		if rt == kuasar {
			return len(p.argv) > 0 && p.argv[0] == "kuasar-holder"
		}
		return p.comm == "pause"
	}
	add := func(pid int, pss, rss *int64) error {
		ps, rs, err := smapsRollup(pid)
		if err != nil {
			return err
		}
		*pss += ps
		*rss += rs
		return nil
	}
	for pid := range managers {
		if err := add(pid, &m.ManagerPSS, &m.ManagerRSS); err != nil {
			return m, err
		}
		m.Managers++
	}
	for _, p := range procs {
		if !managers[p.ppid] {
			continue
		}
		if !isHelper(p) {
			m.Workloads++
			continue
		}
		if err := add(p.pid, &m.HelperPSS, &m.HelperRSS); err != nil {
			return m, err
		}
		m.Helpers++
	}
	return m, nil
}
