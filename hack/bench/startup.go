package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/hack/bench/stats"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// marker is the container's first output line; its CRI log timestamp ends
// the measured interval.
const marker = "kg-bench-ready"

type bench struct {
	env *testenv.Env
	tb  testing.TB
	c   config
}

// sample is one pod start.
type sample struct {
	Runtime string
	Mode    string // "serial" or "parallel"
	Batch   int    // parallel batch (0 for serial)
	Index   int    // pod number within the mode (serial) or the batch
	PodID   string
	// Phases, each the time a CRI call took as seen by the client.
	RunPod, Create, Start time.Duration
	// LogAfterStart is from StartContainer's return to the first log
	// line (negative when the line was written before StartContainer
	// returned).
	LogAfterStart time.Duration
	// Total is from just before RunPodSandbox to the first log line's
	// timestamp (stamped by containerd when it read the line).
	Total time.Duration
	// Observed is from just before RunPodSandbox to the poll that found
	// the line: Total plus the polling delay.
	Observed time.Duration
	// StopPod and RemovePod are the teardown calls (not part of Total).
	StopPod, RemovePod time.Duration
}

func (s sample) ms() float64 { return msOf(s.Total) }

func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// pod is one pod with its one container.
type pod struct {
	rt  string // series name
	id  string
	cfg *runtime.PodSandboxConfig
	ctr *runtime.ContainerConfig
	s   sample
}

// startPod runs a pod of series s with a container that prints marker and
// stays up (busybox sh; the WASI test program for wasm), and returns when
// the marker is in the container's CRI log. On error the returned pod
// (when not nil) still has to be removed.
func (b *bench) startPod(s series) (*pod, error) {
	cfg := b.env.PodConfig()
	cfg.Annotations = s.annotations()
	ctr := s.container()
	// Out of the timed part (RunPod would make it too).
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		return nil, err
	}
	p := &pod{rt: s.Name, cfg: cfg, ctr: ctr, s: sample{Runtime: s.Name}}
	ctx, cancel := context.WithTimeout(context.Background(), b.c.timeout)
	defer cancel()

	t0 := time.Now()
	rp, err := b.env.Runtime.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: cfg, RuntimeHandler: s.Handler})
	if err != nil {
		return nil, fmt.Errorf("RunPodSandbox: %w", err)
	}
	t1 := time.Now()
	p.id = rp.PodSandboxId
	cc, err := b.env.Runtime.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: p.id, Config: ctr, SandboxConfig: cfg,
	})
	if err != nil {
		return p, fmt.Errorf("CreateContainer in pod %.12s: %w", p.id, err)
	}
	t2 := time.Now()
	if _, err := b.env.Runtime.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: cc.ContainerId}); err != nil {
		return p, fmt.Errorf("StartContainer %.12s in pod %.12s: %w", cc.ContainerId, p.id, err)
	}
	t3 := time.Now()
	logged, seen, err := waitMarker(ctx, testenv.LogFile(cfg, ctr), b.c.poll)
	if err != nil {
		return p, fmt.Errorf("pod %.12s: %w", p.id, err)
	}
	p.s.PodID = p.id
	p.s.RunPod, p.s.Create, p.s.Start = t1.Sub(t0), t2.Sub(t1), t3.Sub(t2)
	p.s.Total = logged.Sub(t0) // wall clock on both sides
	p.s.LogAfterStart = logged.Sub(t3)
	p.s.Observed = seen.Sub(t0)
	return p, nil
}

// waitMarker polls a CRI log file every interval until it holds marker and
// returns the line's timestamp and when it was seen.
func waitMarker(ctx context.Context, path string, interval time.Duration) (logged, seen time.Time, err error) {
	for {
		// A stat is cheap; read and parse only once something is there.
		if fi, err := os.Stat(path); err == nil && fi.Size() >= int64(len(marker)) {
			seen = time.Now()
			b, err := os.ReadFile(path)
			if err == nil && strings.Contains(string(b), marker) {
				lines, _ := testenv.ParseCRILog(b)
				for _, l := range lines {
					if strings.Contains(l.Msg, marker) {
						return l.Time, seen, nil
					}
				}
				// A line not parsed yet (partly written): the poll time.
				return seen, seen, nil
			}
		}
		select {
		case <-ctx.Done():
			b, _ := os.ReadFile(path)
			return time.Time{}, time.Time{}, fmt.Errorf("no %q in %s (%v); log so far: %q", marker, path, ctx.Err(), b)
		case <-time.After(interval):
		}
	}
}

// stopPod stops and removes a pod (not timed).
func (b *bench) stopPod(p *pod) error {
	if p == nil || p.id == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t0 := time.Now()
	if _, err := b.env.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.id}); err != nil {
		return fmt.Errorf("StopPodSandbox %.12s (%s): %w", p.id, p.rt, err)
	}
	t1 := time.Now()
	if _, err := b.env.Runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.id}); err != nil {
		return fmt.Errorf("RemovePodSandbox %.12s (%s): %w", p.id, p.rt, err)
	}
	p.s.StopPod, p.s.RemovePod = t1.Sub(t0), time.Since(t1)
	return nil
}

// stopPods removes pods, a few at a time.
func (b *bench) stopPods(pods []*pod) error {
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
		sem  = make(chan struct{}, 8)
	)
	for _, p := range pods {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := b.stopPod(p); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// one starts a pod, removes it and returns its sample; a failure ends the
// benchmark (after removing what was made).
func (b *bench) one(s series) sample {
	p, err := b.startPod(s)
	if serr := b.stopPod(p); serr != nil && err == nil {
		err = serr
	}
	if err != nil {
		b.tb.Fatalf("bench: %s: %v", s.Name, err)
	}
	return p.s
}

func (b *bench) checkStop() {
	if stopping.Load() {
		b.tb.Fatalf("bench: interrupted")
	}
}

// order rotates which series goes first, round by round, so drift and
// noise hit all alike (with two series: they alternate).
func order(ss []series, i int) []series {
	out := make([]series, 0, len(ss))
	for j := range ss {
		out = append(out, ss[(i+j)%len(ss)])
	}
	return out
}

func (b *bench) warm() {
	if b.c.warmup == 0 {
		return
	}
	t0 := time.Now()
	for i := 0; i < b.c.warmup; i++ {
		for _, s := range order(b.c.series, i) {
			b.checkStop()
			b.one(s)
		}
	}
	b.tb.Logf("bench: warm-up: %d pods per series in %v", b.c.warmup, time.Since(t0).Round(time.Millisecond))
}

func (b *bench) serial(res *results) {
	if b.c.serial == 0 {
		return
	}
	t0 := time.Now()
	got := map[string][]float64{}
	for i := 0; i < b.c.serial; i++ {
		for _, s := range order(b.c.series, i) {
			b.checkStop()
			smp := b.one(s)
			smp.Mode, smp.Index = "serial", i
			res.startup = append(res.startup, smp)
			got[s.Name] = append(got[s.Name], smp.ms())
		}
		if (i+1)%10 == 0 || i+1 == b.c.serial {
			var p50s []string
			for _, s := range b.c.series {
				p50s = append(p50s, fmt.Sprintf("%s %.1f ms", s.Name, stats.Percentile(got[s.Name], 50)))
			}
			b.tb.Logf("bench: serial %d/%d: p50 %s (%v)", i+1, b.c.serial, strings.Join(p50s, ", "),
				time.Since(t0).Round(time.Second))
		}
	}
}

func (b *bench) parallelRuns(res *results) {
	t0 := time.Now()
	for bt := 0; bt < b.c.batches; bt++ {
		for _, s := range order(b.c.series, bt) {
			b.checkStop()
			start := time.Now()
			ss := b.batch(s)
			var ms []float64
			for i := range ss {
				ss[i].Mode, ss[i].Batch, ss[i].Index = "parallel", bt, i
				ms = append(ms, ss[i].ms())
			}
			res.startup = append(res.startup, ss...)
			b.tb.Logf("bench: parallel batch %d/%d %s: %d pods, p50 %.1f ms, slowest %.1f ms (batch with teardown %v)",
				bt+1, b.c.batches, s.Name, len(ss), stats.Percentile(ms, 50), stats.Percentile(ms, 100),
				time.Since(start).Round(time.Millisecond))
		}
	}
	if b.c.batches > 0 {
		b.tb.Logf("bench: parallel runs took %v", time.Since(t0).Round(time.Second))
	}
}

// batch starts c.parallel pods of s at once, then removes them.
func (b *bench) batch(s series) []sample {
	n := b.c.parallel
	pods := make([]*pod, n)
	errs := make([]error, n)
	var ready, done sync.WaitGroup
	gate := make(chan struct{})
	for i := 0; i < n; i++ {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			ready.Done()
			<-gate
			pods[i], errs[i] = b.startPod(s)
		}()
	}
	ready.Wait()
	close(gate)
	done.Wait()
	err := errors.Join(errs...)
	if serr := b.stopPods(pods); serr != nil && err == nil {
		err = serr
	}
	if err != nil {
		b.tb.Fatalf("bench: %s parallel batch: %v", s.Name, err)
	}
	out := make([]sample, n)
	for i, p := range pods {
		out[i] = p.s
	}
	return out
}
