package events

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/events/exchange"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/protobuf/types/known/emptypb"
)

// containerd is containerd's ttrpc events service in front of containerd's
// own event exchange, which checks each envelope as containerd does; it
// records what the exchange's subscribers see. It can stop and start
// again on the same socket, as containerd restarts.
type containerd struct {
	t    *testing.T
	path string
	ex   *exchange.Exchange

	mu    sync.Mutex
	got   []*cevents.Envelope
	calls int
	srv   *ttrpc.Server
}

func newContainerd(t *testing.T) *containerd {
	c := &containerd{t: t, path: filepath.Join(t.TempDir(), "containerd.sock.ttrpc"), ex: exchange.NewExchange()}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	envs, _ := c.ex.Subscribe(ctx)
	go func() {
		for env := range envs {
			c.mu.Lock()
			c.got = append(c.got, env)
			c.mu.Unlock()
		}
	}()
	t.Cleanup(c.stop)
	return c
}

func (c *containerd) Forward(ctx context.Context, r *eventsapi.ForwardRequest) (*emptypb.Empty, error) {
	c.mu.Lock()
	c.calls++
	c.mu.Unlock()
	env := r.Envelope
	err := c.ex.Forward(ctx, &cevents.Envelope{Timestamp: env.Timestamp.AsTime(), Namespace: env.Namespace, Topic: env.Topic, Event: env.Event})
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

func (c *containerd) start() {
	c.t.Helper()
	srv, err := ttrpc.NewServer()
	if err != nil {
		c.t.Fatal(err)
	}
	eventsapi.RegisterEventsService(srv, c)
	l, err := net.Listen("unix", c.path)
	if err != nil {
		c.t.Fatal(err)
	}
	go srv.Serve(context.Background(), l)
	c.mu.Lock()
	c.srv = srv
	c.mu.Unlock()
}

// stop closes the socket and every connection.
func (c *containerd) stop() {
	c.mu.Lock()
	srv := c.srv
	c.srv = nil
	c.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// events is what containerd's subscribers saw, one line each.
func (c *containerd) events() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, env := range c.got {
		out = append(out, describe(c.t, env))
	}
	return out
}

// waitFor waits until containerd's subscribers saw line.
func (c *containerd) waitFor(line string) []string {
	c.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := c.events()
		for _, l := range got {
			if l == line {
				return got
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("containerd did not get %q; it got %q", line, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func describe(t *testing.T, env *cevents.Envelope) string {
	v, err := typeurl.UnmarshalAny(env.Event)
	if err != nil {
		t.Fatal(err)
	}
	switch e := v.(type) {
	case *eventstypes.TaskExit:
		return fmt.Sprintf("%s exit %s/%s %d", env.Namespace, e.ContainerID, e.ID, e.ExitStatus)
	case *eventstypes.TaskDelete:
		return fmt.Sprintf("%s delete %s", env.Namespace, e.ContainerID)
	case *eventstypes.TaskStart:
		return fmt.Sprintf("%s start %s", env.Namespace, e.ContainerID)
	case *eventstypes.TaskOOM:
		return fmt.Sprintf("%s oom %s", env.Namespace, e.ContainerID)
	}
	return fmt.Sprintf("%s %s %T", env.Namespace, env.Topic, v)
}

func publish(t *testing.T, p *SandboxPublisher, ev cevents.Event) {
	t.Helper()
	topic := map[string]string{
		"*events.TaskExit": runtime.TaskExitEventTopic, "*events.TaskDelete": runtime.TaskDeleteEventTopic,
		"*events.TaskStart": runtime.TaskStartEventTopic, "*events.TaskOOM": runtime.TaskOOMEventTopic,
	}[fmt.Sprintf("%T", ev)]
	if err := p.PublishNamespace("k8s.io", topic, ev); err != nil {
		t.Fatal(err)
	}
}

func exit(id, execID string, status uint32) *eventstypes.TaskExit {
	return &eventstypes.TaskExit{ContainerID: id, ID: execID, ExitStatus: status}
}

// observed logs to the test and to an observer the test reads.
func observed(t *testing.T) (*zap.Logger, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.DebugLevel)
	return zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), core)), logs
}

func newForwarder(t *testing.T, c *containerd, log *zap.Logger, opts ...Option) *Forwarder {
	f := NewForwarder(c.path, log, opts...)
	t.Cleanup(func() { f.Close() })
	return f
}

func TestForwarderDeliversInOrderOnceContainerdIsUp(t *testing.T) {
	c := newContainerd(t)
	f := newForwarder(t, c, zaptest.NewLogger(t))

	// Published before containerd listens: retried, not lost.
	p := f.ForSandbox("pod")
	publish(t, p, exit("c1", "c1", 7))
	publish(t, p, &eventstypes.TaskDelete{ContainerID: "c1"})
	time.Sleep(20 * time.Millisecond)
	c.start()

	got := c.waitFor("k8s.io delete c1")
	if want := []string{"k8s.io exit c1/c1 7", "k8s.io delete c1"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("containerd got %q, want %q", got, want)
	}
}

// TestForwarderKeepsExitsThroughAnOutage stops containerd for 3 s, longer
// than the old forwarder's five tries, while tasks of two pods exit:
// every exit, and the delete after it, arrive once containerd is back, in
// the order they were published (at least once: containerd takes an exit
// twice alike), and the outage is logged once, not per try.
func TestForwarderKeepsExitsThroughAnOutage(t *testing.T) {
	c := newContainerd(t)
	c.start()
	log, logs := observed(t)
	f := newForwarder(t, c, log, WithRetryFor(time.Minute))
	a, b := f.ForSandbox("pod-a"), f.ForSandbox("pod-b")
	publish(t, a, &eventstypes.TaskStart{ContainerID: "a1"})
	c.waitFor("k8s.io start a1")

	c.stop()
	publish(t, a, exit("a1", "e1", 1))
	publish(t, b, exit("b1", "b1", 2))
	publish(t, a, exit("a1", "a1", 137))
	publish(t, a, &eventstypes.TaskDelete{ContainerID: "a1"})
	publish(t, b, &eventstypes.TaskDelete{ContainerID: "b1"})
	time.Sleep(3 * time.Second)
	c.start()

	// At least once: an event whose answer was lost with the connection
	// (containerd got it, then went) is sent again, right after itself.
	got := slices.Compact(c.waitFor("k8s.io delete b1"))
	want := []string{"k8s.io start a1", "k8s.io exit a1/e1 1", "k8s.io exit b1/b1 2", "k8s.io exit a1/a1 137", "k8s.io delete a1", "k8s.io delete b1"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("containerd got\n%q\nwant\n%q", got, want)
	}
	if n := logs.FilterMessageSnippet("cannot forward events").Len(); n != 1 {
		t.Errorf("the outage was logged %d times, want once", n)
	}
	if n := logs.FilterMessageSnippet("events service is back").Len(); n != 1 {
		t.Errorf("the end of the outage was logged %d times, want once", n)
	}
}

// TestForwarderFloodDoesNotCrowdOutOtherSandboxes has a pod flood OOM
// events (as a hostile VM guest can) while containerd is away, with the
// forwarder's defaults: another pod's exit and start still arrive, and
// the flooding pod's events held are bounded by its burst.
func TestForwarderFloodDoesNotCrowdOutOtherSandboxes(t *testing.T) {
	c := newContainerd(t)
	log, logs := observed(t)
	f := newForwarder(t, c, log)
	hostile, victim := f.ForSandbox("hostile"), f.ForSandbox("victim")
	for i := 0; i < 10000; i++ {
		// What the flooding pod's publisher returns is only logged (vmtask).
		_ = hostile.PublishNamespace("k8s.io", runtime.TaskOOMEventTopic, &eventstypes.TaskOOM{ContainerID: "h1"})
	}
	publish(t, victim, &eventstypes.TaskStart{ContainerID: "v1"})
	publish(t, victim, exit("v1", "v1", 3))
	c.start()

	got := c.waitFor("k8s.io exit v1/v1 3")
	ooms := 0
	for _, l := range got {
		if l == "k8s.io oom h1" {
			ooms++
		}
	}
	if ooms == 0 || ooms > DefaultBurst {
		t.Errorf("containerd got %d OOM events of the flooding pod, want 1 to %d", ooms, DefaultBurst)
	}
	if !strings.Contains(fmt.Sprint(got), "k8s.io start v1") {
		t.Errorf("the other pod's start was dropped: %q", got)
	}
	if drops := logs.FilterMessageSnippet("over its rate").FilterField(zap.String("sandbox", "hostile")); drops.Len() != 1 {
		t.Errorf("the flooding pod's drops were logged %d times, want once", drops.Len())
	}
}

// TestForwarderRateLimitsDroppableEvents: a sandbox's events beyond its
// burst are dropped and counted; its exit is not, and keeps its place.
func TestForwarderRateLimitsDroppableEvents(t *testing.T) {
	c := newContainerd(t)
	c.start()
	log, logs := observed(t)
	f := newForwarder(t, c, log, WithRateLimit(0.001, 5))
	p := f.ForSandbox("pod")
	for i := 0; i < 20; i++ {
		publish(t, p, &eventstypes.TaskOOM{ContainerID: "c1"})
	}
	publish(t, p, exit("c1", "c1", 137))

	got := c.waitFor("k8s.io exit c1/c1 137")
	want := []string{"k8s.io oom c1", "k8s.io oom c1", "k8s.io oom c1", "k8s.io oom c1", "k8s.io oom c1", "k8s.io exit c1/c1 137"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("containerd got %q, want %q", got, want)
	}
	// Once the pod is quiet, the count of what was not logged yet is.
	f.mu.Lock()
	f.sweep(time.Now().Add(24 * time.Hour))
	left := len(f.sandboxes)
	f.mu.Unlock()
	if left != 0 {
		t.Errorf("%d idle sandboxes still kept after a sweep", left)
	}
	var dropped uint64
	for _, e := range logs.FilterMessageSnippet("over its rate").FilterField(zap.String("sandbox", "pod")).All() {
		dropped += e.ContextMap()["dropped"].(uint64)
	}
	if dropped != 15 {
		t.Errorf("logged %d dropped events, want 15", dropped)
	}
}

// TestForwarderDropsEventsOlderThanRetryFor: while containerd stays away
// longer than the retry horizon, the events older than it are dropped
// (logged once), the later ones are delivered, and Close ends promptly
// while an event is retried.
func TestForwarderDropsEventsOlderThanRetryFor(t *testing.T) {
	c := newContainerd(t)
	log, logs := observed(t)
	f := NewForwarder(c.path, log, WithRetryFor(time.Second))
	p := f.ForSandbox("pod")
	publish(t, p, exit("old1", "old1", 1))
	publish(t, p, exit("old2", "old2", 1))
	time.Sleep(2500 * time.Millisecond)
	c.start()
	publish(t, p, exit("new", "new", 2))

	if got := c.waitFor("k8s.io exit new/new 2"); len(got) != 1 {
		t.Errorf("containerd got %q, want only the exit published after the horizon", got)
	}
	if n := logs.FilterMessageSnippet("longer than events are kept").Len(); n != 1 {
		t.Errorf("dropping old events was logged %d times, want once", n)
	}

	c.stop()
	publish(t, p, exit("late", "late", 3))
	time.Sleep(100 * time.Millisecond)
	closed := make(chan struct{})
	go func() {
		f.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return while an event was retried")
	}
	if err := p.PublishNamespace("k8s.io", runtime.TaskExitEventTopic, exit("x", "x", 0)); err == nil {
		t.Error("PublishNamespace after Close succeeded")
	}
}

// TestForwarderDropsWhatContainerdRefuses: an event containerd refuses
// (here a namespace it does not accept) is tried once, not retried until
// the horizon ahead of every other pod's events.
func TestForwarderDropsWhatContainerdRefuses(t *testing.T) {
	c := newContainerd(t)
	c.start()
	log, logs := observed(t)
	f := newForwarder(t, c, log)
	p := f.ForSandbox("pod")
	if err := p.PublishNamespace("not a namespace!", runtime.TaskExitEventTopic, exit("c1", "c1", 1)); err != nil {
		t.Fatal(err)
	}
	publish(t, p, exit("c2", "c2", 2))

	if got := c.waitFor("k8s.io exit c2/c2 2"); len(got) != 1 {
		t.Errorf("containerd got %q", got)
	}
	c.mu.Lock()
	calls := c.calls
	c.mu.Unlock()
	if calls != 2 {
		t.Errorf("containerd was called %d times for 2 events, want 2", calls)
	}
	if logs.FilterMessageSnippet("refused").Len() != 1 {
		t.Errorf("the refused event was not logged once: %v", logs.All())
	}
}
