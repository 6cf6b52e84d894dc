// Package hostpod is the pod lifecycle of the families whose containers run
// on the host (runc, wasm): a per-pod holder process owns the pod's
// namespaces, the pod's cgroup holds the holder and the containers, and the
// shared task service serves the containers.
package hostpod

import (
	"context"
	"fmt"
	"path"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"go.uber.org/zap"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/store"
)

// taskAPIVersion is the task API version containerd must speak to us; 3
// tells containerd to connect directly instead of spawning a shim.
const taskAPIVersion = 3

// state is what the family remembers of a pod (store.Sandbox.Family).
type state struct {
	HolderPid       int    `json:"holder_pid,omitempty"`
	HolderStartTime uint64 `json:"holder_start_time,omitempty"`
	// PodCgroup is the pod's cgroup; containers are created below it.
	PodCgroup string `json:"pod_cgroup,omitempty"`
	// OwnPodCgroup is set when the sandboxer created PodCgroup and so
	// removes it at Shutdown.
	OwnPodCgroup bool        `json:"own_pod_cgroup,omitempty"`
	Spec         holder.Spec `json:"holder_spec"`
}

func (st state) holder() holder.Holder {
	return holder.Holder{Pid: st.HolderPid, StartTime: st.HolderStartTime}
}

// holderCgroup is where the holder process lives, beside the containers.
func (st state) holderCgroup(id string) string { return path.Join(st.PodCgroup, id) }

func load(sb *store.Sandbox) (state, error) {
	var st state
	return st, sb.DecodeFamily(&st)
}

func save(sb *store.Sandbox, st state) error { return sb.EncodeFamily(st) }

// Sandboxer implements controller.Sandboxer for pods on the host.
type Sandboxer struct {
	taskAddress string
	log         *zap.Logger
}

// New returns the family; taskAddress is where its task service listens.
func New(taskAddress string, log *zap.Logger) *Sandboxer {
	return &Sandboxer{taskAddress: taskAddress, log: log}
}

var _ controller.Sandboxer = (*Sandboxer)(nil)
var _ controller.Recoverer = (*Sandboxer)(nil)

// holderSpec derives the pod's namespaces from the CRI namespace options:
// a namespace the pod shares with the node is not created.
func holderSpec(sb *store.Sandbox, cfg *runtimeapi.PodSandboxConfig) (holder.Spec, error) {
	ns := cfg.GetLinux().GetSecurityContext().GetNamespaceOptions()
	hostNet := ns.GetNetwork() == runtimeapi.NamespaceMode_NODE
	if hostNet && sb.NetnsPath != "" {
		return holder.Spec{}, fmt.Errorf("pod asks for the node's network but carries netns %s: %w", sb.NetnsPath, errdefs.ErrInvalidArgument)
	}
	if ns.GetUsernsOptions() != nil && ns.GetUsernsOptions().GetMode() == runtimeapi.NamespaceMode_POD {
		return holder.Spec{}, fmt.Errorf("user namespaces per pod are not supported: %w", errdefs.ErrNotImplemented)
	}
	return holder.Spec{
		NetnsPath: sb.NetnsPath,
		NewPID:    ns.GetPid() != runtimeapi.NamespaceMode_NODE,
		NewIPC:    ns.GetIpc() != runtimeapi.NamespaceMode_NODE,
		NewUTS:    !hostNet,
		Hostname:  cfg.GetHostname(),
	}, nil
}

// Create decides the pod's namespaces and cgroup and creates the cgroup.
func (r *Sandboxer) Create(ctx context.Context, sb *store.Sandbox) error {
	cfg, err := controller.PodConfig(sb)
	if err != nil {
		return err
	}
	spec, err := holderSpec(sb, cfg)
	if err != nil {
		return err
	}
	st := state{Spec: spec}
	if st.PodCgroup, st.OwnPodCgroup, err = cgroup.PodPath(cfg.GetLinux().GetCgroupParent(), sb.ID); err != nil {
		return err
	}
	if _, err := cgroup.New(st.holderCgroup(sb.ID)); err != nil {
		return err
	}
	return save(sb, st)
}

// Start runs the holder and places it in the pod's cgroup.
func (r *Sandboxer) Start(ctx context.Context, sb *store.Sandbox) (<-chan controller.Exit, error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	cg, err := cgroup.Load(st.holderCgroup(sb.ID))
	if err != nil {
		return nil, err
	}
	h, exited, err := holder.Start(ctx, st.Spec)
	if err != nil {
		return nil, err
	}
	if err := cg.Add(h.Pid); err != nil {
		holder.Stop(*h, 0)
		<-exited
		return nil, fmt.Errorf("place holder in cgroup: %w", err)
	}
	st.HolderPid, st.HolderStartTime = h.Pid, h.StartTime
	if err := save(sb, st); err != nil {
		holder.Stop(*h, 0)
		<-exited
		return nil, err
	}
	sb.Pid = uint32(h.Pid)
	sb.Address = r.taskAddress
	sb.Version = taskAPIVersion
	return convert(exited), nil
}

func convert(in <-chan holder.Exit) <-chan controller.Exit {
	out := make(chan controller.Exit, 1)
	go func() {
		e := <-in
		out <- controller.Exit{Status: uint32(e.Status), ExitedAt: e.At}
	}()
	return out
}

// Recover reattaches to the holder of a pod that ran while the daemon was
// down.
func (r *Sandboxer) Recover(ctx context.Context, sb *store.Sandbox) (<-chan controller.Exit, error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	if st.HolderPid == 0 {
		return nil, fmt.Errorf("sandbox %s has no holder: %w", sb.ID, errdefs.ErrNotFound)
	}
	exited, err := holder.Watch(st.holder())
	if err != nil {
		return nil, err
	}
	return convert(exited), nil
}

// Stop ends the holder and so every process of the pod's PID namespace.
func (r *Sandboxer) Stop(ctx context.Context, sb *store.Sandbox, timeout time.Duration) error {
	st, err := load(sb)
	if err != nil {
		return err
	}
	return holder.Stop(st.holder(), timeout)
}

// Shutdown removes the pod's cgroups.
func (r *Sandboxer) Shutdown(ctx context.Context, sb *store.Sandbox) error {
	st, err := load(sb)
	if err != nil {
		return err
	}
	if st.PodCgroup == "" {
		return nil
	}
	if err := holder.Stop(st.holder(), 0); err != nil {
		return err
	}
	if err := cgroup.Remove(st.holderCgroup(sb.ID)); err != nil {
		return err
	}
	if st.OwnPodCgroup {
		return cgroup.Remove(st.PodCgroup)
	}
	return nil
}

// Metrics reports the pod cgroup's statistics, which include its containers.
func (r *Sandboxer) Metrics(ctx context.Context, sb *store.Sandbox) (*types.Metric, error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	cg, err := cgroup.Load(st.PodCgroup)
	if err != nil {
		return nil, err
	}
	return cg.Metric(sb.ID)
}
