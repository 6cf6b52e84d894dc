// Package qemu drives QEMU (qemu-system-x86_64) over QMP as a
// hypervisor.Hypervisor: the command line from typed devices, the process
// supervised, hot-plug through QMP, KVM only when a probe boot succeeds.
package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// DefaultBinary is Debian's qemu-system-x86 executable.
const DefaultBinary = "qemu-system-x86_64"

// serialBus is the virtio-serial controller every VM has, so that ports can
// be plugged at boot or later.
const serialBus = "vser0"

// hotplugPort names the PCIe root ports kept free for AddDevice.
func hotplugPort(i int) string { return "hp" + strconv.Itoa(i) }

// sandboxOptions turn on QEMU's seccomp sandbox with everything it can
// deny.
const sandboxOptions = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// esc escapes a value for QEMU's key=value,... option syntax, where a comma
// is written as two.
func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// vhostVsockDevice is the host's vsock device, which QEMU gets open.
const vhostVsockDevice = "/dev/vhost-vsock"

// fdsetPath names an fd set QEMU opens a file of (-add-fd, add-fd) instead
// of a path: file chardevs and block devices take it.
func fdsetPath(set int) string { return "/dev/fdset/" + strconv.Itoa(set) }

// passer numbers the files QEMU inherits: fds 3, 4, ... in order.
type passer struct{ files []hostFile }

func (p *passer) fd(h hostFile) string {
	p.files = append(p.files, h)
	return strconv.Itoa(2 + len(p.files))
}

// addFd puts the file in fd set set; opaque names its path for query-fdsets
// and for whoever reads QEMU's command line.
func (p *passer) addFd(set int, h hostFile) []string {
	return []string{"-add-fd", "fd=" + p.fd(h) + ",set=" + strconv.Itoa(set) + ",opaque=" + esc(h.path)}
}

// commandLine builds QEMU's command line for cfg (without the binary) and
// the files it inherits. QEMU gets everything of the VM's directory as
// descriptors the daemon opened (see hostFile): only the kernel, initrd,
// firmware and /dev/urandom and /dev/kvm, readable by anyone or by the
// kvm group, are opened by path.
func commandLine(cfg *hypervisor.Config) ([]string, []hostFile, error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	machine := "q35,accel=" + string(cfg.Accel)
	accel := []string{}
	if cfg.Accel == hypervisor.AccelTCG && cfg.TCGCacheMiB > 0 {
		// The accelerator's own options need -accel rather than the
		// machine's accel property.
		machine = "q35"
		accel = []string{"-accel", "tcg,tb-size=" + strconv.Itoa(cfg.TCGCacheMiB)}
	}
	cpu := "max"
	if cfg.Accel == hypervisor.AccelKVM {
		cpu = "host"
	}
	a := []string{
		"-name", "kuasar-" + esc(cfg.ID) + ",debug-threads=on",
		"-no-user-config", "-nodefaults", "-display", "none", "-vga", "none",
		"-no-reboot", // a guest reboot ends the VM, like a power-off
		"-cpu", cpu,
		"-smp", strconv.Itoa(cfg.CPUs),
		"-m", strconv.Itoa(cfg.MemoryMiB) + "M",
	}
	if !cfg.Unconfined {
		// A guest that breaks into QEMU meets a seccomp filter: no
		// obsolete system calls, no set*id, no fork/exec, no changes of
		// scheduling or affinity.
		a = append(a, "-sandbox", sandboxOptions)
	}
	if cfg.SharedMemory {
		machine += ",memory-backend=mem"
		a = append(a, "-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", cfg.MemoryMiB))
	}
	a = append(a, "-machine", machine)
	a = append(a, accel...)
	a = append(a, "-kernel", esc(cfg.Kernel))
	if cfg.Initrd != "" {
		a = append(a, "-initrd", esc(cfg.Initrd))
	}
	if cfg.Cmdline != "" {
		a = append(a, "-append", cfg.Cmdline)
	}
	var p passer
	a = append(a,
		"-chardev", "socket,id=qmp,fd="+p.fd(hostFile{kind: fileListen, path: cfg.ControlSocket()})+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-device", "virtio-serial-pci,id="+serialBus,
	)
	for i := 0; i < cfg.HotplugSlots; i++ {
		a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", hotplugPort(i), i+1))
	}
	for i, d := range cfg.Devices {
		// A device's fd set, if it has one, is its index: hot-plugged
		// devices' sets come after (QEMU.nextSet).
		da, err := deviceArgs(cfg, d, i, &p)
		if err != nil {
			return nil, nil, err
		}
		a = append(a, da...)
	}
	return a, p.files, nil
}

func deviceArgs(cfg *hypervisor.Config, d hypervisor.Device, set int, p *passer) ([]string, error) {
	switch d := d.(type) {
	case *hypervisor.Console:
		return append(p.addFd(set, hostFile{kind: fileLog, path: cfg.ConsoleLog()}),
			"-chardev", "file,id="+d.ID+",path="+fdsetPath(set),
			"-serial", "chardev:"+d.ID,
		), nil
	case *hypervisor.RNG:
		return []string{
			"-object", "rng-random,id=" + d.ID + "-src,filename=/dev/urandom",
			"-device", "virtio-rng-pci,id=" + d.ID + ",rng=" + d.ID + "-src",
		}, nil
	case *hypervisor.SerialPort:
		return []string{
			"-chardev", "socket,id=" + d.ID + "-chr,fd=" + p.fd(hostFile{kind: fileListen, path: d.SocketPath}) + ",server=on,wait=off",
			"-device", "virtserialport,id=" + d.ID + ",bus=" + serialBus + ".0,chardev=" + d.ID + "-chr,name=" + esc(d.Name),
		}, nil
	case *hypervisor.Vsock:
		return []string{"-device", fmt.Sprintf("vhost-vsock-pci,id=%s,guest-cid=%d,vhostfd=%s",
			d.ID, d.GuestCID, p.fd(hostFile{kind: fileReadWrite, path: vhostVsockDevice}))}, nil
	case *hypervisor.VirtioFS:
		return []string{
			"-chardev", "socket,id=" + d.ID + "-chr,fd=" + p.fd(hostFile{kind: fileDial, path: d.SocketPath}),
			"-device", "vhost-user-fs-pci,id=" + d.ID + ",chardev=" + d.ID + "-chr,tag=" + esc(d.Tag),
		}, nil
	case *hypervisor.Block:
		format := d.Format
		if format == "" {
			format = "raw"
		}
		ro := onOff(d.ReadOnly)
		return append(p.addFd(set, blockFile(d)),
			"-blockdev", "driver=file,node-name="+d.ID+"-file,filename="+fdsetPath(set)+",read-only="+ro,
			"-blockdev", "driver="+format+",node-name="+d.ID+"-fmt,file="+d.ID+"-file,read-only="+ro,
			"-device", "virtio-blk-pci,id="+d.ID+",drive="+d.ID+"-fmt",
		), nil
	case *hypervisor.TapNet:
		netdev := "tap,id=" + d.ID + "-net,vhost=off"
		dev := "virtio-net-pci,id=" + d.ID + ",netdev=" + d.ID + "-net"
		switch {
		case d.IfName != "":
			if cfg.RunAs != nil {
				return nil, fmt.Errorf("qemu: tap %q: an unprivileged QEMU cannot open a tap by name; pass it open", d.ID)
			}
			netdev += ",ifname=" + esc(d.IfName) + ",script=no,downscript=no"
		case len(d.Files) == 1:
			netdev += ",fd=" + p.fd(hostFile{kind: fileGiven, file: d.Files[0]})
		default:
			fds := make([]string, len(d.Files))
			for i, f := range d.Files {
				fds[i] = p.fd(hostFile{kind: fileGiven, file: f})
			}
			netdev += ",fds=" + strings.Join(fds, ":")
			dev += fmt.Sprintf(",mq=on,vectors=%d", 2*len(d.Files)+2)
		}
		if len(d.MAC) != 0 {
			dev += ",mac=" + d.MAC.String()
		}
		return []string{"-netdev", netdev, "-device", dev}, nil
	}
	return nil, fmt.Errorf("qemu: device %q: type %T is not supported", d.DeviceID(), d)
}

// blockFile opens a disk image as QEMU will use it: QEMU takes a file of
// its fd set only when the access modes match.
func blockFile(d *hypervisor.Block) hostFile {
	if d.ReadOnly {
		return hostFile{kind: fileRead, path: d.Path}
	}
	return hostFile{kind: fileReadWrite, path: d.Path}
}
