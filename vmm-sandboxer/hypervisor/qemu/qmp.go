package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"golang.org/x/sys/unix"
)

// QMP is a client of QEMU's machine protocol on a unix socket: commands
// with IDs, answered in any order, and asynchronous events.
type QMP struct {
	conn *net.UnixConn

	wmu sync.Mutex // one command written at a time

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan qmpReply
	// deleting wakes DeleteDevice calls on DEVICE_DELETED, by device ID.
	deleting map[string]chan struct{}
	closed   bool
	err      error // why the connection ended

	events chan QMPEvent
	done   chan struct{}
	// Version is QEMU's version from the greeting, e.g. "7.2.18".
	Version string
}

// QMPEvent is an asynchronous event, e.g. SHUTDOWN or DEVICE_DELETED.
type QMPEvent struct {
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp QMPTimestamp    `json:"timestamp"`
}

// QMPTimestamp is when QEMU emitted an event.
type QMPTimestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// QMPError is an error QEMU answered a command with.
type QMPError struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
}

type qmpMessage struct {
	QMP *struct {
		Version struct {
			QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
		} `json:"version"`
	} `json:"QMP"`
	ID        string          `json:"id"`
	Return    json.RawMessage `json:"return"`
	Error     *QMPError       `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp QMPTimestamp    `json:"timestamp"`
}

// DialQMP connects to QEMU's QMP socket, reads the greeting and leaves
// capabilities negotiation mode, so commands can be sent.
func DialQMP(ctx context.Context, path string) (*QMP, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: connect %s: %w", path, err)
	}
	q := &QMP{
		conn:    c.(*net.UnixConn),
		pending: map[string]chan qmpReply{},
		events:  make(chan QMPEvent, 64),
		done:    make(chan struct{}),
	}
	// The greeting comes first; read it before the reader loop starts.
	if dl, ok := ctx.Deadline(); ok {
		_ = q.conn.SetReadDeadline(dl)
	}
	r := bufio.NewReader(q.conn)
	dec := json.NewDecoder(r)
	var hello qmpMessage
	if err := dec.Decode(&hello); err != nil {
		q.conn.Close()
		return nil, fmt.Errorf("qmp: read greeting from %s: %w", path, err)
	}
	if hello.QMP == nil {
		q.conn.Close()
		return nil, fmt.Errorf("qmp: %s did not greet with a QMP banner", path)
	}
	v := hello.QMP.Version.QEMU
	q.Version = fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro)
	_ = q.conn.SetReadDeadline(time.Time{})
	go q.readLoop(dec)
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func (q *QMP) readLoop(dec *json.Decoder) {
	var err error
	for {
		var m qmpMessage
		if err = dec.Decode(&m); err != nil {
			break
		}
		switch {
		case m.Event != "":
			ev := QMPEvent{Event: m.Event, Data: m.Data, Timestamp: m.Timestamp}
			if ev.Event == "DEVICE_DELETED" {
				q.deviceDeleted(ev.Data)
			}
			select {
			case q.events <- ev:
			default: // nobody listens: events are advisory
			}
		case m.ID != "":
			q.mu.Lock()
			ch := q.pending[m.ID]
			delete(q.pending, m.ID)
			q.mu.Unlock()
			if ch != nil {
				ch <- qmpReply{Return: m.Return, Error: m.Error}
			}
		}
	}
	q.mu.Lock()
	q.closed = true
	if q.err == nil {
		q.err = fmt.Errorf("qmp: connection closed: %w", err)
	}
	for id, ch := range q.pending {
		close(ch)
		delete(q.pending, id)
	}
	q.mu.Unlock()
	close(q.done)
}

func (q *QMP) deviceDeleted(data json.RawMessage) {
	var d struct {
		Device string `json:"device"`
	}
	_ = json.Unmarshal(data, &d)
	q.mu.Lock()
	if ch := q.deleting[d.Device]; ch != nil {
		close(ch)
		delete(q.deleting, d.Device)
	}
	q.mu.Unlock()
}

// DeleteDevice unplugs device id (device_del) and waits until the guest
// has released it (DEVICE_DELETED) or ctx ends.
func (q *QMP) DeleteDevice(ctx context.Context, id string) error {
	deleted := make(chan struct{})
	q.mu.Lock()
	if q.deleting == nil {
		q.deleting = map[string]chan struct{}{}
	}
	q.deleting[id] = deleted
	q.mu.Unlock()
	forget := func() {
		q.mu.Lock()
		delete(q.deleting, id)
		q.mu.Unlock()
	}
	if _, err := q.Execute(ctx, "device_del", map[string]any{"id": id}); err != nil {
		forget()
		return err
	}
	select {
	case <-deleted:
		return nil
	case <-q.done:
		forget()
		return fmt.Errorf("qmp: connection closed before %s was released", id)
	case <-ctx.Done():
		forget()
		return fmt.Errorf("guest did not release the device: %w", ctx.Err())
	}
}

// LogEvents logs every event at debug level until the connection ends.
func (q *QMP) LogEvents(log *zap.Logger) {
	for {
		select {
		case ev := <-q.events:
			log.Debug("qmp event", zap.String("event", ev.Event), zap.ByteString("data", ev.Data))
		case <-q.done:
			return
		}
	}
}

// Events delivers asynchronous events; events nobody reads are dropped
// once 64 are queued.
func (q *QMP) Events() <-chan QMPEvent { return q.events }

// Done is closed when the connection ends (QEMU exited or Close).
func (q *QMP) Done() <-chan struct{} { return q.done }

// Execute runs one command and returns its "return" value.
func (q *QMP) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	return q.execute(ctx, cmd, args, nil)
}

// ExecuteWithFile runs a command and passes f along with it (SCM_RIGHTS),
// as getfd and add-fd expect.
func (q *QMP) ExecuteWithFile(ctx context.Context, cmd string, args any, f *os.File) (json.RawMessage, error) {
	return q.execute(ctx, cmd, args, f)
}

func (q *QMP) execute(ctx context.Context, cmd string, args any, f *os.File) (json.RawMessage, error) {
	q.mu.Lock()
	if q.closed {
		err := q.err
		q.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	q.nextID++
	id := strconv.FormatUint(q.nextID, 10)
	ch := make(chan qmpReply, 1)
	q.pending[id] = ch
	q.mu.Unlock()

	req := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		q.forget(id)
		return nil, fmt.Errorf("qmp %s: encode arguments: %w", cmd, err)
	}
	q.wmu.Lock()
	if dl, ok := ctx.Deadline(); ok {
		_ = q.conn.SetWriteDeadline(dl)
	}
	if f != nil {
		_, _, err = q.conn.WriteMsgUnix(b, unix.UnixRights(int(f.Fd())), nil)
	} else {
		_, err = q.conn.Write(b)
	}
	_ = q.conn.SetWriteDeadline(time.Time{})
	q.wmu.Unlock()
	if err != nil {
		q.forget(id)
		return nil, fmt.Errorf("qmp %s: send: %w", cmd, err)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			q.mu.Lock()
			err := q.err
			q.mu.Unlock()
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		if r.Error != nil {
			r.Error.Command = cmd
			return nil, r.Error
		}
		return r.Return, nil
	case <-ctx.Done():
		q.forget(id)
		return nil, fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (q *QMP) forget(id string) {
	q.mu.Lock()
	delete(q.pending, id)
	q.mu.Unlock()
}

// Close ends the connection; pending commands fail.
func (q *QMP) Close() error {
	q.mu.Lock()
	if q.err == nil {
		q.err = errors.New("qmp: client closed")
	}
	q.mu.Unlock()
	err := q.conn.Close()
	<-q.done
	return err
}
