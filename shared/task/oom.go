package task

import (
	"context"
	"fmt"

	"github.com/containerd/cgroups/v3/cgroup1"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2"
	eventstypes "github.com/containerd/containerd/api/events"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/runtime"
	oomv1 "github.com/containerd/containerd/v2/pkg/oom/v1"
	"go.uber.org/zap"
)

// oomPublisher lets containerd's cgroup v1 OOM epoller publish through the
// service, which knows each container's namespace.
type oomPublisher struct{ s *Service }

func (p oomPublisher) Publish(_ context.Context, _ string, ev cevents.Event) error {
	oom, ok := ev.(*eventstypes.TaskOOM)
	if !ok {
		return fmt.Errorf("unexpected OOM event %T", ev)
	}
	p.s.oomEvent(oom.ContainerID)
	return nil
}

func newOOMv1Watcher(s *Service) (oomWatcher, error) {
	return oomv1.New(oomPublisher{s})
}

func (s *Service) oomEvent(id string) {
	s.mu.Lock()
	c := s.containers[id]
	s.mu.Unlock()
	if c == nil {
		return
	}
	s.publish(c.sandboxID, c.namespace, runtime.TaskOOMEventTopic, &eventstypes.TaskOOM{ContainerID: id})
}

// watchOOM reports OOM kills in the container's cgroup as TaskOOM events.
func (s *Service) watchOOM(c *containerEntry) {
	id := c.ID()
	switch cg := c.Cgroup().(type) {
	case cgroup1.Cgroup:
		if s.oom1 != nil {
			if err := s.oom1.Add(id, cg); err != nil {
				s.log.Warn("cannot watch OOM events", zap.String("container", id), zap.Error(err))
			}
		}
	case *cgroupsv2.Manager:
		// The event channel ends with an error once the cgroup is deleted.
		events, errs := cg.EventChan()
		go func() {
			var kills uint64
			for {
				select {
				case ev := <-events:
					if ev.OOMKill > kills {
						kills = ev.OOMKill
						s.oomEvent(id)
					}
				case <-errs:
					return
				case <-s.ctx.Done():
					return
				}
			}
		}()
	}
}
