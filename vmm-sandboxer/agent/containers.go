package agent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	cgroupsv2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/api/types/runc/options"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/fifo"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// Containers runs the guest's containers with runc, the Debian binary that
// mkguest puts in the initramfs with its loader and libraries (read from
// its ELF DT_NEEDED entries). runc rather than libcontainer linked into
// vmm-task: the agent then drives containers exactly as runc-sandboxer
// does on a host, through shared/task (containerd's runc process model:
// create/start/exec/kill/delete, stdio FIFOs, exits collected by the
// reaper that PID 1 runs anyway), so the guest and the host share one
// tested code path and vmm-task stays a small static binary.
//
// Each container gets a bundle of its own in the guest (Root/<id>: the
// spec the host sent, the rootfs mounts done at <bundle>/rootfs) and, per
// process, FIFOs that the agent bridges to the host's IO streams on the
// transport's IO port. The initramfs is the guest's root file system,
// which pivot_root cannot leave: runc runs with --no-pivot (move mount +
// chroot), as runc documents for a rootfs on a ramdisk.
type Containers struct {
	// Root holds the containers' bundles (/run/kuasar/containers).
	Root string
	// Runc is the runtime binary; RuncRoot its state directory.
	Runc, RuncRoot string
	Log            *zap.Logger

	svc *task.Service
	ctx context.Context

	mu      sync.Mutex
	streams map[streamKey]*ioSlot
	subs    map[chan *vmmtask.Event]struct{}
}

// namespace is the containerd namespace the task service wants; the guest
// has one pod, so it is fixed.
const namespace = "kuasar"

// guestSandboxID is what every guest bundle names as its sandbox: the VM is
// the pod.
const guestSandboxID = "pod"

type streamKey struct {
	container, exec string
	kind            vmmtask.IOStreamHeader_Kind
}

// ioSlot is one process stream the agent expects: the FIFO it made and the
// host's stream once it arrives.
type ioSlot struct {
	fifo string
	f    io.ReadWriteCloser // the agent's end of the FIFO
	conn chan net.Conn      // buffered 1: the host's stream
	// started is closed once the process has started (stdin's end is
	// passed on only then: containerd's process library opens its own
	// writer of the stdin FIFO at start, which CloseIO closes).
	started     chan struct{}
	startedOnce sync.Once
	attached    bool // a host stream was accepted (under Containers.mu)
	ended       bool // the process's output is over (under Containers.mu)
	cancel      context.CancelFunc
	ctx         context.Context
}

// NewContainers starts the task service over runc. PID 1 must already reap
// through containerd's reaper (reap.Start).
func NewContainers(root, runcBin, runcRoot string, log *zap.Logger) (*Containers, error) {
	if _, err := os.Stat(runcBin); err != nil {
		return nil, fmt.Errorf("container runtime: %w (the image was built without runc: mkguest -runc)", err)
	}
	if err := os.MkdirAll(root, 0o711); err != nil {
		return nil, err
	}
	c := &Containers{
		Root: root, Runc: runcBin, RuncRoot: runcRoot, Log: log,
		ctx:     namespaces.WithNamespace(context.Background(), namespace),
		streams: map[streamKey]*ioSlot{},
		subs:    map[chan *vmmtask.Event]struct{}{},
	}
	rt, err := task.NewRuncRuntime(task.RuntimeConfig{Binary: runcBin, Root: runcRoot}, log)
	if err != nil {
		return nil, err
	}
	// The guest is one pod: its events go to the host, which limits them.
	svc, err := task.New(c, func(string) task.Publisher { return c }, rt, log)
	if err != nil {
		return nil, err
	}
	c.svc = svc
	return c, nil
}

// TaskSandbox implements task.Sandboxes: the guest is one pod.
func (c *Containers) TaskSandbox(id string) (task.Sandbox, error) { return task.Sandbox{}, nil }

// PublishNamespace implements task.Publisher: exits go to Events streams.
func (c *Containers) PublishNamespace(_, topic string, ev cevents.Event) error {
	e, ok := ev.(*eventstypes.TaskExit)
	if !ok {
		return nil
	}
	execID := e.ID
	if execID == e.ContainerID {
		execID = ""
	}
	out := &vmmtask.Event{ContainerId: e.ContainerID, ExecId: execID, Kind: &vmmtask.Event_Exit{Exit: &vmmtask.ExitEvent{
		Pid: e.Pid, ExitStatus: e.ExitStatus, ExitedAtUnixNs: e.ExitedAt.AsTime().UnixNano(),
	}}}
	c.mu.Lock()
	defer c.mu.Unlock()
	for ch := range c.subs {
		select {
		case ch <- out:
		default:
			c.Log.Warn("events subscriber too slow: event dropped", zap.String("container", e.ContainerID))
		}
	}
	return nil
}

func (c *Containers) bundle(id string) string { return filepath.Join(c.Root, id) }

func fifoName(execID string, kind vmmtask.IOStreamHeader_Kind) string {
	p := "init"
	if execID != "" {
		p = "exec-" + execID
	}
	return p + "." + kind.String()
}

// makeIO makes the FIFOs of a process's requested streams and returns
// their paths (stdin, stdout, stderr; "" where not requested). The bridges
// to the host start when the host's streams arrive.
func (c *Containers) makeIO(id, execID string, want [3]bool) (paths [3]string, undo func(), err error) {
	dir := filepath.Join(c.bundle(id), "io")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return paths, nil, err
	}
	var keys []streamKey
	undo = func() {
		c.mu.Lock()
		for _, k := range keys {
			if s := c.streams[k]; s != nil {
				s.cancel()
				delete(c.streams, k)
				_ = os.Remove(s.fifo)
			}
		}
		c.mu.Unlock()
	}
	for i, kind := range []vmmtask.IOStreamHeader_Kind{vmmtask.IOStreamHeader_STDIN, vmmtask.IOStreamHeader_STDOUT, vmmtask.IOStreamHeader_STDERR} {
		if !want[i] {
			continue
		}
		p := filepath.Join(dir, fifoName(execID, kind))
		_ = os.Remove(p)
		if err := unix.Mkfifo(p, 0o600); err != nil {
			undo()
			return paths, nil, fmt.Errorf("mkfifo %s: %w", p, err)
		}
		k := streamKey{id, execID, kind}
		ctx, cancel := context.WithCancel(context.Background())
		// The agent's end opens now, without waiting for the other side
		// (runc's side opens during create and waits for this one).
		flag := syscall.O_RDONLY
		if kind == vmmtask.IOStreamHeader_STDIN {
			flag = syscall.O_WRONLY
		}
		f, err := fifo.OpenFifo(ctx, p, flag|syscall.O_NONBLOCK, 0)
		if err != nil {
			cancel()
			undo()
			return paths, nil, fmt.Errorf("open fifo %s: %w", p, err)
		}
		context.AfterFunc(ctx, func() { f.Close() })
		s := &ioSlot{fifo: p, f: f, conn: make(chan net.Conn, 1), started: make(chan struct{}), ctx: ctx, cancel: cancel}
		c.mu.Lock()
		if old := c.streams[k]; old != nil {
			old.cancel()
		}
		c.streams[k] = s
		keys = append(keys, k)
		c.mu.Unlock()
		go c.bridge(k, s)
		paths[i] = p
	}
	// runc's side (containerd's process library) takes either no stdio at
	// all or both outputs: one not asked for goes to /dev/null.
	if want[0] || want[1] || want[2] {
		for i := 1; i < 3; i++ {
			if paths[i] == "" {
				paths[i] = os.DevNull
			}
		}
	}
	return paths, undo, nil
}

// bridge copies between a process's FIFO and the host's stream once it
// arrives, until the process's side ends (stdout, stderr) or the host's
// (stdin), or the process is deleted.
func (c *Containers) bridge(k streamKey, s *ioSlot) {
	defer s.f.Close()
	output := k.kind != vmmtask.IOStreamHeader_STDIN
	conn, ok := c.nextConn(s, output)
	if !ok {
		return
	}
	if !output {
		c.bridgeStdin(k, s, conn)
		return
	}
	c.bridgeOutput(k, s, conn)
}

// nextConn waits for the host's (next) stream of a slot. An output stream
// is watched: the host never writes on one, so a read returning means the
// host went away, and the slot takes the next one.
func (c *Containers) nextConn(s *ioSlot, output bool) (net.Conn, bool) {
	select {
	case conn := <-s.conn:
		context.AfterFunc(s.ctx, func() { conn.Close() })
		if output {
			c.watch(s, conn)
		}
		return conn, true
	case <-s.ctx.Done():
		return nil, false
	}
}

func (c *Containers) watch(s *ioSlot, conn net.Conn) {
	go func() {
		_, _ = conn.Read(make([]byte, 1))
		c.mu.Lock()
		s.attached = false
		c.mu.Unlock()
	}()
}

// bridgeOutput copies a process's output to the host. When the host drops
// the stream (its daemon restarted), the FIFO stays open and what was read
// waits for the host to attach again: the process blocks once the FIFO is
// full instead of dying of SIGPIPE, and nothing is lost.
func (c *Containers) bridgeOutput(k streamKey, s *ioSlot, conn net.Conn) {
	defer func() {
		c.mu.Lock()
		s.ended = true
		c.mu.Unlock()
		conn.Close()
		select {
		case late := <-s.conn:
			late.Close()
		default:
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, rerr := s.f.Read(buf)
		// A host that attached again while this waited for output takes
		// over from here.
		select {
		case next := <-s.conn:
			conn.Close()
			conn = next
			context.AfterFunc(s.ctx, func() { next.Close() })
			c.watch(s, next)
		default:
		}
		for n > 0 {
			if _, err := conn.Write(buf[:n]); err == nil {
				break
			}
			conn.Close()
			c.Log.Info("host stream lost; waiting for the host to attach again", zap.String("container", k.container), zap.String("exec", k.exec), zap.Stringer("stream", k.kind))
			var ok bool
			if conn, ok = c.nextConn(s, true); !ok {
				return
			}
		}
		if rerr != nil {
			return
		}
	}
}

func (c *Containers) bridgeStdin(k streamKey, s *ioSlot, conn net.Conn) {
	defer conn.Close()
	_, _ = io.Copy(s.f, conn)
	// The host closed stdin: so does the process's, once started.
	s.f.Close()
	select {
	case <-s.started:
	case <-s.ctx.Done():
		return
	}
	_, err := c.svc.CloseIO(c.ctx, &taskAPI.CloseIORequest{ID: k.container, ExecID: k.exec, Stdin: true})
	if err != nil {
		c.Log.Debug("close stdin", zap.String("container", k.container), zap.String("exec", k.exec), zap.Error(err))
	}
}

// ServeIO accepts the host's IO streams on l: each starts with a
// length-prefixed IOStreamHeader, which the agent answers with a
// length-prefixed error text (empty: attached).
func (c *Containers) ServeIO(l net.Listener) error {
	for {
		conn, err := l.Accept()
		if err != nil {
			return err
		}
		go c.attach(conn)
	}
}

func (c *Containers) attach(conn net.Conn) {
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	h := &vmmtask.IOStreamHeader{}
	err := readHeader(conn, h)
	var s *ioSlot
	if err == nil {
		c.mu.Lock()
		s = c.streams[streamKey{h.ContainerId, h.ExecId, h.Kind}]
		switch {
		case s == nil:
			err = fmt.Errorf("no %s stream was asked for process %q of container %q", h.Kind, h.ExecId, h.ContainerId)
		case s.attached:
			err = fmt.Errorf("the %s stream of process %q of container %q is already attached", h.Kind, h.ExecId, h.ContainerId)
		case s.ended:
			err = fmt.Errorf("the %s stream of process %q of container %q has ended", h.Kind, h.ExecId, h.ContainerId)
		default:
			s.attached = true
		}
		c.mu.Unlock()
	}
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	werr := writeFrame(conn, []byte(msg))
	_ = conn.SetDeadline(time.Time{})
	if err != nil || werr != nil {
		conn.Close()
		return
	}
	s.conn <- conn // buffered, and only one stream gets here per slot
}

func readHeader(r io.Reader, h *vmmtask.IOStreamHeader) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return fmt.Errorf("io stream header: %w", err)
	}
	l := binary.BigEndian.Uint32(n[:])
	if l > 64<<10 {
		return fmt.Errorf("io stream header of %d bytes", l)
	}
	b := make([]byte, l)
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("io stream header: %w", err)
	}
	return proto.Unmarshal(b, h)
}

func writeFrame(w io.Writer, b []byte) error {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	_, err := w.Write(append(n[:], b...))
	return err
}

// dropIO ends the bridges of one process (or of every process of the
// container when all) and removes their FIFOs.
func (c *Containers) dropIO(id, execID string, all bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, s := range c.streams {
		if k.container == id && (all || k.exec == execID) {
			s.cancel()
			_ = os.Remove(s.fifo)
			delete(c.streams, k)
		}
	}
}

func (c *Containers) Create(ctx context.Context, r *vmmtask.CreateContainerRequest) (*vmmtask.CreateContainerResponse, error) {
	if err := validate.ID("container", r.ContainerId); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	var spec map[string]any
	if err := json.Unmarshal(r.Spec, &spec); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "container %s: spec: %v", r.ContainerId, err)
	}
	b := c.bundle(r.ContainerId)
	if _, err := os.Stat(b); err == nil {
		return nil, status.Errorf(codes.AlreadyExists, "container %s exists", r.ContainerId)
	}
	if err := os.MkdirAll(b, 0o711); err != nil {
		return nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	ok := false
	defer func() {
		if !ok {
			c.dropIO(r.ContainerId, "", true)
			_ = os.RemoveAll(b)
		}
	}()
	if err := os.WriteFile(filepath.Join(b, "config.json"), r.Spec, 0o600); err != nil {
		return nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	if err := os.WriteFile(filepath.Join(b, "sandbox"), []byte(guestSandboxID), 0o600); err != nil {
		return nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	paths, _, err := c.makeIO(r.ContainerId, "", [3]bool{r.Stdin, r.Stdout, r.Stderr})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "container %s: %v", r.ContainerId, err)
	}
	opts, err := typeurl.MarshalAnyToProto(&options.Options{NoPivotRoot: true})
	if err != nil {
		return nil, err
	}
	req := &taskAPI.CreateTaskRequest{
		ID: r.ContainerId, Bundle: b, Terminal: r.Terminal,
		Stdin: paths[0], Stdout: paths[1], Stderr: paths[2], Options: opts,
	}
	for _, m := range r.Rootfs {
		req.Rootfs = append(req.Rootfs, &types.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	resp, err := c.svc.Create(c.ctx, req)
	if err != nil {
		return nil, err
	}
	ok = true
	return &vmmtask.CreateContainerResponse{Pid: resp.Pid}, nil
}

func (c *Containers) Start(ctx context.Context, r *vmmtask.StartProcessRequest) (*vmmtask.StartProcessResponse, error) {
	resp, err := c.svc.Start(c.ctx, &taskAPI.StartRequest{ID: r.ContainerId, ExecID: r.ExecId})
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	for k, s := range c.streams {
		if k.container == r.ContainerId && k.exec == r.ExecId {
			s.startedOnce.Do(func() { close(s.started) })
		}
	}
	c.mu.Unlock()
	return &vmmtask.StartProcessResponse{Pid: resp.Pid}, nil
}

func (c *Containers) Exec(ctx context.Context, r *vmmtask.ExecProcessRequest) (*vmmtask.Empty, error) {
	if r.ExecId == "" {
		return nil, status.Error(codes.InvalidArgument, "exec id must not be empty")
	}
	if err := validate.ID("exec", r.ExecId); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	// Before its bundle path is used: "" or ".." would name Root or its parent.
	if err := validate.ID("container", r.ContainerId); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if _, err := os.Stat(c.bundle(r.ContainerId)); err != nil {
		return nil, status.Errorf(codes.NotFound, "container %s not found", r.ContainerId)
	}
	paths, undo, err := c.makeIO(r.ContainerId, r.ExecId, [3]bool{r.Stdin, r.Stdout, r.Stderr})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "exec %s: %v", r.ExecId, err)
	}
	_, err = c.svc.Exec(c.ctx, &taskAPI.ExecProcessRequest{
		ID: r.ContainerId, ExecID: r.ExecId, Terminal: r.Terminal,
		Stdin: paths[0], Stdout: paths[1], Stderr: paths[2],
		Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: r.Process},
	})
	if err != nil {
		undo()
		return nil, err
	}
	return &vmmtask.Empty{}, nil
}

func (c *Containers) Signal(ctx context.Context, r *vmmtask.SignalProcessRequest) (*vmmtask.Empty, error) {
	if _, err := c.svc.Kill(c.ctx, &taskAPI.KillRequest{ID: r.ContainerId, ExecID: r.ExecId, Signal: r.Signal, All: r.All}); err != nil {
		return nil, err
	}
	return &vmmtask.Empty{}, nil
}

func (c *Containers) Wait(ctx context.Context, r *vmmtask.WaitProcessRequest) (*vmmtask.WaitProcessResponse, error) {
	resp, err := c.svc.Wait(namespaces.WithNamespace(ctx, namespace), &taskAPI.WaitRequest{ID: r.ContainerId, ExecID: r.ExecId})
	if err != nil {
		return nil, err
	}
	return &vmmtask.WaitProcessResponse{ExitStatus: resp.ExitStatus, ExitedAtUnixNs: resp.ExitedAt.AsTime().UnixNano()}, nil
}

// Delete deletes an exited process; deleting the init unmounts the rootfs
// and removes the container's bundle.
func (c *Containers) Delete(ctx context.Context, r *vmmtask.DeleteProcessRequest) (*vmmtask.DeleteProcessResponse, error) {
	resp, err := c.svc.Delete(c.ctx, &taskAPI.DeleteRequest{ID: r.ContainerId, ExecID: r.ExecId})
	if err != nil {
		return nil, err
	}
	c.dropIO(r.ContainerId, r.ExecId, r.ExecId == "")
	if r.ExecId == "" {
		b := c.bundle(r.ContainerId)
		_ = unix.Unmount(filepath.Join(b, "rootfs"), unix.MNT_DETACH)
		if err := os.RemoveAll(b); err != nil {
			c.Log.Warn("remove bundle", zap.String("container", r.ContainerId), zap.Error(err))
		}
	}
	return &vmmtask.DeleteProcessResponse{Pid: resp.Pid, ExitStatus: resp.ExitStatus, ExitedAtUnixNs: resp.ExitedAt.AsTime().UnixNano()}, nil
}

func (c *Containers) State(ctx context.Context, r *vmmtask.ProcessStateRequest) (*vmmtask.ProcessStateResponse, error) {
	resp, err := c.svc.State(c.ctx, &taskAPI.StateRequest{ID: r.ContainerId, ExecID: r.ExecId})
	if err != nil {
		return nil, err
	}
	out := &vmmtask.ProcessStateResponse{Pid: resp.Pid, Status: resp.Status.String(), ExitStatus: resp.ExitStatus}
	if resp.ExitedAt != nil && !resp.ExitedAt.AsTime().IsZero() && resp.ExitedAt.AsTime().Unix() > 0 {
		out.ExitedAtUnixNs = resp.ExitedAt.AsTime().UnixNano()
	}
	return out, nil
}

func (c *Containers) CloseStdin(ctx context.Context, r *vmmtask.CloseStdinRequest) (*vmmtask.Empty, error) {
	if _, err := c.svc.CloseIO(c.ctx, &taskAPI.CloseIORequest{ID: r.ContainerId, ExecID: r.ExecId, Stdin: true}); err != nil {
		return nil, err
	}
	return &vmmtask.Empty{}, nil
}

func (c *Containers) ResizePty(ctx context.Context, r *vmmtask.ResizePtyRequest) (*vmmtask.Empty, error) {
	if _, err := c.svc.ResizePty(c.ctx, &taskAPI.ResizePtyRequest{ID: r.ContainerId, ExecID: r.ExecId, Width: r.Width, Height: r.Height}); err != nil {
		return nil, err
	}
	return &vmmtask.Empty{}, nil
}

func (c *Containers) Stats(ctx context.Context, r *vmmtask.ContainerStatsRequest) (*vmmtask.ContainerStatsResponse, error) {
	resp, err := c.svc.Stats(c.ctx, &taskAPI.StatsRequest{ID: r.ContainerId})
	if err != nil {
		return nil, err
	}
	v, err := typeurl.UnmarshalAny(resp.Stats)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "stats: %v", err)
	}
	m, ok := v.(*cgroupsv2stats.Metrics)
	if !ok {
		return nil, status.Errorf(codes.Unimplemented, "stats of type %T (the guest has cgroup v2)", v)
	}
	out := &vmmtask.ContainerStatsResponse{}
	if m.CPU != nil {
		out.CpuUsageNs = m.CPU.UsageUsec * 1000
	}
	if m.Memory != nil {
		out.MemoryUsageBytes, out.MemoryLimitBytes = m.Memory.Usage, m.Memory.UsageLimit
	}
	if m.Pids != nil {
		out.Pids = m.Pids.Current
	}
	return out, nil
}

// Events streams exits until the host goes away.
func (c *Containers) Events(ctx context.Context, send func(*vmmtask.Event) error) error {
	ch := make(chan *vmmtask.Event, 256)
	c.mu.Lock()
	c.subs[ch] = struct{}{}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.subs, ch)
		c.mu.Unlock()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e := <-ch:
			if err := send(e); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
		}
	}
}
