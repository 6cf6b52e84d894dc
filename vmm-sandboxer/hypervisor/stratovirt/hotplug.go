package stratovirt

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// plugged is a hot-plugged device and the slot it holds: a replaceable
// mmio slot of its kind on microvm, a pcie-root-port on q35.
type plugged struct {
	dev  hypervisor.Device
	slot int
}

// step is one QMP command of a hot-plug, with the command that undoes it.
type step struct {
	cmd  string
	args map[string]any
	file *os.File // passed with the command (getfd)
	undo string
	uarg map[string]any
}

// kind is the slot family of a device StratoVirt can hot-plug: "blk" or
// "net"; "" for the others.
func kind(d hypervisor.Device) string {
	switch d.(type) {
	case *hypervisor.Block:
		return "blk"
	case *hypervisor.TapNet:
		return "net"
	}
	return ""
}

// freeSlot picks a slot for a device of kind k, under s.mu. On microvm the
// boot-time devices of the kind hold the first slots.
func (s *StratoVirt) freeSlot(k string) (int, error) {
	used := map[int]bool{}
	first, n := 0, s.cfg.HotplugSlots
	if s.conf.Machine == MachineMicroVM {
		n = microBlkSlots
		if k == "net" {
			n = microNetSlots
		}
		for _, d := range s.cfg.Devices {
			if kind(d) == k {
				first++
			}
		}
	}
	for _, p := range s.plugged {
		if s.conf.Machine == MachineQ35 || kind(p.dev) == k {
			used[p.slot] = true
		}
	}
	for i := first; i < n; i++ {
		if !used[i] {
			return i, nil
		}
	}
	return 0, fmt.Errorf("no free %s hot-plug slot (%d in all)", k, n)
}

// AddDevice hot-plugs a disk or a NIC: StratoVirt hot-plugs nothing else.
func (s *StratoVirt) AddDevice(ctx context.Context, d hypervisor.Device) error {
	if err := d.Validate(); err != nil {
		return s.errorf("%w", err)
	}
	c, err := s.client()
	if err != nil {
		return err
	}
	k := kind(d)
	if k == "" {
		return s.errorf("add %s: stratovirt cannot hot-plug a %T", d.DeviceID(), d)
	}
	s.mu.Lock()
	_, dup := s.plugged[d.DeviceID()]
	for _, b := range s.cfg.Devices {
		dup = dup || b.DeviceID() == d.DeviceID()
	}
	if dup {
		s.mu.Unlock()
		return s.errorf("device %q exists already", d.DeviceID())
	}
	slot, err := s.freeSlot(k)
	if err != nil {
		s.mu.Unlock()
		return s.errorf("add %s: %w", d.DeviceID(), err)
	}
	s.plugged[d.DeviceID()] = plugged{dev: d, slot: slot}
	s.mu.Unlock()

	steps := s.plugSteps(d, slot)
	for i, st := range steps {
		if st.file != nil {
			_, err = c.ExecuteWithFile(ctx, st.cmd, st.args, st.file)
		} else {
			_, err = c.Execute(ctx, st.cmd, st.args)
		}
		if err == nil {
			continue
		}
		for j := i - 1; j >= 0; j-- {
			if steps[j].undo != "" {
				_, _ = c.Execute(ctx, steps[j].undo, steps[j].uarg)
			}
		}
		s.mu.Lock()
		delete(s.plugged, d.DeviceID())
		s.mu.Unlock()
		return s.errorf("add %s: %w", d.DeviceID(), err)
	}
	return nil
}

// plugSteps are the QMP commands that plug d into slot. StratoVirt wants
// the backend (node or netdev) named like the device.
func (s *StratoVirt) plugSteps(d hypervisor.Device, slot int) []step {
	dev := map[string]any{"id": d.DeviceID()}
	if s.conf.Machine == MachineQ35 {
		dev["bus"], dev["addr"] = hotplugPort(slot), "0x0"
	} else {
		dev["addr"] = fmt.Sprintf("%#x", slot)
	}
	bus := "mmio"
	if s.conf.Machine == MachineQ35 {
		bus = "pci"
	}
	id := d.DeviceID()
	var steps []step
	switch d := d.(type) {
	case *hypervisor.Block:
		dev["driver"], dev["drive"] = "virtio-blk-"+bus, id
		steps = append(steps, step{cmd: "blockdev-add", args: map[string]any{
			"node-name": id, "driver": format(d), "read-only": d.ReadOnly,
			"file": map[string]any{"driver": "file", "filename": d.Path}, "cache": map[string]any{"direct": false},
		}, undo: "blockdev-del", uarg: map[string]any{"node-name": id}})
	case *hypervisor.TapNet:
		nd := map[string]any{"id": id}
		if d.IfName != "" {
			nd["ifname"] = d.IfName
		} else {
			names := make([]string, len(d.Files))
			for i, f := range d.Files {
				names[i] = fmt.Sprintf("%s-fd%d", id, i)
				steps = append(steps, step{cmd: "getfd", args: map[string]any{"fdname": names[i]}, file: f})
			}
			if len(names) == 1 {
				nd["fd"] = names[0]
			} else {
				nd["fds"], nd["queues"] = strings.Join(names, ":"), 2*len(names)
				dev["mq"] = true
			}
		}
		steps = append(steps, step{cmd: "netdev_add", args: nd, undo: "netdev_del", uarg: map[string]any{"id": id}})
		dev["driver"], dev["netdev"] = "virtio-net-"+bus, id
		if len(d.MAC) != 0 {
			dev["mac"] = d.MAC.String()
		}
	}
	return append(steps, step{cmd: "device_add", args: dev})
}

// RemoveDevice unplugs a hot-plugged device: device_del, then, once
// StratoVirt reports DEVICE_DELETED (a PCI device needs the guest's
// consent, so this waits for ctx), its backend.
func (s *StratoVirt) RemoveDevice(ctx context.Context, id string) error {
	c, err := s.client()
	if err != nil {
		return err
	}
	s.mu.Lock()
	p, ok := s.plugged[id]
	if !ok {
		s.mu.Unlock()
		return s.errorf("no hot-plugged device %q", id)
	}
	s.mu.Unlock()
	if err := c.DeleteDevice(ctx, id); err != nil {
		return s.errorf("remove %s: %w", id, err)
	}
	var err2 error
	for _, st := range s.plugSteps(p.dev, p.slot) {
		if st.undo != "" {
			if _, err := c.Execute(ctx, st.undo, st.uarg); err != nil {
				err2 = s.errorf("remove %s backend: %w", id, err)
			}
		}
	}
	s.mu.Lock()
	delete(s.plugged, id)
	s.mu.Unlock()
	return err2
}
