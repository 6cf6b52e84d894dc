package main

import (
	"bufio"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// The VM pod section (--vmm N): N pods started one after another under
// vmm-sandboxer (QEMU; TCG where KVM does not work), each with a container
// that prints a line, timed from RunPodSandbox to that line and split into
// the VM's boot to its agent answering (the daemon's own measure), the rest
// of the pod's start (CNI, taps, virtiofsd, the guest's setup) and the
// container's start; then the PSS of the vmm-sandboxer daemon with
// --vmm-pod-counts pods running, and of each VM's QEMU and virtiofsd.

const vmmHandler = "kuasar-vmm"

// vmmStart is one pod's start.
type vmmStart struct {
	// RunPod is the RunPodSandbox call; Boot the daemon's VMM start to
	// agent answering, part of it.
	RunPod, Boot time.Duration
	// Container is CreateContainer + StartContainer; FirstOutput is from
	// the RunPodSandbox call to the container's first log line.
	Container, FirstOutput time.Duration
}

// vmmMem is the memory with Pods pods running.
type vmmMem struct {
	Pods int
	// DaemonPSS is the vmm-sandboxer daemon's; VMPSS the median per pod of
	// its QEMU and virtiofsd together (KiB).
	DaemonPSS, VMPSS int64
}

type vmmResults struct {
	starts []vmmStart
	mem    []vmmMem
}

// vmmRun runs the section under its own containerd.
func vmmRun(c config, counts []int) (*vmmResults, error) {
	res := &vmmResults{}
	r := testenv.NewRunner("bench-vmm", os.Stderr)
	err := r.Run(func(tb testing.TB) { vmmBench(tb, c, counts, res) })
	return res, err
}

func vmmBench(tb testing.TB, c config, counts []int, res *vmmResults) {
	out, err := testenv.OutputDir()
	if err != nil {
		tb.Fatal(err)
	}
	bin := testenv.Binary("vmm-sandboxer")
	kernel, initrd := filepath.Join(out, "guest", "vmlinuz"), filepath.Join(out, "guest", "initramfs.img")
	testenv.RequireFiles(tb, bin, kernel, initrd)
	env := testenv.Start(tb, testenv.Options{
		Sandboxers: []testenv.Sandboxer{{
			Name: vmmHandler, Binary: bin, Args: []string{"--log-level", c.logLevel},
			ConfigTOML: fmt.Sprintf("[guest]\nkernel = %q\ninitrd = %q\n", kernel, initrd),
		}},
		LogLevel:     c.logLevel,
		StartTimeout: 60 * time.Second,
	})
	before := env.Snapshot()
	daemonPID := env.DaemonPID(vmmHandler)

	// Startup: one pod at a time, removed before the next.
	for i := 0; i < c.vmm; i++ {
		if stopping.Load() {
			tb.Fatalf("interrupted")
		}
		id, s := vmmStartPod(tb, env, c, i)
		s.Boot = vmmBootTime(tb, env.LogPath(vmmHandler), id)
		res.starts = append(res.starts, s)
		env.StopRemovePod(tb, id)
		fmt.Fprintf(os.Stderr, "bench: vmm pod %d/%d: RunPodSandbox %v (boot to agent %v), container %v, first output %v\n",
			i+1, c.vmm, s.RunPod.Round(time.Millisecond), s.Boot.Round(time.Millisecond),
			s.Container.Round(time.Millisecond), s.FirstOutput.Round(time.Millisecond))
	}

	// Memory: pods added until each count is reached.
	var running []string
	for _, n := range counts {
		for len(running) < n {
			if stopping.Load() {
				tb.Fatalf("interrupted")
			}
			id, _ := vmmStartPod(tb, env, c, len(running)+1000)
			running = append(running, id)
		}
		time.Sleep(c.settle)
		m := vmmMem{Pods: n}
		if pss, _, err := smapsRollup(daemonPID); err != nil {
			tb.Fatalf("bench: daemon PSS: %v", err)
		} else {
			m.DaemonPSS = pss
		}
		m.VMPSS = vmPSS(tb, env.SandboxerDirs[vmmHandler], n)
		res.mem = append(res.mem, m)
		fmt.Fprintf(os.Stderr, "bench: vmm %d pods: daemon PSS %s MiB, per VM (QEMU + virtiofsd) %s MiB\n",
			n, mib(float64(m.DaemonPSS)), mib(float64(m.VMPSS)))
	}
	for _, id := range running {
		env.StopRemovePod(tb, id)
	}
	env.AssertNoLeaks(tb, before, 60*time.Second)
}

// vmmStartPod starts a pod and a container printing one line, and times it.
func vmmStartPod(tb testing.TB, env *testenv.Env, c config, i int) (string, vmmStart) {
	cfg := env.PodConfig()
	t0 := time.Now()
	id := env.RunPod(tb, vmmHandler, cfg)
	s := vmmStart{RunPod: time.Since(t0)}
	ctr := testenv.ContainerConfig(fmt.Sprintf("hello-%d", i), "sh", "-c", "echo "+marker+"; exec sleep 3600")
	t1 := time.Now()
	env.CreateStartContainer(tb, id, cfg, ctr)
	s.Container = time.Since(t1)
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if _, _, err := waitMarker(ctx, testenv.LogFile(cfg, ctr), c.poll); err != nil {
		tb.Fatalf("bench: vmm pod %s: no output: %v", id, err)
	}
	s.FirstOutput = time.Since(t0)
	return id, s
}

// vmmBootTime reads the daemon's measure of a pod's VM boot from its log.
func vmmBootTime(tb testing.TB, log, id string) time.Duration {
	f, err := os.Open(log)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l struct {
			Msg     string  `json:"msg"`
			Sandbox string  `json:"sandbox"`
			Boot    float64 `json:"boot_to_agent"`
		}
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "pod VM running" && l.Sandbox == id {
			return time.Duration(l.Boot * float64(time.Second))
		}
	}
	tb.Fatalf("bench: no boot time of %s in %s", id, log)
	return 0
}

// vmPSS is the median PSS per VM of the QEMU and virtiofsd processes that
// run for the daemon's pods (found by the VM directory in their command
// line); there must be n VMs.
func vmPSS(tb testing.TB, dir string, n int) int64 {
	vmDir := filepath.Join(dir, "vm") + "/"
	perVM := map[string]int64{}
	for _, p := range listProcs() {
		cl := p.cmdline()
		i := strings.Index(cl, vmDir)
		if i < 0 || strings.Contains(cl, "vmm-sandboxer") {
			continue
		}
		vm, _, _ := strings.Cut(cl[i+len(vmDir):], "/")
		pss, _, err := smapsRollup(p.pid)
		if err != nil {
			continue // exited meanwhile
		}
		perVM[vm] += pss
	}
	if len(perVM) != n {
		tb.Fatalf("bench: found processes of %d VMs, want %d", len(perVM), n)
	}
	var v []int64
	for _, x := range perVM {
		v = append(v, x)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

func medianOf(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// report writes vmm.md and vmm.csv into out and returns the markdown.
func (r *vmmResults) report(out string) (string, error) {
	pick := func(f func(vmmStart) time.Duration) []time.Duration {
		var v []time.Duration
		for _, s := range r.starts {
			v = append(v, f(s))
		}
		return v
	}
	ms := func(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) }
	var b strings.Builder
	fmt.Fprintf(&b, "## VM pods (vmm-sandboxer, QEMU)\n\n%d pods started one after another; medians in ms.\n\n", len(r.starts))
	b.WriteString("| RunPodSandbox | of which VM boot to agent | rest of the pod start | container create+start | RunPodSandbox to first output |\n|---|---|---|---|---|\n")
	fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n\n",
		ms(medianOf(pick(func(s vmmStart) time.Duration { return s.RunPod }))),
		ms(medianOf(pick(func(s vmmStart) time.Duration { return s.Boot }))),
		ms(medianOf(pick(func(s vmmStart) time.Duration { return s.RunPod - s.Boot }))),
		ms(medianOf(pick(func(s vmmStart) time.Duration { return s.Container }))),
		ms(medianOf(pick(func(s vmmStart) time.Duration { return s.FirstOutput }))))
	b.WriteString("| pods running | vmm-sandboxer daemon PSS (MiB) | per VM: QEMU + virtiofsd PSS (MiB, median) |\n|---|---|---|\n")
	for _, m := range r.mem {
		fmt.Fprintf(&b, "| %d | %s | %s |\n", m.Pods, mib(float64(m.DaemonPSS)), mib(float64(m.VMPSS)))
	}
	if err := os.WriteFile(filepath.Join(out, "vmm.md"), []byte(b.String()), 0o644); err != nil {
		return "", err
	}
	f, err := os.Create(filepath.Join(out, "vmm.csv"))
	if err != nil {
		return "", err
	}
	defer f.Close()
	w := csv.NewWriter(f)
	_ = w.Write([]string{"kind", "index_or_pods", "runpod_ms", "boot_ms", "container_ms", "first_output_ms", "daemon_pss_kib", "vm_pss_kib"})
	for i, s := range r.starts {
		_ = w.Write([]string{"start", strconv.Itoa(i), ms(s.RunPod), ms(s.Boot), ms(s.Container), ms(s.FirstOutput), "", ""})
	}
	for _, m := range r.mem {
		_ = w.Write([]string{"memory", strconv.Itoa(m.Pods), "", "", "", "", strconv.FormatInt(m.DaemonPSS, 10), strconv.FormatInt(m.VMPSS, 10)})
	}
	w.Flush()
	return b.String(), w.Error()
}
