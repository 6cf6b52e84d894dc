package quark

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	pathrs "github.com/cyphar/filepath-securejoin/pathrs-lite"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/safemount"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// TasksExtension is the sandbox extension that carries a Quark pod's
// containers (Kuasar's contract): JSON of TaskResources.
const TasksExtension = "tasks"

// TaskResources is the pod's container list.
type TaskResources struct {
	Tasks []TaskResource `json:"tasks"`
}

// TaskResource is one container as containerd describes it.
type TaskResource struct {
	TaskID    string            `json:"task_id"`
	Spec      *specs.Spec       `json:"spec,omitempty"`
	Rootfs    []Mount           `json:"rootfs,omitempty"`
	Stdin     string            `json:"stdin,omitempty"`
	Stdout    string            `json:"stdout,omitempty"`
	Stderr    string            `json:"stderr,omitempty"`
	Processes []ProcessResource `json:"processes,omitempty"`
}

// ProcessResource is one exec'd process.
type ProcessResource struct {
	ExecID string         `json:"exec_id"`
	Spec   *specs.Process `json:"spec,omitempty"`
	Stdin  string         `json:"stdin,omitempty"`
	Stdout string         `json:"stdout,omitempty"`
	Stderr string         `json:"stderr,omitempty"`
}

// Mount is a rootfs mount (containerd's mount, with Kuasar's field names).
type Mount struct {
	Type    string   `json:"type"`
	Source  string   `json:"source"`
	Target  string   `json:"target,omitempty"`
	Options []string `json:"options,omitempty"`
}

// IO are a process's stdio paths as Quark sees them, relative to the
// sandbox bundle it runs in ("/<container>/stdout").
type IO struct {
	Stdin  string `json:"stdin,omitempty"`
	Stdout string `json:"stdout,omitempty"`
	Stderr string `json:"stderr,omitempty"`
}

// ContainerState is what the engine prepared for a container.
type ContainerState struct {
	Bundle    string        `json:"bundle"`
	IO        IO            `json:"io"`
	Processes map[string]IO `json:"processes,omitempty"`
}

// podState is the engine's record of a pod (sandbox.Pod.State).
type podState struct {
	Containers map[string]*ContainerState `json:"containers,omitempty"`
}

func loadState(pod *sandbox.Pod) (*podState, error) {
	st := &podState{}
	if len(pod.State) > 0 {
		if err := json.Unmarshal(pod.State, st); err != nil {
			return nil, fmt.Errorf("decode Quark state of pod %s: %w", pod.ID, err)
		}
	}
	if st.Containers == nil {
		st.Containers = map[string]*ContainerState{}
	}
	return st, nil
}

func saveState(pod *sandbox.Pod, st *podState) {
	b, _ := json.Marshal(st)
	pod.State = b
}

// Containers returns what the engine prepared for a pod's containers, by
// ID: the bundle and the IO paths as Quark sees them.
func Containers(pod *sandbox.Pod) (map[string]*ContainerState, error) {
	st, err := loadState(pod)
	if err != nil {
		return nil, err
	}
	return st.Containers, nil
}

// wantsTasks tells whether an update names the tasks extension.
func wantsTasks(fields []string) bool {
	return len(fields) == 0 || slices.Contains(fields, "extensions") || slices.Contains(fields, "extensions."+TasksExtension)
}

// Update keeps the pod's prepared containers in step with the "tasks"
// extension: new containers get bundles, gone ones lose them, and
// processes added or removed get their IO bound or unbound.
func (e *Engine) Update(ctx context.Context, pod *sandbox.Pod, upd *types.Sandbox, fields []string) error {
	if !wantsTasks(fields) {
		return nil
	}
	a, ok := upd.GetExtensions()[TasksExtension]
	if !ok {
		if len(fields) == 0 || slices.Contains(fields, "extensions") {
			return nil // an update of other fields
		}
		return fmt.Errorf("update names extensions.%s but carries none: %w", TasksExtension, errdefs.ErrInvalidArgument)
	}
	var tasks TaskResources
	if err := json.Unmarshal(a.GetValue(), &tasks); err != nil {
		return fmt.Errorf("extension %s: %v: %w", TasksExtension, err, errdefs.ErrInvalidArgument)
	}
	want := map[string]*TaskResource{}
	for i := range tasks.Tasks {
		t := &tasks.Tasks[i]
		if err := validate.ID("container", t.TaskID); err != nil {
			return err
		}
		if _, dup := want[t.TaskID]; dup {
			return fmt.Errorf("container %s listed twice: %w", t.TaskID, errdefs.ErrInvalidArgument)
		}
		for _, p := range t.Processes {
			if err := validate.ID("exec", p.ExecID); err != nil {
				return err
			}
		}
		want[t.TaskID] = t
	}
	st, err := loadState(pod)
	if err != nil {
		return err
	}
	defer saveState(pod, st)
	var errs []error
	// Gone containers first: they may free names the new ones reuse.
	for _, id := range sortedKeys(st.Containers) {
		if _, ok := want[id]; !ok {
			if err := e.removeContainer(pod, id); err != nil {
				errs = append(errs, err)
				continue
			}
			delete(st.Containers, id)
		}
	}
	for _, id := range sortedKeys(want) {
		t := want[id]
		c, ok := st.Containers[id]
		if !ok {
			if !pod.Running {
				errs = append(errs, fmt.Errorf("container %s joins pod %s, which is not running: %w", id, pod.ID, errdefs.ErrFailedPrecondition))
				continue
			}
			if c, err = e.appendContainer(pod, t); err != nil {
				errs = append(errs, err)
				continue
			}
			st.Containers[id] = c
		}
		if err := e.updateProcesses(pod, id, c, t.Processes); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// appendContainer prepares a container's bundle in the sandbox bundle:
// rootfs mounted, bind mounts resolved into it, IO bound in, config.json.
func (e *Engine) appendContainer(pod *sandbox.Pod, t *TaskResource) (_ *ContainerState, retErr error) {
	if t.Spec == nil {
		return nil, fmt.Errorf("container %s has no spec: %w", t.TaskID, errdefs.ErrInvalidArgument)
	}
	bundle := filepath.Join(bundleDir(pod), t.TaskID)
	rootfs := filepath.Join(bundle, "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if err := sandbox.RemoveDir(bundle); err != nil {
				e.log.Error("remove bundle of failed container", zap.String("container", t.TaskID), zap.Error(err))
			}
		}
	}()
	var mounts []mount.Mount
	for _, m := range t.Rootfs {
		mounts = append(mounts, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	if err := mount.All(mounts, rootfs); err != nil {
		return nil, fmt.Errorf("mount rootfs of container %s: %v: %w", t.TaskID, err, errdefs.ErrInvalidArgument)
	}
	spec := *t.Spec
	spec.Root = &specs.Root{Path: "rootfs", Readonly: t.Spec.Root != nil && t.Spec.Root.Readonly}
	root, err := safemount.OpenDir(rootfs)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	var kept []specs.Mount
	for _, m := range spec.Mounts {
		if m.Type != "bind" {
			kept = append(kept, m)
			continue
		}
		if err := bindVolume(root, m); err != nil {
			return nil, fmt.Errorf("container %s mount %s: %w", t.TaskID, m.Destination, err)
		}
	}
	spec.Mounts = kept
	io, err := bindIO(bundle, t.TaskID, "", IO{Stdin: t.Stdin, Stdout: t.Stdout, Stderr: t.Stderr})
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", t.TaskID, err)
	}
	data, err := json.Marshal(&spec)
	if err != nil {
		return nil, err
	}
	if err := store.WriteFileAtomic(filepath.Join(bundle, "config.json"), data); err != nil {
		return nil, err
	}
	e.log.Debug("container prepared", zap.String("sandbox", pod.ID), zap.String("container", t.TaskID), zap.String("bundle", bundle))
	return &ContainerState{Bundle: bundle, IO: io, Processes: map[string]IO{}}, nil
}

// updateProcesses binds the IO of new processes and unbinds gone ones'.
func (e *Engine) updateProcesses(pod *sandbox.Pod, id string, c *ContainerState, procs []ProcessResource) error {
	if c.Processes == nil {
		c.Processes = map[string]IO{}
	}
	want := map[string]ProcessResource{}
	for _, p := range procs {
		want[p.ExecID] = p
	}
	var errs []error
	dir, err := safemount.OpenDir(c.Bundle)
	if err != nil {
		return err
	}
	defer dir.Close()
	for _, execID := range sortedKeys(c.Processes) {
		if _, ok := want[execID]; ok {
			continue
		}
		for _, n := range ioNames(execID) {
			if err := unbind(dir, n); err != nil {
				errs = append(errs, err)
			}
		}
		delete(c.Processes, execID)
	}
	for _, execID := range sortedKeys(want) {
		if _, ok := c.Processes[execID]; ok {
			continue
		}
		p := want[execID]
		io, err := bindIO(c.Bundle, id, execID, IO{Stdin: p.Stdin, Stdout: p.Stdout, Stderr: p.Stderr})
		if err != nil {
			errs = append(errs, fmt.Errorf("process %s of container %s: %w", execID, id, err))
			continue
		}
		c.Processes[execID] = io
	}
	return errors.Join(errs...)
}

var stdioNames = []string{"stdin", "stdout", "stderr"}

// bindIO binds a process's IO paths into the container's bundle
// (<bundle>/stdout, <bundle>/<exec>-stdout) and returns them as Quark sees
// them from its sandbox bundle (/<container>/stdout).
func bindIO(bundle, id, execID string, host IO) (_ IO, retErr error) {
	dir, err := safemount.OpenDir(bundle)
	if err != nil {
		return IO{}, err
	}
	defer dir.Close()
	names := ioNames(execID)
	defer func() {
		if retErr != nil {
			for _, n := range names {
				unbind(dir, n)
			}
		}
	}()
	var out IO
	for i, f := range []struct {
		host string
		in   *string
	}{{host.Stdin, &out.Stdin}, {host.Stdout, &out.Stdout}, {host.Stderr, &out.Stderr}} {
		if f.host == "" {
			continue
		}
		isDir, err := sourceIsDir(f.host)
		if err != nil {
			return IO{}, fmt.Errorf("bind %s: %w", stdioNames[i], err)
		}
		target, err := safemount.Target(dir, names[i], isDir)
		if err != nil {
			return IO{}, fmt.Errorf("bind %s: %w", stdioNames[i], err)
		}
		err = safemount.Bind(f.host, target, false, 0)
		target.Close()
		if err != nil {
			return IO{}, fmt.Errorf("bind %s: %w", stdioNames[i], err)
		}
		*f.in = "/" + id + "/" + names[i]
	}
	return out, nil
}

// ioNames are the names of a process's IO paths in its container's
// bundle, in the order of stdioNames.
func ioNames(execID string) []string {
	if execID == "" {
		return stdioNames
	}
	names := make([]string, len(stdioNames))
	for i, s := range stdioNames {
		names[i] = execID + "-" + s
	}
	return names
}

// unbind unmounts and removes a bound IO path in dir, if it is there.
func unbind(dir *os.File, name string) error {
	if err := safemount.Unmount(dir, name); err != nil {
		return err
	}
	return safemount.Remove(dir, name)
}

// sourceIsDir tells whether a bind source, a host path from containerd,
// is a directory.
func sourceIsDir(source string) (bool, error) {
	st, err := os.Stat(source)
	if err != nil {
		return false, fmt.Errorf("bind source: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return st.IsDir(), nil
}

// bindVolume binds a volume into a container's rootfs (root) as the spec
// asks: recursively for rbind; read-only, nosuid, nodev, noexec on every
// mount of the copy before it is attached, so never writable.
func bindVolume(root *os.File, m specs.Mount) error {
	isDir, err := sourceIsDir(m.Source)
	if err != nil {
		return err
	}
	target, err := volumeTarget(root, m.Destination, isDir)
	if err != nil {
		return fmt.Errorf("mount point in the image: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	defer target.Close()
	recursive, attr := safemount.BindOptions(m.Options)
	return safemount.Bind(m.Source, target, recursive, attr)
}

// volumeTarget opens the mount point dest in a container's rootfs (root),
// which comes from the tenant's image: its symlinks resolve inside root, as
// runc resolves them, and what is missing is created there, a directory or
// an empty file like the source (a dangling symlink is refused). The mount
// point is never reached through a path the kernel walks again.
func volumeTarget(root *os.File, dest string, isDir bool) (*os.File, error) {
	if isDir {
		return pathrs.MkdirAllHandle(root, dest, 0o755)
	}
	target, err := pathrs.OpenatInRoot(root, dest)
	if errors.Is(err, os.ErrNotExist) {
		parent, err := pathrs.MkdirAllHandle(root, filepath.Dir(filepath.Clean("/"+dest)), 0o755)
		if err != nil {
			return nil, err
		}
		defer parent.Close()
		return safemount.Target(parent, filepath.Base(dest), false)
	}
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(target.Fd()), &st); err != nil {
		target.Close()
		return nil, err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		target.Close()
		return nil, fmt.Errorf("%s is a directory, its volume a file", dest)
	}
	return target, nil
}

// removeContainer unmounts and removes a container's bundle.
func (e *Engine) removeContainer(pod *sandbox.Pod, id string) error {
	bundle := filepath.Join(bundleDir(pod), id)
	if err := sandbox.RemoveDir(bundle); err != nil {
		return fmt.Errorf("remove bundle of container %s: %w", id, err)
	}
	e.log.Debug("container removed", zap.String("sandbox", pod.ID), zap.String("container", id))
	return nil
}
