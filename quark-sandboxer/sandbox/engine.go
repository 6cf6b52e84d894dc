package sandbox

import (
	"context"
	"encoding/json"
	"time"

	"github.com/containerd/containerd/api/types"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/holder"
)

// Pod annotations (in the CRI pod config) that choose per pod what the
// configuration chooses for all.
const (
	// AnnotationEngine names the pod's engine: "gvisor" or "quark".
	AnnotationEngine = "quark.kuasar-go.io/engine"
	// AnnotationPlatform names a gVisor pod's platform: systrap, ptrace or kvm.
	AnnotationPlatform = "quark.kuasar-go.io/gvisor-platform"
)

// Pod is what an engine knows of a pod. The family creates Dir (root-only)
// before Create and removes it after Shutdown.
type Pod struct {
	ID string
	// Dir is the pod's own directory under the daemon's --dir.
	Dir       string
	NetnsPath string
	Config    *runtimeapi.PodSandboxConfig
	// Cgroup is where the engine places the sandbox's processes, below
	// the pod's cgroup; the family accounts (Metrics) and removes both.
	Cgroup string
	// Running tells whether the sandbox runs (Update may add containers).
	Running bool
	// Platform is the gVisor platform chosen for the pod.
	Platform string
	// State is the engine's own record of the pod, persisted with the pod.
	State json.RawMessage
}

// Started is a running sandbox.
type Started struct {
	// Pid is the sandbox's main process (runsc's sandbox, Quark's sandbox
	// process), watched for the pod's exit.
	Pid int
	// Address and Version are the task API containerd connects to.
	Address string
	Version uint32
	// Exited delivers the sandbox's exit once.
	Exited <-chan controller.Exit
}

// Engine runs pods under one application kernel. The family calls it with
// the pod's lock held; each method leaves nothing behind when it fails.
type Engine interface {
	// Name is the engine's name in configs and annotations.
	Name() string
	// Check reports why the engine cannot run pods on this host (its
	// binary is missing, say), or nil.
	Check() error
	// Create prepares the pod (bundles, directories) in pod.Dir.
	Create(ctx context.Context, pod *Pod) error
	// Start runs the sandbox.
	Start(ctx context.Context, pod *Pod) (*Started, error)
	// Stop ends the sandbox process proc, politely first when timeout > 0.
	// Its exit still arrives on Started.Exited.
	Stop(ctx context.Context, pod *Pod, proc holder.Holder, timeout time.Duration) error
	// Shutdown releases what the engine holds for the pod (runtime state,
	// mounts); it is idempotent and called on stopped pods.
	Shutdown(ctx context.Context, pod *Pod) error
	// Update applies a sandbox update from containerd (Quark: the pod's
	// containers in the "tasks" extension).
	Update(ctx context.Context, pod *Pod, update *types.Sandbox, fields []string) error
}
