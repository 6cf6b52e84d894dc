package stratovirt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	"go.uber.org/zap/zaptest"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeModeEnv); mode != "" {
		os.Exit(fakeStratoVirt(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeBinary writes a stratovirt script that runs this test binary as the
// fake VMM in mode.
func fakeBinary(t *testing.T, mode string) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "stratovirt")
	if err := os.WriteFile(bin, []byte(fmt.Sprintf("#!/bin/sh\n%s=%s exec %s \"$@\"\n", fakeModeEnv, mode, self)), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// tapFile stands in for an open tap: a file whose path the fake can name.
func tapFile(t *testing.T, name string) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestContractStratoVirtCommandLine(t *testing.T) {
	dir := "/run/vm/pod1"
	tap, tap2 := tapFile(t, "tap-a"), tapFile(t, "tap-b")
	all := []hypervisor.Device{
		&hypervisor.Console{ID: "con0"},
		&hypervisor.RNG{ID: "rng0"},
		&hypervisor.SerialPort{ID: "agent", Name: "agent.0", SocketPath: dir + "/agent.sock"},
		&hypervisor.Vsock{ID: "vsock0", GuestCID: 3},
		&hypervisor.VirtioFS{ID: "fs0", Tag: "kuasar", SocketPath: dir + "/virtiofsd.sock"},
		&hypervisor.Block{ID: "blk0", Path: "/img,1.raw", ReadOnly: true},
		&hypervisor.TapNet{ID: "net0", IfName: "tap0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}},
		&hypervisor.TapNet{ID: "net1", Files: []*os.File{tap}},
	}
	head := "-name kuasar-pod1 -machine type=%s,dump-guest-core=off,mem-share=on -smp 2 -m 512M " +
		"-kernel /boot/vmlinuz -initrd /boot/initrd -append console=ttyS0 quiet "
	qmp := "-qmp unix:/run/vm/pod1/vmm.sock,server,nowait "
	devs := "-chardev file,id=con0,path=/run/vm/pod1/console.log -serial chardev:con0 " +
		"-object rng-random,id=rng0-src,filename=/dev/urandom -device virtio-rng-%[1]s,rng=rng0-src,id=rng0%[2]s " +
		"-device virtio-serial-%[1]s,id=vser0%[3]s " +
		"-chardev socket,id=agent-chr,path=/run/vm/pod1/agent.sock,server,nowait -device virtserialport,chardev=agent-chr,id=agent,name=agent.0 " +
		"-device vhost-vsock-%[1]s,id=vsock0,guest-cid=3%[4]s " +
		"-chardev socket,id=fs0-chr,path=/run/vm/pod1/virtiofsd.sock -device vhost-user-fs-%[1]s,id=fs0,chardev=fs0-chr,tag=kuasar%[5]s " +
		"-drive id=blk0,file=/img,,1.raw,readonly=on,direct=off,format=raw -device virtio-blk-%[1]s,drive=blk0,id=blk0%[6]s " +
		"-netdev tap,id=net0,ifname=tap0 -device virtio-net-%[1]s,netdev=net0,id=net0,mac=02:00:00:00:00:01%[7]s " +
		"-netdev tap,id=net1,fd=3 -device virtio-net-%[1]s,netdev=net1,id=net1%[8]s"
	pci := func(slot int) string { return fmt.Sprintf(",bus=pcie.0,addr=%#x", slot) }
	tests := []struct {
		name    string
		conf    func(*Config)
		vm      func(*hypervisor.Config)
		want    string
		files   []*os.File
		wantErr string
	}{
		{name: "microvm", want: fmt.Sprintf(head, "microvm") + qmp + fmt.Sprintf(devs, "device", "", "", "", "", "", "", ""), files: []*os.File{tap}},
		{name: "q35 with firmware and hot-plug ports",
			conf: func(c *Config) { c.Machine, c.Firmware = MachineQ35, "/usr/share/OVMF/OVMF_CODE.fd" },
			vm:   func(v *hypervisor.Config) { v.HotplugSlots = 2 },
			want: fmt.Sprintf(head, "q35") + "-drive file=/usr/share/OVMF/OVMF_CODE.fd,if=pflash,unit=0,readonly=true " + qmp +
				fmt.Sprintf(devs, "pci", pci(1), pci(2), pci(3), pci(4), pci(5), pci(6), pci(7)) +
				" -device pcie-root-port,port=0x1,addr=0x8,bus=pcie.0,id=hp0 -device pcie-root-port,port=0x2,addr=0x9,bus=pcie.0,id=hp1",
			files: []*os.File{tap}},
		{name: "multi-queue tap", vm: func(v *hypervisor.Config) {
			v.SharedMemory, v.Initrd, v.Cmdline = false, "", ""
			v.Devices = []hypervisor.Device{&hypervisor.TapNet{ID: "net0", Files: []*os.File{tap, tap2}}}
		},
			want:  "-name kuasar-pod1 -machine type=microvm,dump-guest-core=off -smp 2 -m 512M -kernel /boot/vmlinuz " + qmp + "-netdev tap,id=net0,fds=3:4,queues=4 -device virtio-net-device,netdev=net0,id=net0,mq=on",
			files: []*os.File{tap, tap2}},
		{name: "microvm disk slots", vm: func(v *hypervisor.Config) {
			v.Devices = nil
			for i := range 7 {
				v.Devices = append(v.Devices, &hypervisor.Block{ID: fmt.Sprintf("blk%d", i), Path: "/x"})
			}
		}, wantErr: "microvm takes at most 6 disks and 2 NICs (got 7 and 0)"},
		{name: "q35 slots", conf: func(c *Config) { c.Machine = MachineQ35 }, vm: func(v *hypervisor.Config) { v.HotplugSlots = 30 },
			wantErr: "q35 has 31 free slots on pcie.0, the devices and hot-plug ports need 37"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			if tc.conf != nil {
				tc.conf(&c)
			}
			vm := hypervisor.Config{ID: "pod1", Dir: dir, Kernel: "/boot/vmlinuz", Initrd: "/boot/initrd", Cmdline: "console=ttyS0 quiet",
				CPUs: 2, MemoryMiB: 512, SharedMemory: true, Accel: hypervisor.AccelKVM, Devices: all}
			if tc.vm != nil {
				tc.vm(&vm)
			}
			args, files, err := Args(&vm, &c)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			// -append's value has a space: compare the joined line, and the
			// value on its own.
			if got := strings.Join(args, " "); got != tc.want {
				t.Errorf("command line\n got %s\nwant %s", got, tc.want)
			}
			for i, a := range args {
				if a == "-append" && args[i+1] != vm.Cmdline {
					t.Errorf("-append %q, want %q", args[i+1], vm.Cmdline)
				}
			}
			if fmt.Sprint(files) != fmt.Sprint(tc.files) {
				t.Errorf("files %v, want %v", files, tc.files)
			}
		})
	}
}

// newVM makes the driver with the fake in mode, stopped when the test ends.
func newVM(t *testing.T, vm hypervisor.Config, c Config, mode string) *StratoVirt {
	t.Helper()
	c.Binary = fakeBinary(t, mode)
	s, err := New(vm, c, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return s
}

func baseVM(t *testing.T, tap *os.File) hypervisor.Config {
	dir := t.TempDir()
	return hypervisor.Config{
		ID: "pod1", Dir: dir, Kernel: "/boot/vmlinuz", CPUs: 1, MemoryMiB: 256, SharedMemory: true, HotplugSlots: 2,
		Devices: []hypervisor.Device{
			&hypervisor.Console{ID: "con0"},
			&hypervisor.Vsock{ID: "vsock0", GuestCID: 3},
			&hypervisor.VirtioFS{ID: "fs0", Tag: "kuasar", SocketPath: filepath.Join(dir, "virtiofsd.sock")},
			&hypervisor.Block{ID: "blk0", Path: "/var/lib/rootfs.img"},
			&hypervisor.TapNet{ID: "net0", Files: []*os.File{tap}},
		},
	}
}

// exchanges is the journal as "execute arguments-json [fds]" lines after
// the first n, and the argv line.
func exchanges(t *testing.T, dir string, from int) ([]string, command) {
	t.Helper()
	cs, err := readJournal(dir)
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, c := range cs[1+from:] {
		line := c.Execute
		if c.Arguments != nil {
			b, _ := json.Marshal(c.Arguments)
			line += " " + string(b)
		}
		if len(c.FDs) > 0 {
			line += " " + fmt.Sprint(c.FDs)
		}
		s = append(s, line)
	}
	return s, cs[0]
}

func gone(t *testing.T, s *StratoVirt) hypervisor.ExitStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := s.Wait(ctx)
	if err != nil {
		t.Fatalf("the VMM process is still there: %v", err)
	}
	if err := syscall.Kill(s.PID(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("kill(%d, 0) = %v, want ESRCH", s.PID(), err)
	}
	if _, err := os.Stat(s.cfg.ControlSocket()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("QMP socket left behind (%v)", err)
	}
	return st
}

func TestContractStratoVirtLifecycle(t *testing.T) {
	tests := []struct {
		machine string
		// The QMP exchanges of adding blk1, adding net1 (a tap fd), the
		// refused badblk, and removing blk1.
		want []string
	}{
		{machine: MachineMicroVM, want: []string{
			`blockdev-add {"cache":{"direct":false},"driver":"raw","file":{"driver":"file","filename":"/var/lib/data.img"},"node-name":"blk1","read-only":true}`,
			`device_add {"addr":"0x1","drive":"blk1","driver":"virtio-blk-mmio","id":"blk1"}`,
			`getfd {"fdname":"net1-fd0"} [TAP]`,
			`netdev_add {"fd":"net1-fd0","id":"net1"}`,
			`device_add {"addr":"0x1","driver":"virtio-net-mmio","id":"net1","mac":"02:00:00:00:00:02","netdev":"net1"}`,
			`blockdev-add {"cache":{"direct":false},"driver":"raw","file":{"driver":"file","filename":"/x.img"},"node-name":"badblk","read-only":false}`,
			`device_add {"addr":"0x2","drive":"badblk","driver":"virtio-blk-mmio","id":"badblk"}`,
			`blockdev-del {"node-name":"badblk"}`,
			`device_del {"id":"blk1"}`,
			`blockdev-del {"node-name":"blk1"}`,
		}},
		{machine: MachineQ35, want: []string{
			`blockdev-add {"cache":{"direct":false},"driver":"raw","file":{"driver":"file","filename":"/var/lib/data.img"},"node-name":"blk1","read-only":true}`,
			`device_add {"addr":"0x0","bus":"hp0","drive":"blk1","driver":"virtio-blk-pci","id":"blk1"}`,
			`getfd {"fdname":"net1-fd0"} [TAP]`,
			`netdev_add {"fd":"net1-fd0","id":"net1"}`,
			`device_add {"addr":"0x0","bus":"hp1","driver":"virtio-net-pci","id":"net1","mac":"02:00:00:00:00:02","netdev":"net1"}`,
			// Both root ports are taken: the refusal comes before QMP.
			`device_del {"id":"blk1"}`,
			`blockdev-del {"node-name":"blk1"}`,
		}},
	}
	for _, tc := range tests {
		t.Run(tc.machine, func(t *testing.T) {
			tap, tap1 := tapFile(t, "tap-boot"), tapFile(t, "tap-plugged")
			vm := baseVM(t, tap)
			c := DefaultConfig()
			c.Machine = tc.machine
			s := newVM(t, vm, c, modeOK)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			t.Cleanup(cancel)
			if err := s.Start(ctx); err != nil {
				t.Fatal(err)
			}
			if err := s.Ping(ctx); err != nil {
				t.Fatal(err)
			}
			got, first := exchanges(t, vm.Dir, 0)
			if want := []string{"qmp_capabilities", "query-status", "query-status"}; strings.Join(got, "|") != strings.Join(want, "|") {
				t.Errorf("QMP after start %q, want %q", got, want)
			}
			// The process got the command line Args builds, and the tap as fd 3.
			wantArgs, _, _ := Args(&s.cfg, &s.conf)
			if strings.Join(first.Argv, " ") != strings.Join(wantArgs, " ") || first.FD3 != tap.Name() {
				t.Errorf("VMM ran with %q and fd 3 %s, want %q and %s", first.Argv, first.FD3, wantArgs, tap.Name())
			}

			adds := []struct {
				dev     hypervisor.Device
				wantErr string
			}{
				{dev: &hypervisor.Block{ID: "blk1", Path: "/var/lib/data.img", ReadOnly: true}},
				{dev: &hypervisor.TapNet{ID: "net1", Files: []*os.File{tap1}, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}}},
				{dev: &hypervisor.Block{ID: "badblk", Path: "/x.img"}, wantErr: msgAddFailed},
				{dev: &hypervisor.Block{ID: "blk0", Path: "/x.img"}, wantErr: `device "blk0" exists already`},
				{dev: &hypervisor.RNG{ID: "rng1"}, wantErr: "cannot hot-plug a *hypervisor.RNG"},
			}
			if tc.machine == MachineQ35 {
				adds[2].wantErr = "no free blk hot-plug slot (2 in all)"
			}
			for _, a := range adds {
				err := s.AddDevice(ctx, a.dev)
				if a.wantErr == "" && err != nil {
					t.Errorf("add %s: %v", a.dev.DeviceID(), err)
				}
				if a.wantErr != "" && (err == nil || !strings.Contains(err.Error(), a.wantErr)) {
					t.Errorf("add %s: error %v, want one saying %q", a.dev.DeviceID(), err, a.wantErr)
				}
			}
			if err := s.RemoveDevice(ctx, "blk1"); err != nil {
				t.Error(err)
			}
			if err := s.RemoveDevice(ctx, "blk0"); err == nil || !strings.Contains(err.Error(), `no hot-plugged device "blk0"`) {
				t.Errorf("remove of a boot device: %v", err)
			}
			got, _ = exchanges(t, vm.Dir, 3)
			want := strings.ReplaceAll(strings.Join(tc.want, "\n"), "TAP", tap1.Name())
			if strings.Join(got, "\n") != want {
				t.Errorf("hot-plug QMP\n got %s\nwant %s", strings.Join(got, "\n"), want)
			}

			if err := s.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if st := gone(t, s); st.Code != 0 || st.Signal != "" {
				t.Errorf("VMM ended with %s, want exit code 0 after quit", st)
			}
			if got, _ := exchanges(t, vm.Dir, 0); got[len(got)-1] != "quit" {
				t.Errorf("last QMP command %q, want quit", got[len(got)-1])
			}
			if err := s.Ping(ctx); err == nil {
				t.Error("Ping of a stopped VM succeeded")
			}
		})
	}
}

func TestContractStratoVirtStartFails(t *testing.T) {
	tests := []struct {
		mode    string
		timeout time.Duration
		want    []string
		killed  bool
	}{
		{mode: modeExitEarly, want: []string{"exited (exit code 1) before QMP answered", msgNoKVM}},
		{mode: modeNoSocket, timeout: 300 * time.Millisecond, want: []string{"did not answer within 300ms", "qmp_timeout"}, killed: true},
		{mode: modeNotRunning, want: []string{"not running (status paused)"}, killed: true},
	}
	for _, tc := range tests {
		t.Run(tc.mode, func(t *testing.T) {
			c := DefaultConfig()
			if tc.timeout != 0 {
				c.QMPTimeout = hypervisor.Duration(tc.timeout)
			}
			s := newVM(t, baseVM(t, tapFile(t, "tap")), c, tc.mode)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			t.Cleanup(cancel)
			err := s.Start(ctx)
			if err == nil {
				t.Fatal("Start succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if st := gone(t, s); (st.Signal == "killed") != tc.killed {
				t.Errorf("VMM ended with %s; want killed by the driver: %v", st, tc.killed)
			}
		})
	}
}

func TestContractStratoVirtStopKillsAStuckVMM(t *testing.T) {
	s := newVM(t, baseVM(t, tapFile(t, "tap")), DefaultConfig(), modeIgnoreQuit)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer scancel()
	if err := s.Stop(sctx); err != nil {
		t.Fatal(err)
	}
	if st := gone(t, s); st.Signal != "killed" {
		t.Errorf("VMM ended with %s, want killed", st)
	}
}

func TestAgentDialer(t *testing.T) {
	port := &hypervisor.SerialPort{ID: "agent", Name: "agent", SocketPath: "/run/a.sock"}
	tests := []struct {
		name string
		devs []hypervisor.Device
		want string // the dialer's %T and what it dials
	}{
		{"vsock first", []hypervisor.Device{port, &hypervisor.Vsock{ID: "v", GuestCID: 7}}, "*transport.VsockDialer 7"},
		{"serial port", []hypervisor.Device{port}, "*transport.SerialDialer /run/a.sock"},
		{"none", nil, "error"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			vm := hypervisor.Config{ID: "pod1", Dir: t.TempDir(), Kernel: "/k", Devices: tc.devs}
			s, err := New(vm, DefaultConfig(), nil)
			if err != nil {
				t.Fatal(err)
			}
			d, err := s.AgentDialer()
			got := "error"
			switch d := d.(type) {
			case *transport.VsockDialer:
				got = fmt.Sprintf("%T %d", d, d.CID)
			case *transport.SerialDialer:
				got = fmt.Sprintf("%T %s", d, d.SocketPath)
			}
			if got != tc.want || (got == "error") != (err != nil) {
				t.Errorf("dialer %s (error %v), want %s", got, err, tc.want)
			}
		})
	}
}

func TestConfig(t *testing.T) {
	tests := []struct {
		name, toml string
		want       string // "" means valid
		check      func(Config) bool
	}{
		{name: "defaults", check: func(c Config) bool { return c == DefaultConfig() }},
		{name: "q35", toml: "machine = \"q35\"\nfirmware = \"/fw.fd\"\nqmp_timeout = \"2s\"\ncpus = 2\nmemory_mib = 1024\nbinary = \"/opt/sv\"\n",
			check: func(c Config) bool {
				return c.Machine == MachineQ35 && c.Firmware == "/fw.fd" && time.Duration(c.QMPTimeout) == 2*time.Second && c.CPUs == 2 && c.MemoryMiB == 1024 && c.Binary == "/opt/sv"
			}},
		{name: "zero cpus", toml: "cpus = 0", want: "stratovirt.cpus 0: want 1 to 254"},
		{name: "small memory", toml: "memory_mib = 100", want: "stratovirt.memory_mib 100: want at least 128"},
		{name: "machine", toml: `machine = "pc"`, want: `stratovirt.machine "pc": want microvm or q35`},
		{name: "microvm firmware", toml: `firmware = "/fw.fd"`, want: "stratovirt.firmware: only the q35 machine"},
		{name: "zero timeout", toml: `qmp_timeout = "0s"`, want: "stratovirt.qmp_timeout 0s"},
		{name: "unknown key", toml: `api_socket_timeout = "1s"`, want: "missing in the target struct"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			dec := toml.NewDecoder(strings.NewReader(tc.toml))
			dec.DisallowUnknownFields()
			err := dec.Decode(&c)
			if err == nil {
				err = c.Validate()
			}
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !tc.check(c) {
					t.Fatalf("decoded %+v", c)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}
