package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// record is what the service keeps of a container across daemon restarts,
// in <recordDir>/<id>.json.
type record struct {
	SandboxID string `json:"sandbox_id"`
	Namespace string `json:"namespace"`
	// Container is the runtime's own record (Recorded).
	Container json.RawMessage `json:"container"`
}

// exitStatusUnknown is the status of a process that ended while no daemon
// watched and whose exit nothing recorded.
const exitStatusUnknown = 255

func (s *Service) recordPath(id string) string { return filepath.Join(s.recordDir, id+".json") }

// writeRecord writes c's record, replacing the previous one atomically.
func (s *Service) writeRecord(c *containerEntry) error {
	if s.recordDir == "" {
		return nil
	}
	rc, ok := c.Container.(Recorded)
	if !ok {
		return nil
	}
	data, err := rc.Record()
	if err != nil {
		return fmt.Errorf("record of container %s: %w", c.ID(), err)
	}
	b, err := json.Marshal(record{SandboxID: c.sandboxID, Namespace: c.namespace, Container: data})
	if err != nil {
		return err
	}
	s.recordMu.Lock()
	defer s.recordMu.Unlock()
	return store.WriteFileAtomic(s.recordPath(c.ID()), b)
}

// updateRecord rewrites the record of a container the service still has
// after a change of its processes; a failure is logged: the container
// runs on, but a restart would find it as it was.
func (s *Service) updateRecord(c *containerEntry) {
	if s.recordDir == "" {
		return
	}
	s.mu.Lock()
	current := s.containers[c.ID()] == c
	s.mu.Unlock()
	if !current {
		return
	}
	if err := s.writeRecord(c); err != nil {
		s.log.Warn("update container record", zap.String("container", c.ID()), zap.Error(err))
	}
}

func (s *Service) removeRecord(id string) {
	if s.recordDir == "" {
		return
	}
	s.recordMu.Lock()
	defer s.recordMu.Unlock()
	if err := os.Remove(s.recordPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.log.Warn("remove container record", zap.String("container", id), zap.Error(err))
	}
}

// discard ends and deletes a container the service gives up on.
func (s *Service) discard(ctx context.Context, c *containerEntry) {
	ctx = context.WithoutCancel(ctx)
	if _, err := c.Container.Delete(ctx, &taskAPI.DeleteRequest{ID: c.ID()}); err != nil {
		s.log.Warn("delete container", zap.String("container", c.ID()), zap.Error(err))
	}
}

// restore serves again the containers a previous instance of the daemon
// recorded. recorded are the exits the exit source kept while no daemon
// listened: a process that ended meanwhile reports its real status, one
// that ended unrecorded reports 255, the others are watched again.
func (s *Service) restore(ctx context.Context, recorded []Exit) error {
	rs, ok := s.runtime.(Restorer)
	if !ok {
		return fmt.Errorf("runtime %T cannot restore containers: %w", s.runtime, errdefs.ErrNotImplemented)
	}
	if err := os.MkdirAll(s.recordDir, 0o700); err != nil {
		return fmt.Errorf("container records: %w", err)
	}
	ents, err := os.ReadDir(s.recordDir)
	if err != nil {
		return fmt.Errorf("container records: %w", err)
	}
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || validate.ID("container", id) != nil {
			continue
		}
		c, err := s.restoreOne(ctx, rs, id)
		if err != nil {
			// Left in place for an operator to look at; containerd finds
			// the container gone and reports it exited.
			s.log.Error("restore container", zap.String("container", id), zap.Error(err))
			continue
		}
		s.reattach(c, recorded)
		s.updateRecord(c)
		s.watchOOM(c)
		s.log.Info("container restored", zap.String("container", id), zap.String("sandbox", c.sandboxID))
	}
	return nil
}

func (s *Service) restoreOne(ctx context.Context, rs Restorer, id string) (*containerEntry, error) {
	data, err := os.ReadFile(s.recordPath(id))
	if err != nil {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, fmt.Errorf("record %s: %v: %w", s.recordPath(id), err, errdefs.ErrInvalidArgument)
	}
	if err := validate.ID("sandbox", rec.SandboxID); err != nil {
		return nil, fmt.Errorf("record %s: %w", s.recordPath(id), err)
	}
	if rec.Namespace == "" {
		return nil, fmt.Errorf("record %s names no namespace: %w", s.recordPath(id), errdefs.ErrInvalidArgument)
	}
	rc, err := rs.Restore(ctx, rec.Container)
	if err != nil {
		return nil, err
	}
	if rc.ID() != id {
		return nil, fmt.Errorf("record %s holds container %q: %w", s.recordPath(id), rc.ID(), errdefs.ErrInvalidArgument)
	}
	c := &containerEntry{Container: rc, sandboxID: rec.SandboxID, namespace: rec.Namespace}
	s.mu.Lock()
	s.containers[id] = c
	s.mu.Unlock()
	return c, nil
}

// reattach watches again the processes of a restored container that still
// run and reports the exits of those that ended meanwhile, the execs'
// before the init's.
func (s *Service) reattach(c *containerEntry, recorded []Exit) {
	init, _ := c.Process("")
	type ended struct {
		e   Exit
		ref processRef
	}
	var exits []ended
	for _, p := range append(c.ExecdProcesses(), init) {
		st, err := p.Status(s.ctx)
		if err != nil || st == "stopped" || st == "deleted" {
			if p == init {
				c.initExited = true
			}
			continue
		}
		if st == "created" && p != init {
			continue // an exec never started
		}
		pid, start := p.Pid(), startTimeOf(p)
		if pid == 0 {
			continue
		}
		ref := processRef{c: c, p: p}
		if p != init {
			c.runningExecs++
		}
		if e, ok := findExit(recorded, pid, start); ok {
			exits = append(exits, ended{e, ref})
			continue
		}
		if alive, _ := proc.Alive(pid, start); alive {
			s.mu.Lock()
			s.running[pid] = append(s.running[pid], ref)
			s.mu.Unlock()
			continue
		}
		s.log.Warn("process ended while no daemon watched and its exit was not recorded",
			zap.String("container", c.ID()), zap.String("process", p.ID()), zap.Int("pid", pid))
		exits = append(exits, ended{Exit{Pid: pid, StartTime: start, Status: exitStatusUnknown, At: time.Now()}, ref})
	}
	for _, x := range exits {
		s.handleExit(x.e, x.ref)
	}
}

// findExit returns the latest recorded exit of process pid started at
// startTime.
func findExit(recorded []Exit, pid int, startTime uint64) (Exit, bool) {
	for i := len(recorded) - 1; i >= 0; i-- {
		if recorded[i].same(pid, startTime) {
			return recorded[i], true
		}
	}
	return Exit{}, false
}
