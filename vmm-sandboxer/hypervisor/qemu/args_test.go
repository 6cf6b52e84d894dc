package qemu

import (
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

func baseConfig() hypervisor.Config {
	return hypervisor.Config{
		ID: "pod1", Dir: "/run/vmm/pod1", Kernel: "/k/vmlinuz", Initrd: "/k/initrd.img",
		Cmdline: "console=ttyS0 quiet", CPUs: 2, MemoryMiB: 512, Accel: hypervisor.AccelTCG,
	}
}

func TestArgs(t *testing.T) {
	tap, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	mac, _ := net.ParseMAC("02:42:ac:11:00:02")
	tests := []struct {
		name  string
		edit  func(c *hypervisor.Config)
		want  []string // "flag value": must appear as two consecutive arguments
		not   []string // none may appear as an argument
		files []string // "kind path" of each file QEMU inherits, fd 3 first
	}{
		{
			name: "tcg base",
			edit: func(c *hypervisor.Config) {},
			want: []string{
				"-machine q35,accel=tcg", "-cpu max", "-smp 2", "-m 512M", "-no-reboot", "-nodefaults",
				"-kernel /k/vmlinuz", "-initrd /k/initrd.img", "-append console=ttyS0 quiet",
				"-chardev socket,id=qmp,fd=3,server=on,wait=off", "-mon chardev=qmp,mode=control",
				"-device virtio-serial-pci,id=vser0",
				"-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
			},
			not:   []string{"-object"},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name:  "unconfined: no seccomp sandbox",
			edit:  func(c *hypervisor.Config) { c.Unconfined = true },
			not:   []string{"-sandbox"},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name:  "kvm uses the host cpu",
			edit:  func(c *hypervisor.Config) { c.Accel = hypervisor.AccelKVM },
			want:  []string{"-machine q35,accel=kvm", "-cpu host"},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name: "shared memory for vhost-user",
			edit: func(c *hypervisor.Config) { c.SharedMemory = true },
			want: []string{
				"-object memory-backend-memfd,id=mem,size=512M,share=on",
				"-machine q35,accel=tcg,memory-backend=mem",
			},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name:  "a smaller TCG translation cache",
			edit:  func(c *hypervisor.Config) { c.TCGCacheMiB = 64; c.SharedMemory = true },
			want:  []string{"-machine q35,memory-backend=mem", "-accel tcg,tb-size=64"},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name:  "KVM has no translation cache",
			edit:  func(c *hypervisor.Config) { c.TCGCacheMiB = 64; c.Accel = hypervisor.AccelKVM },
			want:  []string{"-machine q35,accel=kvm"},
			not:   []string{"-accel"},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name: "hot-plug slots",
			edit: func(c *hypervisor.Config) { c.HotplugSlots = 2 },
			want: []string{
				"-device pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
				"-device pcie-root-port,id=hp1,bus=pcie.0,chassis=2",
			},
			files: []string{"listen /run/vmm/pod1/vmm.sock"},
		},
		{
			name: "commas in paths are escaped",
			edit: func(c *hypervisor.Config) {
				c.Kernel = "/k/a,b"
				c.Dir = "/run/x,y"
				c.Devices = []hypervisor.Device{&hypervisor.Console{ID: "console"}}
			},
			want:  []string{"-kernel /k/a,,b", "-add-fd fd=4,set=0,opaque=/run/x,,y/console.log"},
			files: []string{"listen /run/x,y/vmm.sock", "log /run/x,y/console.log"},
		},
		{
			name: "every device type",
			edit: func(c *hypervisor.Config) {
				c.SharedMemory = true
				c.Devices = []hypervisor.Device{
					&hypervisor.Console{ID: "console"},
					&hypervisor.RNG{ID: "rng"},
					&hypervisor.SerialPort{ID: "agent", Name: "kuasar.agent", SocketPath: "/run/vmm/pod1/agent.sock"},
					&hypervisor.Vsock{ID: "vsock", GuestCID: 7},
					&hypervisor.VirtioFS{ID: "fs", Tag: "kuasar", SocketPath: "/run/vmm/pod1/fs.sock"},
					&hypervisor.Block{ID: "disk0", Path: "/img/a.qcow2", Format: "qcow2", ReadOnly: true},
					&hypervisor.TapNet{ID: "net0", IfName: "tap0", MAC: mac},
					&hypervisor.TapNet{ID: "net1", Files: []*os.File{tap}},
					&hypervisor.TapNet{ID: "net2", Files: []*os.File{tap, tap}},
				}
			},
			// QEMU gets every file of the VM's directory open: the
			// console log in fd set 0, the listening agent socket, a
			// connection to virtiofsd, the vsock device, the disk image
			// in fd set 5, the taps.
			want: []string{
				"-add-fd fd=4,set=0,opaque=/run/vmm/pod1/console.log",
				"-chardev file,id=console,path=/dev/fdset/0", "-serial chardev:console",
				"-object rng-random,id=rng-src,filename=/dev/urandom", "-device virtio-rng-pci,id=rng,rng=rng-src",
				"-chardev socket,id=agent-chr,fd=5,server=on,wait=off",
				"-device virtserialport,id=agent,bus=vser0.0,chardev=agent-chr,name=kuasar.agent",
				"-device vhost-vsock-pci,id=vsock,guest-cid=7,vhostfd=6",
				"-chardev socket,id=fs-chr,fd=7", "-device vhost-user-fs-pci,id=fs,chardev=fs-chr,tag=kuasar",
				"-add-fd fd=8,set=5,opaque=/img/a.qcow2",
				"-blockdev driver=file,node-name=disk0-file,filename=/dev/fdset/5,read-only=on",
				"-blockdev driver=qcow2,node-name=disk0-fmt,file=disk0-file,read-only=on",
				"-device virtio-blk-pci,id=disk0,drive=disk0-fmt",
				"-netdev tap,id=net0-net,vhost=off,ifname=tap0,script=no,downscript=no",
				"-device virtio-net-pci,id=net0,netdev=net0-net,mac=02:42:ac:11:00:02",
				"-netdev tap,id=net1-net,vhost=off,fd=9",
				"-netdev tap,id=net2-net,vhost=off,fds=10:11", "-device virtio-net-pci,id=net2,netdev=net2-net,mq=on,vectors=6",
			},
			files: []string{
				"listen /run/vmm/pod1/vmm.sock", "log /run/vmm/pod1/console.log", "listen /run/vmm/pod1/agent.sock",
				"readwrite /dev/vhost-vsock", "dial /run/vmm/pod1/fs.sock", "read /img/a.qcow2",
				"given " + os.DevNull, "given " + os.DevNull, "given " + os.DevNull,
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseConfig()
			tc.edit(&cfg)
			args, files, err := commandLine(&cfg)
			if err != nil {
				t.Fatal(err)
			}
			checkNoDirPaths(t, &cfg, args)
			joined := "\x00" + strings.Join(args, "\x00") + "\x00"
			for _, w := range tc.want {
				if !strings.Contains(joined, "\x00"+strings.Replace(w, " ", "\x00", 1)+"\x00") {
					t.Errorf("missing %q in\n%s", w, strings.Join(args, " "))
				}
			}
			for _, n := range tc.not {
				for _, a := range args {
					if a == n {
						t.Errorf("unexpected %q in %s", n, strings.Join(args, " "))
					}
				}
			}
			var got []string
			for _, f := range files {
				got = append(got, f.String())
			}
			if strings.Join(got, "\n") != strings.Join(tc.files, "\n") {
				t.Errorf("files:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.files, "\n"))
			}
		})
	}
}

// checkNoDirPaths fails when an option of QEMU's command line names a
// path in the VM's directory: QEMU, which may run as a user who cannot
// open it, gets all of it as descriptors. An fd set's opaque label is
// not opened.
func checkNoDirPaths(t *testing.T, cfg *hypervisor.Config, args []string) {
	t.Helper()
	dir := strings.ReplaceAll(cfg.Dir, ",", ",,")
	for _, a := range args {
		for _, opt := range strings.Split(strings.ReplaceAll(a, ",,", "\x00"), ",") {
			opt = strings.ReplaceAll(opt, "\x00", ",,")
			if strings.Contains(opt, dir) && !strings.HasPrefix(opt, "opaque=") {
				t.Errorf("argument %q names a path in the VM's directory %s", a, cfg.Dir)
			}
		}
	}
}

// String is "kind path", for tests.
func (h hostFile) String() string {
	kind := map[fileKind]string{fileGiven: "given", fileListen: "listen", fileDial: "dial", fileLog: "log",
		fileRead: "read", fileReadWrite: "readwrite"}[h.kind]
	if h.kind == fileGiven {
		return kind + " " + h.file.Name()
	}
	return kind + " " + h.path
}

func TestArgsInvalid(t *testing.T) {
	tests := []struct {
		name string
		edit func(c *hypervisor.Config)
		want string
	}{
		{"unresolved accel", func(c *hypervisor.Config) { c.Accel = hypervisor.AccelAuto }, `accelerator "auto"`},
		{"no kernel", func(c *hypervisor.Config) { c.Kernel = "" }, "no kernel"},
		{"too little memory", func(c *hypervisor.Config) { c.MemoryMiB = 16 }, "memory 16 MiB"},
		{"bad device id", func(c *hypervisor.Config) { c.Devices = []hypervisor.Device{&hypervisor.RNG{ID: "1,x"}} }, `device id "1,x"`},
		{"duplicate id", func(c *hypervisor.Config) {
			c.Devices = []hypervisor.Device{&hypervisor.RNG{ID: "a"}, &hypervisor.Console{ID: "a"}}
		}, `"a" used twice`},
		{"virtio-fs without shared memory", func(c *hypervisor.Config) {
			c.Devices = []hypervisor.Device{&hypervisor.VirtioFS{ID: "fs", Tag: "t", SocketPath: "/s"}}
		}, "needs shared memory"},
		{"reserved vsock cid", func(c *hypervisor.Config) {
			c.Devices = []hypervisor.Device{&hypervisor.Vsock{ID: "v", GuestCID: 2}}
		}, "CID 2 is reserved"},
		{"tap with name and files", func(c *hypervisor.Config) {
			c.Devices = []hypervisor.Device{&hypervisor.TapNet{ID: "n", IfName: "tap0", Files: []*os.File{os.Stdin}}}
		}, "either an interface name or open tap files"},
		{"socket path too long", func(c *hypervisor.Config) {
			c.Devices = []hypervisor.Device{&hypervisor.SerialPort{ID: "p", Name: "n", SocketPath: "/" + strings.Repeat("x", 120)}}
		}, "longer than 107 bytes"},
		{"bad block format", func(c *hypervisor.Config) {
			c.Devices = []hypervisor.Device{&hypervisor.Block{ID: "b", Path: "/x", Format: "vmdk"}}
		}, `format "vmdk"`},
		{"unprivileged tap by name", func(c *hypervisor.Config) {
			c.RunAs = &syscall.Credential{Uid: 1 << 30, Gid: 1 << 30}
			c.Devices = []hypervisor.Device{&hypervisor.TapNet{ID: "n", IfName: "tap0"}}
		}, "cannot open a tap by name"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := baseConfig()
			tc.edit(&cfg)
			_, _, err := commandLine(&cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestParseAccel(t *testing.T) {
	for in, want := range map[string]hypervisor.Accel{"": "auto", "auto": "auto", "kvm": "kvm", "tcg": "tcg"} {
		got, err := hypervisor.ParseAccel(in)
		if err != nil || got != want {
			t.Errorf("ParseAccel(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := hypervisor.ParseAccel("hvf"); err == nil {
		t.Error("ParseAccel(hvf) succeeded")
	}
}
