package wasmrt

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

var (
	_ task.Restorer   = (*Runtime)(nil)
	_ task.Recorded   = (*container)(nil)
	_ task.StartTimer = (*proc)(nil)
)

// recordVersion is the version of record's layout.
const recordVersion = 1

// record is what a new daemon instance needs to serve a wasm container
// again: its module processes run on (children of the keeper) and write to
// containerd's FIFOs themselves.
type record struct {
	Version int    `json:"version"`
	ID      string `json:"id"`
	Bundle  string `json:"bundle"`
	Engine  string `json:"engine"`
	Mounted bool   `json:"rootfs_mounted,omitempty"`
	// Cgroup is the container's cgroup, "" without one.
	Cgroup string       `json:"cgroup,omitempty"`
	Paused bool         `json:"paused,omitempty"`
	Init   procRecord   `json:"init"`
	Execs  []procRecord `json:"execs,omitempty"`
}

type procRecord struct {
	ID        string      `json:"id,omitempty"`
	Pid       int         `json:"pid"`
	StartTime uint64      `json:"start_time,omitempty"`
	Stdio     stdio.Stdio `json:"stdio"`
	Started   bool        `json:"started,omitempty"`
	Exited    bool        `json:"exited,omitempty"`
	Status    int         `json:"status,omitempty"`
	At        time.Time   `json:"exited_at,omitzero"`
}

func (p *proc) record() procRecord {
	p.mu.Lock()
	defer p.mu.Unlock()
	return procRecord{ID: p.id, Pid: p.pid, StartTime: p.startTime, Stdio: p.stdio,
		Started: p.started, Exited: p.exited, Status: p.status, At: p.at}
}

// Record implements task.Recorded.
func (c *container) Record() ([]byte, error) {
	r := record{Version: recordVersion, ID: c.id, Bundle: c.bundle, Engine: c.engine, Mounted: c.mounted,
		Paused: c.isPaused(), Init: c.init.record()}
	if c.cg != nil {
		r.Cgroup = c.cg.path
	}
	for _, e := range c.List() {
		r.Execs = append(r.Execs, e.record())
	}
	return json.Marshal(r)
}

// Restore implements task.Restorer: the container as recorded, its spec
// read again from the bundle. An exec that never started is not kept: its
// runner waited for the daemon's word on a pipe that closed with it.
func (rt *Runtime) Restore(ctx context.Context, data []byte) (task.Container, error) {
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("wasm container record: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("wasm container record: %w", err)
	}
	spec, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	c := &container{id: r.ID, bundle: r.Bundle, rt: rt, spec: spec, engine: r.Engine,
		rootfs: spec.Root.Path, mounted: r.Mounted, paused: r.Paused}
	if !filepath.IsAbs(c.rootfs) {
		c.rootfs = filepath.Join(r.Bundle, c.rootfs)
	}
	if r.Cgroup != "" {
		if c.cg, err = newCgroup(r.Cgroup, nil); err != nil {
			return nil, err
		}
	}
	c.init = restoredProc(c, r.Init)
	for _, e := range r.Execs {
		if !e.Started && !e.Exited {
			continue
		}
		c.Add(e.ID, restoredProc(c, e))
	}
	return c, nil
}

func restoredProc(c *container, r procRecord) *proc {
	p := &proc{id: r.ID, pid: r.Pid, startTime: r.StartTime, stdio: r.Stdio, c: c, restored: true,
		started: r.Started, waitCh: make(chan struct{}), reaped: make(chan struct{})}
	if r.Exited {
		p.exited, p.status, p.at = true, r.Status, r.At
		close(p.waitCh)
		close(p.reaped)
	}
	return p
}

func (r record) validate() error {
	if r.Version != recordVersion {
		return fmt.Errorf("version %d, want %d: %w", r.Version, recordVersion, errdefs.ErrInvalidArgument)
	}
	if err := validate.ID("container", r.ID); err != nil {
		return err
	}
	if err := validate.AbsPath("bundle", r.Bundle); err != nil {
		return err
	}
	if r.Cgroup != "" && !filepath.IsAbs(r.Cgroup) {
		return fmt.Errorf("cgroup %q is not absolute: %w", r.Cgroup, errdefs.ErrInvalidArgument)
	}
	for _, p := range append([]procRecord{r.Init}, r.Execs...) {
		if p.ID != "" {
			if err := validate.ID("exec", p.ID); err != nil {
				return err
			}
		}
		if p.Pid <= 0 || p.Status < 0 || p.Status > 255 {
			return fmt.Errorf("process %q: pid %d, status %d: %w", p.ID, p.Pid, p.Status, errdefs.ErrInvalidArgument)
		}
	}
	if r.Init.ID != "" {
		return fmt.Errorf("init with exec id %q: %w", r.Init.ID, errdefs.ErrInvalidArgument)
	}
	return nil
}
