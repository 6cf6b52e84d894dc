// Package events forwards task events to containerd's ttrpc events service
// (containerd.services.events.ttrpc.v1.Events/Forward), as a shim would,
// without blocking the caller. Every event goes through one queue, in the
// order it was published; while containerd is away, events are retried.
//
// Each sandbox publishes through its own SandboxPublisher. A task's exit,
// and the delete that follows it, are never dropped: containerd's clients
// learn of exits from them. Other events (OOM, create, start, exec...) are
// rate limited per sandbox, so that a pod, or a VM guest that reports
// events, cannot flood the queue the other pods' exits wait in.
package events

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const (
	// DefaultRetryFor is how long an event is retried while containerd is
	// away: a restart or an upgrade of containerd takes less.
	DefaultRetryFor = 5 * time.Minute
	// DefaultRate and DefaultBurst limit a sandbox's droppable events: far
	// above what its containers' starts, execs and OOM kills make.
	DefaultRate  = 20
	DefaultBurst = 100

	dialTimeout = 2 * time.Second
	callTimeout = 5 * time.Second
	minBackoff  = 50 * time.Millisecond
	// maxBackoff bounds how late an event arrives once containerd is back.
	maxBackoff = time.Second
	// sweepEvery is how often idle sandboxes are forgotten.
	sweepEvery = time.Minute
	// logDropsEvery bounds the log lines of a sandbox over its rate.
	logDropsEvery = time.Minute
)

// mustDeliver are the topics never dropped for a rate: containerd's
// clients (and CRI's recovery) need each exit, and its delete after it.
var mustDeliver = map[string]bool{
	runtime.TaskExitEventTopic:   true,
	runtime.TaskDeleteEventTopic: true,
}

// Option configures a Forwarder.
type Option func(*options)

type options struct {
	retryFor time.Duration
	rate     float64
	burst    int
}

// WithRetryFor retries an event for d after it was published
// (DefaultRetryFor). While containerd stays away longer, the events older
// than d are dropped, and counted in the log.
func WithRetryFor(d time.Duration) Option { return func(o *options) { o.retryFor = d } }

// WithRateLimit lets each sandbox publish its droppable events at rate per
// second, and burst at once (DefaultRate, DefaultBurst). burst is also the
// most of them held for a sandbox while containerd is away.
func WithRateLimit(rate float64, burst int) Option {
	return func(o *options) { o.rate, o.burst = rate, max(burst, 1) }
}

type item struct {
	env      *types.Envelope
	deadline time.Time
	sb       *sandbox // of a droppable event, else nil
}

// sandbox is a sandbox's token bucket for droppable events.
type sandbox struct {
	tokens float64
	last   time.Time // of the last refill
	queued int       // droppable events queued or being sent
	// dropped counts the events over the rate; logged up to logged.
	dropped, logged uint64
	loggedAt        time.Time
}

// Forwarder sends events to one containerd.
type Forwarder struct {
	address string
	log     *zap.Logger
	opts    options
	// ctx ends with Close, and with it dials, sends and waits.
	ctx     context.Context
	cancel  context.CancelFunc
	wake    chan struct{} // the queue has events
	stopped chan struct{} // the sender has returned

	mu        sync.Mutex
	queue     []*item
	sandboxes map[string]*sandbox
	swept     time.Time

	// The sender's own.
	client *ttrpc.Client
	outage time.Time // since when containerd is unreachable; zero while it is
	lost   int       // events dropped for age in this outage
}

// NewForwarder returns a forwarder to the ttrpc socket at address and starts
// its sender. Close stops it.
func NewForwarder(address string, log *zap.Logger, opts ...Option) *Forwarder {
	o := options{retryFor: DefaultRetryFor, rate: DefaultRate, burst: DefaultBurst}
	for _, opt := range opts {
		opt(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &Forwarder{
		address: address, log: log, opts: o, ctx: ctx, cancel: cancel,
		wake: make(chan struct{}, 1), stopped: make(chan struct{}),
		sandboxes: map[string]*sandbox{}, swept: time.Now(),
	}
	go f.run()
	return f
}

// SandboxPublisher publishes the task events of one sandbox.
type SandboxPublisher struct {
	f  *Forwarder
	id string
}

// ForSandbox returns the publisher of sandbox id's events. Publishers of
// the same id share its rate.
func (f *Forwarder) ForSandbox(id string) *SandboxPublisher {
	return &SandboxPublisher{f: f, id: id}
}

// PublishNamespace queues event for namespace ns. An event over the
// sandbox's rate is dropped, and logged by the forwarder, not returned as
// an error: the caller could do nothing but log it once more per event.
func (p *SandboxPublisher) PublishNamespace(ns, topic string, event cevents.Event) error {
	a, err := typeurl.MarshalAnyToProto(event)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", topic, err)
	}
	now := time.Now()
	it := &item{
		env:      &types.Envelope{Timestamp: timestamppb.New(now), Namespace: ns, Topic: topic, Event: a},
		deadline: now.Add(p.f.opts.retryFor),
	}
	f := p.f
	f.mu.Lock()
	defer f.mu.Unlock()
	now = time.Now() // the buckets' clock only goes forward
	if f.ctx.Err() != nil {
		return fmt.Errorf("event forwarder closed: %w", errdefs.ErrUnavailable)
	}
	if now.Sub(f.swept) >= sweepEvery {
		f.sweep(now)
	}
	if !mustDeliver[topic] {
		sb := f.sandboxes[p.id]
		if sb == nil {
			sb = &sandbox{tokens: float64(f.opts.burst), last: now}
			f.sandboxes[p.id] = sb
		}
		sb.refill(now, f.opts)
		if sb.tokens < 1 || sb.queued >= f.opts.burst {
			sb.dropped++
			if now.Sub(sb.loggedAt) >= logDropsEvery {
				f.logDrops(p.id, sb, now)
			}
			return nil
		}
		sb.tokens--
		sb.queued++
		it.sb = sb
	}
	f.queue = append(f.queue, it)
	select {
	case f.wake <- struct{}{}:
	default:
	}
	return nil
}

func (sb *sandbox) refill(now time.Time, o options) {
	sb.tokens = min(float64(o.burst), sb.tokens+now.Sub(sb.last).Seconds()*o.rate)
	sb.last = now
}

func (f *Forwarder) logDrops(id string, sb *sandbox, now time.Time) {
	f.log.Warn("dropping task events of a sandbox over its rate",
		zap.String("sandbox", id), zap.Uint64("dropped", sb.dropped-sb.logged),
		zap.Float64("per_second", f.opts.rate), zap.Int("burst", f.opts.burst))
	sb.logged, sb.loggedAt = sb.dropped, now
}

// sweep forgets the sandboxes whose bucket is full again and that have no
// event queued: a new bucket is the same. Called with f.mu held.
func (f *Forwarder) sweep(now time.Time) {
	f.swept = now
	for id, sb := range f.sandboxes {
		sb.refill(now, f.opts)
		if sb.queued > 0 || sb.tokens < float64(f.opts.burst) {
			continue
		}
		if sb.dropped > sb.logged {
			f.logDrops(id, sb, now)
		}
		delete(f.sandboxes, id)
	}
}

// Close stops sending and returns once the sender has; queued events
// that were not sent are dropped.
func (f *Forwarder) Close() error {
	f.cancel()
	<-f.stopped
	return nil
}

func (f *Forwarder) run() {
	defer close(f.stopped)
	defer func() {
		if f.client != nil {
			f.client.Close()
		}
	}()
	for {
		it := f.next()
		if it == nil {
			return
		}
		f.deliver(it)
		if it.sb != nil {
			f.mu.Lock()
			it.sb.queued--
			f.mu.Unlock()
		}
	}
}

// next waits for the oldest queued event; nil once closed.
func (f *Forwarder) next() *item {
	for {
		f.mu.Lock()
		if len(f.queue) > 0 {
			it := f.queue[0]
			f.queue[0] = nil
			f.queue = f.queue[1:]
			f.mu.Unlock()
			return it
		}
		f.mu.Unlock()
		select {
		case <-f.wake:
		case <-f.ctx.Done():
			return nil
		}
	}
}

// deliver sends one event, retrying with capped backoff until its deadline:
// the next event waits, because containerd expects a task's exit before
// its delete. An outage is logged when it starts, when it first costs an
// event and when it ends, not per try.
func (f *Forwarder) deliver(it *item) {
	backoff := minBackoff
	for {
		err := f.forward(it.env)
		if f.ctx.Err() != nil {
			return // closed while sending: not a failure to report
		}
		if err == nil || rejected(err) {
			if !f.outage.IsZero() {
				f.log.Info("containerd's events service is back",
					zap.Duration("after", time.Since(f.outage).Round(time.Millisecond)), zap.Int("dropped", f.lost))
				f.outage, f.lost = time.Time{}, 0
			}
			if err != nil {
				// containerd answered: retrying gets the same answer.
				f.log.Error("containerd refused an event; dropped", zap.String("topic", it.env.Topic),
					zap.String("namespace", it.env.Namespace), zap.Error(err))
			}
			return
		}
		if f.outage.IsZero() {
			f.outage = time.Now()
			f.log.Warn("cannot forward events to containerd; retrying", zap.String("address", f.address),
				zap.Duration("retry_for", f.opts.retryFor), zap.Error(err))
		}
		if !time.Now().Before(it.deadline) {
			if f.lost == 0 {
				f.log.Error("containerd away for longer than events are kept; dropping the oldest",
					zap.Duration("away", time.Since(f.outage).Round(time.Millisecond)), zap.Error(err))
			}
			f.lost++
			return
		}
		t := time.NewTimer(min(backoff, time.Until(it.deadline)))
		select {
		case <-f.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// rejected tells containerd's refusal of an event (an invalid namespace...)
// from a failure to reach it.
func rejected(err error) bool {
	s, ok := status.FromError(err)
	if !ok {
		return false
	}
	switch s.Code() {
	case codes.InvalidArgument, codes.FailedPrecondition, codes.NotFound, codes.AlreadyExists,
		codes.PermissionDenied, codes.Unimplemented, codes.OutOfRange:
		return true
	}
	return false
}

func (f *Forwarder) forward(env *types.Envelope) error {
	if f.client == nil {
		var d net.Dialer
		ctx, cancel := context.WithTimeout(f.ctx, dialTimeout)
		conn, err := d.DialContext(ctx, "unix", f.address)
		cancel()
		if err != nil {
			return fmt.Errorf("connect to containerd events at %s: %w", f.address, err)
		}
		f.client = ttrpc.NewClient(conn)
	}
	ctx, cancel := context.WithTimeout(f.ctx, callTimeout)
	defer cancel()
	_, err := eventsapi.NewEventsClient(f.client).Forward(ctx, &eventsapi.ForwardRequest{Envelope: env})
	if err != nil && !rejected(err) {
		// The next try dials again: containerd may have restarted.
		f.client.Close()
		f.client = nil
	}
	return err
}
