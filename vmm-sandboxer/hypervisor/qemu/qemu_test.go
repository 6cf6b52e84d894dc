package qemu

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/virtiofs"
)

// needQEMU skips when Debian's qemu-system-x86 is not installed.
func needQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath(DefaultBinary); err != nil {
		t.Skipf("%s not installed (Debian package qemu-system-x86; make deps installs it)", DefaultBinary)
	}
}

// haltKernel writes the smallest guest QEMU boots with -kernel: a multiboot
// image whose code disables interrupts and halts forever. The VM runs (QMP
// says so) but costs no CPU, which is all the driver tests need. Anyone can
// read it, as an unprivileged QEMU must.
func haltKernel(t *testing.T) string {
	t.Helper()
	const load = 0x100000
	var img [36]byte
	h := []uint32{
		0x1BADB002,                              // magic
		0x00010000,                              // flags: the address fields below are valid
		-(0x1BADB002 + 0x00010000) & 0xffffffff, // checksum
		load,                                    // header_addr
		load,                                    // load_addr
		0,                                       // load_end_addr: the whole file
		0,                                       // bss_end_addr: none
		load + 32,                               // entry_addr: right after the header
	}
	for i, v := range h {
		binary.LittleEndian.PutUint32(img[4*i:], v)
	}
	copy(img[32:], []byte{0xFA, 0xF4, 0xEB, 0xFD}) // cli; hlt; jmp hlt
	// Not in t.TempDir(), whose top directory is root's alone.
	dir, err := os.MkdirTemp("", "kuasar-qemu-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := filepath.Join(dir, "halt.bin")
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, img[:], 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// testUser is a user that owns nothing on this host, for an unprivileged
// QEMU: each test package run picks its own from the PID, so that
// packages tested at once do not share one.
func testUser(t *testing.T) *syscall.Credential {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run QEMU as another user")
	}
	id := uint32(0x7b000000 + os.Getpid())
	return &syscall.Credential{Uid: id, Gid: id}
}

// startVM starts a halted VM and stops it at the test's end, checking that
// neither the process nor the control socket is left behind.
func startVM(t *testing.T, edit func(*hypervisor.Config)) *QEMU {
	t.Helper()
	needQEMU(t)
	cfg := hypervisor.Config{
		ID: "test", Dir: t.TempDir(), Kernel: haltKernel(t), CPUs: 1, MemoryMiB: 64,
		Accel: hypervisor.AccelTCG, HotplugSlots: 1,
		Devices: []hypervisor.Device{&hypervisor.Console{ID: "console"}},
	}
	if edit != nil {
		edit(&cfg)
	}
	vm, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := vm.Start(ctx); err != nil {
		t.Fatal(err)
	}
	pid := vm.PID()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := vm.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("qemu pid %d still exists after Stop (kill 0: %v)", pid, err)
		}
		if _, err := os.Stat(cfg.ControlSocket()); !os.IsNotExist(err) {
			t.Errorf("control socket left behind: %v", err)
		}
	})
	return vm
}

func TestQEMUStartPingStop(t *testing.T) {
	vm := startVM(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := vm.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	c, err := vm.QMP()
	if err != nil {
		t.Fatal(err)
	}
	if c.Version == "" || c.Version == "0.0.0" {
		t.Errorf("QMP greeting version %q", c.Version)
	}
	// A command QEMU rejects comes back as a QMPError naming the class.
	_, err = c.Execute(ctx, "no-such-command", nil)
	var qe *QMPError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command: got %v, want a CommandNotFound QMPError", err)
	}
	// Commands answer concurrently and each gets its own reply.
	errs := make(chan error, 16)
	for i := 0; i < 16; i++ {
		go func() {
			r, err := c.Execute(ctx, "query-name", nil)
			if err == nil {
				var n struct{ Name string }
				if err = json.Unmarshal(r, &n); err == nil && n.Name != "kuasar-test" {
					err = errors.New("query-name: " + string(r))
				}
			}
			errs <- err
		}()
	}
	for i := 0; i < 16; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := vm.Wait(ctx)
	if err != nil || st.Code != 0 || st.Signal != "" {
		t.Fatalf("after quit: status %v, err %v; want exit code 0", st, err)
	}
	if err := vm.Ping(ctx); err == nil {
		t.Fatal("ping after stop succeeded")
	}
}

// TestQEMUUnprivileged runs QEMU as a user of its own: without
// capabilities, under its seccomp filter, and unable to open anything of
// the VM's directory, which it gets as descriptors.
func TestQEMUUnprivileged(t *testing.T) {
	user := testUser(t)
	vm := startVM(t, func(c *hypervisor.Config) { c.RunAs = user })
	fields := testenv.ProcStatus(t, vm.PID())
	id := fmt.Sprint(user.Uid)
	for k, want := range map[string]string{
		"Uid": strings.Repeat(id+" ", 3) + id, "Gid": strings.Repeat(id+" ", 3) + id, "Groups": "",
		"CapPrm": "0000000000000000", "CapEff": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2",
	} {
		if fields[k] != want {
			t.Errorf("QEMU's %s: %q, want %q", k, fields[k], want)
		}
	}
	// A network namespace of its own.
	self, _ := os.Readlink("/proc/self/ns/net")
	if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", vm.PID())); err != nil || ns == self {
		t.Errorf("QEMU's network namespace %q (%v) is the host's", ns, err)
	}
	// The console it writes to, through a descriptor.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := vm.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	cfg := vm.Config()
	for _, p := range []string{cfg.Dir, cfg.ConsoleLog(), cfg.ControlSocket()} {
		cmd := exec.Command("cat", p)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: user}
		if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "Permission denied") {
			t.Errorf("QEMU's user reads %s: %v %s", p, err, out)
		}
	}
}

func TestQEMUHotplug(t *testing.T) {
	t.Run("root", func(t *testing.T) { testHotplug(t, nil) })
	t.Run("unprivileged", func(t *testing.T) { testHotplug(t, testUser(t)) })
}

// testHotplug plugs and unplugs devices, which QEMU gets open over QMP.
func testHotplug(t *testing.T, runAs *syscall.Credential) {
	dir := t.TempDir()
	vm := startVM(t, func(c *hypervisor.Config) {
		c.RunAs, c.HotplugSlots, c.SharedMemory = runAs, 2, true
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A virtio-fs device: QEMU gets a connection to virtiofsd, whose
	// socket it could not open itself, and negotiates with it at once.
	share := filepath.Join(dir, "share")
	if err := os.Mkdir(share, 0o700); err != nil {
		t.Fatal(err)
	}
	fsd, err := virtiofs.Start(ctx, virtiofs.Config{SocketPath: filepath.Join(dir, "fs.sock"), SharedDir: share}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fsd.Stop(context.Background()) })
	if err := vm.AddDevice(ctx, &hypervisor.VirtioFS{ID: "fs1", Tag: "t", SocketPath: filepath.Join(dir, "fs.sock")}); err != nil {
		t.Fatal(err)
	}

	// A virtio-serial port: its host socket appears, and it unplugs
	// without the guest's help.
	sock := filepath.Join(dir, "port.sock")
	port := &hypervisor.SerialPort{ID: "port1", Name: "test.port", SocketPath: sock}
	if err := vm.AddDevice(ctx, port); err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("hot-plugged port's socket: %v", err)
	}
	conn.Close()
	if err := vm.AddDevice(ctx, port); err == nil || !strings.Contains(err.Error(), "already plugged") {
		t.Fatalf("adding the port twice: %v", err)
	}
	if err := vm.RemoveDevice(ctx, "port1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an unplugged port's socket is left: %v", err)
	}

	// A block device takes the last hot-plug slot.
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	// A failed plug frees its slot: a missing file fails before QEMU
	// hears of it; a raw image taken for qcow2 fails at its second
	// blockdev-add, and the steps before are undone (the file's node and
	// its fd set).
	err = vm.AddDevice(ctx, &hypervisor.Block{ID: "disk2", Path: filepath.Join(dir, "missing.img")})
	if err == nil || !strings.Contains(err.Error(), "missing.img") {
		t.Fatalf("plugging a missing file: %v", err)
	}
	err = vm.AddDevice(ctx, &hypervisor.Block{ID: "disk3", Path: img, Format: "qcow2"})
	if err == nil || !strings.Contains(err.Error(), "qcow2") {
		t.Fatalf("plugging a raw image as qcow2: %v", err)
	}
	c, _ := vm.QMP()
	if r, err := c.Execute(ctx, "query-fdsets", nil); err != nil || strings.Contains(string(r), img) {
		t.Fatalf("fd sets after a failed plug: %s, %v; want none of %s", r, err, img)
	}
	if err := vm.AddDevice(ctx, &hypervisor.Block{ID: "disk0", Path: img}); err != nil {
		t.Fatal(err)
	}
	r, err := c.Execute(ctx, "query-block", nil)
	if err != nil || !strings.Contains(string(r), `"disk0-fmt"`) {
		t.Fatalf("query-block after plugging disk0: %s, %v", r, err)
	}
	err = vm.AddDevice(ctx, &hypervisor.Block{ID: "disk1", Path: img})
	if err == nil || !strings.Contains(err.Error(), "no free hot-plug slot") {
		t.Fatalf("a disk with no slot left: %v", err)
	}
	// PCIe unplug needs the guest's consent, which a halted guest never
	// gives: RemoveDevice says so when its context ends.
	short, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel2()
	err = vm.RemoveDevice(short, "disk0")
	if err == nil || !strings.Contains(err.Error(), "guest did not release") {
		t.Fatalf("unplug without a guest: %v", err)
	}
	if err := vm.AddDevice(ctx, &hypervisor.Console{ID: "c2"}); err == nil {
		t.Fatal("hot-plugging a console succeeded")
	}
}

func TestQEMUStartErrors(t *testing.T) {
	needQEMU(t)
	tests := []struct {
		name string
		edit func(*hypervisor.Config)
		want string
	}{
		{"missing kernel file", func(c *hypervisor.Config) { c.Kernel = "/nonexistent/vmlinuz" }, "/nonexistent/vmlinuz"},
		{"missing binary", func(c *hypervisor.Config) { c.Binary = "/nonexistent/qemu" }, "/nonexistent/qemu"},
		{"unprivileged, a kernel only root can read", func(c *hypervisor.Config) {
			c.RunAs = testUser(t)
			c.Kernel = filepath.Join(c.Dir, "vmlinuz")
			if err := os.WriteFile(c.Kernel, []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}, "cannot read the guest image: directory "},
		{"unknown virtiofs socket", func(c *hypervisor.Config) {
			c.SharedMemory = true
			c.Devices = []hypervisor.Device{&hypervisor.VirtioFS{ID: "fs", Tag: "t", SocketPath: filepath.Join(c.Dir, "nofs.sock")}}
		}, "nofs.sock"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := hypervisor.Config{ID: "bad", Dir: t.TempDir(), Kernel: haltKernel(t), CPUs: 1, MemoryMiB: 64, Accel: hypervisor.AccelTCG}
			tc.edit(&cfg)
			vm, err := New(cfg, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err = vm.Start(ctx)
			if err == nil {
				vm.Stop(ctx)
				t.Fatal("start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not name %q", err, tc.want)
			}
			if pid := vm.PID(); pid != 0 {
				if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
					t.Errorf("qemu pid %d left running after a failed start", pid)
				}
			}
			if _, err := os.Stat(cfg.ControlSocket()); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("control socket left after a failed start: %v", err)
			}
		})
	}
}

// TestProbeKVM boots the installed Debian kernel under KVM with a short
// limit. Here (a nested host where guests hang under KVM) it answers no
// with a reason; on a host with working KVM it answers yes. Either way it
// leaves no process behind.
func TestProbeKVM(t *testing.T) {
	needQEMU(t)
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(kernels) == 0 {
		t.Skip("no kernel in /boot (Debian package linux-image-cloud-amd64)")
	}
	ctx := context.Background()
	t0 := time.Now()
	ok, reason, err := ProbeKVM(ctx, "", kernels[0], 4*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kvm usable: %v (%s) after %s", ok, reason, time.Since(t0).Round(time.Millisecond))
	if ok == (reason != "") {
		t.Fatalf("ok=%v with reason %q", ok, reason)
	}
	a, why, err := ResolveAccel(ctx, hypervisor.AccelTCG, "", kernels[0], time.Second)
	if err != nil || a != hypervisor.AccelTCG || why != "configured" {
		t.Fatalf("configured tcg resolved to %q (%s, %v)", a, why, err)
	}
	out, _ := exec.Command("pgrep", "-f", "accel=kvm.*"+kernels[0]).Output()
	if len(strings.TrimSpace(string(out))) != 0 {
		t.Fatalf("probe left qemu running: pids %s", out)
	}
}
