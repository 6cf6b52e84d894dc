package gvisor

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

var (
	_ task.Restorer   = (*Runtime)(nil)
	_ task.Recorded   = (*container)(nil)
	_ task.StartTimer = (*initProcess)(nil)
)

// recordVersion is the version of record's layout.
const recordVersion = 1

// record is what a new daemon instance needs to serve a runsc container
// again: the container runs on in its pod's sandbox, its waiter (a child of
// the keeper) stands for it, and it writes to containerd's FIFOs itself.
// Exec'd processes are not recorded: their IO is copied by the daemon.
type record struct {
	Version   int    `json:"version"`
	ID        string `json:"id"`
	Bundle    string `json:"bundle"`
	SandboxID string `json:"sandbox_id"`
	// Runsc is the runsc command line of the container's pod.
	Runsc struct {
		Binary string   `json:"binary"`
		Root   string   `json:"root"`
		Args   []string `json:"args,omitempty"`
	} `json:"runsc"`
	// Rootfs is where the rootfs is mounted, "" when containerd gave none.
	Rootfs     string      `json:"rootfs,omitempty"`
	Stdio      stdio.Stdio `json:"stdio"`
	Pid        int         `json:"pid,omitempty"`
	StartTime  uint64      `json:"start_time,omitempty"`
	Started    bool        `json:"started,omitempty"`
	Paused     bool        `json:"paused,omitempty"`
	Exited     bool        `json:"exited,omitempty"`
	ExitStatus int         `json:"exit_status,omitempty"`
	ExitedAt   time.Time   `json:"exited_at,omitzero"`
}

// Record implements task.Recorded.
func (c *container) Record() ([]byte, error) {
	p := c.init
	r := record{Version: recordVersion, ID: c.id, Bundle: c.bundle, SandboxID: c.sandboxID, Rootfs: p.Rootfs, Stdio: p.stdio}
	r.Runsc.Binary, r.Runsc.Root, r.Runsc.Args = p.runc.Command, p.runc.Root, p.runc.ExtraArgs
	p.mu.Lock()
	r.Pid, r.StartTime, r.Started, r.Paused = p.pid, p.startTime, p.started, p.paused
	p.mu.Unlock()
	if st, _ := p.Init.Status(context.Background()); st == "stopped" {
		r.Exited, r.ExitStatus, r.ExitedAt = true, p.ExitStatus(), p.ExitedAt()
	}
	return json.Marshal(r)
}

// Restore implements task.Restorer: the container as recorded, with
// containerd's process.Init made again for runsc's commands (kill, delete,
// exec, update). A terminal's console is not: it was the daemon's.
func (rt *Runtime) Restore(ctx context.Context, data []byte) (task.Container, error) {
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("runsc container record: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("runsc container record: %w", err)
	}
	args, err := rt.runscArgs(&r)
	if err != nil {
		return nil, fmt.Errorf("runsc container record: %w", err)
	}
	rc := &runc.Runc{
		Command:      r.Runsc.Binary,
		Root:         r.Runsc.Root,
		Log:          filepath.Join(r.Bundle, "log.json"),
		LogFormat:    runc.JSON,
		PdeathSignal: unix.SIGKILL,
		ExtraArgs:    args,
	}
	stdioOf := r.Stdio
	stdioOf.Terminal = false
	init := &initProcess{
		Init: rt.newInit(r.ID, r.Bundle, r.Rootfs, rc, stdio.Stdio{}),
		rt:   rt, runc: rc, id: r.ID, stdio: stdioOf,
		pid: r.Pid, startTime: r.StartTime, started: r.Started, paused: r.Paused,
	}
	if r.Exited {
		init.Init.SetExited(r.ExitStatus)
		init.exitedAt = r.ExitedAt
	}
	return &container{id: r.ID, bundle: r.Bundle, sandboxID: r.SandboxID, init: init, log: rt.log}, nil
}

// ExitedAt implements process.Process.
func (p *initProcess) ExitedAt() time.Time {
	if !p.exitedAt.IsZero() {
		return p.exitedAt
	}
	return p.Init.ExitedAt()
}

func (r record) validate() error {
	if r.Version != recordVersion {
		return fmt.Errorf("version %d, want %d: %w", r.Version, recordVersion, errdefs.ErrInvalidArgument)
	}
	if err := validate.ID("container", r.ID); err != nil {
		return err
	}
	if err := validate.ID("sandbox", r.SandboxID); err != nil {
		return err
	}
	if err := validate.AbsPath("bundle", r.Bundle); err != nil {
		return err
	}
	if r.Rootfs != "" && r.Rootfs != filepath.Join(r.Bundle, "rootfs") {
		return fmt.Errorf("rootfs %q is not the bundle's: %w", r.Rootfs, errdefs.ErrInvalidArgument)
	}
	if r.Pid < 0 || (r.Started && r.Pid == 0) {
		return fmt.Errorf("pid %d: %w", r.Pid, errdefs.ErrInvalidArgument)
	}
	if r.ExitStatus < 0 || r.ExitStatus > 255 {
		return fmt.Errorf("exit status %d: %w", r.ExitStatus, errdefs.ErrInvalidArgument)
	}
	return nil
}

// runscArgs checks that the record names the engine's runsc and root and
// returns the global flags the engine gives the container's pod. Of the
// recorded flags only the pod's platform and network mode count; the rest
// is the configuration's, never a record's (a flag can name a file runsc
// writes, or another root).
func (rt *Runtime) runscArgs(r *record) ([]string, error) {
	if r.Runsc.Binary != rt.engine.Binary() || r.Runsc.Root != rt.engine.root {
		return nil, fmt.Errorf("runsc %q with root %q, not the daemon's %q with root %q: %w",
			r.Runsc.Binary, r.Runsc.Root, rt.engine.Binary(), rt.engine.root, errdefs.ErrInvalidArgument)
	}
	pod := &sandbox.Pod{ID: r.SandboxID}
	for _, a := range r.Runsc.Args {
		if p, ok := strings.CutPrefix(a, "--platform="); ok {
			pod.Platform = p
		} else if a == "--network=sandbox" {
			// The flags tell that the pod has a network namespace of its
			// own, not its path; the engine's flags need no more.
			pod.NetnsPath = "(recorded)"
		}
	}
	if err := sandbox.ValidatePlatform(pod.Platform); err != nil {
		return nil, fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
	}
	return rt.engine.args(pod), nil
}
