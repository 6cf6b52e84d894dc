package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// DefaultProbeTimeout bounds the KVM probe boot. A kernel without an
// initramfs reaches its root-mount panic in well under a second under
// working KVM; where KVM is broken the guest hangs and the probe times out.
const DefaultProbeTimeout = 10 * time.Second

// ProbeKVM boots kernel under KVM without a root file system: the kernel
// panics when it finds no root and, with panic=-1 and -no-reboot, QEMU
// exits. KVM works when that happens before timeout and the console shows
// the kernel ran. /dev/kvm being there proves nothing (on some nested
// hosts ordinary guests hang under it), hence the boot. The reason says
// why KVM is not usable.
func ProbeKVM(ctx context.Context, binary, kernel string, timeout time.Duration) (ok bool, reason string, err error) {
	if binary == "" {
		binary = DefaultBinary
	}
	if timeout <= 0 {
		timeout = DefaultProbeTimeout
	}
	f, err := os.OpenFile(KVMDevice, os.O_RDWR, 0)
	if err != nil {
		return false, "cannot open " + KVMDevice + ": " + err.Error(), nil
	}
	f.Close()
	bin, err := exec.LookPath(binary)
	if err != nil {
		return false, "", fmt.Errorf("qemu: kvm probe: %w", err)
	}
	if _, err := os.Stat(kernel); err != nil {
		return false, "", fmt.Errorf("qemu: kvm probe: kernel: %w", err)
	}
	dir, err := os.MkdirTemp("", "kuasar-kvm-probe-")
	if err != nil {
		return false, "", fmt.Errorf("qemu: kvm probe: %w", err)
	}
	defer os.RemoveAll(dir)
	console := filepath.Join(dir, "console.log")
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(cctx, bin,
		"-machine", "q35,accel=kvm", "-cpu", "host", "-smp", "1", "-m", "256M",
		"-no-user-config", "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot",
		"-kernel", esc(kernel), "-append", "console=ttyS0 panic=-1 loglevel=4",
		"-serial", "file:"+esc(console))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	out, runErr := cmd.CombinedOutput()
	log, _ := os.ReadFile(console)
	switch {
	case cctx.Err() != nil && ctx.Err() == nil:
		return false, fmt.Sprintf("a guest kernel did not finish booting under KVM in %s", timeout), nil
	case ctx.Err() != nil:
		return false, "", fmt.Errorf("qemu: kvm probe: %w", ctx.Err())
	case runErr != nil:
		var ee *exec.ExitError
		if errors.As(runErr, &ee) {
			return false, fmt.Sprintf("qemu failed under KVM (%v): %s", runErr, strings.TrimSpace(string(out))), nil
		}
		return false, "", fmt.Errorf("qemu: kvm probe: %w", runErr)
	case !strings.Contains(string(log), "Linux version"):
		return false, "qemu exited under KVM but the guest kernel printed nothing", nil
	}
	return true, "", nil
}

// KVMDevice is the device QEMU opens for KVM.
const KVMDevice = "/dev/kvm"

// KVMGroups returns the supplementary groups an unprivileged QEMU needs to
// open dev (KVMDevice) for reading and writing: none when anyone may, its
// group when that group may (and is not root's). Otherwise only root can
// open it, and the error says so; it wraps fs.ErrNotExist when there is no
// such device.
func KVMGroups(dev string) ([]uint32, error) {
	st, err := os.Stat(dev)
	if err != nil {
		return nil, err
	}
	perm, gid := st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid
	switch {
	case perm&0o006 == 0o006:
		return nil, nil
	case perm&0o060 == 0o060 && gid != 0:
		return []uint32{gid}, nil
	}
	return nil, fmt.Errorf("%s (mode %#o, group %d) is for root alone: an unprivileged QEMU needs it readable and writable by a group other than root's (udev: GROUP=\"kvm\", MODE=\"0660\")", dev, perm, gid)
}

// ResolveAccel turns auto into kvm or tcg by probing; kvm and tcg are
// returned as they are (a VM asked to use KVM fails at start where KVM does
// not work, which is what the operator asked for).
func ResolveAccel(ctx context.Context, a hypervisor.Accel, binary, kernel string, timeout time.Duration) (hypervisor.Accel, string, error) {
	if a != hypervisor.AccelAuto && a != "" {
		return a, "configured", nil
	}
	ok, reason, err := ProbeKVM(ctx, binary, kernel, timeout)
	if err != nil {
		return "", "", err
	}
	if ok {
		return hypervisor.AccelKVM, "a probe boot under KVM succeeded", nil
	}
	return hypervisor.AccelTCG, reason, nil
}
