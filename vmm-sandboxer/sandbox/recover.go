package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/daemon"
	"github.com/kuasar-go/kuasar-go/shared/holder"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/unixsock"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/vmtask"
)

var _ controller.Recoverer = (*Family)(nil)

// Recover reattaches to the VM of a pod that ran while the daemon was
// down (VMs live in sessions of their own and outlive it): it watches the
// VMM process, reconnects to the agent, restores the pod's containers from
// the guest and serves the pod's task socket again.
func (f *Family) Recover(ctx context.Context, sb *store.Sandbox) (_ <-chan controller.Exit, retErr error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	if f.cfg.Hypervisor != HypervisorQEMU {
		return nil, fmt.Errorf("reattaching to %s VMs is not supported: %w", f.cfg.Hypervisor, errdefs.ErrNotImplemented)
	}
	// Held until the pod's release, whether its VM still runs or not.
	if st.VMMUid != 0 {
		if err := f.uids.Reserve(st.VMMUid, sb.ID); err != nil {
			return nil, fmt.Errorf("the user of sandbox %s's QEMU: %w", sb.ID, err)
		}
	}
	if st.VMMPid == 0 || !vmmOf(st) {
		return nil, fmt.Errorf("the VM of sandbox %s no longer runs: %w", sb.ID, errdefs.ErrNotFound)
	}
	// holder.Watch watches any process by PID and start time (pidfd).
	exits, err := holder.Watch(holder.Holder{Pid: st.VMMPid, StartTime: st.VMMStartTime})
	if err != nil {
		return nil, err
	}
	vm := &attachedQEMU{pid: st.VMMPid, qmpSocket: filepath.Join(st.VMDir, "vmm.sock"), exits: exits, done: make(chan struct{})}
	go vm.watch()
	p := &pod{dir: st.VMDir, vm: vm, exited: vm.done}
	defer func() {
		if retErr != nil {
			f.release(context.Background(), sb, st, p)
		}
	}()
	if st.AgentCID != 0 {
		p.dialer = &transport.VsockDialer{CID: st.AgentCID}
	} else {
		p.dialer = transport.NewSerialDialer(filepath.Join(st.VMDir, "agent.sock"))
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	t0 := time.Now()
	if p.agent, err = agentclient.Dial(actx, p.dialer); err != nil {
		return nil, fmt.Errorf("reconnect to the agent: %w", err)
	}
	f.log.Debug("agent reconnected", zap.String("sandbox", sb.ID), zap.Duration("took", time.Since(t0)))
	p.tasks = vmtask.New(sb.ID, p.agent, st.hostShare(), st.recordDir(), f.events.ForSandbox(sb.ID), f.fds, f.log.Named("tasks").With(zap.String("sandbox", sb.ID)))
	if err := p.tasks.Restore(actx); err != nil {
		f.log.Warn("some containers could not be restored", zap.String("sandbox", sb.ID), zap.Error(err))
	}
	if err := f.serveTasks(actx, p, st); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.pods[sb.ID] = p
	f.mu.Unlock()
	f.log.Info("pod VM reattached", zap.String("sandbox", sb.ID), zap.Int("vmm_pid", st.VMMPid))
	return f.watch(sb.ID, p), nil
}

// serveTasks serves the pod's task API on its backend socket and has the
// keeper serve the address containerd dials (again, after a restart).
func (f *Family) serveTasks(ctx context.Context, p *pod, st state) error {
	var err error
	if p.taskSrv, err = ttrpc.NewServer(daemon.RecoverTTRPC(f.log)); err != nil {
		return err
	}
	p.tasks.Register(p.taskSrv)
	l, err := unixsock.Listen(st.taskBackendSocket())
	if err != nil {
		return fmt.Errorf("task socket: %w", err)
	}
	go func() { _ = p.taskSrv.Serve(context.Background(), l) }()
	if err := f.proxy.Listen(ctx, st.taskSocket(), st.taskBackendSocket()); err != nil {
		return fmt.Errorf("task socket: %w", err)
	}
	return nil
}

// attachedQEMU is a QEMU process an earlier instance of the daemon
// started: not a child, so it is watched through a pidfd (its exit status
// is not known) and stopped over QMP, or killed.
type attachedQEMU struct {
	pid       int
	qmpSocket string
	exits     <-chan holder.Exit
	done      chan struct{}
}

var _ hypervisor.Hypervisor = (*attachedQEMU)(nil)

var errAttached = errors.New("not supported on a VM reattached after a restart")

func (a *attachedQEMU) watch() {
	<-a.exits
	close(a.done)
}

func (a *attachedQEMU) Start(context.Context) error { return errAttached }
func (a *attachedQEMU) PID() int                    { return a.pid }

func (a *attachedQEMU) AddDevice(context.Context, hypervisor.Device) error { return errAttached }
func (a *attachedQEMU) RemoveDevice(context.Context, string) error         { return errAttached }

// Wait reports the exit; a process that is not our child has no status
// we can read.
func (a *attachedQEMU) Wait(ctx context.Context) (hypervisor.ExitStatus, error) {
	select {
	case <-a.done:
		return hypervisor.ExitStatus{Code: -1, Signal: "unknown (not a child of this daemon)"}, nil
	case <-ctx.Done():
		return hypervisor.ExitStatus{}, ctx.Err()
	}
}

// Ping asks QMP whether the VM runs.
func (a *attachedQEMU) Ping(ctx context.Context) error {
	q, err := qemu.DialQMP(ctx, a.qmpSocket)
	if err != nil {
		return err
	}
	defer q.Close()
	_, err = q.Execute(ctx, "query-status", nil)
	return err
}

// Stop quits QEMU over QMP and kills it when it has not gone when ctx
// ends.
func (a *attachedQEMU) Stop(ctx context.Context) error {
	select {
	case <-a.done:
		return nil
	default:
	}
	if q, err := qemu.DialQMP(ctx, a.qmpSocket); err == nil {
		_, _ = q.Execute(ctx, "quit", nil)
		q.Close()
	}
	select {
	case <-a.done:
		return nil
	case <-ctx.Done():
	}
	if err := unix.Kill(a.pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return err
	}
	select {
	case <-a.done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("qemu pid %d did not exit after SIGKILL", a.pid)
	}
}

// virtiofsdOf tells whether pid is the pod's virtiofsd (its command line
// names the VM's directory) and not a process that reused the PID.
func virtiofsdOf(st state) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", st.VirtiofsdPid))
	return err == nil && st.VirtiofsdPid > 0 && containsDir(b, st.VMDir)
}
