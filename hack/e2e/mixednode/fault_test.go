package mixednode

import (
	"testing"
	"time"

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
