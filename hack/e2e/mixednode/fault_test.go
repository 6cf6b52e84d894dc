package mixednode

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestFaultContainerdRestart restarts containerd while a pod of every
// family runs: the sandboxers and their pods go on, containerd reconnects
// to their controllers and task addresses, and afterwards every pod is
// ready, every running container still runs and takes an exec, the wasm
// container keeps its exit code, and stopping the containers reports
// their exits through the new containerd.
func TestFaultContainerdRestart(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	runs := n.runAll(t, "RunPods")

	t0 := time.Now()
	env.RestartContainerd(t)
	t.Logf("containerd restarted, CRI ready again in %v", time.Since(t0).Round(time.Millisecond))

	ctx := t.Context()
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
// runs a long container, one that writes twice a second and one that ends
// while the daemon is down, then starts it again: the pod is ready, the
// long container still runs and takes an exec, the writer's log goes on,
// the short one reports its own exit code, the pod's first container keeps
// its exit code (wasm), and the pod takes a new container. The keeper
// (package keeper) keeps containerd's task connections and the
// containers' exits across the restart.
func TestFaultKillSandboxer(t *testing.T) {
	n := startNode(t)
	env := n.env
	before := env.Snapshot()
	var runs []*podRun
	for _, f := range n.fams {
		if f.survivesKill {
			runs = append(runs, n.runPod(t, f))
		}
	}
	ctx := t.Context()
	for _, r := range runs {
		t.Run(r.fam.name, func(t *testing.T) {
			f := r.fam
			long := f.run("long-"+f.name, f.cmds.forever...)
			longID := env.CreateStartContainer(t, r.podID, r.podCfg, long)
			// The short container ends 2 s after its start; the daemon is
			// down from about then for 4 s.
			shortID := env.CreateStartContainer(t, r.podID, r.podCfg, f.run("short-"+f.name, f.cmds.short...))
			// The ticker writes twice a second, through the restart: its
			// output must neither kill it (SIGPIPE) nor stop reaching its log.
			ticker := f.run("ticker-"+f.name, f.cmds.ticker...)
			tickerID := env.CreateStartContainer(t, r.podID, r.podCfg, ticker)
			env.WaitLog(t, r.podCfg, ticker, "tick-1\n", 60*time.Second)
			daemonPID := env.DaemonPID(f.handler)
			t0 := time.Now()
			env.KillSandboxer(t, f.handler, 4*time.Second)
			t.Logf("%s killed (pid %d) and serving again after %v", f.handler, daemonPID, time.Since(t0).Round(time.Millisecond))

			env.WaitPodReady(t, r.podID, 20*time.Second)
			if st := env.ContainerStatus(t, longID); st.State != runtime.ContainerState_CONTAINER_RUNNING {
				t.Fatalf("long container after the sandboxer's restart: %v (exit %d, %s), want RUNNING", st.State, st.ExitCode, st.Reason)
			}
			if out, _, code := env.ExecSync(t, longID, 60*time.Second, f.cmds.exec...); out != "alive\n" || code != 5 {
				t.Errorf("ExecSync after the sandboxer's restart: %q, exit %d; want alive, 5", out, code)
			}
			// About 10 s after its start: after the restart.
			if log := env.WaitLog(t, r.podCfg, ticker, "tick-20\n", 60*time.Second); !strings.Contains(log, "tick-20\n") {
				t.Errorf("the ticker's output did not go on after the restart:\n%s", log)
			}
			if st := env.ContainerStatus(t, tickerID); st.State != runtime.ContainerState_CONTAINER_RUNNING {
				t.Errorf("ticker after the restart: %v (exit %d), want RUNNING", st.State, st.ExitCode)
			}
			if code := env.WaitContainerExited(t, shortID, 30*time.Second); code != 42 {
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
			if _, err := env.Runtime.StopContainer(ctx, &runtime.StopContainerRequest{ContainerId: longID, Timeout: 1}); err != nil {
				t.Fatalf("StopContainer after the sandboxer's restart: %v", err)
			}
			if st := env.ContainerStatus(t, longID); st.State != runtime.ContainerState_CONTAINER_EXITED {
				t.Errorf("long container after StopContainer: %v, want EXITED", st.State)
			}
		})
	}
	n.removeAll(t, "RemovePods", runs)
	env.AssertNoLeaks(t, before, 60*time.Second)
}
