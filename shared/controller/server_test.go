package controller

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/kuasar-go/kuasar-go/shared/store"
)

// slowRecoverer reattaches every sandbox only once all of them are being
// reattached at the same time, or fails after a while.
type slowRecoverer struct {
	Sandboxer // not called
	all       int
	mu        sync.Mutex
	inFlight  int
	together  chan struct{}
}

func (r *slowRecoverer) Recover(ctx context.Context, sb *store.Sandbox) (<-chan Exit, error) {
	r.mu.Lock()
	if r.inFlight++; r.inFlight == r.all {
		close(r.together)
	}
	r.mu.Unlock()
	select {
	case <-r.together:
		return make(chan Exit), nil
	case <-time.After(5 * time.Second):
		return nil, errors.New("the other sandboxes were not being reattached meanwhile")
	}
}

// TestNewRecoversInParallel: one sandbox slow to reattach (a guest that
// does not answer) holds up neither the others nor the daemon's start by
// more than its own wait: New reattaches them at once.
func TestNewRecoversInParallel(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"pod-a", "pod-b", "pod-c"}
	for _, id := range ids {
		if err := st.Save(&store.Sandbox{ID: id, State: store.StateRunning, CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	fam := &slowRecoverer{all: len(ids), together: make(chan struct{})}
	s, err := New(context.Background(), fam, st, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		e, err := s.get(id)
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-e.exited:
			t.Errorf("sandbox %s was not reattached", id)
		default:
		}
	}
}
