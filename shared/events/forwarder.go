// Package events forwards task events to containerd's ttrpc events service
// (containerd.services.events.ttrpc.v1.Events/Forward), as a shim would,
// without blocking the caller: events queue and are sent in order, with
// retries while containerd is away.
package events

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	eventsapi "github.com/containerd/containerd/api/services/ttrpc/events/v1"
	"github.com/containerd/containerd/api/types"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const (
	queueSize   = 4096
	maxAttempts = 5
	dialTimeout = 2 * time.Second
)

type item struct {
	env      *types.Envelope
	attempts int
}

// Forwarder sends events to one containerd.
type Forwarder struct {
	address string
	log     *zap.Logger
	queue   chan *item
	done    chan struct{}
	stopped chan struct{} // closed when the sender has returned
	once    sync.Once

	mu     sync.Mutex
	client *ttrpc.Client
}

// NewForwarder returns a forwarder to the ttrpc socket at address and starts
// its sender. Close stops it.
func NewForwarder(address string, log *zap.Logger) *Forwarder {
	f := &Forwarder{address: address, log: log, queue: make(chan *item, queueSize), done: make(chan struct{}), stopped: make(chan struct{})}
	go f.run()
	return f
}

// Publish queues event for the namespace carried by ctx. It implements
// containerd's events.Publisher.
func (f *Forwarder) Publish(ctx context.Context, topic string, event cevents.Event) error {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return err
	}
	return f.PublishNamespace(ns, topic, event)
}

// PublishNamespace queues event for namespace ns.
func (f *Forwarder) PublishNamespace(ns, topic string, event cevents.Event) error {
	a, err := typeurl.MarshalAnyToProto(event)
	if err != nil {
		return fmt.Errorf("encode %s event: %w", topic, err)
	}
	env := &types.Envelope{Timestamp: timestamppb.Now(), Namespace: ns, Topic: topic, Event: a}
	select {
	case f.queue <- &item{env: env}:
		return nil
	case <-f.done:
		return errors.New("event forwarder closed")
	default:
		return fmt.Errorf("event queue full, dropping %s", topic)
	}
}

// Close stops sending and returns once the sender has; queued events
// that were not sent are dropped.
func (f *Forwarder) Close() error {
	f.once.Do(func() { close(f.done) })
	f.mu.Lock()
	var err error
	if f.client != nil {
		// Ends a send in flight.
		err = f.client.Close()
	}
	f.mu.Unlock()
	<-f.stopped
	return err
}

func (f *Forwarder) run() {
	defer close(f.stopped)
	for {
		select {
		case <-f.done:
			return
		case it := <-f.queue:
			f.send(it)
		}
	}
}

// send delivers one event, retrying with backoff; order is kept because
// containerd expects a task's exit before its delete.
func (f *Forwarder) send(it *item) {
	backoff := 50 * time.Millisecond
	for {
		err := f.forward(it.env)
		if err == nil {
			return
		}
		select {
		case <-f.done:
			return // closed while sending: not a failure to report
		default:
		}
		it.attempts++
		if it.attempts >= maxAttempts {
			f.log.Error("dropping event after retries", zap.String("topic", it.env.Topic), zap.Error(err))
			return
		}
		f.log.Warn("forward event failed, retrying", zap.String("topic", it.env.Topic), zap.Error(err))
		select {
		case <-f.done:
			return
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

func (f *Forwarder) forward(env *types.Envelope) error {
	c, err := f.conn()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = eventsapi.NewEventsClient(c).Forward(ctx, &eventsapi.ForwardRequest{Envelope: env})
	if err != nil {
		f.mu.Lock()
		if f.client == c {
			f.client.Close()
			f.client = nil
		}
		f.mu.Unlock()
	}
	return err
}

func (f *Forwarder) conn() (*ttrpc.Client, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.client != nil {
		return f.client, nil
	}
	select {
	case <-f.done:
		return nil, errors.New("event forwarder closed")
	default:
	}
	conn, err := net.DialTimeout("unix", f.address, dialTimeout)
	if err != nil {
		return nil, fmt.Errorf("connect to containerd events at %s: %w", f.address, err)
	}
	f.client = ttrpc.NewClient(conn)
	return f.client, nil
}
