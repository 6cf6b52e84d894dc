package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/safemount"
	"github.com/kuasar-go/kuasar-go/shared/store"
)

// state is what the family remembers of a pod (store.Sandbox.Family).
type state struct {
	Engine   string `json:"engine"`
	Platform string `json:"platform,omitempty"`
	// PodCgroup is the pod's cgroup; the sandbox runs in PodCgroup/<id>
	// and containers below PodCgroup. Empty for Quark pods created before
	// Quark sandboxes were placed in it.
	PodCgroup string `json:"pod_cgroup,omitempty"`
	// OwnPodCgroup is set when the family chose PodCgroup and so removes it.
	OwnPodCgroup bool            `json:"own_pod_cgroup,omitempty"`
	Pid          int             `json:"pid,omitempty"`
	StartTime    uint64          `json:"start_time,omitempty"`
	EngineState  json.RawMessage `json:"engine_state,omitempty"`
}

func (st state) sandboxProc() holder.Holder {
	return holder.Holder{Pid: st.Pid, StartTime: st.StartTime}
}

func load(sb *store.Sandbox) (state, error) {
	var st state
	if len(sb.Family) == 0 {
		return st, fmt.Errorf("sandbox %s has no pod state: %w", sb.ID, errdefs.ErrFailedPrecondition)
	}
	return st, sb.DecodeFamily(&st)
}

func save(sb *store.Sandbox, st state) error { return sb.EncodeFamily(st) }

// Family implements controller.Sandboxer for pods under an application
// kernel, delegating to the pod's engine.
type Family struct {
	dir     string
	cfg     *Config
	engines map[string]Engine
	log     *zap.Logger
}

var (
	_ controller.Sandboxer = (*Family)(nil)
	_ controller.Recoverer = (*Family)(nil)
	_ controller.Updater   = (*Family)(nil)
)

// New returns the family; each pod gets a directory below dir.
func New(dir string, cfg *Config, engines []Engine, log *zap.Logger) *Family {
	f := &Family{dir: dir, cfg: cfg, engines: map[string]Engine{}, log: log}
	for _, e := range engines {
		f.engines[e.Name()] = e
	}
	return f
}

// annotation returns a pod annotation from the CRI pod config, or from the
// sandbox's own annotations.
func annotation(sb *store.Sandbox, cfg *runtimeapi.PodSandboxConfig, key string) (string, bool) {
	if v, ok := cfg.GetAnnotations()[key]; ok {
		return v, true
	}
	v, ok := sb.Annotations[key]
	return v, ok
}

func (f *Family) pod(sb *store.Sandbox, st state) (*Pod, error) {
	cfg, err := controller.PodConfig(sb)
	if err != nil {
		return nil, err
	}
	p := &Pod{
		ID:        sb.ID,
		Dir:       filepath.Join(f.dir, sb.ID),
		NetnsPath: sb.NetnsPath,
		Config:    cfg,
		Running:   sb.State == store.StateRunning,
		Platform:  st.Platform,
		State:     st.EngineState,
	}
	if st.PodCgroup != "" {
		p.Cgroup = path.Join(st.PodCgroup, sb.ID)
	}
	return p, nil
}

// resolve returns what every operation on a created pod needs: its state,
// its engine and the engine's view of it.
func (f *Family) resolve(sb *store.Sandbox) (state, Engine, *Pod, error) {
	st, err := load(sb)
	if err != nil {
		return st, nil, nil, err
	}
	eng, err := f.engine(st)
	if err != nil {
		return st, nil, nil, err
	}
	pod, err := f.pod(sb, st)
	return st, eng, pod, err
}

func (f *Family) engine(st state) (Engine, error) {
	e, ok := f.engines[st.Engine]
	if !ok {
		return nil, fmt.Errorf("engine %q is not available in this daemon: %w", st.Engine, errdefs.ErrFailedPrecondition)
	}
	return e, nil
}

// Create chooses the pod's engine (and gVisor platform), checks that the
// engine can run, and lets it prepare the pod's directory.
func (f *Family) Create(ctx context.Context, sb *store.Sandbox) error {
	cfg, err := controller.PodConfig(sb)
	if err != nil {
		return err
	}
	st := state{Engine: f.cfg.Engine}
	if v, ok := annotation(sb, cfg, AnnotationEngine); ok {
		if err := f.cfg.AllowEngine(v); err != nil {
			return fmt.Errorf("annotation %s: %w", AnnotationEngine, err)
		}
		st.Engine = v
	}
	eng, err := f.engine(st)
	if err != nil {
		return err
	}
	if err := eng.Check(); err != nil {
		return fmt.Errorf("engine %s cannot run pods: %v: %w", st.Engine, err, errdefs.ErrFailedPrecondition)
	}
	ns := cfg.GetLinux().GetSecurityContext().GetNamespaceOptions()
	if ns.GetNetwork() == runtimeapi.NamespaceMode_NODE && sb.NetnsPath != "" {
		return fmt.Errorf("pod asks for the node's network but carries netns %s: %w", sb.NetnsPath, errdefs.ErrInvalidArgument)
	}
	if ns.GetUsernsOptions() != nil && ns.GetUsernsOptions().GetMode() == runtimeapi.NamespaceMode_POD {
		return fmt.Errorf("user namespaces per pod are not supported: %w", errdefs.ErrNotImplemented)
	}
	if st.Engine == EngineGVisor {
		st.Platform = f.cfg.GVisor.Platform
		if v, ok := annotation(sb, cfg, AnnotationPlatform); ok {
			if err := f.cfg.AllowPlatform(v); err != nil {
				return fmt.Errorf("annotation %s: %w", AnnotationPlatform, err)
			}
			st.Platform = v
		}
	}
	if st.PodCgroup, st.OwnPodCgroup, err = cgroup.PodPath(cfg.GetLinux().GetCgroupParent(), sb.ID); err != nil {
		return err
	}
	pod, err := f.pod(sb, st)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(f.dir, 0o700); err != nil {
		return err
	}
	// A directory left by a daemon that died during a Create.
	if err := RemoveDir(pod.Dir); err != nil {
		return err
	}
	if err := os.Mkdir(pod.Dir, 0o700); err != nil {
		return err
	}
	if err := eng.Create(ctx, pod); err != nil {
		if rerr := RemoveDir(pod.Dir); rerr != nil {
			f.log.Error("clean up after failed create", zap.String("sandbox", sb.ID), zap.Error(rerr))
		}
		return err
	}
	st.EngineState = pod.State
	f.log.Debug("pod created", zap.String("sandbox", sb.ID), zap.String("engine", st.Engine), zap.String("platform", st.Platform))
	return save(sb, st)
}

// Start runs the pod's sandbox.
func (f *Family) Start(ctx context.Context, sb *store.Sandbox) (<-chan controller.Exit, error) {
	st, eng, pod, err := f.resolve(sb)
	if err != nil {
		return nil, err
	}
	started, err := eng.Start(ctx, pod)
	if err != nil {
		return nil, err
	}
	st.Pid = started.Pid
	st.StartTime, err = proc.StartTime(started.Pid)
	if err == nil {
		st.EngineState = pod.State
		err = save(sb, st)
	} else {
		err = fmt.Errorf("sandbox process %d ended right after start: %w", started.Pid, errdefs.ErrInternal)
	}
	if err != nil {
		if serr := eng.Stop(context.WithoutCancel(ctx), pod, st.sandboxProc(), 0); serr != nil {
			f.log.Error("stop after failed start", zap.String("sandbox", sb.ID), zap.Error(serr))
		}
		select {
		case <-started.Exited:
		case <-time.After(10 * time.Second):
			f.log.Error("sandbox process did not exit after a failed start", zap.String("sandbox", sb.ID), zap.Int("pid", started.Pid))
		}
		return nil, err
	}
	sb.Pid = uint32(started.Pid)
	sb.Address = started.Address
	sb.Version = started.Version
	return started.Exited, nil
}

// Recover watches the sandbox process of a pod that ran while the daemon
// was down; its exit status cannot be collected (it is not our child).
func (f *Family) Recover(ctx context.Context, sb *store.Sandbox) (<-chan controller.Exit, error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	if st.Pid == 0 {
		return nil, fmt.Errorf("sandbox %s has no process: %w", sb.ID, errdefs.ErrNotFound)
	}
	return watchProcess(st.sandboxProc())
}

// Stop ends the pod's sandbox.
func (f *Family) Stop(ctx context.Context, sb *store.Sandbox, timeout time.Duration) error {
	st, eng, pod, err := f.resolve(sb)
	if err != nil {
		return err
	}
	return eng.Stop(ctx, pod, st.sandboxProc(), timeout)
}

// Shutdown releases the pod's runtime state, cgroups and directory.
func (f *Family) Shutdown(ctx context.Context, sb *store.Sandbox) error {
	st, eng, pod, err := f.resolve(sb)
	if err != nil {
		return err
	}
	if st.Pid != 0 {
		// Never leave a sandbox process behind, whatever the engine did.
		if err := holder.Stop(st.sandboxProc(), 0); err != nil {
			return err
		}
	}
	if err := eng.Shutdown(ctx, pod); err != nil {
		return err
	}
	if st.PodCgroup != "" {
		if err := cgroup.Remove(pod.Cgroup); err != nil {
			return err
		}
		if st.OwnPodCgroup {
			if err := cgroup.Remove(st.PodCgroup); err != nil {
				return err
			}
		}
	}
	return RemoveDir(pod.Dir)
}

// Metrics reports the pod cgroup's statistics.
func (f *Family) Metrics(ctx context.Context, sb *store.Sandbox) (*types.Metric, error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	if st.PodCgroup == "" {
		return nil, fmt.Errorf("%s pods have no cgroup the sandboxer accounts: %w", st.Engine, errdefs.ErrNotImplemented)
	}
	cg, err := cgroup.Load(st.PodCgroup)
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, errdefs.ErrNotFound)
	}
	return cg.Metric(sb.ID)
}

// Update hands a sandbox update to the pod's engine.
func (f *Family) Update(ctx context.Context, sb *store.Sandbox, upd *types.Sandbox, fields []string) error {
	st, eng, pod, err := f.resolve(sb)
	if err != nil {
		return err
	}
	uerr := eng.Update(ctx, pod, upd, fields)
	// Record what the engine did even when it failed half-way, so that
	// Shutdown finds it.
	st.EngineState = pod.State
	if err := save(sb, st); err != nil {
		return err
	}
	return uerr
}

// Unmount lazily unmounts every mount at or below dir, and fails if one
// stays. Mounts below dir may lie in a container's root file system, which
// the tenant writes: they are reached from a descriptor of dir without
// following any symlink (a tenant's swap makes the unmount fail, never land
// outside), shallowest first, so that one detach takes what is mounted
// below it.
func Unmount(dir string) error {
	if err := unmountDir(dir); err != nil {
		return err
	}
	for i := 0; i < 5; i++ {
		mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
		if err != nil {
			return err
		}
		if len(mounts) == 0 {
			return nil
		}
		sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) < len(mounts[j].Mountpoint) })
		d, err := safemount.OpenDir(dir)
		if err != nil {
			return err
		}
		for _, m := range mounts {
			rel, err := filepath.Rel(dir, m.Mountpoint)
			if err != nil || rel == "." {
				continue
			}
			if err := safemount.Unmount(d, rel); err != nil {
				d.Close()
				return err
			}
		}
		d.Close()
	}
	return fmt.Errorf("mounts stay below %s", dir)
}

// unmountDir detaches what is mounted on dir itself (a path of the
// daemon's own).
func unmountDir(dir string) error {
	for {
		err := unix.Unmount(dir, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil:
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil
		default:
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
	}
}

// RemoveDir removes dir after unmounting whatever is mounted below it, so
// that removal never reaches into a bind-mounted host directory.
func RemoveDir(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := Unmount(dir); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}
