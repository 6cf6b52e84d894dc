package cloudhypervisor

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
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor/chapi"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeModeEnv); mode != "" {
		os.Exit(fakeCH(mode, os.Args[1:]))
	}
	os.Exit(m.Run())
}

// specPath is the project's copy of the API description, beside the repo.
const specPath = "../../../../shared/specs/cloud-hypervisor-v53.0.openapi.yaml"

// fakeBinary writes a cloud-hypervisor script that runs this test binary
// as the fake VMM in mode.
func fakeBinary(t *testing.T, mode string) string {
	t.Helper()
	spec, err := filepath.Abs(specPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(spec); err != nil {
		t.Fatalf("API description: %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "cloud-hypervisor")
	script := fmt.Sprintf("#!/bin/sh\n%s=%s %s=%s exec %s \"$@\"\n", fakeModeEnv, mode, fakeSpecEnv, spec, self)
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// vmConfig is a VM with every device kind the driver boots with.
func vmConfig(t *testing.T, tap *os.File) hypervisor.Config {
	dir := t.TempDir()
	return hypervisor.Config{
		ID: "pod1", Dir: dir,
		Kernel: "/boot/vmlinuz", Initrd: "/boot/initrd", Cmdline: "console=ttyS0 quiet",
		CPUs: 2, MemoryMiB: 512, SharedMemory: true,
		Devices: []hypervisor.Device{
			&hypervisor.Console{ID: "con0"},
			&hypervisor.RNG{ID: "rng0"},
			&hypervisor.Vsock{ID: "vsock0", GuestCID: 3},
			&hypervisor.VirtioFS{ID: "fs0", Tag: "kuasar", SocketPath: filepath.Join(dir, "virtiofsd.sock")},
			&hypervisor.Block{ID: "blk0", Path: "/var/lib/rootfs.img", ReadOnly: true},
			&hypervisor.TapNet{ID: "net0", IfName: "tap0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}},
			&hypervisor.TapNet{ID: "net1", Files: []*os.File{tap}},
		},
	}
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

// newVM makes the driver for vm with the fake in mode, and stops it when
// the test ends.
func newVM(t *testing.T, vm hypervisor.Config, mode string, timeout time.Duration) *CloudHypervisor {
	t.Helper()
	c := DefaultConfig()
	c.Binary = fakeBinary(t, mode)
	c.APISocketTimeout = hypervisor.Duration(timeout)
	h, err := New(vm, c, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := h.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return h
}

// checkJournal fails the test for every exchange that broke the API
// description and returns the exchanges.
func checkJournal(t *testing.T, dir string) []exchange {
	t.Helper()
	exs, err := readJournal(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, ex := range exs {
		if ex.Invalid != "" {
			t.Errorf("%s %s broke the API description: %s", ex.Method, ex.Path, ex.Invalid)
		}
	}
	return exs
}

// calls lists the exchanges as "METHOD op", vmm.ping polls left out.
func calls(exs []exchange) []string {
	var s []string
	for _, ex := range exs {
		if op := strings.TrimPrefix(ex.Path, "/api/v1/"); op != "vmm.ping" {
			s = append(s, ex.Method+" "+op)
		}
	}
	return s
}

func last(t *testing.T, exs []exchange, op string) exchange {
	t.Helper()
	for i := len(exs) - 1; i >= 0; i-- {
		if exs[i].Path == "/api/v1/"+op {
			return exs[i]
		}
	}
	t.Fatalf("no %s in %v", op, calls(exs))
	return exchange{}
}

// gone checks that nothing of the VMM is left: the process reaped and its
// sockets removed.
func gone(t *testing.T, h *CloudHypervisor) hypervisor.ExitStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := h.Wait(ctx)
	if err != nil {
		t.Fatalf("the VMM process is still there: %v", err)
	}
	if err := syscall.Kill(h.PID(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("kill(%d, 0) = %v, want ESRCH", h.PID(), err)
	}
	for _, p := range []string{h.cfg.ControlSocket(), h.VsockSocket()} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", p, err)
		}
	}
	return st
}

func TestContractCloudHypervisorLifecycle(t *testing.T) {
	tap := tapFile(t, "tap-net1")
	vm := vmConfig(t, tap)
	h := newVM(t, vm, modeOK, 10*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)

	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if h.PID() == 0 {
		t.Fatal("no PID after Start")
	}
	if err := h.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	exs := checkJournal(t, vm.Dir)
	want := []string{"PUT vm.create", "PUT vm.add-net", "PUT vm.boot", "GET vm.info", "GET vm.info"}
	if got := calls(exs); strings.Join(got, ", ") != strings.Join(want, ", ") {
		t.Fatalf("calls %v, want %v", got, want)
	}
	if exs[0].Path != "/api/v1/vmm.ping" {
		t.Errorf("first call %s %s, want the vmm.ping that waits for the API", exs[0].Method, exs[0].Path)
	}

	var got chapi.VmConfig
	if err := json.Unmarshal(last(t, exs, "vm.create").Body, &got); err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"kernel", *got.Payload.Kernel, vm.Kernel},
		{"initramfs", *got.Payload.Initramfs, vm.Initrd},
		{"cmdline", *got.Payload.Cmdline, vm.Cmdline},
		{"vcpus", [2]int{got.Cpus.BootVcpus, got.Cpus.MaxVcpus}, [2]int{2, 2}},
		{"memory", got.Memory.Size, int64(512 << 20)},
		{"shared memory", *got.Memory.Shared, true},
		{"serial", fmt.Sprint(got.Serial.Mode, " ", *got.Serial.File), "File " + vm.ConsoleLog()},
		{"console", fmt.Sprint(got.Console.Mode, " ", *got.Console.File), "File " + h.VirtioConsoleLog()},
		{"rng", got.Rng.Src, "/dev/urandom"},
		{"vsock", fmt.Sprint(got.Vsock.Cid, " ", got.Vsock.Socket), "3 " + h.VsockSocket()},
		{"fs", fmt.Sprint(len(*got.Fs), " ", (*got.Fs)[0].Tag, " ", (*got.Fs)[0].Socket), "1 kuasar " + filepath.Join(vm.Dir, "virtiofsd.sock")},
		{"disk", fmt.Sprint(len(*got.Disks), " ", *(*got.Disks)[0].Path, " ", *(*got.Disks)[0].Readonly, " ", *(*got.Disks)[0].ImageType), "1 /var/lib/rootfs.img true Raw"},
		// The tap by name is in vm.create; the one by fd came with vm.add-net.
		{"net", fmt.Sprint(len(*got.Net), " ", *(*got.Net)[0].Tap, " ", *(*got.Net)[0].Mac), "1 tap0 02:00:00:00:00:01"},
		{"tap fd", strings.Join(last(t, exs, "vm.add-net").FDs, ","), tap.Name()},
		{"tap fd queues", string(last(t, exs, "vm.add-net").Body), `{"id":"net1","num_queues":2}`},
	}
	for _, c := range checks {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("vm.create %s: %v, want %v", c.what, c.got, c.want)
		}
	}

	// Hot-plug: the driver's calls, and the VMM's refusals named.
	tap2, tap3 := tapFile(t, "tap-a"), tapFile(t, "tap-b")
	plugs := []struct {
		dev     hypervisor.Device
		op      string
		fds     string
		wantErr string
	}{
		{dev: &hypervisor.Block{ID: "blk1", Path: "/var/lib/data.qcow2", Format: "qcow2"}, op: "vm.add-disk"},
		{dev: &hypervisor.TapNet{ID: "net2", Files: []*os.File{tap2, tap3}}, op: "vm.add-net", fds: tap2.Name() + "," + tap3.Name()},
		{dev: &hypervisor.VirtioFS{ID: "fs1", Tag: "more", SocketPath: filepath.Join(vm.Dir, "v2.sock")}, op: "vm.add-fs"},
		{dev: &hypervisor.Block{ID: "blk2", Path: "/missing.img"}, wantErr: "HTTP 500 Internal Server Error: " + msgAddDisk},
		{dev: &hypervisor.Block{ID: "blk0", Path: "/x.img"}, wantErr: `device "blk0" exists already`},
		{dev: &hypervisor.RNG{ID: "rng1"}, wantErr: "cannot hot-plug a *hypervisor.RNG"},
		{dev: &hypervisor.Block{ID: "bad id"}, wantErr: `device id "bad id"`},
	}
	for _, p := range plugs {
		err := h.AddDevice(ctx, p.dev)
		if p.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), p.wantErr) {
				t.Errorf("add %s: error %v, want one saying %q", p.dev.DeviceID(), err, p.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("add %s: %v", p.dev.DeviceID(), err)
			continue
		}
		ex := last(t, checkJournal(t, vm.Dir), p.op)
		if ex.Status != 200 || !strings.Contains(string(ex.Body), `"id":"`+p.dev.DeviceID()+`"`) || strings.Join(ex.FDs, ",") != p.fds {
			t.Errorf("add %s: fake got %s %s fds %v and answered %d", p.dev.DeviceID(), ex.Path, ex.Body, ex.FDs, ex.Status)
		}
	}
	// A refused device is not kept: the same ID can come again.
	if err := h.AddDevice(ctx, &hypervisor.Block{ID: "blk2", Path: "/var/lib/b.img"}); err != nil {
		t.Errorf("add blk2 after a refusal: %v", err)
	}

	removes := []struct {
		id, wantErr string
	}{
		{id: "blk1"},
		{id: "blk1", wantErr: `no hot-plugged device "blk1"`},
		{id: "blk0", wantErr: `no hot-plugged device "blk0"`},
	}
	for _, r := range removes {
		err := h.RemoveDevice(ctx, r.id)
		if r.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), r.wantErr) {
				t.Errorf("remove %s: error %v, want one saying %q", r.id, err, r.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("remove %s: %v", r.id, err)
		}
		if ex := last(t, checkJournal(t, vm.Dir), "vm.remove-device"); string(ex.Body) != `{"id":"`+r.id+`"}` || ex.Status != 204 {
			t.Errorf("remove %s: fake got %s and answered %d", r.id, ex.Body, ex.Status)
		}
	}

	if err := h.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if st := gone(t, h); st.Code != 0 || st.Signal != "" {
		t.Errorf("VMM ended with %s, want exit code 0 after vmm.shutdown", st)
	}
	tail := calls(checkJournal(t, vm.Dir))
	if got := strings.Join(tail[len(tail)-2:], ", "); got != "PUT vm.shutdown, PUT vmm.shutdown" {
		t.Errorf("Stop called %s, want vm.shutdown then vmm.shutdown", got)
	}
	if err := h.Ping(ctx); err == nil {
		t.Error("Ping of a stopped VM succeeded")
	}
	if err := h.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestContractCloudHypervisorStartFails(t *testing.T) {
	tests := []struct {
		mode    string
		timeout time.Duration
		want    []string // what the error must say
		killed  bool     // the driver had to kill the VMM
	}{
		{mode: modeFailCreate, want: []string{"vm.create", "HTTP 500 Internal Server Error", msgCreate}, killed: true},
		{mode: modeFailBoot, want: []string{"vm.boot", "HTTP 500 Internal Server Error", msgBoot}, killed: true},
		{mode: modeNoSocket, timeout: 300 * time.Millisecond, want: []string{"did not answer within 300ms", "api_socket_timeout"}, killed: true},
		{mode: modeExitEarly, want: []string{"exited (exit code 1) before its API answered", msgNoKVM}},
	}
	for _, tc := range tests {
		t.Run(tc.mode, func(t *testing.T) {
			vm := vmConfig(t, tapFile(t, "tap"))
			if tc.timeout == 0 {
				tc.timeout = 10 * time.Second
			}
			h := newVM(t, vm, tc.mode, tc.timeout)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			t.Cleanup(cancel)
			err := h.Start(ctx)
			if err == nil {
				t.Fatal("Start succeeded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			st := gone(t, h)
			if killed := st.Signal == "killed"; killed != tc.killed {
				t.Errorf("VMM ended with %s; killed by the driver: %v, want %v", st, killed, tc.killed)
			}
			if tc.mode != modeNoSocket && tc.mode != modeExitEarly {
				checkJournal(t, vm.Dir)
			}
		})
	}
}

func TestContractCloudHypervisorStopKillsAStuckVMM(t *testing.T) {
	vm := vmConfig(t, tapFile(t, "tap"))
	h := newVM(t, vm, modeIgnoreShutdown, 10*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	if err := h.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer scancel()
	if err := h.Stop(sctx); err != nil {
		t.Fatal(err)
	}
	if st := gone(t, h); st.Signal != "killed" {
		t.Errorf("VMM ended with %s, want killed", st)
	}
	checkJournal(t, vm.Dir)
}

func TestContractCloudHypervisorAgentDialer(t *testing.T) {
	vm := vmConfig(t, tapFile(t, "tap"))
	c := DefaultConfig()
	h, err := New(vm, c, nil)
	if err != nil {
		t.Fatal(err)
	}
	d, err := h.AgentDialer()
	if err != nil {
		t.Fatal(err)
	}
	if hv, ok := d.(*transport.HybridVsockDialer); !ok || hv.SocketPath != h.VsockSocket() {
		t.Errorf("agent dialer %#v, want hybrid vsock on %s", d, h.VsockSocket())
	}
	vm.Devices = vm.Devices[:2]
	if h, err = New(vm, c, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := h.AgentDialer(); err == nil {
		t.Error("agent dialer without a vsock device")
	}
}

func TestNewRejects(t *testing.T) {
	base := func(t *testing.T) hypervisor.Config { return vmConfig(t, tapFile(t, "tap")) }
	tests := []struct {
		name string
		edit func(*hypervisor.Config)
		want string
	}{
		{"tcg", func(c *hypervisor.Config) { c.Accel = hypervisor.AccelTCG }, "kvm only"},
		{"serial port", func(c *hypervisor.Config) {
			c.Devices = append(c.Devices, &hypervisor.SerialPort{ID: "agent", Name: "agent", SocketPath: "/tmp/a.sock"})
		}, "no virtio-serial ports"},
		{"two vsocks", func(c *hypervisor.Config) {
			c.Devices = append(c.Devices, &hypervisor.Vsock{ID: "vsock1", GuestCID: 4})
		}, "one vsock device"},
		{"small memory", func(c *hypervisor.Config) { c.MemoryMiB = 100 }, "memory 100 MiB: want at least 128"},
		{"no kernel", func(c *hypervisor.Config) { c.Kernel = "" }, "no kernel"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			vm := base(t)
			tc.edit(&vm)
			_, err := New(vm, DefaultConfig(), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New: %v, want an error saying %q", err, tc.want)
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
		{name: "all keys", toml: "binary = \"/opt/ch/cloud-hypervisor\"\napi_socket_timeout = \"3s\"\ncpus = 4\nmemory_mib = 2048\n",
			check: func(c Config) bool {
				return c.Binary == "/opt/ch/cloud-hypervisor" && time.Duration(c.APISocketTimeout) == 3*time.Second && c.CPUs == 4 && c.MemoryMiB == 2048
			}},
		{name: "zero cpus", toml: "cpus = 0", want: "cloud_hypervisor.cpus 0: want at least 1"},
		{name: "small memory", toml: "memory_mib = 64", want: "cloud_hypervisor.memory_mib 64: want at least 128"},
		{name: "no binary", toml: `binary = ""`, want: "cloud_hypervisor.binary: empty"},
		{name: "zero timeout", toml: `api_socket_timeout = "0s"`, want: "cloud_hypervisor.api_socket_timeout 0s"},
		{name: "bad timeout", toml: `api_socket_timeout = "soon"`, want: `duration "soon"`},
		{name: "unknown key", toml: `machine = "q35"`, want: "missing in the target struct"},
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
