package vmtask

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"go.uber.org/zap"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// record is what the host keeps of a container so that a restarted daemon
// can serve it again; the guest keeps the rest (status, PID, exit).
type record struct {
	ID        string `json:"id"`
	Bundle    string `json:"bundle"`
	Namespace string `json:"namespace"`
	// Mounts names the mount points in the container's directory in the
	// share (records of earlier versions hold their absolute paths).
	Mounts   []string `json:"mounts"`
	Stdin    string   `json:"stdin,omitempty"`
	Stdout   string   `json:"stdout,omitempty"`
	Stderr   string   `json:"stderr,omitempty"`
	Terminal bool     `json:"terminal,omitempty"`
	Pid      uint32   `json:"pid"`
}

func (s *Service) recordPath(id string) string { return filepath.Join(s.recordDir, id+".json") }

// saveRecord writes the container's record atomically, root-only.
func (s *Service) saveRecord(c *container) error {
	if err := os.MkdirAll(s.recordDir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(record{
		ID: c.id, Bundle: c.bundle, Namespace: c.namespace, Mounts: c.mounts,
		Stdin: c.init.stdio.Stdin, Stdout: c.init.stdio.Stdout, Stderr: c.init.stdio.Stderr, Terminal: c.init.stdio.Terminal,
		Pid: c.init.pid,
	})
	if err != nil {
		return err
	}
	return store.WriteFileAtomic(s.recordPath(c.id), b)
}

func (s *Service) removeRecord(id string) {
	if err := os.Remove(s.recordPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("remove container record", zap.String("container", id), zap.Error(err))
	}
}

// Restore serves again the containers a previous instance of the daemon
// created in this pod: their records on the host, their state from the
// guest, which kept running. A container that ended meanwhile reports its
// real exit status; one the guest no longer has is released. The output of
// a running container goes on: the keeper held containerd's FIFOs open,
// and the guest kept the container's output until the host attached again.
func (s *Service) Restore(ctx context.Context) error {
	ents, err := os.ReadDir(s.recordDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || validate.ID("container", id) != nil {
			continue
		}
		if err := s.restoreOne(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("container %s: %w", id, err))
		}
	}
	return errors.Join(errs...)
}

// decodeRecord reads the record of container id, whose directory in the
// share is dir: InvalidArgument for what a restarted daemon cannot trust.
// Its mount points come back as names in dir (records of earlier versions
// hold absolute paths): each is unmounted and removed there when the
// container goes, so none may be dir itself.
func decodeRecord(b []byte, id, dir string) (record, error) {
	bad := func(format string, args ...any) (record, error) {
		return record{}, fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), errdefs.ErrInvalidArgument)
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return bad("%v", err)
	}
	if r.ID != id {
		return bad("holds container %q", r.ID)
	}
	if err := validate.AbsPath("bundle", r.Bundle); err != nil {
		return record{}, err
	}
	if err := identifiers.Validate(r.Namespace); err != nil {
		return bad("namespace: %v", err)
	}
	for _, p := range []string{r.Stdin, r.Stdout, r.Stderr} {
		if p != "" {
			if err := validate.AbsPath("stdio", p); err != nil {
				return record{}, err
			}
		}
	}
	mounts := r.Mounts
	r.Mounts = nil
	for _, m := range mounts {
		if filepath.IsAbs(m) {
			m, _ = filepath.Rel(dir, m)
		}
		if !filepath.IsLocal(m) || m == "." || strings.ContainsRune(m, '/') {
			return bad("mount point %q is not in the container's directory", m)
		}
		r.Mounts = append(r.Mounts, m)
	}
	return r, nil
}

func (s *Service) restoreOne(ctx context.Context, id string) error {
	b, err := os.ReadFile(s.recordPath(id))
	if err != nil {
		return err
	}
	dir := filepath.Join(s.share.HostDir, id)
	r, err := decodeRecord(b, id, dir)
	if err != nil {
		return fmt.Errorf("record %s: %w", s.recordPath(id), err)
	}
	c := &container{id: r.ID, bundle: r.Bundle, namespace: r.Namespace, dir: dir, mounts: r.Mounts,
		execs: map[string]*process{}}
	st, err := s.agent.ProcessState(ctx, &vmmtask.ProcessStateRequest{ContainerId: id})
	if errdefs.IsNotFound(errgrpc.ToNative(err)) {
		s.log.Info("container gone from the guest; releasing it", zap.String("container", id))
		s.releaseHost(c)
		s.removeRecord(id)
		return nil
	}
	if err != nil {
		return err
	}
	p := &process{
		ap: s.agent.Attach(id, ""), pid: st.Pid, exited: make(chan struct{}),
		stdio: taskAPI.StateResponse{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	}
	c.init = p
	switch st.Status {
	case "CREATED":
		p.status = statusCreated
	case "STOPPED":
		p.status, p.exitStatus, p.exitedAt = statusStopped, st.ExitStatus, time.Unix(0, st.ExitedAtUnixNs)
		close(p.exited)
	default:
		p.status = statusRunning
	}
	if p.status == statusRunning {
		// The keeper kept containerd's readers of the output FIFOs open:
		// the output goes on where it stopped.
		hio, stdio, err := openIO(ctx, "", r.Stdout, r.Stderr)
		if err != nil {
			s.log.Warn("container output is not captured after the restart", zap.String("container", id), zap.Error(err))
		} else if ap, err := s.agent.AttachIO(ctx, id, "", stdio); err != nil {
			hio.Close()
			s.log.Warn("container output is not captured after the restart", zap.String("container", id), zap.Error(err))
		} else {
			p.io, p.ap = hio, ap
			s.holdIO(ctx, id, r.Stdout, r.Stderr)
		}
	}
	s.mu.Lock()
	s.containers[id] = c
	s.mu.Unlock()
	switch p.status {
	case statusRunning:
		go s.waitExit(c, p)
	case statusStopped:
		// containerd learns of it from Wait as well; the event is for
		// whoever missed it while the daemon was down.
		s.publish(c.namespace, runtime.TaskExitEventTopic, &eventstypes.TaskExit{
			ContainerID: id, ID: id, Pid: p.pid, ExitStatus: p.exitStatus, ExitedAt: protobuf.ToTimestamp(p.exitedAt),
		})
	}
	s.log.Info("container restored", zap.String("container", id), zap.String("status", st.Status), zap.Uint32("guest_pid", st.Pid))
	return nil
}
