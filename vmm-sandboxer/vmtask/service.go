// Package vmtask is the host side of a VM pod's containers: it serves
// containerd's task API (containerd.task.v3.Task over ttrpc) for one pod
// and translates each request for the guest agent. containerd's rootfs
// mounts are mounted on the host inside the directory virtio-fs shares
// with the guest, host paths in the OCI spec are rewritten to guest paths,
// CRI's FIFOs are bridged to the agent's IO streams, and exits and OOM
// kills the guest reports become containerd task events.
package vmtask

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	cgroupsv2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	apitask "github.com/containerd/containerd/api/types/task"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/safemount"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
)

var empty = &emptypb.Empty{}

// lostExitStatus is the exit status of a process whose VM went away
// before it reported its own (containerd's "unknown" status).
const lostExitStatus = 255

// Publisher sends task events to containerd.
type Publisher interface {
	PublishNamespace(ns, topic string, event cevents.Event) error
}

// FDKeeper keeps file descriptors open while the daemon restarts (package
// keeper): the host ends of the containers' output FIFOs, so that
// containerd's readers do not see EOF while the daemon is down.
type FDKeeper interface {
	Hold(ctx context.Context, key string, files ...*os.File) error
	Release(ctx context.Context, key string) error
}

// Service is one pod's task service.
type Service struct {
	sandboxID string
	agent     *agentclient.Client
	share     agentclient.Share
	pub       Publisher
	fds       FDKeeper
	log       *zap.Logger
	ctx       context.Context
	cancel    context.CancelFunc
	// recordDir keeps a record per container for a restarted daemon.
	recordDir string

	mu         sync.Mutex
	containers map[string]*container
}

type container struct {
	id, bundle, namespace string
	// dir is the container's directory in the share (Share.HostDir/<id>):
	// the rootfs mount and the exposed host paths.
	dir string
	// mounts names the mount points in dir, in mount order.
	mounts []string
	init   *process
	execs  map[string]*process
}

type processStatus int

const (
	statusCreated processStatus = iota
	statusRunning
	statusStopped
)

type process struct {
	execID string
	ap     *agentclient.Process
	io     *hostIO
	stdio  taskAPI.StateResponse // Stdin, Stdout, Stderr, Terminal

	mu         sync.Mutex
	status     processStatus
	pid        uint32
	exitStatus uint32
	exitedAt   time.Time
	exited     chan struct{}
}

// New returns the task service of pod sandboxID, whose agent is reached
// through agent and whose share is share; it keeps its containers' records
// in recordDir (see Restore) and the ends of their output FIFOs in fds.
func New(sandboxID string, agent *agentclient.Client, share agentclient.Share, recordDir string, pub Publisher, fds FDKeeper, log *zap.Logger) *Service {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{
		sandboxID: sandboxID, agent: agent, share: share, pub: pub, fds: fds, log: log,
		ctx: ctx, cancel: cancel, containers: map[string]*container{}, recordDir: recordDir,
	}
	go s.forwardEvents()
	return s
}

// Register adds the service to a ttrpc server.
func (s *Service) Register(srv *ttrpc.Server) {
	taskAPI.RegisterTTRPCTaskService(srv, s)
}

// Close ends every process the service still tracks as exited (the VM is
// going away), releases the containers' host mounts and stops listening
// for guest events.
func (s *Service) Close() {
	s.cancel()
	s.mu.Lock()
	cs := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		if c != nil {
			cs = append(cs, c)
		}
	}
	s.containers = map[string]*container{}
	s.mu.Unlock()
	for _, c := range cs {
		for _, p := range c.processes() {
			s.markExited(c, p, lostExitStatus, time.Now())
			p.io.Close()
		}
		s.releaseHost(c)
	}
	s.releaseIO(s.sandboxID)
}

func (s *Service) publish(ns, topic string, ev cevents.Event) {
	if err := s.pub.PublishNamespace(ns, topic, ev); err != nil {
		s.log.Error("publish event", zap.String("topic", topic), zap.Error(err))
	}
}

// forwardEvents passes the guest's OOM kills on to containerd. Exits come
// through each process's wait, which also waits for its output to drain.
func (s *Service) forwardEvents() {
	stream, err := s.agent.Events(s.ctx, &vmmtask.EventsRequest{})
	if err != nil {
		s.log.Warn("guest events", zap.Error(err))
		return
	}
	for {
		e, err := stream.Recv()
		if err != nil {
			if s.ctx.Err() == nil {
				s.log.Debug("guest events ended", zap.Error(err))
			}
			return
		}
		if e.GetOom() == nil {
			continue
		}
		s.mu.Lock()
		c := s.containers[e.ContainerId]
		s.mu.Unlock()
		if c != nil {
			s.publish(c.namespace, runtime.TaskOOMEventTopic, &eventstypes.TaskOOM{ContainerID: c.id})
		}
	}
}

// agentErr turns an error from the agent into one containerd understands,
// keeping the guest's gRPC code (NotFound, InvalidArgument...).
func agentErr(err error) error {
	return errgrpc.ToGRPC(errgrpc.ToNative(err))
}

func (s *Service) getContainer(id string) (*container, error) {
	if err := validate.ID("container", id); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	c := s.containers[id]
	s.mu.Unlock()
	if c == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s", id)
	}
	return c, nil
}

func (s *Service) getProcess(id, execID string) (*container, *process, error) {
	c, err := s.getContainer(id)
	if err != nil {
		return nil, nil, err
	}
	if execID == "" {
		return c, c.init, nil
	}
	if err := validate.ID("exec", execID); err != nil {
		return nil, nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	p := c.execs[execID]
	s.mu.Unlock()
	if p == nil {
		return nil, nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "process %s of container %s", execID, id)
	}
	return c, p, nil
}

// processes lists the container's processes; an exec whose ID is only
// reserved (nil, while Exec works) is not one yet.
func (c *container) processes() []*process {
	ps := []*process{c.init}
	for _, p := range c.execs {
		if p != nil {
			ps = append(ps, p)
		}
	}
	return ps
}

// exposer returns the function that bind-mounts host paths into the
// container's directory in the share, cdir, and gives their guest paths.
// The guest can write in the share, so everything there is reached through
// file descriptors that refuse symlinks (package safemount).
func (s *Service) exposer(c *container, cdir *os.File) exposeFunc {
	return func(src string, options []string) (string, error) {
		st, err := os.Stat(src)
		if err != nil {
			return "", fmt.Errorf("bind source: %w", err)
		}
		name := exposedName(len(c.mounts), src)
		target, err := safemount.Target(cdir, name, st.IsDir())
		if err != nil {
			return "", err
		}
		defer target.Close()
		c.mounts = append(c.mounts, name)
		recursive, attr := safemount.BindOptions(options)
		// What the spec asks for, read-only above all, holds for the
		// whole tree from the start; nosuid and nodev keep what the guest
		// writes there harmless to the host, and the guest does not see
		// them (virtiofsd reports modes as they are; the guest's own
		// mount decides for the guest).
		if err := safemount.Bind(src, target, recursive, attr|safemount.NoSuid|safemount.NoDev); err != nil {
			return "", fmt.Errorf("bind %s into the share: %w", src, err)
		}
		return s.share.GuestPath(filepath.Join(c.dir, name))
	}
}

// releaseHost unmounts what the container mounted in the share and
// removes its directory there, never following a link the guest planted.
// What cannot be unmounted stays, with its directory.
func (s *Service) releaseHost(c *container) {
	root, err := safemount.OpenDir(s.share.HostDir)
	if err != nil {
		s.log.Warn("release container directory", zap.String("container", c.id), zap.Error(err))
		return
	}
	defer root.Close()
	mounted := false
	for i := len(c.mounts) - 1; i >= 0; i-- {
		if err := safemount.Unmount(root, filepath.Join(c.id, c.mounts[i])); err != nil {
			s.log.Warn("unmount", zap.String("container", c.id), zap.String("mount", c.mounts[i]), zap.Error(err))
			mounted = true
		}
	}
	if mounted {
		return
	}
	cdir, err := safemount.OpenBeneath(root, c.id, unix.O_PATH|unix.O_DIRECTORY)
	if errors.Is(err, unix.ENOENT) {
		c.mounts = nil
		return
	}
	if err == nil {
		for _, name := range c.mounts {
			if err := safemount.Remove(cdir, name); err != nil {
				s.log.Warn("remove mount point", zap.String("container", c.id), zap.Error(err))
			}
		}
		cdir.Close()
		err = safemount.Remove(root, c.id)
	}
	if err != nil {
		s.log.Warn("remove container directory", zap.String("container", c.id), zap.Error(err))
	}
	c.mounts = nil
}

// Create mounts the container's rootfs in the share, exposes its bind
// mounts, opens its FIFOs and creates it in the guest.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	if err := validate.ID("container", r.ID); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument))
	}
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "checkpoint restore is not supported")
	}
	sandboxID, spec, err := task.ReadBundle(r.Bundle)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if sandboxID != s.sandboxID {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "container %s belongs to sandbox %s, not to %s served here", r.ID, sandboxID, s.sandboxID)
	}
	s.mu.Lock()
	if _, ok := s.containers[r.ID]; ok {
		s.mu.Unlock()
		return nil, errgrpc.ToGRPCf(errdefs.ErrAlreadyExists, "container %s", r.ID)
	}
	if s.ctx.Err() != nil {
		s.mu.Unlock()
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "sandbox %s is shutting down", s.sandboxID)
	}
	// Reserve the ID while the guest works.
	s.containers[r.ID] = nil
	s.mu.Unlock()

	c := &container{id: r.ID, bundle: r.Bundle, namespace: ns, dir: filepath.Join(s.share.HostDir, r.ID), execs: map[string]*process{}}
	p := &process{exited: make(chan struct{}), stdio: taskAPI.StateResponse{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}}
	defer func() {
		if retErr != nil {
			p.io.Close()
			s.releaseHost(c)
			s.mu.Lock()
			delete(s.containers, r.ID)
			s.mu.Unlock()
		}
	}()
	root, err := safemount.OpenDir(s.share.HostDir)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	defer root.Close()
	cdir, err := safemount.Mkdir(root, r.ID, 0o700)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	defer cdir.Close()
	rootfs, err := safemount.Target(cdir, "rootfs", true)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	defer rootfs.Close()
	c.mounts = append(c.mounts, "rootfs")
	if err := mountRootfs(r, spec, rootfs); err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	gspec, err := guestSpec(spec, r.ID, s.exposer(c, cdir))
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	hostRoot := filepath.Join(c.dir, "rootfs")
	guestRoot, err := s.share.GuestPath(hostRoot)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	hio, stdio, err := openIO(ctx, r.Stdin, r.Stdout, r.Stderr)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	p.io = hio
	ap, err := s.agent.Create(ctx, r.ID, gspec, guestRoot, stdio)
	if err != nil {
		return nil, agentErr(err)
	}
	s.holdIO(ctx, r.ID, r.Stdout, r.Stderr)
	p.ap, p.pid = ap, ap.Pid
	c.init = p
	if err := s.saveRecord(c); err != nil {
		_, _ = ap.Delete(context.Background())
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: keep its record: %w", r.ID, err))
	}
	s.mu.Lock()
	s.containers[r.ID] = c
	s.mu.Unlock()
	s.publish(ns, runtime.TaskCreateEventTopic, &eventstypes.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Pid: p.pid,
		IO: &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	s.log.Debug("container created", zap.String("container", r.ID), zap.Uint32("guest_pid", p.pid))
	return &taskAPI.CreateTaskResponse{Pid: p.pid}, nil
}

// mountRootfs mounts the container's root file system on target, an
// open directory in the share: containerd's mounts, or the bundle's rootfs
// when containerd prepared it there. nosuid and nodev for the host's sake,
// as for the exposed paths.
func mountRootfs(r *taskAPI.CreateTaskRequest, spec *specs.Spec, target *os.File) error {
	if len(r.Rootfs) > 0 {
		ms := mount.FromProto(r.Rootfs)
		for i := range ms {
			ms[i].Options = append(slices.Clip(ms[i].Options), "nosuid", "nodev")
		}
		// Through the descriptor: the kernel follows only its magic link.
		if err := mount.All(ms, safemount.ProcPath(target)); err != nil {
			return fmt.Errorf("mount rootfs: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		return nil
	}
	src := spec.Root.Path
	if !filepath.IsAbs(src) {
		src = filepath.Join(r.Bundle, src)
	}
	if err := safemount.Bind(src, target, true, safemount.NoSuid|safemount.NoDev); err != nil {
		return fmt.Errorf("bind rootfs %s: %v: %w", src, err, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Start starts a container's init or an exec'd process and watches for
// its exit.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	st := p.status
	p.mu.Unlock()
	if st != statusCreated {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "process %q of container %s was already started", r.ExecID, r.ID)
	}
	pid, err := p.ap.Start(ctx)
	if err != nil {
		return nil, agentErr(err)
	}
	p.mu.Lock()
	p.pid, p.status = pid, statusRunning
	p.mu.Unlock()
	if r.ExecID == "" {
		s.publish(c.namespace, runtime.TaskStartEventTopic, &eventstypes.TaskStart{ContainerID: c.id, Pid: pid})
	} else {
		s.publish(c.namespace, runtime.TaskExecStartedEventTopic, &eventstypes.TaskExecStarted{ContainerID: c.id, ExecID: r.ExecID, Pid: pid})
	}
	go s.waitExit(c, p)
	return &taskAPI.StartResponse{Pid: pid}, nil
}

// waitExit waits for the process's exit in the guest and the end of its
// output, then publishes it; a container's init exit comes after those of
// its execs, as containerd expects.
func (s *Service) waitExit(c *container, p *process) {
	status, at, err := p.ap.Exit(s.ctx)
	if err != nil {
		if s.ctx.Err() != nil {
			return // Close reports it
		}
		s.log.Warn("process lost", zap.String("container", c.id), zap.String("exec", p.execID), zap.Error(err))
		status, at = lostExitStatus, time.Now()
	}
	// The output has drained: containerd's readers see EOF once the
	// writers close, and only then finish the process's IO.
	s.closeIO(c, p)
	if p == c.init {
		s.mu.Lock()
		execs := c.processes()[1:]
		s.mu.Unlock()
		for _, e := range execs {
			e.mu.Lock()
			started := e.status != statusCreated
			e.mu.Unlock()
			if started {
				select {
				case <-e.exited:
				case <-time.After(10 * time.Second):
					s.log.Warn("exec did not end with its container", zap.String("container", c.id), zap.String("exec", e.execID))
				}
			}
		}
	}
	s.markExited(c, p, status, at)
}

// markExited records the exit of a process once and publishes it.
func (s *Service) markExited(c *container, p *process, status uint32, at time.Time) {
	p.mu.Lock()
	if p.status == statusStopped {
		p.mu.Unlock()
		return
	}
	wasRunning := p.status == statusRunning
	p.status, p.exitStatus, p.exitedAt = statusStopped, status, at
	close(p.exited)
	pid := p.pid
	p.mu.Unlock()
	if !wasRunning {
		return
	}
	s.publish(c.namespace, runtime.TaskExitEventTopic, &eventstypes.TaskExit{
		ContainerID: c.id, ID: processID(c, p), Pid: pid, ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at),
	})
}

func processID(c *container, p *process) string {
	if p.execID == "" {
		return c.id
	}
	return p.execID
}

// Delete deletes an exited (or never started) process; deleting the init
// deletes the container and releases its host mounts.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	st := p.status
	p.mu.Unlock()
	if st == statusRunning {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "process %q of container %s is running", r.ExecID, r.ID)
	}
	if r.ExecID == "" {
		s.mu.Lock()
		running := 0
		for _, e := range c.processes()[1:] {
			e.mu.Lock()
			if e.status == statusRunning {
				running++
			}
			e.mu.Unlock()
		}
		s.mu.Unlock()
		if running > 0 {
			return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s has %d running processes", r.ID, running)
		}
	}
	if _, err := p.ap.Delete(ctx); err != nil {
		switch {
		case errdefs.IsNotFound(errgrpc.ToNative(err)):
		case errors.Is(err, ttrpc.ErrClosed) || s.ctx.Err() != nil:
			// The VM is gone, and the process with it.
			s.log.Warn("guest unavailable for delete", zap.String("container", r.ID), zap.Error(err))
		default:
			// The guest still has it: keep ours so the delete can be retried.
			return nil, agentErr(err)
		}
	}
	// A process deleted before it started never exits by itself.
	s.markExited(c, p, p.exitStatus, p.exitedAt)
	s.closeIO(c, p)
	p.mu.Lock()
	resp := &taskAPI.DeleteResponse{Pid: p.pid, ExitStatus: p.exitStatus, ExitedAt: protobuf.ToTimestamp(p.exitedAt)}
	p.mu.Unlock()
	s.mu.Lock()
	if r.ExecID != "" {
		delete(c.execs, r.ExecID)
		s.mu.Unlock()
		return resp, nil
	}
	delete(s.containers, r.ID)
	s.mu.Unlock()
	s.releaseHost(c)
	s.removeRecord(c.id)
	s.publish(c.namespace, runtime.TaskDeleteEventTopic, &eventstypes.TaskDelete{
		ContainerID: c.id, Pid: resp.Pid, ExitStatus: resp.ExitStatus, ExitedAt: resp.ExitedAt,
	})
	return resp, nil
}

// Exec adds a process to a container; Start runs it.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (_ *emptypb.Empty, retErr error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	if r.ExecID == "" {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "exec id must not be empty")
	}
	if err := validate.ID("exec", r.ExecID); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.Spec == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "exec %s has no process spec", r.ExecID)
	}
	var spec specs.Process
	if err := json.Unmarshal(r.Spec.Value, &spec); err != nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "exec %s: process spec: %v", r.ExecID, err)
	}
	spec.Terminal = r.Terminal
	spec.ApparmorProfile, spec.SelinuxLabel = "", ""
	p := &process{execID: r.ExecID, exited: make(chan struct{}), stdio: taskAPI.StateResponse{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}}
	s.mu.Lock()
	if _, ok := c.execs[r.ExecID]; ok {
		s.mu.Unlock()
		return nil, errgrpc.ToGRPCf(errdefs.ErrAlreadyExists, "exec %s in container %s", r.ExecID, r.ID)
	}
	// Reserved: the process is found only once it has its agent handle,
	// so that a concurrent Start or Kill cannot reach a half-made one.
	c.execs[r.ExecID] = nil
	s.mu.Unlock()
	defer func() {
		if retErr != nil {
			p.io.Close()
			s.mu.Lock()
			delete(c.execs, r.ExecID)
			s.mu.Unlock()
		}
	}()
	hio, stdio, err := openIO(ctx, r.Stdin, r.Stdout, r.Stderr)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("exec %s: %w", r.ExecID, err))
	}
	p.io = hio
	ap, err := s.agent.Exec(ctx, r.ID, r.ExecID, &spec, stdio)
	if err != nil {
		return nil, agentErr(err)
	}
	p.ap = ap
	s.mu.Lock()
	c.execs[r.ExecID] = p
	s.mu.Unlock()
	s.publish(c.namespace, runtime.TaskExecAddedEventTopic, &eventstypes.TaskExecAdded{ContainerID: c.id, ExecID: r.ExecID})
	return empty, nil
}

// State reports a process as the host knows it.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	resp := &taskAPI.StateResponse{
		ID: processID(c, p), Bundle: c.bundle, Pid: p.pid, ExecID: r.ExecID,
		Stdin: p.stdio.Stdin, Stdout: p.stdio.Stdout, Stderr: p.stdio.Stderr, Terminal: p.stdio.Terminal,
	}
	switch p.status {
	case statusCreated:
		resp.Status = apitask.Status_CREATED
	case statusRunning:
		resp.Status = apitask.Status_RUNNING
	default:
		resp.Status = apitask.Status_STOPPED
		resp.ExitStatus = p.exitStatus
		resp.ExitedAt = protobuf.ToTimestamp(p.exitedAt)
	}
	return resp, nil
}

// Kill signals a process (every process of the container with All).
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	st := p.status
	p.mu.Unlock()
	if st == statusStopped && !r.All {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "process %q of container %s already finished", r.ExecID, r.ID)
	}
	if err := p.ap.Signal(ctx, r.Signal, r.All); err != nil {
		return nil, agentErr(err)
	}
	return empty, nil
}

// Pids lists the container's processes the host started.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	ps := c.processes()
	s.mu.Unlock()
	resp := &taskAPI.PidsResponse{}
	for _, p := range ps {
		p.mu.Lock()
		if p.status == statusRunning {
			resp.Processes = append(resp.Processes, &apitask.ProcessInfo{Pid: p.pid})
		}
		p.mu.Unlock()
	}
	if len(resp.Processes) == 0 {
		// An exited init still names itself until deleted: see
		// shared/task.Service.Pids (containerd#6860).
		c.init.mu.Lock()
		if c.init.status == statusStopped && c.init.pid > 0 {
			resp.Processes = append(resp.Processes, &apitask.ProcessInfo{Pid: c.init.pid})
		}
		c.init.mu.Unlock()
	}
	return resp, nil
}

// CloseIO ends a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if r.Stdin {
		if err := p.io.CloseStdin(); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	return empty, nil
}

// ResizePty resizes a process's terminal in the guest.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	if _, _, err := s.getProcess(r.ID, r.ExecID); err != nil {
		return nil, err
	}
	if _, err := s.agent.ResizePty(ctx, &vmmtask.ResizePtyRequest{ContainerId: r.ID, ExecId: r.ExecID, Width: r.Width, Height: r.Height}); err != nil {
		return nil, agentErr(err)
	}
	return empty, nil
}

// Wait blocks until the process has exited.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, errgrpc.ToGRPC(ctx.Err())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return &taskAPI.WaitResponse{ExitStatus: p.exitStatus, ExitedAt: protobuf.ToTimestamp(p.exitedAt)}, nil
}

// Stats reports the container's cgroup statistics in the guest, in
// containerd's cgroup v2 form.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	if _, err := s.getContainer(r.ID); err != nil {
		return nil, err
	}
	st, err := s.agent.ContainerStats(ctx, &vmmtask.ContainerStatsRequest{ContainerId: r.ID})
	if err != nil {
		return nil, agentErr(err)
	}
	a, err := typeurl.MarshalAnyToProto(&cgroupsv2stats.Metrics{
		CPU:    &cgroupsv2stats.CPUStat{UsageUsec: st.CpuUsageNs / 1000},
		Memory: &cgroupsv2stats.MemoryStat{Usage: st.MemoryUsageBytes, UsageLimit: st.MemoryLimitBytes},
		Pids:   &cgroupsv2stats.PidsStat{Current: st.Pids},
	})
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

// Connect reports the daemon's PID in place of a shim's.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid())}
	if c, err := s.getContainer(r.ID); err == nil {
		c.init.mu.Lock()
		resp.TaskPid = c.init.pid
		c.init.mu.Unlock()
	}
	return resp, nil
}

// Shutdown is a no-op: the service lives as long as its pod.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return empty, nil
}

var errNoPause = errors.New("pausing containers in a VM pod is not supported")

func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("%w: %w", errNoPause, errdefs.ErrNotImplemented))
}

func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("%w: %w", errNoPause, errdefs.ErrNotImplemented))
}

func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "checkpoint is not supported")
}

// Update is not supported: the guest agent cannot change a running
// container's resources yet.
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "updating the resources of a container in a VM pod is not supported")
}

// ioKey names what the keeper holds of a container's IO.
func (s *Service) ioKey(id string) string { return s.sandboxID + "/" + id }

// holdIO has the keeper hold a writer of each output FIFO of a container's
// init, so that containerd's readers keep them open while the daemon
// restarts; a restored daemon writes to them again. Without a keeper the
// output ends with the daemon.
func (s *Service) holdIO(ctx context.Context, id string, paths ...string) {
	if s.fds == nil {
		return
	}
	var files []*os.File
	for _, path := range paths {
		if path == "" {
			continue
		}
		// Non-blocking: the reader openIO opened is there.
		f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			s.log.Warn("output FIFO for the keeper", zap.String("container", id), zap.Error(err))
			continue
		}
		defer f.Close()
		files = append(files, f)
	}
	if len(files) == 0 {
		return
	}
	if err := s.fds.Hold(ctx, s.ioKey(id), files...); err != nil {
		s.log.Warn("keeper does not hold the container's output", zap.String("container", id), zap.Error(err))
	}
}

// closeIO closes a process's IO; for an init, the keeper's writers go too,
// so that containerd's readers see EOF.
func (s *Service) closeIO(c *container, p *process) {
	p.io.Close()
	if p == c.init {
		s.releaseIO(s.ioKey(c.id))
	}
}

func (s *Service) releaseIO(key string) {
	if s.fds == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.fds.Release(ctx, key); err != nil {
		s.log.Warn("keeper release", zap.String("key", key), zap.Error(err))
	}
}
