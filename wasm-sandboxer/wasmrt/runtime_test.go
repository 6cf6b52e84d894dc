package wasmrt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/compile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if sharedCache != "" {
		os.RemoveAll(sharedCache)
	}
	// runc removed each container's cgroup; the tests' parent is left.
	parents, _ := filepath.Glob("/sys/fs/cgroup/*/kuasar-wasmrt-test")
	for _, p := range parents {
		os.Remove(p)
	}
	os.Exit(code)
}

const testNS = "wasmrt-test"

func nsCtx() context.Context { return namespaces.WithNamespace(context.Background(), testNS) }

var (
	reapOnce sync.Once
	exitsMu  sync.Mutex
	// waiting maps a PID to the process its exit goes to, as the task
	// service matches them.
	waiting = map[int]process.Process{}
	early   = map[int]int{}
)

func startReaping(t *testing.T) {
	reapOnce.Do(func() {
		if err := reap.Start(zap.NewNop()); err != nil {
			t.Fatal(err)
		}
		go func() {
			for e := range reaper.Default.Subscribe() {
				exitsMu.Lock()
				if p := waiting[e.Pid]; p != nil {
					delete(waiting, e.Pid)
					go p.SetExited(e.Status)
				} else {
					early[e.Pid] = e.Status
				}
				exitsMu.Unlock()
			}
		}()
	})
}

// deliver hands p's exit to p when it comes (or came).
func deliver(p process.Process) {
	exitsMu.Lock()
	defer exitsMu.Unlock()
	if s, ok := early[p.Pid()]; ok {
		delete(early, p.Pid())
		go p.SetExited(s)
		return
	}
	waiting[p.Pid()] = p
}

var (
	cacheOnce   sync.Once
	sharedCache string
)

// cacheDir is one cache for the package's tests: one compile per engine.
func cacheDir(t *testing.T) string {
	cacheOnce.Do(func() {
		d, err := os.MkdirTemp("", "kg-wasmrt-cache-")
		if err != nil {
			t.Fatal(err)
		}
		sharedCache = d
	})
	return sharedCache
}

var testLimits = compile.Limits{Memory: 1 << 30, Pids: 256, Timeout: 5 * time.Minute, Concurrent: 2, MaxModuleSize: 64 << 20}

// testRuntime is the runtime with the runners make build made, or skips.
func testRuntime(t *testing.T, cfg Config) task.Runtime {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skip("runc is not installed")
	}
	testenv.RequireFiles(t, testenv.Binary(runner.BinaryName), testenv.Binary("wasm-sandboxer"))
	if slices.Contains(engine.Names(), "wasmtime") {
		testenv.RequireFiles(t, testenv.Binary(runner.WasmtimeBinaryName))
	}
	startReaping(t)
	if cfg.Engine == "" {
		cfg.Engine = "wazero"
		cfg.AllowedEngines = engine.Names()
	}
	if cfg.CacheDir == "" {
		cfg.CacheDir = cacheDir(t)
	}
	if cfg.Compile == (compile.Limits{}) {
		cfg.Compile = testLimits
	}
	cfg.RunnerDir = filepath.Dir(testenv.Binary(runner.BinaryName))
	// Compiled by the daemon make build built with the runners: a test
	// binary's wazero knows no version ("dev"), and its code would not be
	// the runner's.
	cfg.Compiler = testenv.Binary("wasm-sandboxer")
	cfg.Runtime = task.RuntimeConfig{Root: t.TempDir()}
	rt, err := New(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Whatever a test leaves, runc's containers go.
		r := &runc.Runc{Root: filepath.Join(cfg.Runtime.Root, testNS)}
		cs, _ := r.List(context.Background())
		for _, c := range cs {
			_ = r.Delete(context.Background(), c.ID, &runc.DeleteOpts{Force: true})
		}
		rt.Close()
	})
	runtimeRoots.Store(rt, cfg.Runtime.Root)
	return rt
}

// runtimeRoots is each test runtime's runc root.
var runtimeRoots sync.Map

// runcContainers lists the containers runc knows for rt.
func runcContainers(t *testing.T, rt task.Runtime) []string {
	t.Helper()
	root, _ := runtimeRoots.Load(rt)
	r := &runc.Runc{Root: filepath.Join(root.(string), testNS)}
	cs, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, c := range cs {
		ids = append(ids, c.ID)
	}
	return ids
}

// testBundle is a bundle for args, its rootfs a directory with the test
// program, the hand-made modules and a file to read, its spec one as CRI
// writes (namespaces, /proc, capabilities); edit changes it.
type testBundle struct {
	dir, rootfs, stdout string
	req                 *taskAPI.CreateTaskRequest
	out                 <-chan string
}

func newBundle(t *testing.T, args []string, edit func(*specs.Spec)) *testBundle {
	t.Helper()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	b := &testBundle{dir: dir, rootfs: filepath.Join(dir, "rootfs")}
	files := map[string][]byte{"app.wasm": prog, "etc/greeting": []byte(testenv.WasmGreeting)}
	for p, data := range testenv.WasmModules {
		files[strings.TrimPrefix(p, "/")] = data
	}
	for _, d := range []string{"proc", "dev", "sys", "data"} {
		os.MkdirAll(filepath.Join(b.rootfs, d), 0o777)
	}
	for p, data := range files {
		full := filepath.Join(b.rootfs, p)
		os.MkdirAll(filepath.Dir(full), 0o755)
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	id := "wasmrt-" + strings.ToLower(strings.NewReplacer("/", "-", "_", "-", " ", "-").Replace(t.Name()))
	caps := []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID"}
	spec := &specs.Spec{
		Version: specs.Version,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: args, Env: []string{"A=b"}, Cwd: "/",
			Capabilities: &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: "/kuasar-wasmrt-test/" + id,
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace},
				{Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}, {Type: specs.NetworkNamespace}},
		},
	}
	if edit != nil {
		edit(spec)
	}
	data, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	b.stdout = filepath.Join(dir, "stdout")
	if err := unix.Mkfifo(b.stdout, 0o600); err != nil {
		t.Fatal(err)
	}
	b.out = readFIFO(t, b.stdout)
	b.req = &taskAPI.CreateTaskRequest{ID: id, Bundle: dir, Stdout: b.stdout, Stderr: b.stdout}
	return b
}

// readFIFO reads a FIFO until its writers are gone.
func readFIFO(t *testing.T, path string) <-chan string {
	out := make(chan string, 1)
	go func() {
		f, err := os.Open(path)
		if err != nil {
			out <- err.Error()
			return
		}
		defer f.Close()
		b, _ := io.ReadAll(f)
		out <- string(b)
	}()
	t.Cleanup(func() {
		// Release an open still waiting for a writer.
		if w, err := os.OpenFile(path, os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			w.Close()
		}
	})
	return out
}

func recv(t *testing.T, what string, ch <-chan string) string {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(60 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		return ""
	}
}

func waitExit(t *testing.T, p process.Process) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("wait for %s: %v", p.ID(), err)
	}
	return p.ExitStatus()
}

func create(t *testing.T, rt task.Runtime, b *testBundle) task.Container {
	t.Helper()
	c, err := rt.Create(nsCtx(), b.req)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	init, _ := c.Process("")
	deliver(init)
	return c
}

// TestRuntime runs a module per engine: Create prepares the module process
// but the module does not run; Start runs it with its args, env and root,
// confined as a runc container (own mount namespace, root the rootfs,
// no_new_privs, a seccomp filter, the spec's capabilities); an exec runs
// another module in it; Delete leaves nothing.
func TestRuntime(t *testing.T) {
	for _, eng := range engine.Names() {
		t.Run(eng, func(t *testing.T) {
			rt := testRuntime(t, Config{})
			b := newBundle(t, []string{"/app.wasm", "args", "env", "cat", "/etc/greeting", "write", "/data/started", "yes", "forever"}, func(s *specs.Spec) {
				s.Annotations = map[string]string{EngineAnnotation: eng}
			})
			c := create(t, rt, b)
			init, _ := c.Process("")
			if st, _ := init.Status(nsCtx()); st != "created" || c.Pid() == 0 {
				t.Fatalf("after Create: status %q pid %d", st, c.Pid())
			}
			if _, err := os.Stat(filepath.Join(b.rootfs, "data", "started")); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("the module ran before Start: %v", err)
			}
			if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: b.req.ID}); err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
				if _, err := os.Stat(filepath.Join(b.rootfs, "data", "started")); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the module did not run")
				}
			}
			st := testenv.ProcStatus(t, c.Pid())
			// CHOWN, DAC_OVERRIDE, FOWNER, KILL, SETGID, SETUID: 0xeb.
			if st["NoNewPrivs"] != "1" || st["Seccomp"] != "2" || st["CapEff"] != "00000000000000eb" {
				t.Errorf("module process: NoNewPrivs %s, Seccomp %s, CapEff %s; want 1, 2 and the spec's capabilities", st["NoNewPrivs"], st["Seccomp"], st["CapEff"])
			}
			if host, _ := os.Readlink("/proc/self/ns/mnt"); host == mustReadlink(t, fmt.Sprintf("/proc/%d/ns/mnt", c.Pid())) {
				t.Error("the module process is in the host's mount namespace")
			}
			if !sameFile(t, fmt.Sprintf("/proc/%d/root/etc/greeting", c.Pid()), filepath.Join(b.rootfs, "etc/greeting")) {
				t.Error("the module process's root is not the container's rootfs")
			}
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", c.Pid())); string(comm) != "kuasar-wasm\n" {
				t.Errorf("module process name %q", comm)
			}

			// An exec: another module process in the container.
			status, out := execRun(t, c, "exec1", "/app.wasm", "echo", "exec-ok", "cat", "/data/started", "exit", "5")
			if status != 5 || out != "exec-ok\nyes\n" {
				t.Errorf("exec: status %d, output %q", status, out)
			}
			if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: b.req.ID, Signal: uint32(unix.SIGTERM)}); err != nil {
				t.Fatal(err)
			}
			if s := waitExit(t, init); s != 143 {
				t.Errorf("exit status after SIGTERM %d, want 143", s)
			}
			log := recv(t, "output", b.out)
			for _, want := range []string{"arg[0]=/app.wasm\n", "env:A=b\n", testenv.WasmGreeting + "\n", "running until killed\n"} {
				if !strings.Contains(log, want) {
					t.Errorf("output lacks %q:\n%s", want, log)
				}
			}
			if strings.Contains(log, runner.EnvMode) {
				t.Errorf("the module sees the runner's environment:\n%s", log)
			}
			if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: b.req.ID}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// execRun execs a module in c and returns its status and output.
func execRun(t *testing.T, c task.Container, execID string, args ...string) (int, string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "exec-out")
	if err := unix.Mkfifo(out, 0o600); err != nil {
		t.Fatal(err)
	}
	got := readFIFO(t, out)
	spec, err := typeurl.MarshalAnyToProto(&specs.Process{Args: args, Cwd: "/"})
	if err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.ReserveProcess(execID); !ok {
		t.Fatalf("exec id %s taken", execID)
	}
	p, err := c.Exec(nsCtx(), &taskAPI.ExecProcessRequest{ID: c.ID(), ExecID: execID, Spec: spec, Stdout: out})
	if err != nil {
		t.Fatalf("exec: %v", err)
	}
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: c.ID(), ExecID: execID}); err != nil {
		return -1, err.Error()
	}
	deliver(p)
	status := waitExit(t, p)
	output := recv(t, "exec output", got)
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: c.ID(), ExecID: execID}); err != nil {
		t.Fatalf("delete exec: %v", err)
	}
	return status, output
}

func mustReadlink(t *testing.T, p string) string {
	t.Helper()
	l, err := os.Readlink(p)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// TestCreateErrors: what cannot run fails Create (or, for what only the
// engine finds when it instantiates the module, Start) with the right code
// and leaves nothing behind.
func TestCreateErrors(t *testing.T) {
	rt := testRuntime(t, Config{Engine: "wazero"})
	tests := []struct {
		name    string
		args    []string
		edit    func(*specs.Spec)
		atStart bool
		wantErr error
		wantMsg string
	}{
		{name: "missing module", args: []string{"/nosuch.wasm"}, wantErr: errdefs.ErrInvalidArgument, wantMsg: "not found in the container's rootfs"},
		{name: "not wasm", args: []string{"/notwasm.wasm"}, wantErr: errdefs.ErrInvalidArgument, wantMsg: "not a WebAssembly module"},
		{name: "unknown engine", args: []string{"/app.wasm"}, edit: func(s *specs.Spec) { s.Annotations = map[string]string{EngineAnnotation: "v8"} },
			wantErr: errdefs.ErrInvalidArgument, wantMsg: `unknown wasm engine "v8"`},
		{name: "engine not allowed", args: []string{"/app.wasm"}, edit: func(s *specs.Spec) { s.Annotations = map[string]string{EngineAnnotation: otherEngine()} },
			wantErr: errdefs.ErrPermissionDenied, wantMsg: "wasm.allowed_engines"},
		{name: "terminal", args: []string{"/app.wasm"}, edit: func(s *specs.Spec) { s.Process.Terminal = true }, wantErr: errdefs.ErrInvalidArgument, wantMsg: "no terminal"},
		{name: "no proc", args: []string{"/app.wasm"}, edit: func(s *specs.Spec) { s.Mounts = s.Mounts[1:] }, wantErr: errdefs.ErrInvalidArgument, wantMsg: "need /proc"},
		{name: "NUL in an argument", args: []string{"/app.wasm", "a\x00b"}, wantErr: errdefs.ErrInvalidArgument, wantMsg: "NUL"},
		{name: "NUL in the environment", args: []string{"/app.wasm"}, edit: func(s *specs.Spec) { s.Process.Env = append(s.Process.Env, "X=a\x00b") },
			wantErr: errdefs.ErrInvalidArgument, wantMsg: "NUL"},
		{name: "import the engine lacks", args: []string{"/badimport.wasm"}, atStart: true, wantErr: errdefs.ErrInvalidArgument, wantMsg: "nosuch"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "engine not allowed" && otherEngine() == "" {
				t.Skip("this build has wazero only")
			}
			b := newBundle(t, tc.args, tc.edit)
			c, err := rt.Create(nsCtx(), b.req)
			if tc.atStart {
				if err != nil {
					t.Fatalf("create: %v", err)
				}
				init, _ := c.Process("")
				deliver(init)
				_, err = c.Start(nsCtx(), &taskAPI.StartRequest{ID: b.req.ID})
				waitExit(t, init)
				if _, derr := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: b.req.ID}); derr != nil {
					t.Errorf("delete: %v", derr)
				}
			}
			if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("error %v, want %v %q", err, tc.wantErr, tc.wantMsg)
			}
			if left := runcContainers(t, rt); len(left) > 0 {
				t.Errorf("runc still has %v", left)
			}
		})
	}
}

// otherEngine is an engine besides wazero, or "".
func otherEngine() string {
	for _, n := range engine.Names() {
		if n != "wazero" {
			return n
		}
	}
	return ""
}

// TestBadCache: with kuasar-wasm-runner-wasmtime, a cache entry whose code
// wasmtime cannot load fails Start naming the entry, which is dropped, so
// that the next container compiles the module again and runs.
func TestBadCache(t *testing.T) {
	if !slices.Contains(engine.Names(), "wasmtime") {
		t.Skip("needs wasmtime")
	}
	cache := t.TempDir()
	rt := testRuntime(t, Config{Engine: "wasmtime", CacheDir: cache})
	run := func(name string) error {
		b := newBundle(t, []string{"/app.wasm", "echo", name, "exit", "3"}, nil)
		b.req.ID += "-" + name
		c := create(t, rt, b)
		init, _ := c.Process("")
		_, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: b.req.ID})
		if s := waitExit(t, init); err == nil && s != 3 {
			t.Errorf("%s: exit status %d, want 3", name, s)
		}
		if _, derr := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: b.req.ID}); derr != nil {
			t.Errorf("delete: %v", derr)
		}
		if out := recv(t, "output", b.out); err == nil && out != name+"\n" {
			t.Errorf("%s: output %q", name, out)
		}
		return err
	}
	if err := run("first"); err != nil {
		t.Fatal(err)
	}
	code, _ := filepath.Glob(filepath.Join(cache, "wasmtime-*", "*", engine.WasmtimeCodeFile))
	if len(code) != 1 {
		t.Fatalf("cached code: %v, want one file", code)
	}
	entry := filepath.Dir(code[0])
	if err := os.WriteFile(code[0], []byte(strings.Repeat("Z", 4096)), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := run("bad"); err == nil || !strings.Contains(err.Error(), "cannot load the compiled module") || !strings.Contains(err.Error(), entry) {
		t.Errorf("start with a bad cache entry: %v; want it to name %s", err, entry)
	}
	if _, err := os.Stat(entry); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the bad cache entry was not dropped: %v", err)
	}
	if err := run("again"); err != nil {
		t.Errorf("after the bad entry was dropped: %v", err)
	}
}

// TestRunnersChecked: a runner that is missing, dynamically linked, or
// not executable by every user is refused when the daemon starts, naming
// it.
func TestRunnersChecked(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	sh, _ := os.ReadFile("/bin/sh") // dynamically linked
	if err := os.WriteFile(filepath.Join(dir, runner.BinaryName), sh, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Engine: "wazero", Compile: testLimits, RunnerDir: dir, Runtime: task.RuntimeConfig{Root: t.TempDir()}}
	if _, err := New(cfg, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("dynamic runner: %v", err)
	}
	os.Remove(filepath.Join(dir, runner.BinaryName))
	if _, err := New(cfg, zap.NewNop()); err == nil || !strings.Contains(err.Error(), runner.BinaryName) {
		t.Errorf("missing runner: %v", err)
	}
	if bin := testenv.Binary(runner.BinaryName); fileExists(bin) {
		data, _ := os.ReadFile(bin)
		os.WriteFile(filepath.Join(dir, runner.BinaryName), data, 0o700)
		if _, err := New(cfg, zap.NewNop()); err == nil || !strings.Contains(err.Error(), "every user may execute") {
			t.Errorf("runner only root may execute: %v", err)
		}
	}
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
