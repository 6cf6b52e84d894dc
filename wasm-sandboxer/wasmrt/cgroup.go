package wasmrt

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// cgroup is a container's cgroup in the hierarchy the host uses (v1 on
// legacy and hybrid hosts, v2 on unified ones), with the spec's limits.
type cgroup struct {
	path string
	v1   cgroup1.Cgroup
	v2   *cgroup2.Manager
}

func newCgroup(path string, res *specs.LinuxResources) (*cgroup, error) {
	if res == nil {
		res = &specs.LinuxResources{}
	}
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", path, cgroup2.ToResources(res))
		if err != nil {
			return nil, fmt.Errorf("create cgroup %s: %w", path, err)
		}
		return &cgroup{path: path, v2: m}, nil
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(path), res)
	if err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", path, err)
	}
	return &cgroup{path: path, v1: cg}, nil
}

// object is what the task service's stats and OOM watch take.
func (g *cgroup) object() any {
	if g.v2 != nil {
		return g.v2
	}
	return g.v1
}

func (g *cgroup) add(pid int) error {
	if g.v2 != nil {
		return g.v2.AddProc(uint64(pid))
	}
	return g.v1.Add(cgroup1.Process{Pid: pid})
}

func (g *cgroup) update(res *specs.LinuxResources) error {
	if g.v2 != nil {
		return g.v2.Update(cgroup2.ToResources(res))
	}
	return g.v1.Update(res)
}

func (g *cgroup) freeze() error {
	if g.v2 != nil {
		return g.v2.Freeze()
	}
	return g.v1.Freeze()
}

func (g *cgroup) thaw() error {
	if g.v2 != nil {
		return g.v2.Thaw()
	}
	return g.v1.Thaw()
}

// delete removes the cgroup, waiting briefly for processes that are
// still exiting.
func (g *cgroup) delete() error {
	var err error
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if g.v2 != nil {
			err = g.v2.Delete()
		} else {
			err = g.v1.Delete()
		}
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("delete cgroup %s: %w", g.path, err)
		}
	}
}
