// Package agent is vmm-task, the init (PID 1) of a pod's VM: it sets the
// guest up (mounts, kernel modules, loopback), reaps orphans and serves the
// vmmtask.v1 Agent API to the host over the VM's transport.
package agent

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultPortName is the virtio-serial port the host names for the agent.
const DefaultPortName = "kuasar.agent"

// ModuleList is where the image lists the modules to load, in order.
const ModuleList = "/etc/vmm-task/modules"

// Options come from the kernel command line (kuasar.<key>=<value>).
type Options struct {
	PortName string // kuasar.port: the agent's virtio-serial port name
	Debug    bool   // kuasar.debug: debug logging on the console
}

// ParseCmdline reads the options from a kernel command line.
func ParseCmdline(cmdline string) Options {
	o := Options{PortName: DefaultPortName}
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		switch k {
		case "kuasar.port":
			if v != "" {
				o.PortName = v
			}
		case "kuasar.debug":
			o.Debug = v == "" || v == "1" || v == "true"
		}
	}
	return o
}

// baseMount is one file system every guest gets.
type baseMount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	required               bool
}

var baseMounts = []baseMount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", true},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", true},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", true},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5", false},
	{"shm", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", false},
	{"mqueue", "/dev/mqueue", "mqueue", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", false},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", false},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate", false},
}

// MountBase mounts /proc, /sys, /dev and friends and the cgroup v2
// hierarchy. A required mount that fails is an error; the others become
// warnings, and the guest goes on.
func MountBase() (warnings []string, err error) {
	for _, m := range baseMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return warnings, fmt.Errorf("mkdir %s: %w", m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			if m.required {
				return warnings, fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
			}
			warnings = append(warnings, fmt.Sprintf("mount %s on %s: %v", m.fstype, m.target, err))
		}
	}
	// The usual links into /proc.
	for link, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx",
	} {
		_ = os.Remove(link)
		if err := os.Symlink(target, link); err != nil {
			warnings = append(warnings, fmt.Sprintf("symlink %s: %v", link, err))
		}
	}
	return warnings, nil
}

// LoadModules loads the module files listed in list, in order. A module
// already loaded (or built in) is fine; one that fails to load is a
// warning. It returns how many it loaded.
func LoadModules(list string) (loaded int, warnings []string, err error) {
	f, err := os.Open(list)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil, nil // an image without modules
	}
	if err != nil {
		return 0, nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		if err := loadModule(p); err != nil {
			if errors.Is(err, unix.EEXIST) {
				continue
			}
			warnings = append(warnings, fmt.Sprintf("load module %s: %v", p, err))
			continue
		}
		loaded++
	}
	return loaded, warnings, sc.Err()
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	if !strings.HasSuffix(path, ".ko") {
		// .ko.xz / .ko.zst: the kernel decompresses (CONFIG_MODULE_DECOMPRESS).
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	return unix.FinitModule(int(f.Fd()), "", flags)
}

// LoopbackUp brings lo up, without which nothing in the guest can talk to
// itself.
func LoopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("lo flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	return nil
}

// PowerOff syncs, unmounts what it can and powers the VM off. It returns
// only if the power-off failed.
func PowerOff() error {
	unix.Sync()
	if b, err := os.ReadFile("/proc/self/mounts"); err == nil {
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			f := strings.Fields(lines[i])
			if len(f) > 1 && f[1] != "/" {
				_ = unix.Unmount(f[1], unix.MNT_DETACH)
			}
		}
	}
	unix.Sync()
	return unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}
