package stratovirt

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// serialBus is the virtio-serial controller the VM gets when it has
// virtio-serial ports.
const serialBus = "vser0"

// Limits of the microvm machine's replaceable mmio slots, which boot-time
// and hot-plugged disks and NICs share.
const (
	microBlkSlots = 6
	microNetSlots = 2
)

// hotplugPort names the q35 pcie-root-ports kept free for AddDevice.
func hotplugPort(i int) string { return "hp" + strconv.Itoa(i) }

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// esc escapes a value for StratoVirt's key=value,... option syntax, which,
// like QEMU's, writes a comma as two.
func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// args builds the command line: the q35 machine puts every device on
// pcie.0 at its own slot, microvm uses virtio-mmio devices.
type args struct {
	machine string
	a       []string
	files   []*os.File
	slot    int // last pcie.0 slot used
}

// device adds -device for a virtio device: driver virtio-net becomes
// virtio-net-device on microvm and virtio-net-pci with a slot on q35.
func (b *args) device(driver, opts string) {
	if b.machine == MachineQ35 {
		b.slot++
		b.a = append(b.a, "-device", fmt.Sprintf("%s-pci,%s,bus=pcie.0,addr=%#x", driver, opts, b.slot))
		return
	}
	b.a = append(b.a, "-device", driver+"-device,"+opts)
}

// Args builds StratoVirt's command line for vm (without the binary) and the
// files the process must inherit, which become fds 3, 4, ... in order.
func Args(vm *hypervisor.Config, c *Config) ([]string, []*os.File, error) {
	b := &args{machine: c.Machine}
	machine := "type=" + c.Machine + ",dump-guest-core=off"
	if vm.SharedMemory {
		machine += ",mem-share=on"
	}
	b.a = []string{
		"-name", "kuasar-" + esc(vm.ID),
		"-machine", machine,
		"-smp", strconv.Itoa(vm.CPUs),
		"-m", strconv.Itoa(vm.MemoryMiB) + "M",
		"-kernel", esc(vm.Kernel),
	}
	if vm.Initrd != "" {
		b.a = append(b.a, "-initrd", esc(vm.Initrd))
	}
	if vm.Cmdline != "" {
		b.a = append(b.a, "-append", vm.Cmdline)
	}
	if c.Firmware != "" {
		b.a = append(b.a, "-drive", "file="+esc(c.Firmware)+",if=pflash,unit=0,readonly=true")
	}
	b.a = append(b.a, "-qmp", "unix:"+esc(vm.ControlSocket())+",server,nowait")
	blks, nets, serial := 0, 0, false
	for _, d := range vm.Devices {
		switch d := d.(type) {
		case *hypervisor.Console:
			b.a = append(b.a, "-chardev", "file,id="+d.ID+",path="+esc(vm.ConsoleLog()), "-serial", "chardev:"+d.ID)
		case *hypervisor.RNG:
			b.a = append(b.a, "-object", "rng-random,id="+d.ID+"-src,filename=/dev/urandom")
			b.device("virtio-rng", "rng="+d.ID+"-src,id="+d.ID)
		case *hypervisor.SerialPort:
			if !serial {
				b.device("virtio-serial", "id="+serialBus)
				serial = true
			}
			b.a = append(b.a,
				"-chardev", "socket,id="+d.ID+"-chr,path="+esc(d.SocketPath)+",server,nowait",
				"-device", "virtserialport,chardev="+d.ID+"-chr,id="+d.ID+",name="+esc(d.Name))
		case *hypervisor.Vsock:
			b.device("vhost-vsock", fmt.Sprintf("id=%s,guest-cid=%d", d.ID, d.GuestCID))
		case *hypervisor.VirtioFS:
			b.a = append(b.a, "-chardev", "socket,id="+d.ID+"-chr,path="+esc(d.SocketPath))
			b.device("vhost-user-fs", "id="+d.ID+",chardev="+d.ID+"-chr,tag="+esc(d.Tag))
		case *hypervisor.Block:
			blks++
			b.a = append(b.a, "-drive", "id="+d.ID+",file="+esc(d.Path)+",readonly="+onOff(d.ReadOnly)+",direct=off,format="+format(d))
			b.device("virtio-blk", "drive="+d.ID+",id="+d.ID)
		case *hypervisor.TapNet:
			nets++
			netdev := "tap,id=" + d.ID
			opts := "netdev=" + d.ID + ",id=" + d.ID
			switch {
			case d.IfName != "":
				netdev += ",ifname=" + esc(d.IfName)
			case len(d.Files) == 1:
				netdev += ",fd=" + strconv.Itoa(3+len(b.files))
				b.files = append(b.files, d.Files[0])
			default:
				fds := make([]string, len(d.Files))
				for i, f := range d.Files {
					fds[i] = strconv.Itoa(3 + len(b.files))
					b.files = append(b.files, f)
				}
				netdev += ",fds=" + strings.Join(fds, ":") + ",queues=" + strconv.Itoa(2*len(d.Files))
				opts += ",mq=on"
			}
			if len(d.MAC) != 0 {
				opts += ",mac=" + d.MAC.String()
			}
			b.a = append(b.a, "-netdev", netdev)
			b.device("virtio-net", opts)
		default:
			return nil, nil, fmt.Errorf("stratovirt: device %q: type %T is not supported", d.DeviceID(), d)
		}
	}
	switch c.Machine {
	case MachineMicroVM:
		if blks > microBlkSlots || nets > microNetSlots {
			return nil, nil, fmt.Errorf("stratovirt: microvm takes at most %d disks and %d NICs (got %d and %d)", microBlkSlots, microNetSlots, blks, nets)
		}
	case MachineQ35:
		for i := 0; i < vm.HotplugSlots; i++ {
			b.slot++
			b.a = append(b.a, "-device", fmt.Sprintf("pcie-root-port,port=%#x,addr=%#x,bus=pcie.0,id=%s", i+1, b.slot, hotplugPort(i)))
		}
		if b.slot > 31 {
			return nil, nil, fmt.Errorf("stratovirt: q35 has 31 free slots on pcie.0, the devices and hot-plug ports need %d", b.slot)
		}
	}
	return b.a, b.files, nil
}

func format(d *hypervisor.Block) string {
	if d.Format == "" {
		return "raw"
	}
	return d.Format
}
