package cloudhypervisor

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor/chapi"
)

// fsQueueSize is the virtio-fs request queue's depth (the API's default).
const fsQueueSize = 1024

// VirtioConsoleLog is where the guest's virtio console (hvc0) writes; the
// serial port (ttyS0) writes to hypervisor.Config.ConsoleLog.
func (h *CloudHypervisor) VirtioConsoleLog() string {
	return filepath.Join(h.cfg.Dir, "virtio-console.log")
}

// vmConfig is vm.create's body for the VM, and the taps given as open
// files, which vm.create cannot take.
func (h *CloudHypervisor) vmConfig() (chapi.VmConfig, []*hypervisor.TapNet) {
	c := &h.cfg
	vm := chapi.VmConfig{
		Payload: chapi.PayloadConfig{Kernel: &c.Kernel},
		Cpus:    &chapi.CpusConfig{BootVcpus: c.CPUs, MaxVcpus: c.CPUs},
		Memory:  &chapi.MemoryConfig{Size: int64(c.MemoryMiB) << 20, Shared: &c.SharedMemory},
		// Without a Console device the guest writes nowhere: CH's defaults
		// (a tty) would be the daemon's.
		Serial:  &chapi.SerialConfig{Mode: chapi.ConsoleModeOff},
		Console: &chapi.ConsoleConfig{Mode: chapi.ConsoleModeOff},
	}
	if c.Initrd != "" {
		vm.Payload.Initramfs = &c.Initrd
	}
	if c.Cmdline != "" {
		vm.Payload.Cmdline = &c.Cmdline
	}
	var (
		fs    []chapi.FsConfig
		disks []chapi.DiskConfig
		nets  []chapi.NetConfig
		taps  []*hypervisor.TapNet
	)
	for _, d := range c.Devices {
		switch d := d.(type) {
		case *hypervisor.Console:
			vm.Serial = &chapi.SerialConfig{Mode: chapi.ConsoleModeFile, File: ptr(c.ConsoleLog())}
			vm.Console = &chapi.ConsoleConfig{Mode: chapi.ConsoleModeFile, File: ptr(h.VirtioConsoleLog()), Id: &d.ID}
		case *hypervisor.RNG:
			vm.Rng = &chapi.RngConfig{Src: "/dev/urandom", Id: &d.ID}
		case *hypervisor.Vsock:
			vm.Vsock = h.vsockConfig(d)
		case *hypervisor.VirtioFS:
			fs = append(fs, fsConfig(d))
		case *hypervisor.Block:
			disks = append(disks, diskConfig(d))
		case *hypervisor.TapNet:
			if len(d.Files) > 0 {
				taps = append(taps, d)
			} else {
				nets = append(nets, netConfig(d))
			}
		}
	}
	vm.Fs, vm.Disks, vm.Net = nilIfEmpty(fs), nilIfEmpty(disks), nilIfEmpty(nets)
	return vm, taps
}

// nilIfEmpty leaves a list out of the request when it has nothing.
func nilIfEmpty[T any](s []T) *[]T {
	if len(s) == 0 {
		return nil
	}
	return &s
}

func ptr[T any](v T) *T { return &v }

func (h *CloudHypervisor) vsockConfig(d *hypervisor.Vsock) *chapi.VsockConfig {
	return &chapi.VsockConfig{Cid: int64(d.GuestCID), Socket: h.VsockSocket(), Id: &d.ID}
}

func fsConfig(d *hypervisor.VirtioFS) chapi.FsConfig {
	return chapi.FsConfig{Tag: d.Tag, Socket: d.SocketPath, NumQueues: 1, QueueSize: fsQueueSize, Id: &d.ID}
}

func diskConfig(d *hypervisor.Block) chapi.DiskConfig {
	img := chapi.Raw
	if d.Format == "qcow2" {
		img = chapi.Qcow2
	}
	return chapi.DiskConfig{Path: &d.Path, Readonly: &d.ReadOnly, ImageType: &img, Id: &d.ID}
}

// netConfig describes a tap by name, or by the fds sent with the request:
// one fd per queue pair.
func netConfig(d *hypervisor.TapNet) chapi.NetConfig {
	n := chapi.NetConfig{Id: &d.ID}
	if d.IfName != "" {
		n.Tap = &d.IfName
	} else {
		n.NumQueues = ptr(2 * len(d.Files))
	}
	if len(d.MAC) != 0 {
		n.Mac = ptr(d.MAC.String())
	}
	return n
}

// AddDevice hot-plugs d through vm.add-disk, -fs, -net or -vsock; Cloud
// Hypervisor picks the PCI slot.
func (h *CloudHypervisor) AddDevice(ctx context.Context, d hypervisor.Device) error {
	if err := d.Validate(); err != nil {
		return h.errorf("%w", err)
	}
	if h.process() == nil {
		return h.errorf("not started")
	}
	id := d.DeviceID()
	h.mu.Lock()
	_, dup := h.plugged[id]
	for _, b := range h.cfg.Devices {
		dup = dup || b.DeviceID() == id
	}
	if !dup {
		h.plugged[id] = d // reserved; dropped again on failure
	}
	h.mu.Unlock()
	if dup {
		return h.errorf("device %q exists already", id)
	}
	err := h.plug(ctx, d)
	if err != nil {
		h.mu.Lock()
		delete(h.plugged, id)
		h.mu.Unlock()
		return h.errorf("add %s: %w", id, err)
	}
	return nil
}

func (h *CloudHypervisor) plug(ctx context.Context, d hypervisor.Device) error {
	var err error
	switch d := d.(type) {
	case *hypervisor.Block:
		_, err = h.api.PutVmAddDiskWithResponse(ctx, diskConfig(d))
	case *hypervisor.VirtioFS:
		if !h.cfg.SharedMemory {
			return errors.New("virtio-fs needs the VM's memory shared")
		}
		_, err = h.api.PutVmAddFsWithResponse(ctx, fsConfig(d))
	case *hypervisor.TapNet:
		_, err = h.api.PutVmAddNetWithResponse(withFiles(ctx, d.Files), netConfig(d))
	case *hypervisor.Vsock:
		_, err = h.api.PutVmAddVsockWithResponse(ctx, *h.vsockConfig(d))
	default:
		return fmt.Errorf("cloud-hypervisor cannot hot-plug a %T", d)
	}
	return err
}

// RemoveDevice unplugs a hot-plugged device with vm.remove-device.
func (h *CloudHypervisor) RemoveDevice(ctx context.Context, id string) error {
	if h.process() == nil {
		return h.errorf("not started")
	}
	h.mu.Lock()
	_, ok := h.plugged[id]
	h.mu.Unlock()
	if !ok {
		return h.errorf("no hot-plugged device %q", id)
	}
	if _, err := h.api.PutVmRemoveDeviceWithResponse(ctx, chapi.VmRemoveDevice{Id: &id}); err != nil {
		return h.errorf("remove %s: %w", id, err)
	}
	h.mu.Lock()
	delete(h.plugged, id)
	h.mu.Unlock()
	return nil
}
