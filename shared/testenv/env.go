package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Sandboxer is a sandboxer daemon to run beside containerd.
type Sandboxer struct {
	// Name is the proxy plugin name, the CRI runtime handler name and the
	// socket's base name (<dir>/<Name>.sock), e.g. "kuasar-runc".
	Name string
	// Binary is the daemon's path.
	Binary string
	// Args are appended after the standard flags (--listen, --dir,
	// --containerd-address, --log-level debug).
	Args []string
	// Env is added to the daemon's environment.
	Env []string
	// RuntimeType defaults to "io.containerd.<Name>.v1".
	RuntimeType string
	// RuntimeTOML is extra TOML put inside the runtime handler's table.
	RuntimeTOML string
	// ConfigTOML, when set, is written to <dir>/<Name>.toml and passed as
	// --config.
	ConfigTOML string
}

// Options configure Start.
type Options struct {
	Sandboxers []Sandboxer
	// ExtraTOML is appended to containerd's config.
	ExtraTOML string
	// LogLevel of containerd; default "debug".
	LogLevel string
	// StartTimeout bounds the wait for each socket and for CRI readiness;
	// default 30s.
	StartTimeout time.Duration
	// NoImages skips importing the busybox and pause images.
	NoImages bool
	// LeakIgnore are regular expressions; Diff lines of env.Snapshot()s
	// matching one are not leaks (e.g. a state file a sandboxer creates on
	// its first pod and keeps).
	LeakIgnore []string
}

// Env is a running containerd (plus sandboxers) in a temporary root.
type Env struct {
	Dir          string // temporary root, /tmp/kg-*
	Address      string // containerd gRPC socket
	TTRPCAddress string // containerd ttrpc socket
	Bridge       string // CNI bridge name
	Subnet       string // CNI subnet, 10.233.X.0/24
	Gateway      string // bridge address, 10.233.X.1
	NetNSDir     string // where CRI mounts pod network namespaces
	PodLogDir    string // parent of the pods' log directories
	RuncRoot     string // runc --root of the stock runc runtime
	OutputDir    string // _output with bin/ and cni/bin/

	Runtime runtime.RuntimeServiceClient
	Images  runtime.ImageServiceClient
	Conn    *grpc.ClientConn

	// Sandboxers by name: socket and state directory.
	SandboxerSockets map[string]string
	SandboxerDirs    map[string]string

	// StartDuration is how long containerd took from exec to CRI ready.
	StartDuration time.Duration

	t        testing.TB
	procs    []*daemon
	mu       sync.Mutex
	ids      map[string]bool // pod and container ids seen
	baseline *Snap
	ignore   []*regexp.Regexp
}

type daemon struct {
	name string
	cmd  *exec.Cmd
	// args and env started it (for a restart).
	args, env []string
	log       string
	done      chan struct{}
	err       error
}

// RepoRoot returns the directory holding go.work, searched upwards from the
// working directory.
func RepoRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.work")); err == nil {
			return d, nil
		}
		p := filepath.Dir(d)
		if p == d {
			return "", errors.New("go.work not found above the working directory")
		}
		d = p
	}
}

// OutputDir is $KUASAR_GO_OUTPUT or <repo>/_output.
func OutputDir() (string, error) {
	if d := os.Getenv("KUASAR_GO_OUTPUT"); d != "" {
		return d, nil
	}
	r, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(r, "_output"), nil
}

// Binary returns <output>/bin/name.
func Binary(name string) string {
	d, err := OutputDir()
	if err != nil {
		return name
	}
	return filepath.Join(d, "bin", name)
}

// RequireRoot skips the test unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testenv: needs root (containerd, mounts, namespaces); run as root")
	}
}

// RequireFiles skips the test when one of paths does not exist.
func RequireFiles(t testing.TB, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("testenv: %s missing (build with `bash hack/build-tools.sh` / make build): %v", p, err)
		}
	}
}

var (
	imagesOnce sync.Once
	imagesTars [][]byte
	imagesErr  error
)

// testImages builds the busybox and pause image tars once per process.
func testImages() ([][]byte, error) {
	imagesOnce.Do(func() {
		bb, err := BusyboxImageTar()
		if err != nil {
			imagesErr = err
			return
		}
		pause, err := PauseImageTar()
		if err != nil {
			imagesErr = err
			return
		}
		imagesTars = [][]byte{bb, pause}
	})
	return imagesTars, imagesErr
}

// Start runs the sandboxers and containerd in a new temporary root and
// returns when CRI is ready and the test images are imported. Everything is
// torn down in t.Cleanup.
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	RequireRoot(t)
	out, err := OutputDir()
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	need := []string{
		filepath.Join(out, "bin", "containerd"),
		filepath.Join(out, "bin", "ctr"),
		filepath.Join(out, "bin", "containerd-shim-runc-v2"),
		filepath.Join(out, "cni", "bin", "bridge"),
		filepath.Join(out, "cni", "bin", "loopback"),
		filepath.Join(out, "cni", "bin", "host-local"),
		"/usr/bin/runc",
		BusyboxPath,
	}
	for _, s := range opts.Sandboxers {
		need = append(need, s.Binary)
	}
	RequireFiles(t, need...)
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 30 * time.Second
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "debug"
	}

	sweepStale(t)
	dir, err := os.MkdirTemp("/tmp", "kg-")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	e := &Env{
		Dir:              dir,
		Address:          filepath.Join(dir, "containerd.sock"),
		TTRPCAddress:     filepath.Join(dir, "containerd.sock.ttrpc"),
		NetNSDir:         filepath.Join(dir, "state", "io.containerd.grpc.v1.cri", "netns"),
		PodLogDir:        filepath.Join(dir, "pods"),
		RuncRoot:         filepath.Join(dir, "runc"),
		OutputDir:        out,
		SandboxerSockets: map[string]string{},
		SandboxerDirs:    map[string]string{},
		t:                t,
		ids:              map[string]bool{},
	}
	for _, r := range opts.LeakIgnore {
		re, err := regexp.Compile(r)
		if err != nil {
			t.Fatalf("testenv: LeakIgnore %q: %v", r, err)
		}
		e.ignore = append(e.ignore, re)
	}
	for _, s := range opts.Sandboxers {
		e.SandboxerSockets[s.Name] = filepath.Join(dir, s.Name+".sock")
		e.SandboxerDirs[s.Name] = filepath.Join(dir, s.Name)
	}
	e.baseline = e.Snapshot()
	t.Cleanup(e.cleanup)

	if err := e.writeCNI(); err != nil {
		t.Fatalf("testenv: cni config: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "owner"), []byte(ownerID(os.Getpid())+" "+e.Bridge+"\n"), 0o644); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := os.MkdirAll(e.PodLogDir, 0o755); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	cfgPath := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(e.containerdConfig(opts)), 0o644); err != nil {
		t.Fatalf("testenv: %v", err)
	}

	// Sandboxers first: containerd dials them as proxy plugins.
	for _, s := range opts.Sandboxers {
		args := []string{
			"--listen", e.SandboxerSockets[s.Name],
			"--dir", e.SandboxerDirs[s.Name],
			"--containerd-address", e.TTRPCAddress,
			"--log-level", "debug",
		}
		if s.ConfigTOML != "" {
			p := filepath.Join(dir, s.Name+".toml")
			if err := os.WriteFile(p, []byte(s.ConfigTOML), 0o644); err != nil {
				t.Fatalf("testenv: %v", err)
			}
			args = append(args, "--config", p)
		}
		args = append(args, s.Args...)
		if err := e.startDaemon(s.Name, s.Binary, args, s.Env); err != nil {
			t.Fatalf("testenv: %v", err)
		}
	}
	for _, s := range opts.Sandboxers {
		if err := e.waitSocket(s.Name, e.SandboxerSockets[s.Name], opts.StartTimeout); err != nil {
			t.Fatalf("testenv: %v", err)
		}
	}

	start := time.Now()
	pathEnv := "PATH=" + filepath.Join(out, "bin") + ":" + os.Getenv("PATH")
	if err := e.startDaemon("containerd", filepath.Join(out, "bin", "containerd"),
		[]string{"--config", cfgPath}, []string{pathEnv}); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	if err := e.waitSocket("containerd", e.Address, opts.StartTimeout); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	conn, err := grpc.NewClient("unix://"+e.Address,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)),
		grpc.WithUnaryInterceptor(e.trackIDs))
	if err != nil {
		t.Fatalf("testenv: dial containerd: %v", err)
	}
	e.Conn = conn
	e.Runtime = runtime.NewRuntimeServiceClient(conn)
	e.Images = runtime.NewImageServiceClient(conn)
	if err := e.waitCRIReady(opts.StartTimeout); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	e.StartDuration = time.Since(start)
	t.Logf("testenv: containerd ready in %v (dir %s, bridge %s, subnet %s)",
		e.StartDuration.Round(time.Millisecond), dir, e.Bridge, e.Subnet)

	if !opts.NoImages {
		t0 := time.Now()
		if _, err := testImages(); err != nil {
			t.Fatalf("testenv: build test images: %v", err)
		}
		t1 := time.Now()
		if err := e.importImages(opts.StartTimeout); err != nil {
			t.Fatalf("testenv: %v", err)
		}
		t.Logf("testenv: images built in %v (once per process), imported in %v",
			t1.Sub(t0).Round(time.Millisecond), time.Since(t1).Round(time.Millisecond))
	}
	return e
}

func randHex(n int) string {
	b := make([]byte, (n+1)/2)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)[:n]
}

// writeCNI writes a bridge conflist with a bridge and a /24 of its own.
func (e *Env) writeCNI() error {
	e.Bridge = "kg" + randHex(6)
	used := map[int]bool{}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip4 := n.IP.To4(); ip4 != nil && ip4[0] == 10 && ip4[1] == 233 {
					used[int(ip4[2])] = true
				}
			}
		}
	}
	var x int
	for i := 0; i < 1000; i++ {
		b := make([]byte, 1)
		_, _ = rand.Read(b)
		x = 1 + int(b[0])%250
		if !used[x] {
			break
		}
	}
	e.Subnet = fmt.Sprintf("10.233.%d.0/24", x)
	e.Gateway = fmt.Sprintf("10.233.%d.1", x)
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "kg-" + e.Bridge,
		"plugins": []any{
			map[string]any{
				"type":        "bridge",
				"bridge":      e.Bridge,
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": e.Subnet, "gateway": e.Gateway}}},
					"dataDir": filepath.Join(e.Dir, "cni", "ipam"),
				},
			},
		},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	confDir := filepath.Join(e.Dir, "cni", "net.d")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(confDir, "10-kg.conflist"), b, 0o644)
}

func tomlStr(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// disabledPlugins are plugins the tests do not need; most would touch global
// paths (/opt/containerd, /var/run/nri) or probe filesystems.
var disabledPlugins = []string{
	"io.containerd.snapshotter.v1.aufs",
	"io.containerd.snapshotter.v1.btrfs",
	"io.containerd.snapshotter.v1.zfs",
	"io.containerd.snapshotter.v1.devmapper",
	"io.containerd.snapshotter.v1.blockfile",
	"io.containerd.snapshotter.v1.erofs",
	"io.containerd.snapshotter.v1.native",
	"io.containerd.differ.v1.erofs",
	"io.containerd.mount-handler.v1.erofs",
	"io.containerd.tracing.processor.v1.otlp",
	"io.containerd.internal.v1.tracing",
	"io.containerd.ttrpc.v1.otelttrpc",
	"io.containerd.nri.v1.nri",
	"io.containerd.internal.v1.opt",
}

// containerdConfig renders config version 3.
func (e *Env) containerdConfig(opts Options) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	d := e.Dir
	w("version = 3")
	w("root = %s", tomlStr(filepath.Join(d, "root")))
	w("state = %s", tomlStr(filepath.Join(d, "state")))
	w("temp = %s", tomlStr(filepath.Join(d, "tmp")))
	var dis []string
	for _, p := range disabledPlugins {
		dis = append(dis, tomlStr(p))
	}
	w("disabled_plugins = [%s]", strings.Join(dis, ", "))
	w("")
	w("[grpc]")
	w("  address = %s", tomlStr(e.Address))
	w("[ttrpc]")
	w("  address = %s", tomlStr(e.TTRPCAddress))
	w("[debug]")
	w("  address = %s", tomlStr(filepath.Join(d, "debug.sock")))
	w("  level = %s", tomlStr(opts.LogLevel))
	w("")
	w("[plugins.'io.containerd.cri.v1.images']")
	w("  snapshotter = \"overlayfs\"")
	w("[plugins.'io.containerd.cri.v1.images'.pinned_images]")
	w("  sandbox = %s", tomlStr(PauseImage))
	w("")
	w("[plugins.'io.containerd.cri.v1.runtime']")
	w("  restrict_oom_score_adj = true")
	w("  netns_mounts_under_state_dir = true")
	w("  enable_cdi = false")
	w("[plugins.'io.containerd.cri.v1.runtime'.cni]")
	w("  bin_dirs = [%s]", tomlStr(filepath.Join(e.OutputDir, "cni", "bin")))
	w("  conf_dir = %s", tomlStr(filepath.Join(d, "cni", "net.d")))
	w("  max_conf_num = 1")
	w("[plugins.'io.containerd.cri.v1.runtime'.containerd]")
	w("  default_runtime_name = \"runc\"")
	w("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]")
	w("  runtime_type = \"io.containerd.runc.v2\"")
	w("  sandboxer = \"podsandbox\"")
	w("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]")
	w("  BinaryName = \"/usr/bin/runc\"")
	w("  Root = %s", tomlStr(e.RuncRoot))
	w("  SystemdCgroup = false")
	for _, s := range opts.Sandboxers {
		rt := s.RuntimeType
		if rt == "" {
			rt = "io.containerd." + s.Name + ".v1"
		}
		w("")
		w("[proxy_plugins.%s]", tomlStr(s.Name))
		w("  type = \"sandbox\"")
		w("  address = %s", tomlStr(e.SandboxerSockets[s.Name]))
		w("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.%s]", tomlStr(s.Name))
		w("  runtime_type = %s", tomlStr(rt))
		w("  sandboxer = %s", tomlStr(s.Name))
		if s.RuntimeTOML != "" {
			w("%s", s.RuntimeTOML)
		}
	}
	if opts.ExtraTOML != "" {
		w("")
		w("%s", opts.ExtraTOML)
	}
	return b.String()
}

func (e *Env) startDaemon(name, bin string, args, env []string) error {
	logPath := filepath.Join(e.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Dir = e.Dir
	cmd.Env = append(os.Environ(), env...)
	// Its own process group: a ^C of the test does not hit it first, and
	// cleanup decides the order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := spawn(cmd); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	f.Close()
	d := &daemon{name: name, cmd: cmd, args: args, env: env, log: logPath, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		close(d.done)
	}()
	e.procs = append(e.procs, d)
	return nil
}

func (e *Env) daemon(name string) *daemon {
	for _, d := range e.procs {
		if d.name == name {
			return d
		}
	}
	return nil
}

// RestartSandboxer stops the sandboxer name with SIGTERM, waits down, and
// starts it again with the same arguments: what its pods do meanwhile is
// the test's to check.
func (e *Env) RestartSandboxer(t testing.TB, name string, down time.Duration) {
	t.Helper()
	e.RestartSandboxers(t, []string{name}, down)
}

// RestartSandboxers stops every sandboxer of names with SIGTERM before any
// starts again, waits down and starts them all, returning once each
// controller socket serves: a node-wide restart, as an upgrade does.
func (e *Env) RestartSandboxers(t testing.TB, names []string, down time.Duration) {
	t.Helper()
	e.restartDaemons(t, names, down, syscall.SIGTERM, func(name string) error {
		return e.waitSocket(name, e.SandboxerSockets[name], 30*time.Second)
	})
}

// KillSandboxer kills the sandboxer name with SIGKILL (what it started
// goes on), waits down and starts it again on the same state directory,
// returning once its controller socket serves.
func (e *Env) KillSandboxer(t testing.TB, name string, down time.Duration) {
	t.Helper()
	e.restartDaemons(t, []string{name}, down, syscall.SIGKILL, func(name string) error {
		return e.waitSocket(name, e.SandboxerSockets[name], 30*time.Second)
	})
}

// RestartContainerd stops containerd with SIGTERM (the sandboxers and
// their pods go on), waits down and starts it again on the same root,
// returning once CRI serves.
func (e *Env) RestartContainerd(t testing.TB, down time.Duration) {
	t.Helper()
	e.restartDaemons(t, []string{"containerd"}, down, syscall.SIGTERM, func(string) error { return e.waitCRIReady(60 * time.Second) })
}

func (e *Env) restartDaemons(t testing.TB, names []string, down time.Duration, sig syscall.Signal, ready func(name string) error) {
	var stopped []*daemon
	for _, name := range names {
		d := e.daemon(name)
		if d == nil {
			t.Fatalf("testenv: no daemon %s", name)
		}
		if sig == syscall.SIGKILL {
			_ = d.cmd.Process.Kill()
			<-d.done
		} else {
			stopDaemon(t, d, 10*time.Second)
		}
		for i, p := range e.procs {
			if p == d {
				e.procs = append(e.procs[:i], e.procs[i+1:]...)
				break
			}
		}
		stopped = append(stopped, d)
	}
	time.Sleep(down)
	for i, d := range stopped {
		if err := e.startDaemon(names[i], d.cmd.Path, d.args, d.env); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range names {
		if err := ready(name); err != nil {
			t.Fatal(err)
		}
		// The new instance replaces one that leak checks knew.
		e.ignore = append(e.ignore, regexp.MustCompile(fmt.Sprintf(`^%d `, e.DaemonPID(name))))
	}
}

// DaemonPID is the PID of the daemon (containerd or a sandboxer by name),
// 0 when there is none.
func (e *Env) DaemonPID(name string) int {
	if d := e.daemon(name); d != nil && d.cmd.Process != nil {
		return d.cmd.Process.Pid
	}
	return 0
}

// waitSocket waits until a unix socket accepts connections.
func (e *Env) waitSocket(name, sock string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	d := e.daemon(name)
	for {
		c, err := net.DialTimeout("unix", sock, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if d != nil {
			select {
			case <-d.done:
				return fmt.Errorf("%s exited (%v) before listening on %s; log tail:\n%s",
					name, d.err, sock, tail(d.log, 30))
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: socket %s not ready after %v: %v; log tail:\n%s",
				name, sock, timeout, err, tailOf(d, 30))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tailOf(d *daemon, n int) string {
	if d == nil {
		return ""
	}
	return tail(d.log, n)
}

func (e *Env) waitCRIReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := e.Runtime.Status(ctx, &runtime.StatusRequest{})
		cancel()
		if err == nil {
			ready := true
			var notReady []string
			for _, c := range st.GetStatus().GetConditions() {
				if (c.Type == runtime.RuntimeReady || c.Type == runtime.NetworkReady) && !c.Status {
					ready = false
					notReady = append(notReady, fmt.Sprintf("%s: %s %s", c.Type, c.Reason, c.Message))
				}
			}
			if ready {
				return nil
			}
			last = strings.Join(notReady, "; ")
		} else {
			last = err.Error()
			if status.Code(err) == codes.Unimplemented {
				// The socket serves only after every plugin loaded: CRI failed.
				return fmt.Errorf("CRI plugin not loaded (%v); containerd plugin errors:\n%s",
					err, grepFile(e.daemon("containerd").log, "failed to load plugin"))
			}
		}
		select {
		case <-e.daemon("containerd").done:
			return fmt.Errorf("containerd exited before CRI was ready; log tail:\n%s", tail(e.daemon("containerd").log, 40))
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("CRI not ready after %v: %s; containerd log tail:\n%s",
				timeout, last, tail(e.daemon("containerd").log, 40))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Ctr runs _output/bin/ctr against this containerd in namespace k8s.io.
func (e *Env) Ctr(args ...string) (string, error) {
	full := append([]string{"--address", e.Address, "-n", "k8s.io"}, args...)
	cmd := exec.Command(filepath.Join(e.OutputDir, "bin", "ctr"), full...)
	b, err := cmd.CombinedOutput()
	if err != nil {
		return string(b), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, b)
	}
	return string(b), nil
}

func (e *Env) importImages(timeout time.Duration) error {
	tars, err := testImages()
	if err != nil {
		return fmt.Errorf("build test images: %w", err)
	}
	for i, b := range tars {
		p := filepath.Join(e.Dir, fmt.Sprintf("image-%d.tar", i))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return err
		}
		if _, err := e.Ctr("images", "import", p); err != nil {
			return err
		}
		os.Remove(p)
	}
	for _, ref := range []string{BusyboxImage, PauseImage} {
		deadline := time.Now().Add(timeout)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			st, err := e.Images.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: &runtime.ImageSpec{Image: ref}})
			cancel()
			if err == nil && st.GetImage() != nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("CRI does not see imported image %s (err %v)", ref, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// LogPath returns the log file of a daemon ("containerd" or a sandboxer name).
func (e *Env) LogPath(name string) string {
	return filepath.Join(e.Dir, name+".log")
}

// grepFile returns the lines of a file that contain substr.
func grepFile(path, substr string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Snapshot records the machine state for a leak check: processes, mounts,
// netns, links, cgroups, files under the sandboxers' directories. Things
// belonging to other harness instances (other /tmp/kg-* roots, their
// bridges, cgroups and processes named after pod/container ids this env did
// not create) and the env's own CNI bridge (made by the first pod, deleted
// at cleanup) are ignored by Diff.
func (e *Env) Snapshot() *Snap {
	var fileDirs []string
	for _, d := range e.SandboxerDirs {
		fileDirs = append(fileDirs, d)
	}
	sort.Strings(fileDirs)
	return snapshot(&Snap{
		fileDirs:  fileDirs,
		ownDirs:   []string{e.Dir},
		netnsDirs: []string{e.NetNSDir},
		foreign:   e.foreign,
	})
}

// trackIDs records the id of every pod and container made through Conn,
// so leak checks and cleanup can tell this env's cgroups from others'.
func (e *Env) trackIDs(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	if err == nil {
		switch r := reply.(type) {
		case *runtime.RunPodSandboxResponse:
			e.track(r.PodSandboxId)
		case *runtime.CreateContainerResponse:
			e.track(r.ContainerId)
		}
	}
	return err
}

func (e *Env) foreign(line string) bool {
	if line == e.Bridge {
		return true // the env's own bridge lives until cleanup
	}
	for _, re := range e.ignore {
		if re.MatchString(line) {
			return true
		}
	}
	// Pod and container ids: a line naming only ids this env never made
	// (and not its directory) belongs to someone else.
	if ids := hex64Any.FindAllString(line, -1); len(ids) > 0 && !strings.Contains(line, e.Dir+"/") {
		e.mu.Lock()
		known := false
		for _, id := range ids {
			known = known || e.ids[id]
		}
		e.mu.Unlock()
		if !known {
			return true
		}
	}
	for _, m := range harnessDirRe.FindAllString(line, -1) {
		if m != e.Dir {
			return true
		}
	}
	for _, f := range strings.Fields(line) {
		if bridgeRe.MatchString(f) && f != e.Bridge {
			return true
		}
	}
	return false
}

// AssertNoLeaks fails the test when something new appeared since before
// and is still there after timeout (teardown is partly asynchronous).
func (e *Env) AssertNoLeaks(t testing.TB, before *Snap, timeout time.Duration) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(timeout)
	var first []string
	for {
		diff := before.Diff(e.Snapshot())
		if first == nil {
			first = diff
		}
		if len(diff) == 0 {
			if len(first) > 0 && time.Since(start) > 500*time.Millisecond {
				t.Logf("testenv: leak check settled after %v; first seen:\n  %s",
					time.Since(start).Round(time.Millisecond), strings.Join(first, "\n  "))
			}
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("testenv: leaked after %v:\n  %s", timeout, strings.Join(diff, "\n  "))
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *Env) track(id string) {
	e.mu.Lock()
	e.ids[id] = true
	e.mu.Unlock()
}

// cleanup removes pods, stops the daemons, kills what is left, unmounts,
// deletes the bridge and the temporary root.
func (e *Env) cleanup() {
	t := e.t
	start := time.Now()
	defer func() { t.Logf("testenv: cleanup took %v", time.Since(start).Round(time.Millisecond)) }()
	if t.Failed() {
		for _, d := range e.procs {
			t.Logf("testenv: --- tail of %s log (%s) ---\n%s", d.name, d.log, tail(d.log, 60))
		}
	}
	if e.Runtime != nil {
		e.removeAllPods()
	}
	if e.Conn != nil {
		e.Conn.Close()
	}
	// containerd first (it stops talking to the sandboxers), then sandboxers.
	for i := len(e.procs) - 1; i >= 0; i-- {
		if d := e.procs[i]; d.name == "containerd" {
			stopDaemon(t, d, 10*time.Second)
		}
	}
	for _, d := range e.procs {
		if d.name != "containerd" {
			stopDaemon(t, d, 10*time.Second)
		}
	}
	e.mu.Lock()
	ids := make(map[string]bool, len(e.ids))
	for id := range e.ids {
		ids[id] = true
	}
	e.mu.Unlock()
	if n := killLeftovers(e.Dir, ids); n > 0 {
		t.Logf("testenv: killed %d leftover processes of %s", n, e.Dir)
	}
	if err := unmountUnder(e.Dir); err != nil {
		t.Logf("testenv: unmount: %v", err)
	}
	if _, err := net.InterfaceByName(e.Bridge); err == nil && e.Bridge != "" {
		if b, err := exec.Command("ip", "link", "del", e.Bridge).CombinedOutput(); err != nil {
			t.Logf("testenv: delete bridge %s: %v: %s", e.Bridge, err, b)
		}
	}
	e.removeCgroups()
	e.removeShimSockets()
	if err := os.RemoveAll(e.Dir); err != nil {
		// A mount we could not see? Try once more after a lazy unmount.
		_ = unmountUnder(e.Dir)
		if err := os.RemoveAll(e.Dir); err != nil {
			t.Logf("testenv: remove %s: %v", e.Dir, err)
		}
	}
}

func (e *Env) removeAllPods() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if cs, err := e.Runtime.ListContainers(ctx, &runtime.ListContainersRequest{}); err == nil {
		for _, c := range cs.Containers {
			e.track(c.Id)
		}
	}
	pods, err := e.Runtime.ListPodSandbox(ctx, &runtime.ListPodSandboxRequest{})
	if err != nil {
		e.t.Logf("testenv: cleanup: list pods: %v", err)
		return
	}
	for _, p := range pods.Items {
		e.track(p.Id)
		if _, err := e.Runtime.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			e.t.Logf("testenv: cleanup: stop pod %s: %v", p.Id, err)
		}
		if _, err := e.Runtime.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: p.Id}); err != nil {
			e.t.Logf("testenv: cleanup: remove pod %s: %v", p.Id, err)
		}
	}
}

func stopDaemon(t testing.TB, d *daemon, grace time.Duration) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return
	case <-time.After(grace):
	}
	t.Logf("testenv: %s did not exit %v after SIGTERM; SIGKILL", d.name, grace)
	_ = syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
	_ = d.cmd.Process.Kill()
	<-d.done
}

// KillProcessesMentioning SIGKILLs the processes whose command line names
// a path below dir, or that run on a root file system below it, and waits
// for them; it returns how many there were.
func KillProcessesMentioning(dir string) int { return killLeftovers(dir, nil) }

// killLeftovers SIGKILLs processes whose command line names dir, or that
// run on a root filesystem under dir (containers), and waits for them.
func killLeftovers(dir string, ids map[string]bool) int {
	self := os.Getpid()
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		var pid int
		if _, err := fmt.Sscanf(ent.Name(), "%d", &pid); err != nil || pid == self || pid <= 2 {
			continue
		}
		base := filepath.Join("/proc", ent.Name())
		cmdline, _ := os.ReadFile(base + "/cmdline")
		hit := bytes.Contains(cmdline, []byte(dir+"/"))
		if !hit {
			// A container: its root filesystem lives in dir.
			hit = strings.Contains(rootMount(pid), dir+"/")
		}
		if !hit {
			// A pod's holder outliving its sandboxer: its cgroup is named
			// after the pod.
			hit = inCgroupOf(base, ids)
		}
		if hit {
			pids = append(pids, pid)
		}
	}
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, p := range pids {
		// Until gone, not just dead: a zombie waits for its reaper (often
		// PID 1) and would still show in a leak check.
		for time.Now().Before(deadline) {
			if err := syscall.Kill(p, 0); err != nil {
				break
			}
			if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); err == nil && strings.Contains(string(st), ") Z 1 ") {
				break // dead; init reaps it
			}
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(p, &ws, syscall.WNOHANG, nil) // if it is ours
			time.Sleep(10 * time.Millisecond)
		}
	}
	return len(pids)
}

// unmountUnder lazily unmounts every mount point under dir, deepest first.
func unmountUnder(dir string) error {
	var errs []error
	for i := 0; i < 5; i++ {
		var under []string
		s := &Snap{Mounts: map[string]bool{}}
		s.readMounts()
		for m := range s.Mounts {
			if m == dir || strings.HasPrefix(m, dir+"/") {
				under = append(under, m)
			}
		}
		if len(under) == 0 {
			return errors.Join(errs...)
		}
		sort.Slice(under, func(i, j int) bool {
			return strings.Count(under[i], "/") > strings.Count(under[j], "/") ||
				(strings.Count(under[i], "/") == strings.Count(under[j], "/") && under[i] > under[j])
		})
		errs = nil
		for _, m := range under {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("umount %s: %w", m, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeCgroups removes (rmdir, deepest first) cgroup directories named
// after a pod or container of this env that are still there.
func (e *Env) removeCgroups() {
	e.mu.Lock()
	ids := make([]string, 0, len(e.ids))
	for id := range e.ids {
		ids = append(ids, id)
	}
	e.mu.Unlock()
	if len(ids) == 0 {
		return
	}
	s := &Snap{Cgroups: map[string]bool{}}
	s.readCgroups()
	var dirs []string
	for d := range s.Cgroups {
		if e.baseline != nil && e.baseline.Cgroups[d] {
			continue
		}
		for _, id := range ids {
			if strings.Contains(filepath.Base(d), id) {
				dirs = append(dirs, d)
				break
			}
		}
	}
	sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
	for _, d := range dirs {
		if err := os.Remove(d); err != nil {
			e.t.Logf("testenv: cgroup %s left: %v", d, err)
		}
	}
}

// removeShimSockets removes the sockets containerd-shim-runc-v2 leaves in
// /run/containerd/s when it is killed.
func (e *Env) removeShimSockets() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for id := range e.ids {
		for _, p := range []string{"", "debug"} {
			h := sha256.Sum256([]byte(filepath.Join(e.Address, "k8s.io", id, p)))
			_ = os.Remove(filepath.Join("/run/containerd/s", hex.EncodeToString(h[:])))
		}
	}
	// The shim made these directories; they go once empty (Remove refuses
	// a directory that another run still uses).
	_ = os.Remove("/run/containerd/s")
	_ = os.Remove("/run/containerd")
}

// ownerID identifies a process across pid reuse: "pid:starttime".
func ownerID(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return ""
	}
	return fmt.Sprintf("%d:%s", pid, f[19])
}

// sweepStale tears down the roots of harness instances whose test process
// died without cleanup (a test timeout or a kill skips t.Cleanup).
func sweepStale(t testing.TB) {
	dirs, _ := filepath.Glob("/tmp/kg-*")
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "owner"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(f[0], "%d:", &pid); err != nil || pid <= 0 {
			continue
		}
		if ownerID(pid) == f[0] {
			continue // still running
		}
		t.Logf("testenv: sweeping stale %s (owner %s gone)", dir, f[0])
		killLeftovers(dir, nil)
		_ = unmountUnder(dir)
		if bridgeRe.MatchString(f[1]) {
			if _, err := net.InterfaceByName(f[1]); err == nil {
				_ = exec.Command("ip", "link", "del", f[1]).Run()
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Logf("testenv: sweep %s: %v", dir, err)
		}
	}
}

// inCgroupOf reports whether the process at /proc/<pid> (base) lives in a
// cgroup named after one of ids.
func inCgroupOf(base string, ids map[string]bool) bool {
	data, err := os.ReadFile(base + "/cgroup")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		i := strings.LastIndexByte(line, ':')
		if i < 0 {
			continue
		}
		for _, elem := range strings.Split(line[i+1:], "/") {
			if ids[elem] {
				return true
			}
		}
	}
	return false
}
