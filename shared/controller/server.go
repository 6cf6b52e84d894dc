package controller

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// CRI's pod states, which containerd passes through to kubelet.
const (
	stateReady    = "SANDBOX_READY"
	stateNotReady = "SANDBOX_NOTREADY"
)

// exitStatusUnknown is reported for a sandbox whose end was not observed
// (it ended while no sandboxer watched it and its family cannot tell).
const exitStatusUnknown = 255

// entry is one sandbox with the lock that serializes its lifecycle.
type entry struct {
	mu     sync.Mutex
	sb     *store.Sandbox
	exited chan struct{} // closed once sb.State is stopped
}

// Server implements containerd's sandbox Controller over a Sandboxer.
type Server struct {
	sandboxapi.UnimplementedControllerServer

	family Sandboxer
	store  *store.Store
	log    *zap.Logger

	mu        sync.Mutex
	sandboxes map[string]*entry
}

// New returns a server that keeps state in st and reloads what st holds.
// Sandboxes that were running are reattached when the family implements
// Recoverer, else reported as exited.
func New(ctx context.Context, family Sandboxer, st *store.Store, log *zap.Logger) (*Server, error) {
	s := &Server{family: family, store: st, log: log, sandboxes: map[string]*entry{}}
	loaded, err := st.LoadAll()
	if err != nil {
		// Broken files are reported but do not stop the daemon from serving
		// the pods it can read.
		log.Error("some sandbox state could not be read", zap.Error(err))
	}
	// In parallel: one pod slow to reattach (a VM guest that does not
	// answer) must not hold up the others, nor the daemon's start, by more
	// than its own wait.
	entries := make([]*entry, len(loaded))
	sem := make(chan struct{}, maxParallelRestores)
	var wg sync.WaitGroup
	for i, sb := range loaded {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			entries[i] = s.restore(ctx, sb)
		}()
	}
	wg.Wait()
	for i, sb := range loaded {
		s.sandboxes[sb.ID] = entries[i]
	}
	return s, nil
}

// maxParallelRestores bounds the sandboxes reattached at once at start.
const maxParallelRestores = 16

func (s *Server) restore(ctx context.Context, sb *store.Sandbox) *entry {
	e := &entry{sb: sb, exited: make(chan struct{})}
	if sb.State == store.StateStopped {
		close(e.exited)
		return e
	}
	if sb.State == store.StateCreated {
		return e
	}
	var (
		ch  <-chan Exit
		err error
	)
	if r, ok := s.family.(Recoverer); ok {
		ch, err = r.Recover(ctx, sb)
	} else {
		err = fmt.Errorf("family cannot reattach: %w", errdefs.ErrNotImplemented)
	}
	if err != nil {
		s.log.Warn("sandbox not recovered, reporting it exited", zap.String("sandbox", sb.ID), zap.Error(err))
		s.markExited(e, Exit{Status: exitStatusUnknown, ExitedAt: time.Now()})
		return e
	}
	go s.watch(e, ch)
	return e
}

// Sandbox returns a copy of the state of sandbox id.
func (s *Server) Sandbox(id string) (store.Sandbox, error) {
	e, err := s.get(id)
	if err != nil {
		return store.Sandbox{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return *e.sb, nil
}

// IDs lists the known sandboxes.
func (s *Server) IDs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.sandboxes))
	for id := range s.sandboxes {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

func (s *Server) get(id string) (*entry, error) {
	if err := validate.ID("sandbox", id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	return e, nil
}

// lock returns the entry of id with its lock held.
func (s *Server) lock(id string) (*entry, error) {
	e, err := s.get(id)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	// Shutdown may have removed it while we waited for the lock.
	s.mu.Lock()
	current := s.sandboxes[id]
	s.mu.Unlock()
	if current != e {
		e.mu.Unlock()
		return nil, fmt.Errorf("sandbox %s: %w", id, errdefs.ErrNotFound)
	}
	return e, nil
}

func toGRPC(err error) error {
	if err == nil {
		return nil
	}
	return errgrpc.ToGRPC(err)
}

// Create validates the request and prepares the sandbox.
func (s *Server) Create(ctx context.Context, req *sandboxapi.ControllerCreateRequest) (*sandboxapi.ControllerCreateResponse, error) {
	sb, err := sandboxFromRequest(req)
	if err != nil {
		return nil, toGRPC(err)
	}
	e := &entry{sb: sb, exited: make(chan struct{})}
	e.mu.Lock()
	defer e.mu.Unlock()
	s.mu.Lock()
	if _, ok := s.sandboxes[sb.ID]; ok {
		s.mu.Unlock()
		return nil, toGRPC(fmt.Errorf("sandbox %s: %w", sb.ID, errdefs.ErrAlreadyExists))
	}
	// Reserve the ID so a concurrent Create of the same ID fails fast.
	s.sandboxes[sb.ID] = e
	s.mu.Unlock()

	release := func() {
		s.mu.Lock()
		delete(s.sandboxes, sb.ID)
		s.mu.Unlock()
	}
	if err := s.family.Create(ctx, sb); err != nil {
		release()
		return nil, toGRPC(fmt.Errorf("create sandbox %s: %w", sb.ID, err))
	}
	if err := s.store.Save(sb); err != nil {
		if serr := s.family.Shutdown(context.WithoutCancel(ctx), sb); serr != nil {
			s.log.Error("cleanup after failed save", zap.String("sandbox", sb.ID), zap.Error(serr))
		}
		release()
		return nil, toGRPC(fmt.Errorf("create sandbox %s: persist state: %w", sb.ID, err))
	}
	s.log.Info("sandbox created", zap.String("sandbox", sb.ID), zap.String("netns", sb.NetnsPath))
	return &sandboxapi.ControllerCreateResponse{SandboxID: sb.ID}, nil
}

func sandboxFromRequest(req *sandboxapi.ControllerCreateRequest) (*store.Sandbox, error) {
	if err := validate.ID("sandbox", req.GetSandboxID()); err != nil {
		return nil, err
	}
	if err := validateNetns(req.GetNetnsPath()); err != nil {
		return nil, err
	}
	sb := &store.Sandbox{
		ID:          req.GetSandboxID(),
		Sandboxer:   req.GetSandboxer(),
		NetnsPath:   req.GetNetnsPath(),
		Annotations: req.GetAnnotations(),
		State:       store.StateCreated,
		CreatedAt:   time.Now().UTC(),
	}
	for _, m := range req.GetRootfs() {
		sb.Rootfs = append(sb.Rootfs, store.Mount{Type: m.GetType(), Source: m.GetSource(), Target: m.GetTarget(), Options: m.GetOptions()})
	}
	if o := req.GetOptions(); o != nil {
		sb.Options = &store.Any{TypeURL: o.GetTypeUrl(), Value: o.GetValue()}
		if _, err := PodConfig(sb); err != nil {
			return nil, err
		}
	}
	if spec := req.GetSandbox(); spec != nil {
		b, err := proto.Marshal(spec)
		if err != nil {
			return nil, fmt.Errorf("encode sandbox spec: %w", errdefs.ErrInvalidArgument)
		}
		sb.Spec = b
	}
	return sb, nil
}

// Start runs a created sandbox.
func (s *Server) Start(ctx context.Context, req *sandboxapi.ControllerStartRequest) (*sandboxapi.ControllerStartResponse, error) {
	e, err := s.lock(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	defer e.mu.Unlock()
	sb := e.sb
	if sb.State != store.StateCreated {
		return nil, toGRPC(fmt.Errorf("sandbox %s is %s, not created: %w", sb.ID, sb.State, errdefs.ErrFailedPrecondition))
	}
	ch, err := s.family.Start(ctx, sb)
	if err != nil {
		s.forgetFailed(ctx, e)
		return nil, toGRPC(fmt.Errorf("start sandbox %s: %w", sb.ID, err))
	}
	sb.State = store.StateRunning
	sb.StartedAt = time.Now().UTC()
	if err := s.store.Save(sb); err != nil {
		// Without a state file a restart would lose the pod: undo the start.
		s.log.Error("persist started sandbox", zap.String("sandbox", sb.ID), zap.Error(err))
		sb.State = store.StateCreated
		if serr := s.family.Stop(context.WithoutCancel(ctx), sb, 0); serr != nil {
			s.log.Error("stop after failed save", zap.String("sandbox", sb.ID), zap.Error(serr))
		}
		<-ch
		return nil, toGRPC(fmt.Errorf("start sandbox %s: persist state: %w", sb.ID, err))
	}
	go s.watch(e, ch)
	s.log.Info("sandbox started", zap.String("sandbox", sb.ID), zap.Uint32("pid", sb.Pid), zap.String("address", sb.Address))
	return &sandboxapi.ControllerStartResponse{
		SandboxID: sb.ID,
		Pid:       sb.Pid,
		CreatedAt: timestamppb.New(sb.CreatedAt),
		Address:   sb.Address,
		Version:   sb.Version,
	}, nil
}

// forgetFailed releases a sandbox whose start failed and forgets it:
// containerd drops a sandbox whose start failed without a Shutdown, so
// nothing else would. A sandbox whose release fails is kept (created), and
// a later Shutdown can retry. Called with e.mu held.
func (s *Server) forgetFailed(ctx context.Context, e *entry) {
	ctx = context.WithoutCancel(ctx)
	if err := s.family.Shutdown(ctx, e.sb); err != nil {
		s.log.Error("release sandbox after failed start", zap.String("sandbox", e.sb.ID), zap.Error(err))
		return
	}
	if err := s.store.Delete(e.sb.ID); err != nil {
		s.log.Error("forget sandbox after failed start", zap.String("sandbox", e.sb.ID), zap.Error(err))
		return
	}
	s.mu.Lock()
	if s.sandboxes[e.sb.ID] == e {
		delete(s.sandboxes, e.sb.ID)
	}
	s.mu.Unlock()
}

// watch records the sandbox's exit when its family reports it.
func (s *Server) watch(e *entry, ch <-chan Exit) {
	ex, ok := <-ch
	if !ok {
		ex = Exit{Status: exitStatusUnknown, ExitedAt: time.Now()}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	s.markExited(e, ex)
}

// markExited must be called with e.mu held.
func (s *Server) markExited(e *entry, ex Exit) {
	if e.sb.State == store.StateStopped {
		return
	}
	e.sb.State = store.StateStopped
	e.sb.ExitStatus = ex.Status
	e.sb.ExitedAt = ex.ExitedAt.UTC()
	if err := s.store.Save(e.sb); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		s.log.Error("persist sandbox exit", zap.String("sandbox", e.sb.ID), zap.Error(err))
	}
	close(e.exited)
	s.log.Info("sandbox exited", zap.String("sandbox", e.sb.ID), zap.Uint32("status", ex.Status))
}

// Platform reports the platform containers of the sandbox run on.
func (s *Server) Platform(ctx context.Context, req *sandboxapi.ControllerPlatformRequest) (*sandboxapi.ControllerPlatformResponse, error) {
	if _, err := s.get(req.GetSandboxID()); err != nil {
		return nil, toGRPC(err)
	}
	return &sandboxapi.ControllerPlatformResponse{Platform: &types.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}}, nil
}

// Stop ends a sandbox's processes; stopping a stopped sandbox is a no-op.
func (s *Server) Stop(ctx context.Context, req *sandboxapi.ControllerStopRequest) (*sandboxapi.ControllerStopResponse, error) {
	e, err := s.lock(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := s.stopLocked(ctx, e, time.Duration(req.GetTimeoutSecs())*time.Second); err != nil {
		return nil, toGRPC(err)
	}
	return &sandboxapi.ControllerStopResponse{}, nil
}

// stopLocked is called with e.mu held and releases it.
func (s *Server) stopLocked(ctx context.Context, e *entry, timeout time.Duration) error {
	sb := e.sb
	switch sb.State {
	case store.StateStopped:
		e.mu.Unlock()
		return nil
	case store.StateCreated:
		s.markExited(e, Exit{ExitedAt: time.Now()})
		e.mu.Unlock()
		return nil
	}
	err := s.family.Stop(ctx, sb, timeout)
	// The exit is recorded by watch, which needs the lock.
	e.mu.Unlock()
	if err != nil {
		return fmt.Errorf("stop sandbox %s: %w", sb.ID, err)
	}
	select {
	case <-e.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop sandbox %s: %w", sb.ID, ctx.Err())
	}
}

// Wait blocks until the sandbox has exited.
func (s *Server) Wait(ctx context.Context, req *sandboxapi.ControllerWaitRequest) (*sandboxapi.ControllerWaitResponse, error) {
	e, err := s.get(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	select {
	case <-e.exited:
	case <-ctx.Done():
		return nil, toGRPC(ctx.Err())
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return &sandboxapi.ControllerWaitResponse{ExitStatus: e.sb.ExitStatus, ExitedAt: timestamppb.New(e.sb.ExitedAt)}, nil
}

// Status reports the sandbox's state as CRI understands it.
func (s *Server) Status(ctx context.Context, req *sandboxapi.ControllerStatusRequest) (*sandboxapi.ControllerStatusResponse, error) {
	e, err := s.get(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	sb := e.sb
	resp := &sandboxapi.ControllerStatusResponse{
		SandboxID: sb.ID,
		Pid:       sb.Pid,
		State:     stateNotReady,
		CreatedAt: timestamppb.New(sb.CreatedAt),
		Address:   sb.Address,
		Version:   sb.Version,
	}
	if sb.State == store.StateRunning {
		resp.State = stateReady
	}
	if !sb.ExitedAt.IsZero() {
		resp.ExitedAt = timestamppb.New(sb.ExitedAt)
	}
	if req.GetVerbose() {
		resp.Info = map[string]string{"state": string(sb.State), "netns": sb.NetnsPath}
		if len(sb.Family) > 0 {
			resp.Info["family"] = string(sb.Family)
		}
	}
	return resp, nil
}

// Shutdown stops the sandbox if needed and releases everything it holds;
// afterwards the sandbox is unknown.
func (s *Server) Shutdown(ctx context.Context, req *sandboxapi.ControllerShutdownRequest) (*sandboxapi.ControllerShutdownResponse, error) {
	e, err := s.lock(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	if err := s.stopLocked(ctx, e, 0); err != nil {
		return nil, toGRPC(err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	s.mu.Lock()
	if s.sandboxes[e.sb.ID] != e {
		s.mu.Unlock()
		return nil, toGRPC(fmt.Errorf("sandbox %s: %w", e.sb.ID, errdefs.ErrNotFound))
	}
	s.mu.Unlock()
	if err := s.family.Shutdown(ctx, e.sb); err != nil {
		return nil, toGRPC(fmt.Errorf("shutdown sandbox %s: %w", e.sb.ID, err))
	}
	if err := s.store.Delete(e.sb.ID); err != nil {
		return nil, toGRPC(err)
	}
	s.mu.Lock()
	delete(s.sandboxes, e.sb.ID)
	s.mu.Unlock()
	s.log.Info("sandbox shut down", zap.String("sandbox", e.sb.ID))
	return &sandboxapi.ControllerShutdownResponse{}, nil
}

// Metrics reports the resource usage of a running sandbox.
func (s *Server) Metrics(ctx context.Context, req *sandboxapi.ControllerMetricsRequest) (*sandboxapi.ControllerMetricsResponse, error) {
	e, err := s.lock(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	defer e.mu.Unlock()
	if e.sb.State != store.StateRunning {
		return nil, toGRPC(fmt.Errorf("sandbox %s is %s: %w", e.sb.ID, e.sb.State, errdefs.ErrFailedPrecondition))
	}
	m, err := s.family.Metrics(ctx, e.sb)
	if err != nil {
		return nil, toGRPC(fmt.Errorf("metrics of sandbox %s: %w", e.sb.ID, err))
	}
	return &sandboxapi.ControllerMetricsResponse{Metrics: m}, nil
}

// Update replaces the fields of the sandbox's containerd record that the
// request names (all of them when none are named).
func (s *Server) Update(ctx context.Context, req *sandboxapi.ControllerUpdateRequest) (*sandboxapi.ControllerUpdateResponse, error) {
	e, err := s.lock(req.GetSandboxID())
	if err != nil {
		return nil, toGRPC(err)
	}
	defer e.mu.Unlock()
	if req.GetSandbox() == nil {
		return nil, toGRPC(fmt.Errorf("update of sandbox %s carries no sandbox: %w", e.sb.ID, errdefs.ErrInvalidArgument))
	}
	next, err := updatedSpec(e.sb.Spec, req.GetSandbox(), req.GetFields())
	if err != nil {
		return nil, toGRPC(err)
	}
	if u, ok := s.family.(Updater); ok {
		if err := u.Update(ctx, e.sb, req.GetSandbox(), req.GetFields()); err != nil {
			return nil, toGRPC(fmt.Errorf("update sandbox %s: %w", e.sb.ID, err))
		}
	}
	prev := e.sb.Spec
	e.sb.Spec = next
	if err := s.store.Save(e.sb); err != nil {
		e.sb.Spec = prev
		return nil, toGRPC(err)
	}
	return &sandboxapi.ControllerUpdateResponse{}, nil
}

// updatedSpec applies the named fields of upd to the stored spec.
func updatedSpec(stored []byte, upd *types.Sandbox, fields []string) ([]byte, error) {
	cur := &types.Sandbox{}
	if err := proto.Unmarshal(stored, cur); err != nil {
		return nil, fmt.Errorf("decode stored sandbox spec: %w", err)
	}
	if len(fields) == 0 {
		cur = upd
	}
	for _, f := range fields {
		if key, ok := strings.CutPrefix(f, "labels."); ok {
			if cur.Labels == nil {
				cur.Labels = map[string]string{}
			}
			if v, ok := upd.GetLabels()[key]; ok {
				cur.Labels[key] = v
			} else {
				delete(cur.Labels, key)
			}
			continue
		}
		if key, ok := strings.CutPrefix(f, "extensions."); ok {
			if cur.Extensions == nil {
				cur.Extensions = map[string]*anypb.Any{}
			}
			if v, ok := upd.GetExtensions()[key]; ok {
				cur.Extensions[key] = v
			} else {
				delete(cur.Extensions, key)
			}
			continue
		}
		switch f {
		case "labels":
			cur.Labels = upd.GetLabels()
		case "extensions":
			cur.Extensions = upd.GetExtensions()
		case "spec":
			cur.Spec = upd.GetSpec()
		case "runtime":
			cur.Runtime = upd.GetRuntime()
		case "sandboxer":
			cur.Sandboxer = upd.GetSandboxer()
		default:
			return nil, fmt.Errorf("cannot update sandbox field %q: %w", f, errdefs.ErrInvalidArgument)
		}
	}
	return proto.Marshal(cur)
}
