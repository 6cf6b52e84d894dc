// Package task serves containerd's task API (containerd.task.v3.Task over
// ttrpc) for every container of every pod of one sandboxer, driving an OCI
// runtime CLI (runc, crun, runsc) through containerd's runc process library.
// containerd connects to it directly at the address the sandbox controller
// returned; no shim process exists.
package task

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/cgroups/v3/cgroup1"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	apitask "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-go/kuasar-go/shared/validate"
)

var empty = &emptypb.Empty{}

// Sandbox is what the task service needs to know of a task's pod.
type Sandbox struct {
	// CgroupParent is the pod's cgroup; containers are placed below it.
	// Empty leaves the cgroup path containerd chose.
	CgroupParent string
}

// Sandboxes resolves the pod a task belongs to. It returns NotFound for an
// unknown pod and FailedPrecondition for a pod that is not running.
type Sandboxes interface {
	TaskSandbox(id string) (Sandbox, error)
}

// Publisher sends task events to containerd.
type Publisher interface {
	PublishNamespace(ns, topic string, event cevents.Event) error
}

// Publishers returns the publisher of a pod's task events: each pod has
// its own (events.Forwarder.ForSandbox), so that one pod's flood of events
// cannot crowd out the exits of the others.
type Publishers func(sandboxID string) Publisher

// containerEntry is a container with the pod it belongs to and the state
// of its exits.
type containerEntry struct {
	Container
	sandboxID string
	namespace string

	runningExecs int
	initExited   bool
	// heldInitExit is the init's exit while execs still run: containerd must
	// see the init exit last.
	heldInitExit *Exit
}

type processRef struct {
	c *containerEntry
	p process.Process
}

// Service implements taskAPI.TTRPCTaskService.
type Service struct {
	sandboxes  Sandboxes
	publishers Publishers
	runtime    Runtime
	log        *zap.Logger
	ctx        context.Context
	cancel     context.CancelFunc
	exitSrc    ExitSource
	recordDir  string
	oom1       oomWatcher

	mu         sync.Mutex
	containers map[string]*containerEntry
	running    map[int][]processRef
	// starting collects exits while processes start, so that a process that
	// exits before its PID is known is still reported.
	starting map[*map[int][]Exit]struct{}
	// recordMu orders the writes of container records.
	recordMu sync.Mutex
}

// Option configures a Service.
type Option func(*Service)

// WithExits makes src the source of container process exits; the default
// is the daemon's own reaper (ReaperExits).
func WithExits(src ExitSource) Option { return func(s *Service) { s.exitSrc = src } }

// WithRecords keeps a record of every container in dir, so that a new
// instance of the daemon serves the containers of the previous one: New
// restores them. The Runtime must be a Restorer and its containers
// Recorded.
func WithRecords(dir string) Option { return func(s *Service) { s.recordDir = dir } }

type oomWatcher interface {
	Add(id string, cg interface{}) error
	Run(ctx context.Context)
	Close() error
}

// New returns a task service whose containers rt makes and whose events
// go through publishers. Unless an exit source is given, the process must
// already be a child subreaper reaping through containerd's reaper (see
// package reap). With records, it first restores the containers a
// previous instance recorded. The service owns rt and closes it.
func New(sandboxes Sandboxes, publishers Publishers, rt Runtime, log *zap.Logger, opts ...Option) (*Service, error) {
	ctx, cancel := context.WithCancel(context.Background())
	s := &Service{
		sandboxes:  sandboxes,
		publishers: publishers,
		runtime:    rt,
		log:        log,
		ctx:        ctx,
		cancel:     cancel,
		exitSrc:    ReaperExits{},
		containers: map[string]*containerEntry{},
		running:    map[int][]processRef{},
		starting:   map[*map[int][]Exit]struct{}{},
	}
	for _, o := range opts {
		o(s)
	}
	recorded, live, err := s.exitSrc.Subscribe(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("exits of container processes: %w", err)
	}
	if s.recordDir != "" {
		if err := s.restore(ctx, recorded); err != nil {
			cancel()
			return nil, err
		}
	}
	if w, err := newOOMv1Watcher(s); err == nil {
		s.oom1 = w
		go w.Run(ctx)
	} else {
		log.Debug("cgroup v1 OOM watching unavailable", zap.Error(err))
	}
	go s.processExits(live)
	return s, nil
}

// Register adds the service to a ttrpc server.
func (s *Service) Register(srv *ttrpc.Server) {
	taskAPI.RegisterTTRPCTaskService(srv, s)
}

// Close stops exit and OOM processing; containers keep running.
func (s *Service) Close() error {
	s.cancel()
	if s.oom1 != nil {
		s.oom1.Close()
	}
	return s.runtime.Close()
}

func (s *Service) publish(sandboxID, ns, topic string, ev cevents.Event) {
	if err := s.publishers(sandboxID).PublishNamespace(ns, topic, ev); err != nil {
		s.log.Error("publish event", zap.String("sandbox", sandboxID), zap.String("topic", topic), zap.Error(err))
	}
}

func (s *Service) getContainer(id string) (*containerEntry, error) {
	if err := validate.ID("container", id); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	c := s.containers[id]
	s.mu.Unlock()
	// A nil entry is a container whose Create is still running.
	if c == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s", id)
	}
	return c, nil
}

func validateExecID(execID string) error {
	if execID == "" {
		return nil
	}
	return errgrpc.ToGRPC(validate.ID("exec", execID))
}

// preStart registers a collector for exits that happen while a process
// starts; handleStarted hands the process over to normal exit handling.
func (s *Service) preStart() (handleStarted func(c *containerEntry, p process.Process), cleanup func()) {
	exits := map[int][]Exit{}
	s.mu.Lock()
	s.starting[&exits] = struct{}{}
	s.mu.Unlock()
	done := false
	handleStarted = func(c *containerEntry, p process.Process) {
		s.mu.Lock()
		delete(s.starting, &exits)
		done = true
		pid := 0
		if p != nil {
			pid = p.Pid()
		}
		var early []Exit
		for _, e := range exits[pid] {
			if e.same(pid, startTimeOf(p)) {
				early = append(early, e)
			}
		}
		if pid == 0 || len(early) == 0 {
			if pid != 0 {
				s.running[pid] = append(s.running[pid], processRef{c: c, p: p})
			}
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		for _, e := range early {
			s.handleExit(e, processRef{c: c, p: p})
		}
	}
	cleanup = func() {
		s.mu.Lock()
		if !done {
			delete(s.starting, &exits)
		}
		s.mu.Unlock()
	}
	return handleStarted, cleanup
}

// Create creates a container (its init process) in a running pod.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
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
	sandboxID, spec, err := ReadBundle(r.Bundle)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	sb, err := s.sandboxes.TaskSandbox(sandboxID)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("container %s: %w", r.ID, err))
	}
	if err := placeCgroup(r.Bundle, r.ID, spec, sb.CgroupParent); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}

	s.mu.Lock()
	if _, ok := s.containers[r.ID]; ok {
		s.mu.Unlock()
		return nil, errgrpc.ToGRPCf(errdefs.ErrAlreadyExists, "container %s", r.ID)
	}
	// Reserve the ID while the runtime works.
	s.containers[r.ID] = nil
	s.mu.Unlock()

	handleStarted, cleanup := s.preStart()
	defer cleanup()
	rc, err := s.runtime.Create(ctx, r)
	if err != nil {
		s.mu.Lock()
		delete(s.containers, r.ID)
		s.mu.Unlock()
		return nil, errgrpc.ToGRPC(fmt.Errorf("create container %s: %w", r.ID, err))
	}
	c := &containerEntry{Container: rc, sandboxID: sandboxID, namespace: ns}
	// A container the next daemon instance would not know must not run.
	if err := s.writeRecord(c); err != nil {
		s.discard(ctx, c)
		s.mu.Lock()
		delete(s.containers, r.ID)
		s.mu.Unlock()
		return nil, errgrpc.ToGRPC(fmt.Errorf("create container %s: %w", r.ID, err))
	}
	s.mu.Lock()
	s.containers[r.ID] = c
	s.mu.Unlock()

	s.publish(sandboxID, ns, runtime.TaskCreateEventTopic, &eventstypes.TaskCreate{
		ContainerID: r.ID,
		Bundle:      r.Bundle,
		Rootfs:      r.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid:         uint32(rc.Pid()),
	})
	s.watchOOM(c)
	init, _ := rc.Process("")
	handleStarted(c, init)
	s.log.Debug("container created", zap.String("container", r.ID), zap.String("sandbox", sandboxID), zap.Int("pid", rc.Pid()))
	return &taskAPI.CreateTaskResponse{Pid: uint32(rc.Pid())}, nil
}

// ReadBundle checks the bundle containerd prepared and returns the pod it
// belongs to (containerd writes it to <bundle>/sandbox) and its OCI spec.
func ReadBundle(bundle string) (string, *specs.Spec, error) {
	if err := validate.AbsPath("bundle", bundle); err != nil {
		return "", nil, err
	}
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return "", nil, fmt.Errorf("bundle %s: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return "", nil, fmt.Errorf("bundle %s: config.json: %v: %w", bundle, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil || spec.Root == nil {
		return "", nil, fmt.Errorf("bundle %s: config.json has no process or root: %w", bundle, errdefs.ErrInvalidArgument)
	}
	id, err := os.ReadFile(filepath.Join(bundle, "sandbox"))
	if err != nil {
		return "", nil, fmt.Errorf("bundle %s names no sandbox (%v): %w", bundle, err, errdefs.ErrFailedPrecondition)
	}
	sandboxID := strings.TrimSpace(string(id))
	if err := validate.ID("sandbox", sandboxID); err != nil {
		return "", nil, err
	}
	return sandboxID, &spec, nil
}

// placeCgroup puts the container's cgroup below the pod's when containerd
// chose a path outside it (a pod without a cgroup parent), so that the pod's
// cgroup accounts for all of its containers.
func placeCgroup(bundle, id string, spec *specs.Spec, parent string) error {
	if parent == "" || spec.Linux == nil {
		return nil
	}
	// Cleaned: "<parent>/" or "<parent>/../x" is not below the parent.
	if strings.HasPrefix(filepath.Clean(spec.Linux.CgroupsPath), strings.TrimSuffix(parent, "/")+"/") {
		return nil
	}
	spec.Linux.CgroupsPath = filepath.Join(parent, id)
	data, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o600)
}

// Start starts a container's init or an exec'd process.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	if err := validateExecID(r.ExecID); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if r.ExecID != "" {
		if c.initExited {
			s.mu.Unlock()
			return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "container %s init process is not running", c.ID())
		}
		c.runningExecs++
	}
	s.mu.Unlock()
	handleStarted, cleanup := s.preStart()
	defer cleanup()
	p, err := c.Container.Start(ctx, r)
	if err != nil {
		if r.ExecID != "" {
			s.execEnded(c)
		}
		handleStarted(c, nil)
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID == "" {
		s.publish(c.sandboxID, c.namespace, runtime.TaskStartEventTopic, &eventstypes.TaskStart{ContainerID: c.ID(), Pid: uint32(p.Pid())})
	} else {
		s.publish(c.sandboxID, c.namespace, runtime.TaskExecStartedEventTopic, &eventstypes.TaskExecStarted{ContainerID: c.ID(), ExecID: r.ExecID, Pid: uint32(p.Pid())})
	}
	handleStarted(c, p)
	s.updateRecord(c)
	return &taskAPI.StartResponse{Pid: uint32(p.Pid())}, nil
}

// Delete deletes an exited process; deleting the init removes the container
// and unmounts its rootfs.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	if err := validateExecID(r.ExecID); err != nil {
		return nil, err
	}
	p, err := c.Container.Delete(ctx, r)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if r.ExecID != "" {
		s.updateRecord(c)
	} else {
		s.mu.Lock()
		delete(s.containers, r.ID)
		s.mu.Unlock()
		s.removeRecord(r.ID)
		s.publish(c.sandboxID, c.namespace, runtime.TaskDeleteEventTopic, &eventstypes.TaskDelete{
			ContainerID: c.ID(),
			Pid:         uint32(p.Pid()),
			ExitStatus:  uint32(p.ExitStatus()),
			ExitedAt:    protobuf.ToTimestamp(p.ExitedAt()),
		})
	}
	return &taskAPI.DeleteResponse{
		ExitStatus: uint32(p.ExitStatus()),
		ExitedAt:   protobuf.ToTimestamp(p.ExitedAt()),
		Pid:        uint32(p.Pid()),
	}, nil
}

// Exec adds a process to a container; Start runs it.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	if r.ExecID == "" {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "exec id must not be empty")
	}
	if err := validateExecID(r.ExecID); err != nil {
		return nil, err
	}
	ok, cancel := c.ReserveProcess(r.ExecID)
	if !ok {
		return nil, errgrpc.ToGRPCf(errdefs.ErrAlreadyExists, "exec %s in container %s", r.ExecID, r.ID)
	}
	p, err := c.Container.Exec(ctx, r)
	if err != nil {
		cancel()
		return nil, errgrpc.ToGRPC(err)
	}
	s.updateRecord(c)
	s.publish(c.sandboxID, c.namespace, runtime.TaskExecAddedEventTopic, &eventstypes.TaskExecAdded{ContainerID: c.ID(), ExecID: p.ID()})
	return empty, nil
}

// onContainer runs op on the container named id, mapping its error to gRPC.
func (s *Service) onContainer(id string, op func(c *containerEntry) error) (*emptypb.Empty, error) {
	c, err := s.getContainer(id)
	if err != nil {
		return nil, err
	}
	if err := op(c); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return empty, nil
}

// getProcess returns a container's init (execID "") or exec'd process.
func (s *Service) getProcess(id, execID string) (*containerEntry, process.Process, error) {
	c, err := s.getContainer(id)
	if err != nil {
		return nil, nil, err
	}
	if err := validateExecID(execID); err != nil {
		return nil, nil, err
	}
	p, err := c.Process(execID)
	if err != nil {
		return nil, nil, errgrpc.ToGRPC(err)
	}
	return c, p, nil
}

// ResizePty resizes a process's terminal.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	return s.onContainer(r.ID, func(c *containerEntry) error { return c.Container.ResizePty(ctx, r) })
}

// State reports a process's status.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	c, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st, err := p.Status(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	status := apitask.Status_UNKNOWN
	switch st {
	case "created":
		status = apitask.Status_CREATED
	case "running":
		status = apitask.Status_RUNNING
	case "stopped":
		status = apitask.Status_STOPPED
	case "paused":
		status = apitask.Status_PAUSED
	case "pausing":
		status = apitask.Status_PAUSING
	}
	sio := p.Stdio()
	return &taskAPI.StateResponse{
		ID:         p.ID(),
		Bundle:     c.Bundle(),
		Pid:        uint32(p.Pid()),
		Status:     status,
		Stdin:      sio.Stdin,
		Stdout:     sio.Stdout,
		Stderr:     sio.Stderr,
		Terminal:   sio.Terminal,
		ExitStatus: uint32(p.ExitStatus()),
		ExitedAt:   protobuf.ToTimestamp(p.ExitedAt()),
	}, nil
}

// Pause freezes a container.
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	return s.onContainer(r.ID, func(c *containerEntry) error {
		if err := c.Container.Pause(ctx); err != nil {
			return err
		}
		s.publish(c.sandboxID, c.namespace, runtime.TaskPausedEventTopic, &eventstypes.TaskPaused{ContainerID: c.ID()})
		return nil
	})
}

// Resume thaws a paused container.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	return s.onContainer(r.ID, func(c *containerEntry) error {
		if err := c.Container.Resume(ctx); err != nil {
			return err
		}
		s.publish(c.sandboxID, c.namespace, runtime.TaskResumedEventTopic, &eventstypes.TaskResumed{ContainerID: c.ID()})
		return nil
	})
}

// Checkpoint is not offered: the daemon has no CRIU integration.
func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "checkpoint is not supported")
}

// Kill signals a process (all processes of the container when r.All).
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	if err := validateExecID(r.ExecID); err != nil {
		return nil, err
	}
	return s.onContainer(r.ID, func(c *containerEntry) error { return c.Container.Kill(ctx, r) })
}

// Pids lists the container's processes.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	pids, err := c.Container.Pids(ctx)
	if len(pids) == 0 {
		// A container whose init has exited and is not deleted still
		// names it: containerd, loading tasks after its restart, deletes
		// one that lists no process as a leaked shim's (containerd#6860),
		// and CRI would then report the container's exit as 255, Unknown,
		// instead of its real code.
		if init, perr := c.Container.Process(""); perr == nil && init.Pid() > 0 {
			if st, _ := init.Status(ctx); st == "stopped" {
				pids, err = []int{init.Pid()}, nil
			}
		}
	}
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	execs := map[int]string{}
	for _, e := range c.ExecdProcesses() {
		execs[e.Pid()] = e.ID()
	}
	resp := &taskAPI.PidsResponse{}
	for _, pid := range pids {
		info := &apitask.ProcessInfo{Pid: uint32(pid)}
		if execID, ok := execs[pid]; ok {
			a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: execID})
			if err != nil {
				return nil, err
			}
			info.Info = a
		}
		resp.Processes = append(resp.Processes, info)
	}
	return resp, nil
}

// CloseIO closes a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	return s.onContainer(r.ID, func(c *containerEntry) error { return c.Container.CloseIO(ctx, r) })
}

// Update changes a container's resources.
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	return s.onContainer(r.ID, func(c *containerEntry) error { return c.Container.Update(ctx, r) })
}

// Wait blocks until a process has exited.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	_, p, err := s.getProcess(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if err := p.Wait(ctx); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.WaitResponse{ExitStatus: uint32(p.ExitStatus()), ExitedAt: protobuf.ToTimestamp(p.ExitedAt())}, nil
}

// Stats reports the container's cgroup statistics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	c, err := s.getContainer(r.ID)
	if err != nil {
		return nil, err
	}
	var stats any
	switch cg := c.Cgroup().(type) {
	case cgroup1.Cgroup:
		if stats, err = cg.Stat(cgroup1.IgnoreNotExist); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	case *cgroupsv2.Manager:
		if stats, err = cg.Stat(); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	case nil:
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s has no cgroup", c.ID())
	default:
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotImplemented, "cgroup of type %T", cg)
	}
	a, err := typeurl.MarshalAnyToProto(stats)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: a}, nil
}

// Connect reports the daemon's PID in place of a shim's.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	resp := &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid())}
	if c, err := s.getContainer(r.ID); err == nil {
		resp.TaskPid = uint32(c.Pid())
	}
	return resp, nil
}

// Shutdown is a no-op: the daemon outlives every task it serves.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return empty, nil
}

// Containers returns the IDs of the containers of sandbox sandboxID.
func (s *Service) Containers(sandboxID string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for id, c := range s.containers {
		if c != nil && c.sandboxID == sandboxID {
			ids = append(ids, id)
		}
	}
	return ids
}

// processExits matches exits to the processes they were.
func (s *Service) processExits(exits <-chan Exit) {
	for e := range exits {
		s.mu.Lock()
		for exits := range s.starting {
			(*exits)[e.Pid] = append((*exits)[e.Pid], e)
		}
		var refs, others []processRef
		for _, ref := range s.running[e.Pid] {
			if e.same(e.Pid, startTimeOf(ref.p)) {
				refs = append(refs, ref)
			} else {
				others = append(others, ref)
			}
		}
		if len(others) > 0 {
			s.running[e.Pid] = others
		} else {
			delete(s.running, e.Pid)
		}
		s.mu.Unlock()
		for _, ref := range refs {
			if init, _ := ref.c.Process(""); init == ref.p {
				// An init exit runs the runtime (kill --all), whose own exit
				// arrives through this loop: never block it.
				go s.handleExit(e, ref)
				continue
			}
			s.handleExit(e, ref)
		}
	}
}

func (s *Service) handleExit(e Exit, ref processRef) {
	if init, _ := ref.c.Process(""); init != ref.p {
		s.publishExit(e, ref)
		s.execEnded(ref.c)
		return
	}
	// The init is the last of a container's exits containerd may see: end
	// what else runs of the container and hold the exit until the
	// container's execs have ended.
	ref.c.InitExited(s.ctx)
	s.mu.Lock()
	ref.c.initExited = true
	if ref.c.runningExecs > 0 {
		ref.c.heldInitExit = &e
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.publishExit(e, ref)
}

// execEnded counts down running execs and releases a held init exit.
func (s *Service) execEnded(c *containerEntry) {
	s.mu.Lock()
	c.runningExecs--
	var held *Exit
	if c.runningExecs == 0 {
		held, c.heldInitExit = c.heldInitExit, nil
	}
	s.mu.Unlock()
	if held != nil {
		init, _ := c.Process("")
		s.publishExit(*held, processRef{c: c, p: init})
	}
}

func (s *Service) publishExit(e Exit, ref processRef) {
	ref.p.SetExited(e.Status)
	s.updateRecord(ref.c)
	// containerd's clients tell an init's exit from an exec's by ID, the
	// container's own for the init (as containerd's shims send it); some
	// runtimes name their init process "".
	id := ref.p.ID()
	if init, _ := ref.c.Process(""); init == ref.p {
		id = ref.c.ID()
	}
	s.publish(ref.c.sandboxID, ref.c.namespace, runtime.TaskExitEventTopic, &eventstypes.TaskExit{
		ContainerID: ref.c.ID(),
		ID:          id,
		Pid:         uint32(e.Pid),
		ExitStatus:  uint32(e.Status),
		ExitedAt:    protobuf.ToTimestamp(ref.p.ExitedAt()),
	})
}
