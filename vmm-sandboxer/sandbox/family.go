package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/cgroup"
	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/events"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/podnet"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/uidpool"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/virtiofs"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/vmtask"
)

// taskAPIVersion 3 tells containerd to connect to the task address
// directly instead of spawning a shim.
const taskAPIVersion = 3

// guestShareDir is where the guest mounts the pod's virtio-fs share.
const guestShareDir = "/run/kuasar/shared"

// shareTag is the virtio-fs tag of the pod's share.
const shareTag = "kuasar"

// state is what the family remembers of a pod (store.Sandbox.Family).
type state struct {
	// VMDir holds the VM's sockets and logs, the share and the pod's
	// task socket.
	VMDir     string `json:"vm_dir"`
	CPUs      int    `json:"cpus"`
	MemoryMiB int    `json:"memory_mib"`
	Hostname  string `json:"hostname,omitempty"`
	// PodCgroup holds the VMM and virtiofsd; OwnPodCgroup is set when the
	// sandboxer made it.
	PodCgroup    string `json:"pod_cgroup"`
	OwnPodCgroup bool   `json:"own_pod_cgroup,omitempty"`
	VMMPid       int    `json:"vmm_pid,omitempty"`
	// VMMStartTime tells the VMM from a process that reused its PID.
	VMMStartTime uint64 `json:"vmm_start_time,omitempty"`
	VirtiofsdPid int    `json:"virtiofsd_pid,omitempty"`
	// AgentCID is the guest's vsock CID when the agent is reached over
	// vsock, 0 for the virtio-serial port.
	AgentCID uint32 `json:"agent_cid,omitempty"`
	// SplitShare: the host mounts in mountsDir, of which the share is a
	// read-only copy (see makeShare). Pods of earlier versions mounted in
	// the share itself.
	SplitShare bool `json:"split_share,omitempty"`
	// VMMUid is the user (and group) QEMU runs as when unprivileged: held
	// for this pod, after a restart too, until QEMU is gone.
	VMMUid uint32 `json:"vmm_uid,omitempty"`
}

// shareDir is what virtiofsd serves to the guest.
func (st *state) shareDir() string { return filepath.Join(st.VMDir, "share") }

// mountsDir is where the host mounts what the guest sees in the share.
func (st *state) mountsDir() string { return filepath.Join(st.VMDir, "mounts") }

// hostShare is the share as the pod's task service sees it.
func (st *state) hostShare() agentclient.Share {
	if !st.SplitShare {
		return agentclient.Share{HostDir: st.shareDir(), GuestDir: guestShareDir}
	}
	return agentclient.Share{HostDir: st.mountsDir(), GuestDir: guestShareDir}
}

func (st *state) taskSocket() string { return filepath.Join(st.VMDir, "task.sock") }

// taskBackendSocket is where the daemon serves the pod's task API, behind
// the keeper's taskSocket.
func (st *state) taskBackendSocket() string { return filepath.Join(st.VMDir, "task-backend.sock") }
func (st *state) recordDir() string         { return filepath.Join(st.VMDir, "containers") }

// pod is a running pod's VM and what serves it.
type pod struct {
	dir     string // state.VMDir
	vm      hypervisor.Hypervisor
	fsd     *virtiofs.Daemon
	dialer  transport.Dialer
	agent   *agentclient.Client
	tasks   *vmtask.Service
	taskSrv *ttrpc.Server
	exited  chan struct{} // closed once the VMM process has exited
}

// TaskProxy serves a pod's task address on the daemon's behalf and
// forwards it to the socket the daemon serves, so that containerd's
// connections outlive a daemon restart (package keeper).
type TaskProxy interface {
	Listen(ctx context.Context, address, backend string) error
	Close(ctx context.Context, address string) error
}

// Family implements controller.Sandboxer for VM pods.
type Family struct {
	cfg    *Config
	dir    string // --dir
	events *events.Forwarder
	proxy  TaskProxy
	fds    vmtask.FDKeeper
	log    *zap.Logger
	uids   *uidpool.Pool // the users QEMU runs as

	accelOnce sync.Once
	accel     hypervisor.Accel
	accelErr  error

	mu   sync.Mutex
	pods map[string]*pod
}

var _ controller.Sandboxer = (*Family)(nil)

// New returns the family; dir is the daemon's state directory.
// proxy and fds are the keeper's: it serves the pods' task addresses and
// holds their containers' output FIFOs open while the daemon restarts.
func New(cfg *Config, dir string, events *events.Forwarder, proxy TaskProxy, fds vmtask.FDKeeper, log *zap.Logger) *Family {
	return &Family{cfg: cfg, dir: dir, events: events, proxy: proxy, fds: fds, log: log, pods: map[string]*pod{},
		uids: uidpool.New(cfg.QEMU.RunAsUIDBase, cfg.QEMU.RunAsUIDCount)}
}

func load(sb *store.Sandbox) (state, error) {
	var st state
	return st, sb.DecodeFamily(&st)
}

// vmDir is the VM's directory: named by a hash of the pod ID, so that the
// unix sockets in it stay within the 107 bytes sockaddr_un allows.
func (f *Family) vmDir(id string) string {
	h := sha256.Sum256([]byte(id))
	return filepath.Join(f.dir, "vm", hex.EncodeToString(h[:8]))
}

// size derives the VM's CPUs and memory from the pod's resources: the CPU
// limit rounded up (capped by max_cpus), the memory limit plus the guest's
// overhead; the configured defaults where the pod sets none.
func (f *Family) size(cfg *runtimeapi.PodSandboxConfig) (cpus, memMiB int) {
	g := f.cfg.Guest
	cpus, memMiB = f.cfg.defaultSize()
	res := cfg.GetLinux().GetResources()
	if q, p := res.GetCpuQuota(), res.GetCpuPeriod(); q > 0 && p > 0 {
		cpus = int((q + p - 1) / p)
		cpus = min(max(cpus, 1), g.MaxCPUs)
	}
	if l := res.GetMemoryLimitInBytes(); l > 0 {
		memMiB = max(int((l+(1<<20)-1)>>20)+g.MemoryOverheadMiB, minGuestMemoryMiB)
	}
	return cpus, memMiB
}

// Create checks the pod's config and decides its VM's size and cgroup.
func (f *Family) Create(ctx context.Context, sb *store.Sandbox) error {
	cfg, err := controller.PodConfig(sb)
	if err != nil {
		return err
	}
	ns := cfg.GetLinux().GetSecurityContext().GetNamespaceOptions()
	if ns.GetNetwork() == runtimeapi.NamespaceMode_NODE {
		return fmt.Errorf("a VM pod cannot share the node's network namespace: %w", errdefs.ErrInvalidArgument)
	}
	if ns.GetUsernsOptions() != nil && ns.GetUsernsOptions().GetMode() == runtimeapi.NamespaceMode_POD {
		return fmt.Errorf("user namespaces per pod are not supported: %w", errdefs.ErrNotImplemented)
	}
	st := state{VMDir: f.vmDir(sb.ID), Hostname: cfg.GetHostname()}
	st.CPUs, st.MemoryMiB = f.size(cfg)
	if st.PodCgroup, st.OwnPodCgroup, err = cgroup.PodPath(cfg.GetLinux().GetCgroupParent(), sb.ID); err != nil {
		return err
	}
	return sb.EncodeFamily(st)
}

// resolveAccel decides KVM or TCG once, with a probe boot when asked to.
func (f *Family) resolveAccel(ctx context.Context) (hypervisor.Accel, error) {
	f.accelOnce.Do(func() {
		a, _ := hypervisor.ParseAccel(f.cfg.QEMU.Accel)
		var reason string
		f.accel, reason, f.accelErr = qemu.ResolveAccel(ctx, a, f.cfg.QEMU.Binary, f.cfg.Guest.Kernel, 0)
		if f.accelErr == nil {
			f.log.Info("accelerator", zap.String("accel", string(f.accel)), zap.String("reason", reason))
		}
	})
	return f.accel, f.accelErr
}

// vmCgroup is where the VMM and virtiofsd run: a child of the pod cgroup,
// as a container would be.
func vmCgroup(st state, id string) string { return filepath.Join(st.PodCgroup, id) }

// Start wires the pod's network into taps, starts virtiofsd and the VM,
// waits for the agent, sets the guest up and serves the pod's task API.
func (f *Family) Start(ctx context.Context, sb *store.Sandbox) (_ <-chan controller.Exit, retErr error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	for _, p := range []string{f.cfg.Guest.Kernel, f.cfg.Guest.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("guest image: %w (build it with `make guest`, install it with `make install SANDBOXER=vmm`): %w", err, errdefs.ErrFailedPrecondition)
		}
	}
	p := &pod{dir: st.VMDir, exited: make(chan struct{})}
	defer func() {
		if retErr != nil {
			f.release(context.Background(), sb, st, p)
		}
	}()
	if err := makeShare(st.mountsDir(), st.shareDir()); err != nil {
		return nil, err
	}
	st.SplitShare = true
	cg, err := cgroup.New(vmCgroup(st, sb.ID))
	if err != nil {
		return nil, err
	}

	var nw *podnet.Network
	if sb.NetnsPath != "" {
		if nw, err = podnet.Setup(ctx, sb.NetnsPath); err != nil {
			return nil, fmt.Errorf("pod network: %w", err)
		}
		defer nw.Close() // the VMM has its own copies of the taps once started
	}

	fsSock := filepath.Join(st.VMDir, "virtiofs.sock")
	if p.fsd, err = virtiofs.Start(ctx, virtiofs.Config{
		Binary: f.cfg.Virtiofsd.Binary, SocketPath: fsSock, SharedDir: st.shareDir(), Cache: f.cfg.Virtiofsd.Cache,
	}, f.log.Named("virtiofsd")); err != nil {
		return nil, err
	}
	if err := cg.Add(p.fsd.PID()); err != nil {
		return nil, fmt.Errorf("place virtiofsd in the pod cgroup: %w", err)
	}
	st.VirtiofsdPid = p.fsd.PID()

	agentSock := filepath.Join(st.VMDir, "agent.sock")
	agentDev := f.agentDevice(sb.ID, agentSock)
	if v, ok := agentDev.(*hypervisor.Vsock); ok {
		st.AgentCID = v.GuestCID
	}
	vmCfg := hypervisor.Config{
		ID: sb.ID, Dir: st.VMDir, Kernel: f.cfg.Guest.Kernel, Initrd: f.cfg.Guest.Initrd,
		Cmdline: strings.TrimSpace("console=ttyS0 quiet panic=-1 kuasar.port=" + agentPortName + " " + f.cfg.Guest.KernelParams),
		CPUs:    st.CPUs, MemoryMiB: st.MemoryMiB, SharedMemory: true,
		Devices: []hypervisor.Device{
			&hypervisor.Console{ID: "console"},
			&hypervisor.RNG{ID: "rng"},
			agentDev,
			&hypervisor.VirtioFS{ID: "fs0", Tag: shareTag, SocketPath: fsSock},
		},
	}
	if nw != nil {
		for i, iface := range nw.Interfaces {
			vmCfg.Devices = append(vmCfg.Devices, &hypervisor.TapNet{ID: fmt.Sprintf("net%d", i), Files: []*os.File{iface.Tap}, MAC: iface.MAC})
		}
	}
	if vmCfg.RunAs, err = f.runAs(sb.ID, &st); err != nil {
		return nil, err
	}
	vm, dialer, err := f.newVM(ctx, vmCfg, f.log.Named(f.cfg.Hypervisor).With(zap.String("sandbox", sb.ID)))
	if err != nil {
		return nil, err
	}
	p.dialer = dialer
	t0 := time.Now()
	if err := vm.Start(ctx); err != nil {
		return nil, err
	}
	p.vm = vm
	go func() {
		_, _ = vm.Wait(context.Background())
		close(p.exited)
	}()
	if err := cg.Add(vm.PID()); err != nil {
		return nil, fmt.Errorf("place the VMM in the pod cgroup: %w", err)
	}
	st.VMMPid = vm.PID()
	if st.VMMStartTime, err = proc.StartTime(st.VMMPid); err != nil {
		return nil, err
	}

	if p.agent, err = f.waitAgent(ctx, p, vmCfg); err != nil {
		return nil, err
	}
	bootTime := time.Since(t0)
	if err := f.setupGuest(ctx, p.agent, st, sb, nw); err != nil {
		return nil, fmt.Errorf("set the guest up: %w%s", err, consoleTail(vmCfg.ConsoleLog()))
	}

	p.tasks = vmtask.New(sb.ID, p.agent, st.hostShare(), st.recordDir(), f.events.ForSandbox(sb.ID), f.fds, f.log.Named("tasks").With(zap.String("sandbox", sb.ID)))
	if err := f.serveTasks(ctx, p, st); err != nil {
		return nil, err
	}

	if err := sb.EncodeFamily(st); err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.pods[sb.ID] = p
	f.mu.Unlock()
	sb.Pid = uint32(vm.PID())
	sb.Address = "ttrpc+unix://" + st.taskSocket()
	sb.Version = taskAPIVersion
	f.log.Info("pod VM running", zap.String("sandbox", sb.ID), zap.Int("vmm_pid", vm.PID()),
		zap.String("hypervisor", f.cfg.Hypervisor), zap.Int("cpus", st.CPUs), zap.Int("memory_mib", st.MemoryMiB),
		zap.Duration("boot_to_agent", bootTime))
	return f.watch(sb.ID, p), nil
}

// watch delivers the pod's exit when its VMM process ends; the pod's
// containers are then reported exited.
func (f *Family) watch(id string, p *pod) <-chan controller.Exit {
	out := make(chan controller.Exit, 1)
	go f.capLogs(p)
	go f.endWithAgent(id, p)
	go func() {
		st, _ := p.vm.Wait(context.Background())
		p.tasks.Close()
		code := st.Code
		if code < 0 {
			code = 128 + 9
		}
		f.log.Info("pod VM exited", zap.String("sandbox", id), zap.Stringer("status", st))
		out <- controller.Exit{Status: uint32(code), ExitedAt: time.Now()}
	}()
	return out
}

// endWithAgent stops the pod's VM when its agent connection ends while the
// VM runs: the host gave up on a guest that broke the protocol (a flood, a
// stream it opened, a frame no agent sends, a link it stopped reading), or
// the connection broke. The connection is never dialed again, so the pod
// could do nothing more; a guest that misbehaves loses its own pod, never
// the daemon.
func (f *Family) endWithAgent(id string, p *pod) {
	select {
	case <-p.agent.Done():
	case <-p.exited:
		return
	}
	err := p.agent.Err()
	switch {
	case err == nil:
		return // closed by the daemon
	case errors.Is(err, transport.ErrMisbehaved):
		f.log.Warn("the guest broke the agent protocol; stopping its VM", zap.String("sandbox", id), zap.Error(err))
	default:
		// A guest powering off (StopPodSandbox) ends the connection
		// first: give the VM time to exit by itself.
		select {
		case <-p.exited:
			return
		case <-time.After(agentGoneGrace):
		}
		f.log.Warn("the pod's agent connection ended and its VM runs on; stopping it", zap.String("sandbox", id), zap.Error(err))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.vm.Stop(ctx); err != nil {
		f.log.Warn("stop the VM", zap.String("sandbox", id), zap.Error(err))
	}
}

// agentGoneGrace is how long a VM whose agent connection ended may take
// to exit by itself before it is stopped.
const agentGoneGrace = 15 * time.Second

// logCapInterval is how often a VM's logs are checked against
// guest.log_max_kib: what a guest writes between two checks is the most a
// log exceeds it by.
const logCapInterval = 2 * time.Second

// capLogs keeps the logs in the VM's directory (its console, which the
// guest writes, the VMM's and virtiofsd's, which it can make long) under
// guest.log_max_kib each until the VMM exits: they live on /run, in memory.
func (f *Family) capLogs(p *pod) {
	limit := int64(f.cfg.Guest.LogMaxKiB) << 10
	t := time.NewTicker(logCapInterval)
	defer t.Stop()
	for {
		select {
		case <-p.exited:
			return
		case <-t.C:
		}
		logs, _ := filepath.Glob(filepath.Join(p.dir, "*.log"))
		for _, l := range logs {
			if err := hypervisor.CapFile(l, limit); err != nil {
				f.log.Warn("cap log", zap.String("path", l), zap.Error(err))
			}
		}
	}
}

// waitAgent dials the agent until it answers Ping, the VM dies or the boot
// timeout passes; the error then carries the end of the guest's console.
func (f *Family) waitAgent(ctx context.Context, p *pod, vmCfg hypervisor.Config) (*agentclient.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.BootTimeout())
	defer cancel()
	go func() {
		select {
		case <-p.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	c, err := agentclient.Dial(ctx, p.dialer)
	if err == nil {
		if _, err = c.Ping(ctx, &vmmtask.PingRequest{}); err != nil {
			c.Close()
		}
	}
	if err == nil {
		return c, nil
	}
	select {
	case <-p.exited:
		st, _ := p.vm.Wait(context.Background())
		return nil, fmt.Errorf("the VM exited (%s) before its agent answered%s", st, consoleTail(vmCfg.ConsoleLog()))
	default:
	}
	return nil, fmt.Errorf("the guest agent did not answer within %s (%v)%s", f.cfg.BootTimeout(), err, consoleTail(vmCfg.ConsoleLog()))
}

// consoleTail is the end of the guest console, for errors.
func consoleTail(path string) string {
	return "; end of the guest console:\n" + hypervisor.FileTail(path)
}

// setupGuest gives the guest the pod's hostname, DNS, share and network.
func (f *Family) setupGuest(ctx context.Context, agent *agentclient.Client, st state, sb *store.Sandbox, nw *podnet.Network) error {
	cfg, err := controller.PodConfig(sb)
	if err != nil {
		return err
	}
	dns := cfg.GetDnsConfig()
	if _, err := agent.SetupSandbox(ctx, &vmmtask.SetupSandboxRequest{
		Hostname: st.Hostname, TimeUnixNs: time.Now().UnixNano(),
		DnsServers: dns.GetServers(), DnsSearches: dns.GetSearches(), DnsOptions: dns.GetOptions(),
		Mounts: []*vmmtask.MountRequest{{Source: shareTag, Target: guestShareDir, Type: "virtiofs"}},
	}); err != nil {
		return err
	}
	if nw == nil {
		return nil
	}
	if _, err := agent.UpdateInterfaces(ctx, &vmmtask.UpdateInterfacesRequest{Interfaces: nw.ProtoInterfaces()}); err != nil {
		return err
	}
	_, err = agent.UpdateRoutes(ctx, &vmmtask.UpdateRoutesRequest{Routes: nw.ProtoRoutes()})
	return err
}

// makeShare makes the pod's share as two views of one tree: mounts, where
// the host mounts the containers' root file systems and volumes, and
// share, what virtiofsd serves to the guest: a read-only copy that receives
// those mounts (a slave of mounts). The guest writes inside the mounts as
// their own flags allow, but never in the directories around them, where a
// link it planted would turn a later mount of the host's into one over a
// host path (Kata Containers' CVE-2020-2026). virtiofsd's own mount
// namespace receives the mounts too: its copy of share is a slave as well.
func makeShare(mounts, share string) (retErr error) {
	for _, d := range []string{mounts, share} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	undo := func(dir string) {
		if retErr != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	}
	// A mount point of its own, shared, so that share can follow it.
	if err := unix.Mount(mounts, mounts, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("share %s: %w", mounts, err)
	}
	defer undo(mounts)
	if err := unix.Mount("", mounts, "", unix.MS_SHARED, ""); err != nil {
		return fmt.Errorf("share %s: make shared: %w", mounts, err)
	}
	if err := unix.Mount(mounts, share, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("share %s: %w", share, err)
	}
	defer undo(share)
	if err := unix.Mount("", share, "", unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("share %s: make a slave of %s: %w", share, mounts, err)
	}
	if err := unix.Mount("", share, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("share %s: make read-only: %w", share, err)
	}
	return nil
}

// Stop asks the guest to power off (when timeout > 0) and stops the VMM.
func (f *Family) Stop(ctx context.Context, sb *store.Sandbox, timeout time.Duration) error {
	f.mu.Lock()
	p := f.pods[sb.ID]
	f.mu.Unlock()
	if p == nil || p.vm == nil {
		return nil
	}
	if timeout > 0 && p.agent != nil {
		sctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		if _, err := p.agent.Shutdown(sctx, &vmmtask.ShutdownRequest{}); err == nil {
			select {
			case <-p.exited:
				return nil
			case <-sctx.Done():
			}
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return p.vm.Stop(sctx)
}

// Shutdown releases everything the pod holds.
func (f *Family) Shutdown(ctx context.Context, sb *store.Sandbox) error {
	st, err := load(sb)
	if err != nil {
		return err
	}
	f.mu.Lock()
	p := f.pods[sb.ID]
	delete(f.pods, sb.ID)
	f.mu.Unlock()
	if p == nil {
		p = &pod{}
	}
	return f.release(ctx, sb, st, p)
}

// release stops and removes what Start made, whatever part of it exists:
// the task server, the VM, virtiofsd, the taps, the share and the VM's
// directory, the cgroups. It is idempotent.
func (f *Family) release(ctx context.Context, sb *store.Sandbox, st state, p *pod) error {
	var errs []error
	if st.VMDir != "" {
		errs = append(errs, f.proxy.Close(ctx, st.taskSocket()))
	}
	if p.taskSrv != nil {
		p.taskSrv.Close()
	}
	if p.tasks != nil {
		p.tasks.Close()
	}
	if p.agent != nil {
		p.agent.Close()
	}
	if p.dialer != nil {
		p.dialer.Close()
	}
	if p.vm != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		errs = append(errs, p.vm.Stop(sctx))
		cancel()
	} else if st.VMMPid > 0 && vmmOf(st) {
		// A VM of an earlier daemon instance.
		_ = unix.Kill(st.VMMPid, unix.SIGKILL)
	}
	f.releaseUID(sb.ID, st)
	if p.fsd != nil {
		errs = append(errs, p.fsd.Stop(ctx))
	} else if virtiofsdOf(st) {
		_ = unix.Kill(st.VirtiofsdPid, unix.SIGKILL)
	}
	if sb.NetnsPath != "" {
		errs = append(errs, podnet.Teardown(ctx, sb.NetnsPath))
	}
	if st.VMDir != "" {
		// Nothing may be mounted below the directory RemoveAll empties:
		// a container's rootfs would go with it.
		uerr := errors.Join(unmountAll(st.shareDir()), unmountAll(st.mountsDir()))
		errs = append(errs, uerr)
		if uerr == nil {
			if err := os.RemoveAll(st.VMDir); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if st.PodCgroup != "" {
		errs = append(errs, cgroup.Remove(vmCgroup(st, sb.ID)))
		if st.OwnPodCgroup {
			errs = append(errs, cgroup.Remove(st.PodCgroup))
		}
	}
	return errors.Join(errs...)
}

// vmmOf tells whether st.VMMPid still is this pod's VMM and not a process
// that reused the PID: by its start time, which the kernel keeps (a VMM
// can rewrite its command line, and would then outlive its pod).
func vmmOf(st state) bool {
	alive, err := proc.Alive(st.VMMPid, st.VMMStartTime)
	return err == nil && alive
}

// containsDir tells whether a command line names a path in dir.
func containsDir(cmdline []byte, dir string) bool {
	return strings.Contains(string(cmdline), dir+"/")
}

// unmountAll lazily unmounts dir and everything below it.
func unmountAll(dir string) error {
	for {
		err := unix.Unmount(dir, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil // not (or no longer) a mount point
		}
		if err != nil {
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
	}
}

// Metrics reports the VM's cgroup statistics: the VMM (and so the guest's
// memory and CPU) and virtiofsd.
func (f *Family) Metrics(ctx context.Context, sb *store.Sandbox) (*types.Metric, error) {
	st, err := load(sb)
	if err != nil {
		return nil, err
	}
	cg, err := cgroup.Load(vmCgroup(st, sb.ID))
	if err != nil {
		return nil, err
	}
	return cg.Metric(sb.ID)
}
