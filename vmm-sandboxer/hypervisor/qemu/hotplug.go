package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// qmpStep is one QMP command of a hot-plug, with the command that undoes it.
type qmpStep struct {
	cmd  string
	args map[string]any
	undo string
	uarg map[string]any
	file *hostFile // opened here and passed with the command (getfd, add-fd)
}

// AddDevice hot-plugs d. PCI devices take one of the free root ports
// (Config.HotplugSlots); virtio-serial ports go on the VM's serial bus.
func (q *QEMU) AddDevice(ctx context.Context, d hypervisor.Device) error {
	if err := d.Validate(); err != nil {
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	c, err := q.client()
	if err != nil {
		return err
	}
	q.mu.Lock()
	if _, dup := q.plugged[d.DeviceID()]; dup {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: device %q is already plugged", q.cfg.ID, d.DeviceID())
	}
	for _, b := range q.cfg.Devices {
		if b.DeviceID() == d.DeviceID() {
			q.mu.Unlock()
			return fmt.Errorf("qemu: vm %s: device %q exists from boot", q.cfg.ID, d.DeviceID())
		}
	}
	slot := -1
	if _, onSerial := d.(*hypervisor.SerialPort); !onSerial {
		for i, used := range q.slots {
			if !used {
				slot = i
				break
			}
		}
		if slot < 0 {
			q.mu.Unlock()
			return fmt.Errorf("qemu: vm %s: no free hot-plug slot for %q (%d configured)", q.cfg.ID, d.DeviceID(), len(q.slots))
		}
		q.slots[slot] = true
	}
	set := q.nextSet
	q.nextSet++
	q.plugged[d.DeviceID()] = plugged{dev: d, slot: slot, set: set}
	q.mu.Unlock()

	steps, err := plugSteps(d, slot, set)
	if err == nil {
		err = q.run(ctx, c, steps)
	}
	if err != nil {
		q.mu.Lock()
		delete(q.plugged, d.DeviceID())
		if slot >= 0 {
			q.slots[slot] = false
		}
		q.mu.Unlock()
		removeSocket(d)
		return fmt.Errorf("qemu: vm %s: add %s: %w", q.cfg.ID, d.DeviceID(), err)
	}
	return nil
}

// removeSocket removes the socket the daemon listened on for a serial
// port: QEMU, which got it open, does not know its path.
func removeSocket(d hypervisor.Device) {
	if sp, ok := d.(*hypervisor.SerialPort); ok {
		_ = os.Remove(sp.SocketPath)
	}
}

// run executes the steps in order; on a failure it undoes those done.
func (q *QEMU) run(ctx context.Context, c *QMP, steps []qmpStep) error {
	for i, s := range steps {
		var err error
		if s.file != nil {
			err = executeWithFile(ctx, c, s)
		} else {
			_, err = c.Execute(ctx, s.cmd, s.args)
		}
		if err != nil {
			for j := i - 1; j >= 0; j-- {
				if steps[j].undo != "" {
					_, _ = c.Execute(ctx, steps[j].undo, steps[j].uarg)
				}
			}
			return err
		}
	}
	return nil
}

// executeWithFile opens the step's file, passes it with the command and
// closes the daemon's copy.
func executeWithFile(ctx context.Context, c *QMP, s qmpStep) error {
	files, err := openFiles([]hostFile{*s.file})
	if err != nil {
		return err
	}
	defer files.close(false)
	_, err = c.ExecuteWithFile(ctx, s.cmd, s.args, files.files[0])
	return err
}

// getfd passes QEMU a file it then knows by name.
func getfd(name string, h hostFile) qmpStep {
	return qmpStep{cmd: "getfd", args: map[string]any{"fdname": name}, file: &h,
		undo: "closefd", uarg: map[string]any{"fdname": name}}
}

// fdAddr is a socket address QMP takes: a descriptor passed with getfd.
func fdAddr(name string) map[string]any {
	return map[string]any{"type": "fd", "data": map[string]any{"str": name}}
}

func plugSteps(d hypervisor.Device, slot, set int) ([]qmpStep, error) {
	bus := ""
	if slot >= 0 {
		bus = hotplugPort(slot)
	}
	dev := func(driver string, extra map[string]any) qmpStep {
		a := map[string]any{"driver": driver, "id": d.DeviceID()}
		if bus != "" {
			a["bus"] = bus
		}
		for k, v := range extra {
			a[k] = v
		}
		return qmpStep{cmd: "device_add", args: a}
	}
	switch d := d.(type) {
	case *hypervisor.SerialPort:
		chr, fd := d.ID+"-chr", d.ID+"-fd"
		return []qmpStep{
			getfd(fd, hostFile{kind: fileListen, path: d.SocketPath}),
			{cmd: "chardev-add", args: map[string]any{"id": chr, "backend": map[string]any{
				"type": "socket", "data": map[string]any{"addr": fdAddr(fd), "server": true, "wait": false},
			}}, undo: "chardev-remove", uarg: map[string]any{"id": chr}},
			dev("virtserialport", map[string]any{"bus": serialBus + ".0", "chardev": chr, "name": d.Name}),
		}, nil
	case *hypervisor.RNG:
		src := d.ID + "-src"
		return []qmpStep{
			{cmd: "object-add", args: map[string]any{"qom-type": "rng-random", "id": src, "filename": "/dev/urandom"},
				undo: "object-del", uarg: map[string]any{"id": src}},
			dev("virtio-rng-pci", map[string]any{"rng": src}),
		}, nil
	case *hypervisor.Vsock:
		fd := d.ID + "-fd"
		return []qmpStep{
			getfd(fd, hostFile{kind: fileReadWrite, path: vhostVsockDevice}),
			dev("vhost-vsock-pci", map[string]any{"guest-cid": d.GuestCID, "vhostfd": fd}),
		}, nil
	case *hypervisor.VirtioFS:
		chr, fd := d.ID+"-chr", d.ID+"-fd"
		return []qmpStep{
			getfd(fd, hostFile{kind: fileDial, path: d.SocketPath}),
			{cmd: "chardev-add", args: map[string]any{"id": chr, "backend": map[string]any{
				"type": "socket", "data": map[string]any{"addr": fdAddr(fd), "server": false},
			}}, undo: "chardev-remove", uarg: map[string]any{"id": chr}},
			dev("vhost-user-fs-pci", map[string]any{"chardev": chr, "tag": d.Tag}),
		}, nil
	case *hypervisor.Block:
		format := d.Format
		if format == "" {
			format = "raw"
		}
		file, node := d.ID+"-file", d.ID+"-fmt"
		img := blockFile(d)
		return []qmpStep{
			{cmd: "add-fd", args: map[string]any{"fdset-id": set, "opaque": d.Path}, file: &img,
				undo: "remove-fd", uarg: map[string]any{"fdset-id": set}},
			{cmd: "blockdev-add", args: map[string]any{"driver": "file", "node-name": file, "filename": fdsetPath(set), "read-only": d.ReadOnly},
				undo: "blockdev-del", uarg: map[string]any{"node-name": file}},
			{cmd: "blockdev-add", args: map[string]any{"driver": format, "node-name": node, "file": file, "read-only": d.ReadOnly},
				undo: "blockdev-del", uarg: map[string]any{"node-name": node}},
			dev("virtio-blk-pci", map[string]any{"drive": node}),
		}, nil
	case *hypervisor.TapNet:
		netdev := d.ID + "-net"
		var steps []qmpStep
		nd := map[string]any{"type": "tap", "id": netdev, "vhost": false}
		if d.IfName != "" {
			nd["ifname"], nd["script"], nd["downscript"] = d.IfName, "no", "no"
		} else {
			var names []string
			for i, f := range d.Files {
				name := fmt.Sprintf("%s-fd%d", d.ID, i)
				steps = append(steps, getfd(name, hostFile{kind: fileGiven, file: f}))
				names = append(names, name)
			}
			if len(names) == 1 {
				nd["fd"] = names[0]
			} else {
				nd["fds"] = strings.Join(names, ":")
			}
		}
		steps = append(steps, qmpStep{cmd: "netdev_add", args: nd, undo: "netdev_del", uarg: map[string]any{"id": netdev}})
		extra := map[string]any{"netdev": netdev}
		if len(d.MAC) != 0 {
			extra["mac"] = d.MAC.String()
		}
		if len(d.Files) > 1 {
			extra["mq"], extra["vectors"] = true, 2*len(d.Files)+2
		}
		return append(steps, dev("virtio-net-pci", extra)), nil
	case *hypervisor.Console:
		return nil, errors.New("a console cannot be hot-plugged; give it at boot")
	}
	return nil, fmt.Errorf("device type %T is not supported", d)
}

// RemoveDevice unplugs a hot-plugged device: device_del, then, once QEMU
// reports DEVICE_DELETED (PCI devices need the guest's consent, so this
// waits for ctx), its backends.
func (q *QEMU) RemoveDevice(ctx context.Context, id string) error {
	c, err := q.client()
	if err != nil {
		return err
	}
	q.mu.Lock()
	p, ok := q.plugged[id]
	if !ok {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: no hot-plugged device %q", q.cfg.ID, id)
	}
	q.mu.Unlock()
	if err := c.DeleteDevice(ctx, id); err != nil {
		return fmt.Errorf("qemu: vm %s: remove %s: %w", q.cfg.ID, id, err)
	}
	steps, _ := plugSteps(p.dev, p.slot, p.set)
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if steps[i].undo == "" || steps[i].undo == "closefd" {
			continue // fds passed with getfd are consumed by the backend
		}
		if _, err := c.Execute(ctx, steps[i].undo, steps[i].uarg); err != nil {
			errs = append(errs, err)
		}
	}
	q.mu.Lock()
	delete(q.plugged, id)
	if p.slot >= 0 {
		q.slots[p.slot] = false
	}
	q.mu.Unlock()
	removeSocket(p.dev)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("qemu: vm %s: remove %s backends: %w", q.cfg.ID, id, err)
	}
	return nil
}
