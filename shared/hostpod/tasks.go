package hostpod

import (
	"fmt"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

// TaskSandboxes tells the task service which pods run and where their
// containers' cgroups go.
type TaskSandboxes struct {
	Controller *controller.Server
}

// TaskSandbox implements task.Sandboxes.
func (t TaskSandboxes) TaskSandbox(id string) (task.Sandbox, error) {
	sb, err := t.Controller.Sandbox(id)
	if err != nil {
		return task.Sandbox{}, err
	}
	if sb.State != store.StateRunning {
		return task.Sandbox{}, fmt.Errorf("sandbox %s is %s: %w", id, sb.State, errdefs.ErrFailedPrecondition)
	}
	st, err := load(&sb)
	if err != nil {
		return task.Sandbox{}, err
	}
	return task.Sandbox{CgroupParent: st.PodCgroup}, nil
}
