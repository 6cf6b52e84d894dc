// Package cgroup manages a pod's cgroup on cgroup v1 (legacy or hybrid
// hosts) and v2 (unified hosts) behind one type, and reports its statistics
// as containerd metrics.
package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Group is one cgroup path in every hierarchy the host uses.
type Group struct {
	path string
	v1   cgroup1.Cgroup
	v2   *cgroup2.Manager
}

func unified() bool { return cgroups.Mode() == cgroups.Unified }

// New creates the cgroup at path (idempotent).
func New(path string) (*Group, error) { return NewLimited(path, &specs.LinuxResources{}) }

// NewLimited creates the cgroup at path with res's limits (idempotent).
func NewLimited(path string, res *specs.LinuxResources) (*Group, error) {
	if unified() {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", path, cgroup2.ToResources(res))
		if err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", path, err)
		}
		return &Group{path: path, v2: m}, nil
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(path), res)
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	return &Group{path: path, v1: cg}, nil
}

// Load opens the existing cgroup at path.
func Load(path string) (*Group, error) {
	if unified() {
		m, err := cgroup2.Load(path)
		if err != nil {
			return nil, fmt.Errorf("load cgroup %s: %w", path, err)
		}
		return &Group{path: path, v2: m}, nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		return nil, fmt.Errorf("load cgroup %s: %w", path, err)
	}
	return &Group{path: path, v1: cg}, nil
}

// Path is the cgroup's path below the hierarchy roots.
func (g *Group) Path() string { return g.path }

// Add moves pid into the cgroup.
func (g *Group) Add(pid int) error {
	if g.v2 != nil {
		return g.v2.AddProc(uint64(pid))
	}
	return g.v1.Add(cgroup1.Process{Pid: pid})
}

// Delete removes the cgroup; it must hold no processes. A cgroup that is
// already gone is not an error.
func (g *Group) Delete() error {
	var err error
	if g.v2 != nil {
		err = g.v2.Delete()
	} else {
		err = g.v1.Delete()
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete cgroup %s: %w", g.path, err)
	}
	// On hybrid hosts runc also creates the path in the unified hierarchy
	// (for systemd's process tracking), which the v1 manager does not know.
	if cgroups.Mode() == cgroups.Hybrid {
		if err := os.Remove(filepath.Join(unifiedMountpoint, g.path)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("delete cgroup %s in the unified hierarchy: %w", g.path, err)
		}
	}
	return nil
}

// OOMKills is how many of the cgroup's processes the kernel's OOM killer
// killed.
func (g *Group) OOMKills() (uint64, error) {
	if g.v2 != nil {
		st, err := g.v2.Stat()
		if err != nil {
			return 0, fmt.Errorf("stat cgroup %s: %w", g.path, err)
		}
		return st.GetMemoryEvents().GetOomKill(), nil
	}
	st, err := g.v1.Stat(cgroup1.IgnoreNotExist)
	if err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", g.path, err)
	}
	return st.GetMemoryOomControl().GetOomKill(), nil
}

// unifiedMountpoint is where hybrid hosts mount the v2 hierarchy.
const unifiedMountpoint = "/sys/fs/cgroup/unified"

// Metric returns the cgroup's statistics (including its children's) in
// the form containerd's CRI decodes.
func (g *Group) Metric(id string) (*types.Metric, error) {
	var (
		stats any
		err   error
	)
	if g.v2 != nil {
		stats, err = g.v2.Stat()
	} else {
		stats, err = g.v1.Stat(cgroup1.IgnoreNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("stat cgroup %s: %w", g.path, err)
	}
	data, err := typeurl.MarshalAnyToProto(stats)
	if err != nil {
		return nil, err
	}
	return &types.Metric{Timestamp: timestamppb.New(time.Now()), ID: id, Data: data}, nil
}

// OwnRoot holds the cgroups of pods that CRI gave no cgroup parent.
const OwnRoot = "/kuasar-go"

// PodPath is the cgroup of pod id: CRI's cgroup parent, or OwnRoot/<id>
// (own is then true: the sandboxer made it and removes it) when there is
// none. Only cgroupfs paths are supported.
func PodPath(parent, id string) (p string, own bool, err error) {
	if parent == "" {
		return path.Join(OwnRoot, id), true, nil
	}
	if !strings.HasPrefix(parent, "/") || path.Clean(parent) != parent {
		return "", false, fmt.Errorf("cgroup parent %q must be a clean absolute cgroupfs path (the systemd cgroup driver is not supported): %w", parent, errdefs.ErrInvalidArgument)
	}
	return parent, false, nil
}

// Remove deletes the cgroup at p, waiting while its last processes leave
// (a cgroup empties a moment after they were killed). A cgroup that is
// already gone is not an error.
func Remove(p string) error {
	g, err := Load(p)
	if err != nil {
		return nil
	}
	var derr error
	for i := 0; i < 100; i++ {
		if derr = g.Delete(); derr == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return derr
}
