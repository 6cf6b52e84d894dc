package mixednode

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestFaultContainerdRestart stops containerd for 31 s while a pod of
// every family runs, and a container of each pod ends meanwhile: the
// sandboxers and their pods go on, containerd reconnects to their
// controllers and task addresses, and afterwards every pod is ready, the
// sandboxers deliver each exit they held, with its exit code, to
// containerd's event subscribers, CRI reports those containers exited,
// every running container still runs and takes an exec, the wasm
// container keeps its exit code, and stopping the containers reports
// their exits through the new containerd.
func TestFaultContainerdRestart(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	runs := n.runAll(t, "RunPods")
	// Each ends 25 s after its start, containerd is down by then: the
	// slowest to start (the VM) first.
	lateIDs := map[string]string{}
	for _, r := range slices.Backward(runs) {
		lateIDs[env.CreateStartContainer(t, r.podID, r.podCfg, r.fam.run("late-"+r.fam.name, r.fam.cmds.late...))] = r.fam.name
	}

	// The sandboxers' events wait until the test listens for them
	// (containerd does not replay events to a late subscriber).
	release := n.holdEvents(t)
	t0 := time.Now()
	env.RestartContainerd(t, 31*time.Second)
	t1 := time.Now()
	t.Logf("containerd down for 31s, CRI ready again %v after the stop began", t1.Sub(t0).Round(time.Millisecond))
	exits := env.TaskExits(t)
	release()
	left := maps.Clone(lateIDs)
	timeout := time.After(60 * time.Second)
	for len(left) > 0 {
		select {
		case e, ok := <-exits:
			if !ok {
				t.Fatalf("containerd's event stream ended; no exit event for %v", slices.Collect(maps.Values(left)))
			}
			if fam, mine := left[e.ContainerID]; mine && e.ID == e.ContainerID {
				if e.ExitStatus != 43 {
					t.Errorf("%s: exit event with status %d, want 43", fam, e.ExitStatus)
				}
				if at := e.ExitedAt.AsTime(); at.Before(t0) || at.After(t1) {
					t.Errorf("%s: the container ended at %v, not while containerd was away (%v to %v): the test proves nothing", fam, at, t0, t1)
				}
				delete(left, e.ContainerID)
			}
		case <-timeout:
			t.Fatalf("no exit event reached containerd for %v", slices.Collect(maps.Values(left)))
		}
	}

	// CRI reports the real exit too: containerd 2.2's restart drops a
	// task that lists no PIDs as a leaked shim's (its own runc shim's too,
	// whose containers then read exit 255, "Unknown"); the sandboxers' task
	// services keep naming an exited init until it is deleted.
	ctx := t.Context()
	for id, fam := range lateIDs {
		if st := env.ContainerStatus(t, id); st.State != runtime.ContainerState_CONTAINER_EXITED || st.ExitCode != 43 {
			t.Errorf("%s: the container that ended while containerd was down: %v, exit %d (%s); want EXITED with 43", fam, st.State, st.ExitCode, st.Reason)
		}
	}
	for _, r := range runs {
		t.Run(r.fam.name, func(t *testing.T) {
			if st := env.PodStatus(t, r.podID); st.State != runtime.PodSandboxState_SANDBOX_READY {
				t.Errorf("pod after containerd's restart: %v, want READY", st.State)
			}
			st := env.ContainerStatus(t, r.ctrID)
			if r.fam.exitCode >= 0 {
				if st.State != runtime.ContainerState_CONTAINER_EXITED || st.ExitCode != r.fam.exitCode {
					t.Errorf("container after containerd's restart: %v, exit %d; want EXITED with %d", st.State, st.ExitCode, r.fam.exitCode)
				}
				return
			}
			if st.State != runtime.ContainerState_CONTAINER_RUNNING {
				t.Fatalf("container after containerd's restart: %v, want RUNNING", st.State)
			}
			if out, _, code := env.ExecSync(t, r.ctrID, 60*time.Second, "echo", "alive"); out != "alive\n" || code != 0 {
				t.Errorf("ExecSync after containerd's restart: %q, exit %d", out, code)
			}
			if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: r.ctrID, Timeout: 1}); err != nil {
				t.Fatalf("StopContainer after containerd's restart: %v", err)
			}
			if st := env.ContainerStatus(t, r.ctrID); st.State != runtime.ContainerState_CONTAINER_EXITED {
				t.Errorf("container after StopContainer: %v, want EXITED", st.State)
			}
		})
	}
	n.removeAll(t, "RemovePods", runs)
	env.AssertNoLeaks(t, before, 60*time.Second)
}

// TestFaultStateUnwritableAtCreate makes each sandboxer's state directory
// unwritable (a full file system, then a read-only one) and runs a pod of
// every family: RunPodSandbox fails naming the cause and leaves nothing
// behind, and once the directory is writable again pods run.
func TestFaultStateUnwritableAtCreate(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	for _, c := range []struct {
		name, opts, want string
		fill             bool
	}{
		{"full", "size=16k", "no space left on device", true},
		{"read-only", "ro", "read-only file system", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var dirs []string
			for _, f := range n.fams {
				dir := filepath.Join(env.SandboxerDirs[f.handler], "sandboxes")
				if err := unix.Mount("tmpfs", dir, "tmpfs", 0, c.opts); err != nil {
					t.Fatalf("mount a tmpfs on %s: %v", dir, err)
				}
				dirs = append(dirs, dir)
				if c.fill {
					// Fill it up: the file system has no room for a state file.
					_ = os.WriteFile(filepath.Join(dir, "filler"), make([]byte, 64<<10), 0o600)
				}
			}
			for _, f := range n.fams {
				cfg := env.PodConfig()
				cfg.Annotations = f.annotations
				_, err := env.TryRunPod(f.handler, cfg)
				if err == nil || !strings.Contains(err.Error(), c.want) {
					t.Errorf("%s: RunPodSandbox with its state directory %s: %v; want an error naming %q", f.name, c.name, err, c.want)
				}
			}
			for _, dir := range dirs {
				if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
					t.Errorf("unmount %s: %v", dir, err)
				}
			}
		})
	}
	// Writable again: every family runs pods.
	runs := n.runAll(t, "RunPods")
	n.removeAll(t, "RemovePods", runs)
	env.AssertNoLeaks(t, before, 60*time.Second)
}

// TestFaultKillSandboxer kills each sandboxer with SIGKILL while its pod
// runs containers (see survivor), then starts it again: nothing of the pod
// is lost. The keeper (package keeper) keeps containerd's task connections
// and the containers' exits across the restart.
func TestFaultKillSandboxer(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	runs := n.survivingPods(t)
	for _, r := range runs {
		t.Run(r.fam.name, func(t *testing.T) {
			s := n.prepareSurvivor(t, r)
			daemonPID := env.DaemonPID(r.fam.handler)
			t0 := time.Now()
			env.KillSandboxer(t, r.fam.handler, 4*time.Second)
			t.Logf("%s killed (pid %d) and serving again after %v", r.fam.handler, daemonPID, time.Since(t0).Round(time.Millisecond))
			s.check(t)
		})
	}
	n.removeAll(t, "RemovePods", runs)
	env.AssertNoLeaks(t, before, 60*time.Second)
}

// TestRecoverySandboxersRestart stops every sandboxer at once (SIGTERM, as
// an upgrade of the node would) while their pods run containers, and
// starts them again: each reloads its pods and containers from its state
// directory, reattaches to what runs and reports what ended meanwhile with
// its real exit code.
func TestRecoverySandboxersRestart(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	runs := n.survivingPods(t)
	survivors := make([]*survivor, len(runs))
	for i, r := range runs {
		survivors[i] = n.prepareSurvivor(t, r)
	}
	t0 := time.Now()
	var handlers []string
	for _, r := range runs {
		handlers = append(handlers, r.fam.handler)
	}
	env.RestartSandboxers(t, handlers, 4*time.Second)
	t.Logf("%d sandboxers stopped and serving again after %v", len(runs), time.Since(t0).Round(time.Millisecond))
	for _, s := range survivors {
		t.Run(s.r.fam.name, s.check)
	}
	n.removeAll(t, "RemovePods", runs)
	env.AssertNoLeaks(t, before, 60*time.Second)
}

// survivingPods runs a pod of each family that outlives its sandboxer.
func (n *node) survivingPods(t *testing.T) []*podRun {
	var runs []*podRun
	for _, f := range n.fams {
		if f.survivesKill {
			runs = append(runs, n.runPod(t, f))
		}
	}
	return runs
}

// survivor is a pod whose sandboxer is about to go away: a long container,
// one that writes twice a second and one that ends while the daemon is
// down.
type survivor struct {
	n                         *node
	r                         *podRun
	longID, shortID, tickerID string
	ticker                    *runtime.ContainerConfig
}

func (n *node) prepareSurvivor(t *testing.T, r *podRun) *survivor {
	env, f := n.env, r.fam
	s := &survivor{n: n, r: r, ticker: f.run("ticker-"+f.name, f.cmds.ticker...)}
	s.longID = env.CreateStartContainer(t, r.podID, r.podCfg, f.run("long-"+f.name, f.cmds.forever...))
	// The short container ends 2 s after its start; the daemon is down
	// from about then for 4 s.
	s.shortID = env.CreateStartContainer(t, r.podID, r.podCfg, f.run("short-"+f.name, f.cmds.short...))
	// The ticker writes through the restart: its output must neither kill
	// it (SIGPIPE) nor stop reaching its log.
	s.tickerID = env.CreateStartContainer(t, r.podID, r.podCfg, s.ticker)
	env.WaitLog(t, r.podCfg, s.ticker, "tick-1\n", 60*time.Second)
	return s
}

// check runs after the sandboxer's restart: the pod is ready, the long
// container still runs and takes an exec, the ticker's log goes on, the
// short one reports its own exit code, the pod's first container keeps
// its exit code (wasm), and the pod takes a new container.
func (s *survivor) check(t *testing.T) {
	env, r, f := s.n.env, s.r, s.r.fam
	env.WaitPodReady(t, r.podID, 20*time.Second)
	if st := env.ContainerStatus(t, s.longID); st.State != runtime.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("long container after the sandboxer's restart: %v (exit %d, %s), want RUNNING", st.State, st.ExitCode, st.Reason)
	}
	if out, _, code := env.ExecSync(t, s.longID, 60*time.Second, f.cmds.exec...); out != "alive\n" || code != 5 {
		t.Errorf("ExecSync after the sandboxer's restart: %q, exit %d; want alive, 5", out, code)
	}
	// About 10 s after its start: after the restart.
	if log := env.WaitLog(t, r.podCfg, s.ticker, "tick-20\n", 60*time.Second); !strings.Contains(log, "tick-20\n") {
		t.Errorf("the ticker's output did not go on after the restart:\n%s", log)
	}
	if st := env.ContainerStatus(t, s.tickerID); st.State != runtime.ContainerState_CONTAINER_RUNNING {
		t.Errorf("ticker after the restart: %v (exit %d), want RUNNING", st.State, st.ExitCode)
	}
	if code := env.WaitContainerExited(t, s.shortID, 30*time.Second); code != 42 {
		t.Errorf("the container that ended while the sandboxer was down reports exit %d, want 42", code)
	}
	if f.exitCode >= 0 {
		if st := env.ContainerStatus(t, r.ctrID); st.State != runtime.ContainerState_CONTAINER_EXITED || st.ExitCode != f.exitCode {
			t.Errorf("the pod's first container after the restart: %v, exit %d; want EXITED with %d", st.State, st.ExitCode, f.exitCode)
		}
	}
	after := f.run("after-"+f.name, f.cmds.after...)
	env.CreateStartContainer(t, r.podID, r.podCfg, after)
	if log := env.WaitLog(t, r.podCfg, after, "after-restart\n", 60*time.Second); !strings.Contains(log, "after-restart\n") {
		t.Errorf("a container started after the restart logged %q", log)
	}
	if _, err := env.Runtime.StopContainer(t.Context(), &runtime.StopContainerRequest{ContainerId: s.longID, Timeout: 1}); err != nil {
		t.Fatalf("StopContainer after the sandboxer's restart: %v", err)
	}
	if st := env.ContainerStatus(t, s.longID); st.State != runtime.ContainerState_CONTAINER_EXITED {
		t.Errorf("long container after StopContainer: %v, want EXITED", st.State)
	}
}
