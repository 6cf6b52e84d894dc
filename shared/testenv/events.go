package testenv

import (
	"context"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/events/v1"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/typeurl/v2"
)

// probeTopic is what TaskExits publishes to know that its subscription
// is in place.
const probeTopic = "/kuasar-go/testenv/subscribed"

// TaskExits subscribes to the /tasks/exit events containerd publishes and
// returns once the subscription is in place (a probe event came through
// it): every exit published afterwards, until the test ends or containerd
// stops, comes on the channel.
func (e *Env) TaskExits(t testing.TB) <-chan *eventstypes.TaskExit {
	t.Helper()
	ctx, cancel := context.WithCancel(namespaces.WithNamespace(context.Background(), "k8s.io"))
	t.Cleanup(cancel)
	client := eventsapi.NewEventsClient(e.Conn)
	stream, err := client.Subscribe(ctx, &eventsapi.SubscribeRequest{
		Filters: []string{`topic=="` + runtime.TaskExitEventTopic + `"`, `topic=="` + probeTopic + `"`},
	})
	if err != nil {
		t.Fatalf("testenv: subscribe to containerd's events: %v", err)
	}
	probe, err := typeurl.MarshalAnyToProto(&eventstypes.TaskExit{ContainerID: "testenv-probe"})
	if err != nil {
		t.Fatal(err)
	}
	subscribed := make(chan struct{})
	exits := make(chan *eventstypes.TaskExit, 64)
	go func() {
		defer close(exits)
		for {
			env, err := stream.Recv()
			if err != nil {
				return
			}
			if env.Topic == probeTopic {
				select {
				case <-subscribed:
				default:
					close(subscribed)
				}
				continue
			}
			v, err := typeurl.UnmarshalAny(env.Event)
			if ev, ok := v.(*eventstypes.TaskExit); err == nil && ok {
				select {
				case exits <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	// The subscription registers on containerd's side some time after
	// Subscribe returned: publish probes until one comes through.
	deadline := time.After(30 * time.Second)
	for {
		if _, err := client.Publish(ctx, &eventsapi.PublishRequest{Topic: probeTopic, Event: probe}); err != nil {
			t.Fatalf("testenv: publish a probe event: %v", err)
		}
		select {
		case <-subscribed:
			return exits
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatal("testenv: the subscription to containerd's events got no probe event in 30s")
		}
	}
}
