package sandbox

import (
	"fmt"
	"path"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// Tasks tells the daemon's task service (which serves gVisor pods; Quark
// serves its own) which pods run and how.
type Tasks struct {
	Controller *controller.Server
	Family     *Family
}

// TaskPod returns the running gVisor pod id: NotFound for an unknown pod,
// FailedPrecondition for a pod that is not running or not a gVisor pod.
func (t Tasks) TaskPod(id string) (*Pod, error) {
	sb, err := t.Controller.Sandbox(id)
	if err != nil {
		return nil, err
	}
	if sb.State != store.StateRunning {
		return nil, fmt.Errorf("sandbox %s is %s: %w", id, sb.State, errdefs.ErrFailedPrecondition)
	}
	st, err := load(&sb)
	if err != nil {
		return nil, err
	}
	if st.Engine != EngineGVisor {
		return nil, fmt.Errorf("sandbox %s runs under %s, which serves its own tasks at %s: %w", id, st.Engine, sb.Address, errdefs.ErrFailedPrecondition)
	}
	return t.Family.pod(&sb, st)
}

// TaskSandbox implements task.Sandboxes.
func (t Tasks) TaskSandbox(id string) (task.Sandbox, error) {
	pod, err := t.TaskPod(id)
	if err != nil {
		return task.Sandbox{}, err
	}
	sb := task.Sandbox{}
	if pod.Cgroup != "" {
		// Containers go beside the sandbox, below the pod's cgroup.
		sb.CgroupParent = path.Dir(pod.Cgroup)
	}
	return sb, nil
}
