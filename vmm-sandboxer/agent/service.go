package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/version"
)

// Service implements vmmtask.v1 Agent.
type Service struct {
	Log *zap.Logger
	// ServingSince is the boot-clock time at which the agent started
	// serving (Ping reports it).
	ServingSince time.Duration
	// PowerOff ends the VM after Shutdown has answered; PowerOff by default.
	PowerOff func() error
	// Root prefixes paths the service writes (/etc/resolv.conf): "" in a
	// guest, a temporary directory in tests.
	Root string

	// Containers runs containers; nil when the guest cannot (ContainersErr
	// says why), and container calls fail with FailedPrecondition.
	Containers    *Containers
	ContainersErr error

	mu       sync.Mutex
	warnings []string
	shutdown bool
}

var _ vmmtask.AgentService = (*Service)(nil)

// AddWarnings records boot problems that GuestInfo reports.
func (s *Service) AddWarnings(w ...string) {
	s.mu.Lock()
	s.warnings = append(s.warnings, w...)
	s.mu.Unlock()
}

// BootClock is the time since the kernel started (CLOCK_BOOTTIME).
func BootClock() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

func (s *Service) Ping(ctx context.Context, _ *vmmtask.PingRequest) (*vmmtask.PingResponse, error) {
	return &vmmtask.PingResponse{
		Version:       version.String("vmm-task"),
		BootToServeNs: int64(s.ServingSince),
		UptimeNs:      int64(BootClock()),
	}, nil
}

func (s *Service) GuestInfo(ctx context.Context, _ *vmmtask.GuestInfoRequest) (*vmmtask.GuestInfoResponse, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return nil, status.Errorf(codes.Internal, "uname: %v", err)
	}
	host, _ := os.Hostname()
	r := &vmmtask.GuestInfoResponse{
		KernelRelease: unix.ByteSliceToString(u.Release[:]),
		Hostname:      host,
		TimeUnixNs:    time.Now().UnixNano(),
		Cpus:          uint32(runtime.NumCPU()),
	}
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) == nil {
		r.MemoryTotalBytes = uint64(si.Totalram) * uint64(si.Unit)
	}
	if b, err := os.ReadFile("/proc/modules"); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if f := strings.Fields(l); len(f) > 0 {
				r.Modules = append(r.Modules, f[0])
			}
		}
	}
	if b, err := os.ReadFile("/proc/self/mounts"); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if f := strings.Fields(l); len(f) >= 4 {
				r.Mounts = append(r.Mounts, &vmmtask.MountInfo{Source: f[0], Target: f[1], Type: f[2], Options: f[3]})
			}
		}
	}
	if ifs, err := net.Interfaces(); err == nil {
		for _, i := range ifs {
			vi := &vmmtask.Interface{Name: i.Name, Mac: i.HardwareAddr.String(), Mtu: uint32(i.MTU), Up: i.Flags&net.FlagUp != 0}
			addrs, _ := i.Addrs()
			for _, a := range addrs {
				vi.Addresses = append(vi.Addresses, &vmmtask.IPAddress{Address: a.String()})
			}
			r.Interfaces = append(r.Interfaces, vi)
		}
	}
	s.mu.Lock()
	r.BootWarnings = append([]string(nil), s.warnings...)
	s.mu.Unlock()
	return r, nil
}

// clockSkew is how far the guest's clock may be from the host's before
// SetupSandbox sets it.
const clockSkew = time.Second

func (s *Service) SetupSandbox(ctx context.Context, r *vmmtask.SetupSandboxRequest) (*vmmtask.Empty, error) {
	if r.Hostname != "" {
		if err := unix.Sethostname([]byte(r.Hostname)); err != nil {
			return nil, status.Errorf(codes.Internal, "set hostname %q: %v", r.Hostname, err)
		}
	}
	if r.TimeUnixNs != 0 {
		host := time.Unix(0, r.TimeUnixNs)
		if d := time.Since(host); d > clockSkew || d < -clockSkew {
			tv := unix.NsecToTimeval(host.UnixNano())
			if err := unix.Settimeofday(&tv); err != nil {
				return nil, status.Errorf(codes.Internal, "set clock (off by %s): %v", d, err)
			}
			s.Log.Info("clock set from the host", zap.Duration("was_off_by", d))
		}
	}
	if len(r.DnsServers)+len(r.DnsSearches)+len(r.DnsOptions) > 0 {
		if err := s.writeResolvConf(r); err != nil {
			return nil, status.Errorf(codes.Internal, "resolv.conf: %v", err)
		}
	}
	for _, m := range r.Mounts {
		if _, err := s.Mount(ctx, m); err != nil {
			return nil, err
		}
	}
	return &vmmtask.Empty{}, nil
}

func (s *Service) writeResolvConf(r *vmmtask.SetupSandboxRequest) error {
	var b strings.Builder
	for _, ns := range r.DnsServers {
		if net.ParseIP(ns) == nil {
			return fmt.Errorf("dns server %q is not an IP address", ns)
		}
		fmt.Fprintf(&b, "nameserver %s\n", ns)
	}
	if len(r.DnsSearches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(r.DnsSearches, " "))
	}
	if len(r.DnsOptions) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(r.DnsOptions, " "))
	}
	p := filepath.Join(s.Root, "/etc/resolv.conf")
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, []byte(b.String()), 0o644)
}

func (s *Service) Mount(ctx context.Context, r *vmmtask.MountRequest) (*vmmtask.Empty, error) {
	if !filepath.IsAbs(r.Target) {
		return nil, status.Errorf(codes.InvalidArgument, "mount target %q is not an absolute path", r.Target)
	}
	if err := os.MkdirAll(r.Target, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "mount target: %v", err)
	}
	m := mount.Mount{Type: r.Type, Source: r.Source, Options: r.Options}
	if err := m.Mount(r.Target); err != nil {
		return nil, status.Errorf(codes.Internal, "mount %s (%s) on %s: %v", r.Source, r.Type, r.Target, err)
	}
	return &vmmtask.Empty{}, nil
}

func (s *Service) Unmount(ctx context.Context, r *vmmtask.UnmountRequest) (*vmmtask.Empty, error) {
	if err := mount.UnmountAll(r.Target, unix.MNT_DETACH); err != nil {
		return nil, status.Errorf(codes.Internal, "unmount %s: %v", r.Target, err)
	}
	return &vmmtask.Empty{}, nil
}

// Shutdown answers, then powers the VM off (after a moment, so the answer
// reaches the host first).
func (s *Service) Shutdown(ctx context.Context, _ *vmmtask.ShutdownRequest) (*vmmtask.Empty, error) {
	s.mu.Lock()
	already := s.shutdown
	s.shutdown = true
	s.mu.Unlock()
	if already {
		return &vmmtask.Empty{}, nil
	}
	off := s.PowerOff
	if off == nil {
		off = PowerOff
	}
	s.Log.Info("shutdown requested: powering off")
	go func() {
		time.Sleep(100 * time.Millisecond)
		if err := off(); err != nil {
			s.Log.Error("power off", zap.Error(err))
		}
	}()
	return &vmmtask.Empty{}, nil
}

func unimplemented(what string) error {
	return status.Errorf(codes.Unimplemented, "vmm-task: %s is not implemented yet", what)
}

// noContainers is the answer of container calls in a guest that cannot run
// containers (no runc in the image).
func (s *Service) noContainers() error {
	msg := "no container runtime"
	if s.ContainersErr != nil {
		msg = s.ContainersErr.Error()
	}
	return status.Errorf(codes.FailedPrecondition, "vmm-task: containers unavailable: %s", msg)
}

func (s *Service) CreateContainer(ctx context.Context, r *vmmtask.CreateContainerRequest) (*vmmtask.CreateContainerResponse, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Create(ctx, r)
}
func (s *Service) StartProcess(ctx context.Context, r *vmmtask.StartProcessRequest) (*vmmtask.StartProcessResponse, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Start(ctx, r)
}
func (s *Service) ExecProcess(ctx context.Context, r *vmmtask.ExecProcessRequest) (*vmmtask.Empty, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Exec(ctx, r)
}
func (s *Service) SignalProcess(ctx context.Context, r *vmmtask.SignalProcessRequest) (*vmmtask.Empty, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Signal(ctx, r)
}
func (s *Service) WaitProcess(ctx context.Context, r *vmmtask.WaitProcessRequest) (*vmmtask.WaitProcessResponse, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Wait(ctx, r)
}
func (s *Service) DeleteProcess(ctx context.Context, r *vmmtask.DeleteProcessRequest) (*vmmtask.DeleteProcessResponse, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Delete(ctx, r)
}
func (s *Service) CloseStdin(ctx context.Context, r *vmmtask.CloseStdinRequest) (*vmmtask.Empty, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.CloseStdin(ctx, r)
}
func (s *Service) ResizePty(ctx context.Context, r *vmmtask.ResizePtyRequest) (*vmmtask.Empty, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.ResizePty(ctx, r)
}
func (s *Service) ContainerStats(ctx context.Context, r *vmmtask.ContainerStatsRequest) (*vmmtask.ContainerStatsResponse, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.Stats(ctx, r)
}
func (s *Service) ProcessState(ctx context.Context, r *vmmtask.ProcessStateRequest) (*vmmtask.ProcessStateResponse, error) {
	if s.Containers == nil {
		return nil, s.noContainers()
	}
	return s.Containers.State(ctx, r)
}
func (s *Service) Events(ctx context.Context, _ *vmmtask.EventsRequest, srv vmmtask.Agent_EventsServer) error {
	if s.Containers == nil {
		return s.noContainers()
	}
	return s.Containers.Events(ctx, srv.Send)
}
