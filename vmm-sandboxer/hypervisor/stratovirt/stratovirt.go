// Package stratovirt drives StratoVirt as a hypervisor.Hypervisor: its
// command line (microvm or q35 machine) from typed devices, the process
// supervised, control and hot-plug over QMP with the qemu package's client.
package stratovirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// StratoVirt is one VM run by a stratovirt process.
type StratoVirt struct {
	cfg  hypervisor.Config
	conf Config
	log  *zap.Logger

	mu      sync.Mutex
	proc    *hypervisor.Process
	qmp     *qemu.QMP
	plugged map[string]plugged
}

var _ hypervisor.Hypervisor = (*StratoVirt)(nil)

// New checks both configurations and returns a VM that is not started yet.
// The VM's Binary, CPUs and MemoryMiB default to c's; StratoVirt runs on
// KVM only, so an unresolved accelerator means KVM and TCG is an error.
func New(vm hypervisor.Config, c Config, log *zap.Logger) (*StratoVirt, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	if err := vm.KVMDefaults("stratovirt", c.Binary, c.CPUs, c.MemoryMiB); err != nil {
		return nil, fmt.Errorf("stratovirt: vm %s: %w", vm.ID, err)
	}
	err := vm.Validate()
	if vm.MemoryMiB < MinMemoryMiB {
		err = errors.Join(err, fmt.Errorf("memory %d MiB: want at least %d", vm.MemoryMiB, MinMemoryMiB))
	}
	if err == nil {
		_, _, err = Args(&vm, &c) // devices the machine cannot take
	}
	if err != nil {
		return nil, fmt.Errorf("stratovirt: vm %s: %w", vm.ID, err)
	}
	return &StratoVirt{
		cfg:     vm,
		conf:    c,
		log:     log.With(zap.String("vm", vm.ID)),
		plugged: map[string]plugged{},
	}, nil
}

// Config is the VM's configuration, defaults filled in.
func (s *StratoVirt) Config() hypervisor.Config { return s.cfg }

// AgentDialer is how the daemon reaches the guest agent: vsock when the VM
// has a vsock device (the host's vhost-vsock), else the first virtio-serial
// port with the stream multiplexer.
func (s *StratoVirt) AgentDialer() (transport.Dialer, error) {
	var port *hypervisor.SerialPort
	for _, d := range s.cfg.Devices {
		switch d := d.(type) {
		case *hypervisor.Vsock:
			return &transport.VsockDialer{CID: d.GuestCID}, nil
		case *hypervisor.SerialPort:
			if port == nil {
				port = d
			}
		}
	}
	if port != nil {
		return transport.NewSerialDialer(port.SocketPath), nil
	}
	return nil, s.errorf("no vsock device or virtio-serial port to reach the agent through")
}

func (s *StratoVirt) errorf(format string, a ...any) error {
	return fmt.Errorf("stratovirt: vm %s: "+format, append([]any{s.cfg.ID}, a...)...)
}

func (s *StratoVirt) state() (*hypervisor.Process, *qemu.QMP) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc, s.qmp
}

// PID is the VMM's process ID, 0 before Start.
func (s *StratoVirt) PID() int {
	if p, _ := s.state(); p != nil {
		return p.PID()
	}
	return 0
}

// Start runs stratovirt and returns once QMP answers and the guest runs.
// On error the process is killed and its sockets removed.
func (s *StratoVirt) Start(ctx context.Context) error {
	p, err := s.launch()
	if err != nil {
		return err
	}
	if err := s.connect(ctx, p); err != nil {
		p.Kill()
		s.cleanup()
		return err
	}
	return nil
}

// launch starts the process, once.
func (s *StratoVirt) launch() (*hypervisor.Process, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		return nil, s.errorf("already started")
	}
	args, files, err := Args(&s.cfg, &s.conf)
	if err != nil {
		return nil, s.errorf("%w", err)
	}
	bin, err := exec.LookPath(s.cfg.Binary)
	if err != nil {
		return nil, s.errorf("%w", err)
	}
	if err := os.MkdirAll(s.cfg.Dir, 0o700); err != nil {
		return nil, s.errorf("%w", err)
	}
	// A stale socket of a VM that was killed would make StratoVirt fail.
	_ = os.Remove(s.cfg.ControlSocket())
	p, err := hypervisor.StartProcess(bin, args, s.cfg.VMMLog(), files, s.log)
	if err != nil {
		return nil, s.errorf("%w", err)
	}
	s.proc = p
	return p, nil
}

// connect waits for QMP to answer, for as long as qmp_timeout (and ctx)
// allow, and checks that the VM runs.
func (s *StratoVirt) connect(ctx context.Context, p *hypervisor.Process) error {
	timeout := time.Duration(s.conf.QMPTimeout)
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if _, last = os.Stat(s.cfg.ControlSocket()); last == nil {
			var c *qemu.QMP
			if c, last = qemu.DialQMP(wctx, s.cfg.ControlSocket()); last == nil {
				s.mu.Lock()
				s.qmp = c
				s.mu.Unlock()
				go c.LogEvents(s.log)
				return s.Ping(ctx)
			}
		}
		select {
		case <-p.Exited():
			return s.errorf("stratovirt exited (%s) before QMP answered: %s", p.Status(), p.LogTail())
		case <-wctx.Done():
			if ctx.Err() != nil {
				return s.errorf("waiting for QMP at %s: %w", s.cfg.ControlSocket(), ctx.Err())
			}
			return s.errorf("QMP at %s did not answer within %s (qmp_timeout; last error: %v): %s",
				s.cfg.ControlSocket(), timeout, last, p.LogTail())
		case <-tick.C:
		}
	}
}

func (s *StratoVirt) client() (*qemu.QMP, error) {
	if _, c := s.state(); c != nil {
		return c, nil
	}
	return nil, s.errorf("not started")
}

// Ping checks through query-status that the VM runs.
func (s *StratoVirt) Ping(ctx context.Context) error {
	c, err := s.client()
	if err != nil {
		return err
	}
	r, err := c.Execute(ctx, "query-status", nil)
	if err != nil {
		return s.errorf("%w", err)
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := json.Unmarshal(r, &st); err != nil {
		return s.errorf("query-status answer %s: %w", r, err)
	}
	if !st.Running {
		return s.errorf("not running (status %s)", st.Status)
	}
	return nil
}

// Wait blocks until the VMM exits.
func (s *StratoVirt) Wait(ctx context.Context) (hypervisor.ExitStatus, error) {
	p, _ := s.state()
	if p == nil {
		return hypervisor.ExitStatus{}, s.errorf("not started")
	}
	return p.Wait(ctx)
}

// Stop asks StratoVirt to quit and kills it if it has not exited when ctx
// ends. The VM's sockets are removed.
func (s *StratoVirt) Stop(ctx context.Context) error {
	p, c := s.state()
	if p == nil {
		return nil
	}
	defer s.cleanup()
	select {
	case <-p.Exited():
		return nil
	default:
	}
	if c != nil {
		// StratoVirt may exit before it answers; what counts is the exit.
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.Execute(qctx, "quit", nil)
		cancel()
		if err != nil {
			s.log.Debug("qmp quit", zap.Error(err))
		}
	}
	select {
	case <-p.Exited():
		return nil
	case <-ctx.Done():
	}
	s.log.Warn("stratovirt did not quit in time; killing it")
	p.Kill()
	return nil
}

// cleanup closes QMP and removes the sockets StratoVirt listened on.
func (s *StratoVirt) cleanup() {
	s.mu.Lock()
	c := s.qmp
	s.qmp = nil
	s.mu.Unlock()
	if c != nil {
		c.Close()
	}
	_ = os.Remove(s.cfg.ControlSocket())
	for _, d := range s.cfg.Devices {
		if sp, ok := d.(*hypervisor.SerialPort); ok {
			_ = os.Remove(sp.SocketPath)
		}
	}
}
