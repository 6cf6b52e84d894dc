package events

import (
	"context"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/types/known/emptypb"
)

// sink is a containerd events service of the test's own.
type sink struct {
	mu   sync.Mutex
	got  []*eventsapi.ForwardRequest
	recv chan struct{}
}

func (s *sink) Forward(_ context.Context, r *eventsapi.ForwardRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	s.got = append(s.got, r)
	s.mu.Unlock()
	s.recv <- struct{}{}
	return &emptypb.Empty{}, nil
}

func serveSink(t *testing.T, path string) *sink {
	t.Helper()
	s := &sink{recv: make(chan struct{}, 16)}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	eventsapi.RegisterEventsService(srv, s)
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
	return s
}

func (s *sink) wait(t *testing.T, n int) []*eventsapi.ForwardRequest {
	t.Helper()
	for i := 0; i < n; i++ {
		select {
		case <-s.recv:
		case <-time.After(10 * time.Second):
			t.Fatalf("received %d of %d events", i, n)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*eventsapi.ForwardRequest(nil), s.got...)
}

func TestForwarderDeliversInOrderOnceContainerdIsUp(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "containerd.sock.ttrpc")
	f := NewForwarder(sock, zaptest.NewLogger(t))
	t.Cleanup(func() { f.Close() })

	// Published before containerd listens: retried, not lost.
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if err := f.Publish(ctx, "/tasks/exit", &eventstypes.TaskExit{ContainerID: "c1", ExitStatus: 7}); err != nil {
		t.Fatal(err)
	}
	if err := f.PublishNamespace("other", "/tasks/delete", &eventstypes.TaskDelete{ContainerID: "c1"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	got := serveSink(t, sock).wait(t, 2)

	if got[0].Envelope.Topic != "/tasks/exit" || got[0].Envelope.Namespace != "k8s.io" {
		t.Errorf("first event %s in %s, want /tasks/exit in k8s.io", got[0].Envelope.Topic, got[0].Envelope.Namespace)
	}
	v, err := typeurl.UnmarshalAny(got[0].Envelope.Event)
	if err != nil {
		t.Fatal(err)
	}
	if exit, ok := v.(*eventstypes.TaskExit); !ok || exit.ExitStatus != 7 || exit.ContainerID != "c1" {
		t.Errorf("first event %#v", v)
	}
	if got[1].Envelope.Topic != "/tasks/delete" || got[1].Envelope.Namespace != "other" {
		t.Errorf("second event %s in %s", got[1].Envelope.Topic, got[1].Envelope.Namespace)
	}
}

func TestForwarderNeedsANamespace(t *testing.T) {
	f := NewForwarder(filepath.Join(t.TempDir(), "none"), zaptest.NewLogger(t))
	t.Cleanup(func() { f.Close() })
	if err := f.Publish(context.Background(), "/tasks/exit", &eventstypes.TaskExit{}); err == nil {
		t.Error("Publish without a namespace succeeded")
	}
}
