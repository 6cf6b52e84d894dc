package mixednode

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// The runtime handlers, as the install drop-ins name them.
const (
	runcHandler  = "kuasar-runc"
	wasmHandler  = "kuasar-wasm"
	quarkHandler = "kuasar-quark"
	vmmHandler   = "kuasar-vmm"

	// wasmEngineAnnotation is wasm-sandboxer's engine choice
	// (wasmrt.EngineAnnotation; not imported, to keep the hack module off
	// the sandboxer modules).
	wasmEngineAnnotation = "wasm.kuasar-go.io/engine"
	// gvisorPlatformAnnotation is quark-sandboxer's per-pod gVisor platform.
	gvisorPlatformAnnotation = "quark.kuasar-go.io/gvisor-platform"
)

// Real work a busybox container does, with a result the test knows: the sum
// 1..1000 and the SHA-256 of a word.
const (
	workWord  = "kuasar-go"
	workShell = `seq 1 1000 | awk '{s+=$1} END {print "sum=" s}'; printf %s ` + workWord + ` | sha256sum`
	workSum   = "sum=500500\n"
)

func workSHA() string {
	h := sha256.Sum256([]byte(workWord))
	return hex.EncodeToString(h[:]) + "  -\n"
}

// node is a containerd with the four sandboxers, and what the checks need.
type node struct {
	env         *testenv.Env
	guestKernel string // release of the VM's kernel, from its boot header
	fams        []family
	// eventsLink is a symlink to env.Dir through which the sandboxers
	// reach containerd (--containerd-address), so that holdEvents can cut
	// them off its event service.
	eventsLink string
}

// family is one sandbox family's pod of a round: the handler, the pod's
// annotations, its container, the log line that ends its work, and the
// checks of that log.
type family struct {
	name        string
	handler     string
	annotations map[string]string
	container   func() *runtime.ContainerConfig
	done        string
	exitCode    int32 // the container's own exit code; -1: it keeps running
	busybox     bool  // ExecSync of busybox tools works (ip, ping)
	// survivesKill: a SIGKILL of the sandboxer loses no container nor exit
	// status (TestFaultKillSandboxer).
	survivesKill bool
	check        func(t testing.TB, log string)
	// run makes a container of the family that runs cmd: a shell command
	// line, or the wasm test program's commands (see testenv).
	run  func(name string, cmd ...string) *runtime.ContainerConfig
	cmds familyCommands
}

// familyCommands are what the fault tests run in a family's containers.
type familyCommands struct {
	forever, short, late, ticker, after, exec []string
}

var shellCommands = familyCommands{
	forever: []string{"sleep", "3600"},
	short:   []string{"sh", "-c", "sleep 2; exit 42"},
	late:    []string{"sh", "-c", "sleep 25; exit 43"},
	ticker:  []string{"sh", "-c", "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.5; done"},
	after:   []string{"sh", "-c", "echo after-restart"},
	exec:    []string{"sh", "-c", "echo alive; exit 5"},
}

var wasmCommands = familyCommands{
	forever: []string{"forever"},
	short:   []string{"sleep", "2", "exit", "42"},
	late:    []string{"sleep", "25", "exit", "43"},
	ticker:  []string{"ticks"},
	after:   []string{"echo", "after-restart"},
	exec:    []string{"/app.wasm", "echo", "alive", "exit", "5"},
}

func wasmContainer(name string, args ...string) *runtime.ContainerConfig {
	c := testenv.ContainerConfig(name)
	c.Image = &runtime.ImageSpec{Image: testenv.WasmImage}
	c.Command = []string{"/app.wasm"}
	c.Args = args
	return c
}

var (
	wasmOnce sync.Once
	wasmTar  []byte
	wasmErr  error
)

// guestImage is what `make guest` built.
func guestImage(t testing.TB) (kernel, initrd string) {
	out, err := testenv.OutputDir()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(out, "guest", "vmlinuz"), filepath.Join(out, "guest", "initramfs.img")
}

// kernelRelease reads the release from a bzImage's setup header (the
// kernel_version string the boot protocol points to), e.g.
// "6.1.0-56-cloud-amd64".
func kernelRelease(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	hdr := make([]byte, 0x210)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		return "", err
	}
	if string(hdr[0x202:0x206]) != "HdrS" {
		return "", fmt.Errorf("%s: not a bzImage (no HdrS)", path)
	}
	off := int64(binary.LittleEndian.Uint16(hdr[0x20e:])) + 0x200
	buf := make([]byte, 256)
	n, _ := f.ReadAt(buf, off)
	s := string(buf[:n])
	if i := strings.IndexAny(s, " \x00"); i > 0 {
		return s[:i], nil
	}
	return "", fmt.Errorf("%s: no kernel version string at %#x", path, off)
}

// startNode runs containerd with all four sandboxers: runc, wasm
// (wasmtime chosen per pod by annotation, passed through by the handler as
// the install drop-in does), quark with gVisor (systrap) and vmm (QEMU,
// TCG here, the guest image of make guest).
func startNode(t *testing.T) *node {
	t.Helper()
	testenv.RequireRoot(t)
	kernel, initrd := guestImage(t)
	bins := map[string]string{}
	for _, b := range []string{"runc-sandboxer", "wasm-sandboxer", "quark-sandboxer", "vmm-sandboxer", "runsc", "kuasar-holder", "kuasar-wasm-runner"} {
		bins[b] = testenv.Binary(b)
	}
	need := []string{kernel, initrd, "/usr/bin/qemu-system-x86_64"}
	for _, p := range bins {
		need = append(need, p)
	}
	sort.Strings(need)
	testenv.RequireFiles(t, need...)
	testenv.BootsVMs(t)
	release, err := kernelRelease(kernel)
	if err != nil {
		t.Fatal(err)
	}
	wasmOnce.Do(func() { wasmTar, wasmErr = testenv.WasmImageTar() })
	if wasmErr != nil {
		t.Fatalf("build wasm image: %v", wasmErr)
	}
	t0 := time.Now()
	// Made before the env, so removed after it.
	link := filepath.Join(t.TempDir(), "containerd")
	via := []string{"--containerd-address", filepath.Join(link, "containerd.sock.ttrpc")}
	env := testenv.Start(t, testenv.Options{
		Sandboxers: []testenv.Sandboxer{
			{Name: runcHandler, Binary: bins["runc-sandboxer"], Args: via},
			{
				Name: wasmHandler, Binary: bins["wasm-sandboxer"], Args: via,
				RuntimeTOML: "  pod_annotations = [\"wasm.kuasar-go.io/*\"]\n  container_annotations = [\"wasm.kuasar-go.io/*\"]",
			},
			{
				Name: quarkHandler, Binary: bins["quark-sandboxer"], Args: via,
				ConfigTOML: fmt.Sprintf("engine = \"gvisor\"\n[gvisor]\nbinary = %q\nplatform = \"systrap\"\n", bins["runsc"]),
			},
			{
				Name: vmmHandler, Binary: bins["vmm-sandboxer"], Args: via,
				// Below the CRI call's timeout: a slow boot fails with the
				// daemon's error and the guest's console.
				ConfigTOML: fmt.Sprintf("[guest]\nkernel = %q\ninitrd = %q\nboot_timeout_seconds = %d\n", kernel, initrd,
					int((testenv.CallTimeout-20*time.Second)/time.Second)),
			},
		},
		// wasm-sandboxer's compiled-module cache is the daemon's to keep.
		LeakIgnore: []string{`/` + wasmHandler + `/(cache|modules)(/|$)`},
	})
	// Nothing dials it before a pod runs.
	if err := os.Symlink(env.Dir, link); err != nil {
		t.Fatal(err)
	}
	env.ImportImage(t, wasmTar, testenv.WasmImage)
	t.Logf("node: containerd + 4 sandboxers up, images imported in %v", time.Since(t0).Round(time.Millisecond))
	return &node{env: env, guestKernel: release, fams: families(release), eventsLink: link}
}

// holdEvents cuts the sandboxers off containerd's event service until
// release: a test can subscribe to containerd's events before the
// sandboxers deliver what they held meanwhile.
func (n *node) holdEvents(t *testing.T) (release func()) {
	if err := os.Remove(n.eventsLink); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			if err := os.Symlink(n.env.Dir, n.eventsLink); err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(release)
	return release
}

func families(guestKernel string) []family {
	busybox := func(name, extra string) func() *runtime.ContainerConfig {
		return func() *runtime.ContainerConfig {
			return testenv.ContainerConfig(name, "sh", "-c", workShell+"; "+extra+"echo done-"+name+"; exec sleep 3600")
		}
	}
	checkWork := func(t testing.TB, log string) {
		t.Helper()
		if !strings.Contains(log, workSum) || !strings.Contains(log, workSHA()) {
			t.Errorf("the container's work is wrong: want %q and %q in its log:\n%s", workSum, workSHA(), log)
		}
	}
	var host unixName
	_ = host.read()
	return []family{
		{
			name: "runc", handler: runcHandler, container: busybox("runc", ""),
			done: "done-runc\n", exitCode: -1, busybox: true, survivesKill: true,
			run: testenv.ContainerConfig, cmds: shellCommands,
			check: func(t testing.TB, log string) {
				checkWork(t, log)
			},
		},
		{
			name: "wasm", handler: wasmHandler,
			annotations: map[string]string{wasmEngineAnnotation: "wasmtime"},
			container: func() *runtime.ContainerConfig {
				return wasmContainer("wasm", "args", "alloc", "8", "cat", "/etc/greeting", "echo", "done-wasm", "exit", "3")
			},
			done: "done-wasm\n", exitCode: 3, survivesKill: true,
			run: wasmContainer, cmds: wasmCommands,
			check: func(t testing.TB, log string) {
				t.Helper()
				for _, want := range []string{"arg[0]=/app.wasm\n", "arg[2]=alloc\n", "arg[9]=3\n", "allocated 8 MiB\n", testenv.WasmGreeting + "\n"} {
					if !strings.Contains(log, want) {
						t.Errorf("wasm log lacks %q:\n%s", want, log)
					}
				}
			},
		},
		{
			name: "gvisor", handler: quarkHandler,
			annotations: map[string]string{gvisorPlatformAnnotation: "systrap"},
			container:   busybox("gvisor", "dmesg; cat /proc/version; "),
			done:        "done-gvisor\n", exitCode: -1, busybox: true, survivesKill: true,
			run: testenv.ContainerConfig, cmds: shellCommands,
			check: func(t testing.TB, log string) {
				t.Helper()
				checkWork(t, log)
				// gVisor's kernel log, not the host's kernel.
				if !strings.Contains(log, "Starting gVisor") {
					t.Errorf("dmesg in the gVisor pod is not gVisor's:\n%s", log)
				}
				if host.version != "" && strings.Contains(log, host.version) {
					t.Errorf("the gVisor pod sees the host's kernel %q:\n%s", host.version, log)
				}
			},
		},
		{
			name: "vm", handler: vmmHandler, container: busybox("vm", "echo kernel=$(uname -r); cat /proc/version; "),
			done: "done-vm\n", exitCode: -1, busybox: true, survivesKill: true,
			run: testenv.ContainerConfig, cmds: shellCommands,
			check: func(t testing.TB, log string) {
				t.Helper()
				checkWork(t, log)
				if !strings.Contains(log, "kernel="+guestKernel+"\n") {
					t.Errorf("the VM pod does not run the guest kernel %s:\n%s", guestKernel, log)
				}
				if host.release != "" && host.release != guestKernel && strings.Contains(log, "kernel="+host.release+"\n") {
					t.Errorf("the VM pod runs the host's kernel %s", host.release)
				}
			},
		},
	}
}

// podRun is one family's pod of a round.
type podRun struct {
	fam    family
	podID  string
	podCfg *runtime.PodSandboxConfig
	ctrCfg *runtime.ContainerConfig
	ctrID  string
	log    string
	ip     string
	up     time.Duration // RunPodSandbox to the end of the container's work
}

// runPod runs the family's pod and container and waits for its work.
func (n *node) runPod(t testing.TB, f family) *podRun {
	t.Helper()
	env := n.env
	r := &podRun{fam: f, podCfg: env.PodConfig(), ctrCfg: f.container()}
	r.podCfg.Metadata.Name = "mixed-" + f.name + "-" + r.podCfg.Metadata.Uid[:8]
	r.podCfg.LogDirectory = "" // refilled from the new name
	r.podCfg.Hostname = "kuasar-" + f.name
	r.podCfg.Annotations = f.annotations
	t0 := time.Now()
	r.podID = env.RunPod(t, f.handler, r.podCfg)
	r.ctrID = env.CreateStartContainer(t, r.podID, r.podCfg, r.ctrCfg)
	r.log = env.WaitLog(t, r.podCfg, r.ctrCfg, f.done, 150*time.Second)
	if f.exitCode >= 0 {
		if code := env.WaitContainerExited(t, r.ctrID, 60*time.Second); code != f.exitCode {
			t.Errorf("%s container exit code %d, want %d", f.name, code, f.exitCode)
		}
		r.log = env.ReadLog(t, r.podCfg, r.ctrCfg)
	}
	r.up = time.Since(t0)
	f.check(t, r.log)
	return r
}

// runAll runs one pod of every family at the same time and returns when
// each container's work is done; it stops the test on a failure.
func (n *node) runAll(t *testing.T, name string) []*podRun {
	t.Helper()
	runs := make([]*podRun, len(n.fams))
	ok := t.Run(name, func(t *testing.T) {
		for i, f := range n.fams {
			t.Run(f.name, func(t *testing.T) {
				t.Parallel()
				runs[i] = n.runPod(t, f)
			})
		}
	})
	if !ok {
		t.FailNow()
	}
	return runs
}

// removeAll stops and removes the pods, all at once.
func (n *node) removeAll(t *testing.T, name string, runs []*podRun) {
	t.Helper()
	ok := t.Run(name, func(t *testing.T) {
		for _, r := range runs {
			t.Run(r.fam.name, func(t *testing.T) {
				t.Parallel()
				n.env.StopRemovePod(t, r.podID)
			})
		}
	})
	if !ok {
		t.FailNow()
	}
}

// unixName is the host's uname.
type unixName struct{ release, version string }

func (u *unixName) read() error {
	r, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return err
	}
	v, err := os.ReadFile("/proc/sys/kernel/version")
	if err != nil {
		return err
	}
	u.release, u.version = strings.TrimSpace(string(r)), strings.TrimSpace(string(v))
	return nil
}

// daemonFDs describes the open files of this node's daemons (containerd
// and the sandboxers, found by their command lines naming the env's root):
// the total per daemon, and the namespace files (nsfs: net:[...], ...)
// they hold. A namespace a daemon keeps open outlives its pod's netns
// mount, and with it whatever lives in it (a VM pod's tap); the link and
// netns checks of a snapshot cannot see those.
type daemonFDs struct {
	total map[string]int    // daemon -> open fds
	kinds map[string]int    // "daemon kind" -> open fds of that kind (pipe, socket, file path...)
	ns    map[string]string // "daemon fd" -> "net:[4026...]"
}

func (n *node) daemonFDs() daemonFDs {
	d := daemonFDs{total: map[string]int{}, kinds: map[string]int{}, ns: map[string]string{}}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00")
		name := ""
		for i, a := range args {
			switch {
			case a == "--config" && i+1 < len(args) && args[i+1] == filepath.Join(n.env.Dir, "containerd.toml"):
				name = "containerd"
			case a == "--listen" && i+1 < len(args) && strings.HasPrefix(args[i+1], n.env.Dir+"/"):
				name = strings.TrimSuffix(filepath.Base(args[i+1]), ".sock")
			}
		}
		if name == "" {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		d.total[name] += len(fds)
		for _, fd := range fds {
			l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
			d.kinds[name+" "+fdKind(l, n.env.Dir)]++
			if err == nil && strings.HasSuffix(l, "]") && strings.Contains(l, ":[") && !strings.HasPrefix(l, "socket:") &&
				!strings.HasPrefix(l, "pipe:") && !strings.HasPrefix(l, "anon_inode:") {
				d.ns[name+" fd "+fd.Name()] = l
			}
		}
	}
	return d
}

// nsLeaks lists namespace files the daemons hold now and did not before.
func (d daemonFDs) nsLeaks(before daemonFDs) []string {
	var out []string
	for k, v := range d.ns {
		if before.ns[k] != v {
			out = append(out, "namespace fd: "+k+" -> "+v)
		}
	}
	sort.Strings(out)
	return out
}

func (d daemonFDs) String() string {
	var names []string
	for k := range d.total {
		names = append(names, k)
	}
	sort.Strings(names)
	var b strings.Builder
	for i, k := range names {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%s=%d", strings.TrimPrefix(k, "kuasar-"), d.total[k])
	}
	return b.String()
}

// settle waits until nothing is left since before (teardown is partly
// asynchronous) and returns what is still there after timeout.
func (n *node) settle(before *testenv.Snap, fdsBefore daemonFDs, timeout time.Duration) []string {
	deadline := time.Now().Add(timeout)
	for {
		left := before.Diff(n.env.Snapshot())
		left = append(left, n.daemonFDs().nsLeaks(fdsBefore)...)
		left = append(left, n.ipamLeases()...)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kinds counts diff lines by kind ("process", "mount", ...).
func kinds(diff []string) string {
	c := map[string]int{}
	for _, l := range diff {
		k, _, _ := strings.Cut(l, ":")
		c[k]++
	}
	var out []string
	for _, k := range []string{"process", "mount", "netns", "link", "cgroup", "file", "namespace fd", "ipam lease"} {
		out = append(out, fmt.Sprintf("%s %d", k, c[k]))
	}
	return strings.Join(out, ", ")
}

// ipamLeases lists the pod IPs host-local IPAM still holds (one file per
// leased address under its dataDir); CRI releases them at StopPodSandbox.
func (n *node) ipamLeases() []string {
	var out []string
	dir := filepath.Join(n.env.Dir, "cni", "ipam")
	_ = filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil || de.IsDir() {
			return nil
		}
		if name := de.Name(); name == "lock" || strings.HasPrefix(name, "last_reserved_ip") {
			return nil
		}
		out = append(out, "ipam lease: "+p)
		return nil
	})
	return out
}

// fdKind groups an fd's link: "pipe", "socket", "anon_inode:[eventpoll]",
// or a path with ids and the env's root made generic.
func fdKind(link, root string) string {
	if i := strings.Index(link, ":["); i > 0 && !strings.HasPrefix(link, "anon_inode") {
		return link[:i]
	}
	link = strings.ReplaceAll(link, root, "$ROOT")
	return hexID.ReplaceAllString(link, "ID")
}

var hexID = regexp.MustCompile(`[0-9a-f]{64}`)

// grown lists the fd kinds a daemon holds more of than in before.
func (d daemonFDs) grown(before daemonFDs) string {
	var out []string
	for k, v := range d.kinds {
		if v > before.kinds[k] {
			out = append(out, fmt.Sprintf("%s +%d", k, v-before.kinds[k]))
		}
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

// fdLeaks lists the fd kinds a daemon holds more than slack more of than in
// before, pidfds aside: Go's os.Process holds one until it is released or
// collected, so their number follows the daemon's garbage collector (seen
// here: up and down by tens between rounds) and says nothing of a leak.
func (d daemonFDs) fdLeaks(before daemonFDs, slack int) []string {
	var out []string
	for k, v := range d.kinds {
		if !strings.HasSuffix(k, "anon_inode:[pidfd]") && v > before.kinds[k]+slack {
			out = append(out, fmt.Sprintf("open fds: %s: %d, %d after round 1", k, v, before.kinds[k]))
		}
	}
	sort.Strings(out)
	return out
}
