// Package hypervisor is the interface vmm-sandboxer drives every VMM through
// (QEMU now; Cloud Hypervisor and StratoVirt later) and the devices a pod's
// VM is made of, as typed values that each driver translates.
package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
)

// Hypervisor is one VM. A driver's constructor takes a Config; Start boots
// it, and the VM then runs until Stop, a guest power-off or a crash, which
// Wait reports.
type Hypervisor interface {
	// Start launches the VMM process and returns once its control channel
	// answers and the guest runs. On error nothing is left running.
	Start(ctx context.Context) error
	// Stop ends the VM: an orderly quit of the VMM, and a kill when ctx
	// ends first. It returns once the process is gone. Stopping a VM that
	// has already exited is not an error.
	Stop(ctx context.Context) error
	// Wait blocks until the VMM process exits (or ctx ends) and returns how.
	Wait(ctx context.Context) (ExitStatus, error)
	// Ping asks the VMM (not the guest) whether the VM is running.
	Ping(ctx context.Context) error
	// AddDevice hot-plugs a device into the running VM.
	AddDevice(ctx context.Context, d Device) error
	// RemoveDevice unplugs the device with that ID.
	RemoveDevice(ctx context.Context, id string) error
	// PID is the VMM process's ID, 0 before Start.
	PID() int
}

// ExitStatus is how the VMM process ended.
type ExitStatus struct {
	Code   int    // exit code, -1 when killed by a signal
	Signal string // the signal's name when killed by one
}

func (e ExitStatus) String() string {
	if e.Signal != "" {
		return "killed by " + e.Signal
	}
	return fmt.Sprintf("exit code %d", e.Code)
}

// Accel is how guest code runs.
type Accel string

const (
	// AccelAuto uses KVM when a probe boot under it succeeds, else TCG.
	AccelAuto Accel = "auto"
	// AccelKVM is hardware virtualisation through /dev/kvm.
	AccelKVM Accel = "kvm"
	// AccelTCG is QEMU's software emulation: slow, works everywhere.
	AccelTCG Accel = "tcg"
)

// ParseAccel accepts "", auto, kvm and tcg ("" means auto).
func ParseAccel(s string) (Accel, error) {
	switch Accel(s) {
	case "", AccelAuto:
		return AccelAuto, nil
	case AccelKVM, AccelTCG:
		return Accel(s), nil
	}
	return "", fmt.Errorf("accelerator %q: want auto, kvm or tcg", s)
}

// Config describes one VM.
type Config struct {
	// ID names the VM (the pod ID); it appears in the process title.
	ID string
	// Dir is the VM's own directory (the sandbox dir): the VMM's control
	// socket, its log and the guest console log live there.
	Dir string
	// Binary is the VMM executable (a name looked up in PATH, or a path).
	Binary string
	// Kernel, Initrd and Cmdline boot the guest directly.
	Kernel, Initrd, Cmdline string
	CPUs                    int
	MemoryMiB               int
	// SharedMemory backs guest RAM with a shareable memfd, which
	// vhost-user devices (virtio-fs) need.
	SharedMemory bool
	// Accel must be resolved (kvm or tcg) by the time the VM starts.
	Accel Accel
	// HotplugSlots is the number of free PCIe slots kept for AddDevice.
	HotplugSlots int
	// TCGCacheMiB sizes QEMU's translated-code cache under TCG (0: QEMU's
	// default, 1 GiB, which a guest fills with use); other VMMs and KVM
	// ignore it.
	TCGCacheMiB int
	// Unconfined runs QEMU without its seccomp sandbox (-sandbox), for
	// hosts whose QEMU lacks it. Cloud Hypervisor and StratoVirt keep
	// their own filters.
	Unconfined bool
	// RunAs, when set, is the user, group and supplementary groups the
	// VMM process runs as instead of the daemon's (root), so that a guest
	// that breaks into it is an unprivileged user who can open nothing of
	// Dir. QEMU only.
	RunAs *syscall.Credential
	// Devices are present from boot, in order.
	Devices []Device
}

// Paths of the files a VM keeps in its Dir.
func (c *Config) ConsoleLog() string { return filepath.Join(c.Dir, "console.log") }
func (c *Config) VMMLog() string     { return filepath.Join(c.Dir, "vmm.log") }
func (c *Config) ControlSocket() string {
	return filepath.Join(c.Dir, "vmm.sock")
}

var idRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_-]{0,31}$`)

// ValidID checks a device ID: QEMU and the other VMMs take IDs that start
// with a letter and hold letters, digits, '-' and '_'.
func ValidID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("device id %q: want a letter then up to 31 letters, digits, '-' or '_'", id)
	}
	return nil
}

// Validate checks the configuration before anything is started.
func (c *Config) Validate() error {
	var errs []error
	if c.ID == "" {
		errs = append(errs, errors.New("no VM id"))
	}
	if c.Dir == "" {
		errs = append(errs, errors.New("no VM directory"))
	}
	if c.Kernel == "" {
		errs = append(errs, errors.New("no kernel"))
	}
	if c.CPUs < 1 {
		errs = append(errs, fmt.Errorf("cpus %d: want at least 1", c.CPUs))
	}
	if c.MemoryMiB < 64 {
		errs = append(errs, fmt.Errorf("memory %d MiB: want at least 64", c.MemoryMiB))
	}
	if c.Accel != AccelKVM && c.Accel != AccelTCG {
		errs = append(errs, fmt.Errorf("accelerator %q: must be resolved to kvm or tcg", c.Accel))
	}
	seen := map[string]bool{}
	for _, d := range c.Devices {
		if err := d.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		if seen[d.DeviceID()] {
			errs = append(errs, fmt.Errorf("device id %q used twice", d.DeviceID()))
		}
		seen[d.DeviceID()] = true
		if _, ok := d.(*VirtioFS); ok && !c.SharedMemory {
			errs = append(errs, fmt.Errorf("virtio-fs %q needs shared memory", d.DeviceID()))
		}
	}
	return errors.Join(errs...)
}

// Device is one of the device types below.
type Device interface {
	DeviceID() string
	Validate() error
}

// Console is the guest's first serial port (ttyS0), written to the VM's
// console log. Give the guest console=ttyS0 to see its kernel messages.
type Console struct {
	ID string
}

// RNG is a virtio entropy source fed from the host's /dev/urandom.
type RNG struct {
	ID string
}

// SerialPort is a virtio-serial port whose host end is a unix socket the
// VMM listens on; the guest sees /dev/vportNpM, named Name in
// /sys/class/virtio-ports/*/name.
type SerialPort struct {
	ID         string
	Name       string
	SocketPath string
}

// Vsock is a virtio socket device with the guest's context ID.
type Vsock struct {
	ID       string
	GuestCID uint32
}

// VirtioFS is a vhost-user file system served by a virtiofsd listening on
// SocketPath; the guest mounts it as -t virtiofs Tag.
type VirtioFS struct {
	ID         string
	Tag        string
	SocketPath string
}

// Block is a virtio block device backed by a host file or block device.
type Block struct {
	ID       string
	Path     string
	Format   string // raw (default) or qcow2
	ReadOnly bool
}

// TapNet is a virtio network device on a tap interface. The tap is either
// opened by the VMM by name (in the VMM's own network namespace) or passed
// as open files (one per queue), which is how a tap in a pod's network
// namespace reaches a VMM that runs outside it.
type TapNet struct {
	ID     string
	IfName string
	Files  []*os.File
	MAC    net.HardwareAddr
}

func (d *Console) DeviceID() string    { return d.ID }
func (d *RNG) DeviceID() string        { return d.ID }
func (d *SerialPort) DeviceID() string { return d.ID }
func (d *Vsock) DeviceID() string      { return d.ID }
func (d *VirtioFS) DeviceID() string   { return d.ID }
func (d *Block) DeviceID() string      { return d.ID }
func (d *TapNet) DeviceID() string     { return d.ID }

func (d *Console) Validate() error { return ValidID(d.ID) }
func (d *RNG) Validate() error     { return ValidID(d.ID) }

func (d *SerialPort) Validate() error {
	return errors.Join(ValidID(d.ID), need(d.ID, "name", d.Name), need(d.ID, "socket path", d.SocketPath),
		sockLen(d.ID, d.SocketPath))
}

func (d *Vsock) Validate() error {
	if err := ValidID(d.ID); err != nil {
		return err
	}
	if d.GuestCID < 3 {
		return fmt.Errorf("vsock %q: guest CID %d is reserved (want 3 or more)", d.ID, d.GuestCID)
	}
	return nil
}

func (d *VirtioFS) Validate() error {
	return errors.Join(ValidID(d.ID), need(d.ID, "tag", d.Tag), need(d.ID, "socket path", d.SocketPath),
		sockLen(d.ID, d.SocketPath))
}

func (d *Block) Validate() error {
	err := errors.Join(ValidID(d.ID), need(d.ID, "path", d.Path))
	switch d.Format {
	case "", "raw", "qcow2":
	default:
		err = errors.Join(err, fmt.Errorf("block %q: format %q: want raw or qcow2", d.ID, d.Format))
	}
	return err
}

func (d *TapNet) Validate() error {
	err := ValidID(d.ID)
	if (d.IfName == "") == (len(d.Files) == 0) {
		err = errors.Join(err, fmt.Errorf("tap %q: give either an interface name or open tap files", d.ID))
	}
	if len(d.MAC) != 0 && len(d.MAC) != 6 {
		err = errors.Join(err, fmt.Errorf("tap %q: MAC %s is not 6 bytes", d.ID, d.MAC))
	}
	return err
}

func need(id, what, v string) error {
	if v == "" {
		return fmt.Errorf("device %q: no %s", id, what)
	}
	return nil
}

// A unix socket path must fit sockaddr_un's 108 bytes with its NUL.
func sockLen(id, p string) error {
	if len(p) > 107 {
		return fmt.Errorf("device %q: socket path %q is longer than 107 bytes", id, p)
	}
	return nil
}
