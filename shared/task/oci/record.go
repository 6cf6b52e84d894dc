package oci

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// recordVersion is the version of the record format (see the package
// doc); Restore refuses others.
const recordVersion = 1

type record struct {
	Version       int             `json:"version"`
	ID            string          `json:"id"`
	Bundle        string          `json:"bundle"`
	Runtime       runtimeRecord   `json:"runtime"`
	RootfsMounted bool            `json:"rootfs_mounted"`
	Init          processRecord   `json:"init"`
	Execs         []processRecord `json:"execs,omitempty"`
}

// runtimeRecord is what rebuilds the container's runc.Runc and the
// options runc create/exec take: containerd's runc options as resolved.
type runtimeRecord struct {
	Binary string `json:"binary"`
	// Root is the --root runc gets (the namespace's directory).
	Root          string `json:"root"`
	SystemdCgroup bool   `json:"systemd_cgroup,omitempty"`
	NoPivotRoot   bool   `json:"no_pivot_root,omitempty"`
	NoNewKeyring  bool   `json:"no_new_keyring,omitempty"`
	IoUID         int    `json:"io_uid,omitempty"`
	IoGID         int    `json:"io_gid,omitempty"`
}

type processRecord struct {
	// ID is the exec ID; empty for the init.
	ID         string      `json:"id,omitempty"`
	Pid        int         `json:"pid"`
	StartTime  uint64      `json:"start_time"`
	Status     string      `json:"status"`
	ExitStatus int         `json:"exit_status"`
	ExitedAt   time.Time   `json:"exited_at,omitzero"`
	Stdio      stdioRecord `json:"stdio"`
	// Spec is an exec's OCI process: a created exec is started from it.
	Spec *specs.Process `json:"spec,omitempty"`
}

type stdioRecord struct {
	Stdin    string `json:"stdin,omitempty"`
	Stdout   string `json:"stdout,omitempty"`
	Stderr   string `json:"stderr,omitempty"`
	Terminal bool   `json:"terminal,omitempty"`
}

func toStdioRecord(s stdio.Stdio) stdioRecord {
	return stdioRecord{Stdin: s.Stdin, Stdout: s.Stdout, Stderr: s.Stderr, Terminal: s.Terminal}
}

func (s stdioRecord) stdio() stdio.Stdio {
	return stdio.Stdio{Stdin: s.Stdin, Stdout: s.Stdout, Stderr: s.Stderr, Terminal: s.Terminal}
}

// Record describes the container so that Runtime.Restore in a new daemon
// instance rebuilds it in the same state. A process in the middle of an
// operation (start, pause, kill) is recorded once that ends.
func (c *Container) Record() ([]byte, error) {
	rec := record{
		Version: recordVersion,
		ID:      c.id,
		Bundle:  c.bundle,
		Runtime: runtimeRecord{
			Binary:        c.runc.Command,
			Root:          c.runc.Root,
			SystemdCgroup: c.runc.SystemdCgroup,
			NoPivotRoot:   c.noPivotRoot,
			NoNewKeyring:  c.noNewKeyring,
			IoUID:         c.ioUID,
			IoGID:         c.ioGID,
		},
		RootfsMounted: c.rootfsMounted,
	}
	p := c.init
	p.mu.Lock()
	rec.Init = processRecord{
		Pid: p.pid, StartTime: p.startTime, Status: p.state,
		ExitStatus: p.status, ExitedAt: p.exited, Stdio: toStdioRecord(p.stdio),
	}
	p.mu.Unlock()
	for _, e := range c.execs.List() {
		e.mu.Lock()
		if e.state != stateDeleted {
			spec := e.spec
			rec.Execs = append(rec.Execs, processRecord{
				ID: e.id, Pid: e.Pid(), StartTime: e.StartTime(), Status: e.state,
				ExitStatus: e.status, ExitedAt: e.exited, Stdio: toStdioRecord(e.stdio), Spec: &spec,
			})
		}
		e.mu.Unlock()
	}
	data, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("record container %s: %w", c.id, err)
	}
	return data, nil
}

// Restore rebuilds a container from its Record, in the recorded state and
// with no IO objects: its processes have their stdio themselves. A
// terminal process comes back without its console. Whether the recorded
// running processes still run is for the caller to find out (SetExited).
func (rt *Runtime) Restore(ctx context.Context, data []byte) (task.Container, error) {
	var rec record
	// Unmarshal, not a Decoder: Decoder.More misses a trailing '}' or ']'.
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, fmt.Errorf("container record: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	if err := rec.validate(); err != nil {
		return nil, fmt.Errorf("container record: %w", err)
	}
	c := &Container{
		rt:            rt,
		id:            rec.ID,
		bundle:        rec.Bundle,
		runc:          newRunc(rec.Runtime.Binary, rec.Runtime.Root, rec.Bundle, rec.Runtime.SystemdCgroup),
		noPivotRoot:   rec.Runtime.NoPivotRoot,
		noNewKeyring:  rec.Runtime.NoNewKeyring,
		ioUID:         rec.Runtime.IoUID,
		ioGID:         rec.Runtime.IoGID,
		rootfsMounted: rec.RootfsMounted,
	}
	c.init = &Init{c: c, pid: rec.Init.Pid, startTime: rec.Init.StartTime, stdio: rec.Init.Stdio.stdio()}
	c.init.exitState = restoredExitState(rec.Init)
	c.init.io.noConsole = rec.Init.Stdio.Terminal
	for _, pr := range rec.Execs {
		e := &Exec{c: c, id: pr.ID, spec: *pr.Spec, stdio: pr.Stdio.stdio()}
		e.exitState = restoredExitState(pr)
		e.pid.Store(int64(pr.Pid))
		e.startTime.Store(pr.StartTime)
		// A created exec gets its console when started.
		e.io.noConsole = pr.Stdio.Terminal && pr.Status != stateCreated
		c.execs.Add(pr.ID, e)
	}
	switch rec.Init.Status {
	case stateCreated, stateRunning, statePaused:
		c.cgroup = loadCgroup(rec.Init.Pid, rec.Init.StartTime)
	}
	return c, nil
}

func restoredExitState(pr processRecord) exitState {
	s := newExitState(pr.Status)
	if pr.Status == stateStopped || pr.Status == stateDeleted {
		s.status, s.exited = pr.ExitStatus, pr.ExitedAt
		close(s.waitBlock)
	}
	return s
}

// validate refuses records Restore cannot trust: they name paths runc and
// the daemon act on.
func (rec *record) validate() error {
	if rec.Version != recordVersion {
		return fmt.Errorf("version %d, want %d: %w", rec.Version, recordVersion, errdefs.ErrInvalidArgument)
	}
	if err := validate.ID("container", rec.ID); err != nil {
		return err
	}
	if err := validate.AbsPath("bundle", rec.Bundle); err != nil {
		return err
	}
	if rec.Runtime.Binary == "" || strings.ContainsRune(rec.Runtime.Binary, 0) ||
		(strings.ContainsRune(rec.Runtime.Binary, '/') && !filepath.IsAbs(rec.Runtime.Binary)) {
		return fmt.Errorf("runtime binary %q: %w", rec.Runtime.Binary, errdefs.ErrInvalidArgument)
	}
	if err := validate.AbsPath("runtime root", rec.Runtime.Root); err != nil {
		return err
	}
	if rec.Runtime.IoUID < 0 || rec.Runtime.IoGID < 0 {
		return fmt.Errorf("io uid/gid %d:%d: %w", rec.Runtime.IoUID, rec.Runtime.IoGID, errdefs.ErrInvalidArgument)
	}
	if rec.Init.ID != "" {
		return fmt.Errorf("init has an exec id: %w", errdefs.ErrInvalidArgument)
	}
	if err := rec.Init.validate("init", true); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, e := range rec.Execs {
		if err := validate.ID("exec", e.ID); err != nil {
			return err
		}
		if seen[e.ID] {
			return fmt.Errorf("exec %s recorded twice: %w", e.ID, errdefs.ErrInvalidArgument)
		}
		seen[e.ID] = true
		if err := e.validate("exec "+e.ID, false); err != nil {
			return err
		}
	}
	return nil
}

func (pr *processRecord) validate(what string, init bool) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: %s: %w", what, fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument)
	}
	switch pr.Status {
	case stateCreated, stateRunning, stateStopped:
	case statePaused, stateDeleted:
		if !init {
			return bad("status %q", pr.Status)
		}
	default:
		return bad("status %q", pr.Status)
	}
	// runc create gives the init its PID; an exec has one once started.
	needPid := init || pr.Status == stateRunning
	if pr.Pid < 0 || (needPid && pr.Pid == 0) || (!init && pr.Status == stateCreated && pr.Pid != 0) {
		return bad("pid %d in status %s", pr.Pid, pr.Status)
	}
	if pr.ExitStatus < 0 || pr.ExitStatus > 255 {
		return bad("exit status %d", pr.ExitStatus)
	}
	for _, p := range []string{pr.Stdio.Stdin, pr.Stdio.Stdout, pr.Stdio.Stderr} {
		if strings.ContainsRune(p, 0) {
			return bad("stdio path with a NUL byte")
		}
	}
	if init {
		if pr.Spec != nil {
			return bad("a process spec")
		}
	} else if pr.Spec == nil || len(pr.Spec.Args) == 0 {
		return bad("no process spec")
	}
	return nil
}
