// Package cloudhypervisor drives Cloud Hypervisor as a
// hypervisor.Hypervisor: the process supervised, the VM described, booted,
// watched and hot-plugged over its REST API on a unix socket, with a client
// generated from the API's OpenAPI description (package chapi).
package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor/chapi"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// CloudHypervisor is one VM run by a cloud-hypervisor process.
type CloudHypervisor struct {
	cfg  hypervisor.Config
	conf Config
	log  *zap.Logger
	api  *chapi.ClientWithResponses

	mu      sync.Mutex
	proc    *hypervisor.Process
	plugged map[string]hypervisor.Device // hot-plugged devices by ID
}

var _ hypervisor.Hypervisor = (*CloudHypervisor)(nil)

// New checks both configurations and returns a VM that is not started yet.
// The VM's Binary, CPUs and MemoryMiB default to c's; Cloud Hypervisor
// runs on KVM only, so an unresolved accelerator means KVM and TCG is an
// error.
func New(vm hypervisor.Config, c Config, log *zap.Logger) (*CloudHypervisor, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	if err := vm.KVMDefaults("cloud-hypervisor", c.Binary, c.CPUs, c.MemoryMiB); err != nil {
		return nil, fmt.Errorf("cloud-hypervisor: vm %s: %w", vm.ID, err)
	}
	errs := []error{vm.Validate()}
	if vm.MemoryMiB < MinMemoryMiB {
		errs = append(errs, fmt.Errorf("memory %d MiB: want at least %d", vm.MemoryMiB, MinMemoryMiB))
	}
	vsocks := 0
	for _, d := range vm.Devices {
		switch d.(type) {
		case *hypervisor.SerialPort:
			errs = append(errs, fmt.Errorf("device %q: cloud-hypervisor has no virtio-serial ports; use vsock", d.DeviceID()))
		case *hypervisor.Vsock:
			vsocks++
		}
	}
	if vsocks > 1 {
		errs = append(errs, errors.New("cloud-hypervisor takes one vsock device"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("cloud-hypervisor: vm %s: %w", vm.ID, err)
	}
	api, err := newAPIClient(vm.ControlSocket())
	if err != nil {
		return nil, fmt.Errorf("cloud-hypervisor: vm %s: %w", vm.ID, err)
	}
	return &CloudHypervisor{
		cfg:     vm,
		conf:    c,
		log:     log.With(zap.String("vm", vm.ID)),
		api:     api,
		plugged: map[string]hypervisor.Device{},
	}, nil
}

// Config is the VM's configuration, defaults filled in.
func (h *CloudHypervisor) Config() hypervisor.Config { return h.cfg }

// VsockSocket is the unix socket where Cloud Hypervisor proxies the guest's
// vsock ports (hybrid vsock).
func (h *CloudHypervisor) VsockSocket() string { return filepath.Join(h.cfg.Dir, "vsock.sock") }

// AgentDialer is how the daemon reaches the guest agent: hybrid vsock
// through VsockSocket, which needs a Vsock device.
func (h *CloudHypervisor) AgentDialer() (transport.Dialer, error) {
	for _, d := range h.cfg.Devices {
		if _, ok := d.(*hypervisor.Vsock); ok {
			return &transport.HybridVsockDialer{SocketPath: h.VsockSocket()}, nil
		}
	}
	return nil, fmt.Errorf("cloud-hypervisor: vm %s: no vsock device to reach the agent through", h.cfg.ID)
}

func (h *CloudHypervisor) errorf(format string, a ...any) error {
	return fmt.Errorf("cloud-hypervisor: vm %s: "+format, append([]any{h.cfg.ID}, a...)...)
}

func (h *CloudHypervisor) process() *hypervisor.Process {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.proc
}

// PID is the VMM's process ID, 0 before Start.
func (h *CloudHypervisor) PID() int {
	if p := h.process(); p != nil {
		return p.PID()
	}
	return 0
}

// Start runs cloud-hypervisor, waits for its API, creates the VM, adds the
// taps given as open files, boots it and checks that it runs. On error the
// process is killed and its sockets removed.
func (h *CloudHypervisor) Start(ctx context.Context) error {
	p, err := h.launch()
	if err != nil {
		return err
	}
	if err := h.boot(ctx, p); err != nil {
		p.Kill()
		h.removeSockets()
		return err
	}
	return nil
}

// launch starts the process, once.
func (h *CloudHypervisor) launch() (*hypervisor.Process, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.proc != nil {
		return nil, h.errorf("already started")
	}
	bin, err := exec.LookPath(h.cfg.Binary)
	if err != nil {
		return nil, h.errorf("%w", err)
	}
	if err := os.MkdirAll(h.cfg.Dir, 0o700); err != nil {
		return nil, h.errorf("%w", err)
	}
	// Stale sockets of a VM that was killed would make the new one fail.
	h.removeSockets()
	p, err := hypervisor.StartProcess(bin, []string{"--api-socket", "path=" + h.cfg.ControlSocket()}, h.cfg.VMMLog(), nil, h.log)
	if err != nil {
		return nil, h.errorf("%w", err)
	}
	h.proc = p
	return p, nil
}

func (h *CloudHypervisor) boot(ctx context.Context, p *hypervisor.Process) error {
	if err := h.waitAPI(ctx, p); err != nil {
		return err
	}
	vm, tapFiles := h.vmConfig()
	if _, err := h.api.CreateVMWithResponse(ctx, vm); err != nil {
		return h.errorf("vm.create: %w", h.exitErr(p, err))
	}
	// Taps passed as fds go in as cold-plugged devices: the fds ride on the
	// vm.add-net request (vm.create takes none).
	for _, t := range tapFiles {
		if _, err := h.api.PutVmAddNetWithResponse(withFiles(ctx, t.Files), netConfig(t)); err != nil {
			return h.errorf("vm.add-net %s: %w", t.ID, h.exitErr(p, err))
		}
	}
	if _, err := h.api.BootVMWithResponse(ctx); err != nil {
		return h.errorf("vm.boot: %w", h.exitErr(p, err))
	}
	return h.Ping(ctx)
}

// waitAPI waits for the API socket to answer vmm.ping, for as long as the
// configured timeout (and ctx) allow.
func (h *CloudHypervisor) waitAPI(ctx context.Context, p *hypervisor.Process) error {
	timeout := time.Duration(h.conf.APISocketTimeout)
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	var last error
	for {
		if _, err := os.Stat(h.cfg.ControlSocket()); err != nil {
			last = err
		} else if _, last = h.api.GetVmmPingWithResponse(wctx); last == nil {
			return nil
		}
		select {
		case <-p.Exited():
			return h.errorf("cloud-hypervisor exited (%s) before its API answered: %s", p.Status(), p.LogTail())
		case <-wctx.Done():
			if ctx.Err() != nil {
				return h.errorf("waiting for the API socket %s: %w", h.cfg.ControlSocket(), ctx.Err())
			}
			return h.errorf("API socket %s did not answer within %s (api_socket_timeout; last error: %v): %s",
				h.cfg.ControlSocket(), timeout, last, p.LogTail())
		case <-tick.C:
		}
	}
}

// exitErr adds the VMM's log tail to err when the VMM has exited, which
// is then why the request failed.
func (h *CloudHypervisor) exitErr(p *hypervisor.Process, err error) error {
	select {
	case <-p.Exited():
		return fmt.Errorf("%w; cloud-hypervisor exited (%s): %s", err, p.Status(), p.LogTail())
	default:
		return err
	}
}

func (h *CloudHypervisor) removeSockets() {
	_ = os.Remove(h.cfg.ControlSocket())
	_ = os.Remove(h.VsockSocket())
}

// Ping checks through vm.info that the VM runs.
func (h *CloudHypervisor) Ping(ctx context.Context) error {
	if h.process() == nil {
		return h.errorf("not started")
	}
	r, err := h.api.GetVmInfoWithResponse(ctx)
	if err != nil {
		return h.errorf("vm.info: %w", err)
	}
	if r.JSON200 == nil {
		return h.errorf("vm.info: answer is not a VmInfo: %q", r.Body)
	}
	if r.JSON200.State != chapi.Running {
		return h.errorf("not running (state %s)", r.JSON200.State)
	}
	return nil
}

// Wait blocks until the VMM exits.
func (h *CloudHypervisor) Wait(ctx context.Context) (hypervisor.ExitStatus, error) {
	p := h.process()
	if p == nil {
		return hypervisor.ExitStatus{}, h.errorf("not started")
	}
	return p.Wait(ctx)
}

// Stop shuts the VM and then the VMM down over the API and kills the VMM
// if it has not exited when ctx ends. The VM's sockets are removed.
func (h *CloudHypervisor) Stop(ctx context.Context) error {
	p := h.process()
	if p == nil {
		return nil
	}
	defer h.removeSockets()
	select {
	case <-p.Exited():
		return nil
	default:
	}
	// The VMM may exit before it answers vmm.shutdown; what counts is the
	// exit, so failures here only get logged.
	for _, step := range []struct {
		name string
		call func(context.Context) error
	}{
		{"vm.shutdown", func(ctx context.Context) error { _, err := h.api.ShutdownVMWithResponse(ctx); return err }},
		{"vmm.shutdown", func(ctx context.Context) error { _, err := h.api.ShutdownVMMWithResponse(ctx); return err }},
	} {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := step.call(sctx)
		cancel()
		if err != nil {
			h.log.Debug(step.name, zap.Error(err))
		}
	}
	select {
	case <-p.Exited():
		return nil
	case <-ctx.Done():
	}
	h.log.Warn("cloud-hypervisor did not exit in time; killing it")
	p.Kill()
	return nil
}
