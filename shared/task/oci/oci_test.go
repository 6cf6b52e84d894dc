package oci_test

import (
	"bytes"
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
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/containerd/v2/pkg/sys/reaper"
	"github.com/containerd/errdefs"
	runc "github.com/containerd/go-runc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/task/oci"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

const ns = "oci-test"

var (
	// skipReason is why the container tests cannot run here, if they cannot.
	skipReason string
	// rootfsSrc is a busybox tree each container bind-mounts read-only.
	rootfsSrc string
	exits     = &exitHub{waiters: map[int][]waiter{}}
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	switch {
	case os.Geteuid() != 0:
		skipReason = "container tests need root"
	default:
		if _, err := exec.LookPath("runc"); err != nil {
			skipReason = "runc is not installed"
		}
	}
	if skipReason == "" {
		// As the daemon: a child subreaper reaping through containerd's
		// reaper, which go-runc's Monitor then uses.
		if err := reap.Start(zap.NewNop()); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go exits.run(reaper.Default.Subscribe())
		dir, err := os.MkdirTemp("", "oci-test-rootfs")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if err := testenv.WriteBusyboxRootfs(dir); err != nil {
			skipReason = "no busybox rootfs: " + err.Error()
		}
		rootfsSrc = dir
	}
	code := m.Run()
	// runc removed each container's cgroup; the tests' parent is left.
	parents, _ := filepath.Glob("/sys/fs/cgroup/*/kuasar-oci-test")
	if p := "/sys/fs/cgroup/kuasar-oci-test"; len(parents) == 0 {
		parents = append(parents, p)
	}
	for _, p := range parents {
		os.Remove(p)
	}
	return code
}

func requireContainers(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
}

// exitHub hands reaped exits to the test that waits for a PID, as the task
// service matches them to processes. Exits nobody waits for yet are kept:
// a process may end before its PID is known.
type exitHub struct {
	mu      sync.Mutex
	waiters map[int][]waiter
	early   []runc.Exit
}

type waiter struct {
	since time.Time
	ch    chan int
}

func (h *exitHub) run(ch chan runc.Exit) {
	for e := range ch {
		h.mu.Lock()
		ws := h.waiters[e.Pid]
		i := slices.IndexFunc(ws, func(w waiter) bool { return e.Timestamp.After(w.since) })
		if i >= 0 {
			ws[i].ch <- e.Status
			h.waiters[e.Pid] = slices.Delete(ws, i, i+1)
		} else {
			h.early = append(h.early, e)
			if len(h.early) > 4096 {
				h.early = h.early[1:]
			}
		}
		h.mu.Unlock()
	}
}

// await returns where the exit of pid, reaped after since, arrives. since
// tells a process from an earlier one with the same PID.
func (h *exitHub) await(pid int, since time.Time) <-chan int {
	ch := make(chan int, 1)
	h.mu.Lock()
	defer h.mu.Unlock()
	if i := slices.IndexFunc(h.early, func(e runc.Exit) bool { return e.Pid == pid && e.Timestamp.After(since) }); i >= 0 {
		ch <- h.early[i].Status
		h.early = slices.Delete(h.early, i, i+1)
		return ch
	}
	h.waiters[pid] = append(h.waiters[pid], waiter{since: since, ch: ch})
	return ch
}

// deliver calls SetExited on p when its exit arrives, as the service does
// (the init's after InitExited).
func deliver(c task.Container, p process.Process, ch <-chan int) {
	go func() {
		status := <-ch
		if p.ID() == c.ID() {
			if init, _ := c.Process(""); init == p {
				c.InitExited(context.Background())
			}
		}
		p.SetExited(status)
	}()
}

func nsCtx() context.Context { return namespaces.WithNamespace(context.Background(), ns) }

type env struct {
	t      *testing.T
	root   string
	rt     *oci.Runtime
	bundle string
	id     string
}

func newRuntime(t *testing.T, root string) *oci.Runtime {
	t.Helper()
	rt, err := oci.NewRuntime(task.RuntimeConfig{Root: root}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	return rt
}

// newEnv makes a runtime and a bundle whose config.json runs args.
func newEnv(t *testing.T, terminal bool, args ...string) *env {
	t.Helper()
	requireContainers(t)
	e := &env{t: t, root: t.TempDir(), bundle: t.TempDir()}
	e.id = strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()))
	e.rt = newRuntime(t, e.root)
	spec := testSpec(e.id, terminal, args...)
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.bundle, "config.json"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	// Whatever a test leaves, runc state and mounts go.
	t.Cleanup(func() {
		r := &runc.Runc{Root: filepath.Join(e.root, ns)}
		_ = r.Delete(context.Background(), e.id, &runc.DeleteOpts{Force: true})
		_ = mount.UnmountRecursive(filepath.Join(e.bundle, "rootfs"), 0)
	})
	return e
}

func ptr[T any](v T) *T { return &v }

// testSpec is a minimal OCI spec in the spirit of runc spec's defaults:
// new pid, mount, ipc, uts and network namespaces, a read-only rootfs.
func testSpec(id string, terminal bool, args ...string) *specs.Spec {
	caps := []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_NET_BIND_SERVICE"}
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Terminal: terminal,
			Args:     args,
			Env:      []string{"PATH=/bin", "TERM=xterm"},
			Cwd:      "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: "rootfs", Readonly: true},
		Hostname: "oci-test",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: filepath.Join("/kuasar-oci-test", id),
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.NetworkNamespace},
			},
			MaskedPaths:   []string{"/proc/kcore", "/proc/keys", "/sys/firmware"},
			ReadonlyPaths: []string{"/proc/sys", "/proc/sysrq-trigger"},
		},
	}
}

func (e *env) request(sio stdio.Stdio) *taskAPI.CreateTaskRequest {
	return &taskAPI.CreateTaskRequest{
		ID:       e.id,
		Bundle:   e.bundle,
		Rootfs:   []*types.Mount{{Type: "bind", Source: rootfsSrc, Options: []string{"rbind", "ro"}}},
		Stdin:    sio.Stdin,
		Stdout:   sio.Stdout,
		Stderr:   sio.Stderr,
		Terminal: sio.Terminal,
	}
}

// create creates the container and routes its init's exit to it.
func (e *env) create(sio stdio.Stdio) task.Container {
	e.t.Helper()
	since := time.Now()
	c, err := e.rt.Create(nsCtx(), e.request(sio))
	if err != nil {
		e.t.Fatalf("create: %v", err)
	}
	init, _ := c.Process("")
	deliver(c, init, exits.await(c.Pid(), since))
	return c
}

// fifo makes a FIFO and returns its path.
func fifo(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// readFIFO reads a FIFO as containerd does and returns what was written
// to it until its writers are gone. The (blocking) open waits for a writer.
func readFIFO(t *testing.T, path string) <-chan string {
	t.Helper()
	out := make(chan string, 1)
	opened := make(chan *os.File, 1)
	go func() {
		f, err := os.Open(path)
		if err != nil {
			out <- "open: " + err.Error()
			return
		}
		opened <- f
		var b bytes.Buffer
		io.Copy(&b, f)
		out <- b.String()
	}()
	t.Cleanup(func() {
		// Release an open still waiting for a writer, then the reader.
		if w, err := os.OpenFile(path, os.O_RDWR, 0); err == nil {
			w.Close()
		}
		select {
		case f := <-opened:
			f.Close()
		case <-time.After(5 * time.Second):
		}
	})
	return out
}

func recv[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func waitExit(t *testing.T, p process.Process) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("wait for %s: %v", p.ID(), err)
	}
	return p.ExitStatus()
}

func wantStatus(t *testing.T, p process.Process, want string) {
	t.Helper()
	got, err := p.Status(context.Background())
	if err != nil || got != want {
		t.Fatalf("status of %s = %q, %v; want %q", p.ID(), got, err, want)
	}
}

// heldFIFOs lists this process's fds that are open on one of paths.
func heldFIFOs(t *testing.T, paths ...string) []string {
	t.Helper()
	fds, err := filepath.Glob("/proc/self/fd/*")
	if err != nil {
		t.Fatal(err)
	}
	var held []string
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && slices.Contains(paths, l) {
			held = append(held, fd+" -> "+l)
		}
	}
	return held
}

func mounted(t *testing.T, dir string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			return true
		}
	}
	return false
}

func (e *env) runcState() error {
	r := &runc.Runc{Root: filepath.Join(e.root, ns)}
	_, err := r.State(context.Background(), e.id)
	return err
}

// checkGone checks that a deleted container left no runc state, mount or
// pid file.
func (e *env) checkGone() {
	e.t.Helper()
	if err := e.runcState(); err == nil {
		e.t.Error("runc still knows the container after Delete")
	}
	if mounted(e.t, filepath.Join(e.bundle, "rootfs")) {
		e.t.Error("rootfs still mounted after Delete")
	}
	if pids, _ := filepath.Glob(filepath.Join(e.bundle, "*.pid")); len(pids) > 0 {
		e.t.Errorf("pid files left: %v", pids)
	}
}

func execRequest(t *testing.T, id, execID string, sio stdio.Stdio, args ...string) *taskAPI.ExecProcessRequest {
	t.Helper()
	spec, err := typeurl.MarshalAnyToProto(&specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}})
	if err != nil {
		t.Fatal(err)
	}
	return &taskAPI.ExecProcessRequest{ID: id, ExecID: execID, Spec: spec, Stdin: sio.Stdin, Stdout: sio.Stdout, Stderr: sio.Stderr, Terminal: sio.Terminal}
}

// execRun execs args in c, routes its exit and waits for it.
func execRun(t *testing.T, c task.Container, execID string, del bool, args ...string) (int, string) {
	t.Helper()
	out := fifo(t, execID+"-out")
	got := readFIFO(t, out)
	ok, cancel := c.ReserveProcess(execID)
	if !ok {
		t.Fatalf("exec id %s taken", execID)
	}
	p, err := c.Exec(nsCtx(), execRequest(t, c.ID(), execID, stdio.Stdio{Stdout: out}, args...))
	if err != nil {
		cancel()
		t.Fatalf("exec: %v", err)
	}
	since := time.Now()
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: c.ID(), ExecID: execID}); err != nil {
		t.Fatalf("start exec: %v", err)
	}
	if p.Pid() == 0 {
		t.Fatal("started exec has no pid")
	}
	deliver(c, p, exits.await(p.Pid(), since))
	status := waitExit(t, p)
	output := recv(t, "exec output", got)
	if !del {
		return status, output
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: c.ID(), ExecID: execID}); err != nil {
		t.Fatalf("delete exec: %v", err)
	}
	if _, err := c.Process(execID); !errdefs.IsNotFound(err) {
		t.Errorf("deleted exec still found: %v", err)
	}
	return status, output
}

func TestCreateStartExit(t *testing.T) {
	e := newEnv(t, false, "sh", "-c", "echo out; echo err >&2; exit 3")
	out, errp := fifo(t, "stdout"), fifo(t, "stderr")
	c := e.create(stdio.Stdio{Stdout: out, Stderr: errp})
	init, _ := c.Process("")
	if c.Pid() <= 0 || init.(task.StartTimer).StartTime() == 0 {
		t.Fatalf("created container pid %d, start time %d", c.Pid(), init.(task.StartTimer).StartTime())
	}
	// The daemon handed the FIFOs over: it holds none of them.
	if held := heldFIFOs(t, out, errp); len(held) > 0 {
		t.Errorf("the daemon holds the container's FIFOs after Create: %v", held)
	}
	wantStatus(t, init, "created")
	gotOut, gotErr := readFIFO(t, out), readFIFO(t, errp)
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id}); err != nil {
		t.Fatalf("start: %v", err)
	}
	if s := recv(t, "stdout", gotOut); s != "out\n" {
		t.Errorf("stdout %q, want %q", s, "out\n")
	}
	if s := recv(t, "stderr", gotErr); s != "err\n" {
		t.Errorf("stderr %q, want %q", s, "err\n")
	}
	if status := waitExit(t, init); status != 3 {
		t.Errorf("exit status %d, want 3", status)
	}
	if init.ExitedAt().IsZero() {
		t.Error("no exit time")
	}
	wantStatus(t, init, "stopped")
	if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, Signal: 9}); !errdefs.IsNotFound(err) {
		t.Errorf("kill of an exited init: %v, want NotFound", err)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	e.checkGone()
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); !errdefs.IsNotFound(err) {
		t.Errorf("second delete: %v, want NotFound", err)
	}
}

// longRunning is an init that runs until SIGTERM, then exits 7.
var longRunning = []string{"sh", "-c", `trap "exit 7" TERM; sleep 1000 & wait`}

func TestRunningContainer(t *testing.T) {
	e := newEnv(t, false, longRunning...)
	c := e.create(stdio.Stdio{})
	init, _ := c.Process("")
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id}); err != nil {
		t.Fatalf("start: %v", err)
	}
	wantStatus(t, init, "running")
	if c.Cgroup() == nil {
		t.Error("no cgroup")
	}

	pids, err := c.Pids(nsCtx())
	if err != nil || !slices.Contains(pids, c.Pid()) {
		t.Errorf("pids %v, %v: want the init's %d", pids, err, c.Pid())
	}

	if status, out := execRun(t, c, "exec1", true, "sh", "-c", "echo e; exit 4"); status != 4 || out != "e\n" {
		t.Errorf("exec: status %d, output %q; want 4, %q", status, out, "e\n")
	}

	// An exec is signalled by PID; once gone it is NotFound.
	ok, _ := c.ReserveProcess("sleeper")
	if !ok {
		t.Fatal("reserve")
	}
	sleeper, err := c.Exec(nsCtx(), execRequest(t, e.id, "sleeper", stdio.Stdio{}, "sleep", "1000"))
	if err != nil {
		t.Fatal(err)
	}
	since := time.Now()
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id, ExecID: "sleeper"}); err != nil {
		t.Fatal(err)
	}
	deliver(c, sleeper, exits.await(sleeper.Pid(), since))
	wantStatus(t, sleeper, "running")
	if sleeper.(task.StartTimer).StartTime() == 0 {
		t.Error("running exec has no start time")
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id, ExecID: "sleeper"}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("delete of a running exec: %v, want FailedPrecondition", err)
	}
	if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, ExecID: "sleeper", Signal: uint32(unix.SIGKILL)}); err != nil {
		t.Fatalf("kill exec: %v", err)
	}
	if status := waitExit(t, sleeper); status != 128+int(unix.SIGKILL) {
		t.Errorf("killed exec status %d", status)
	}
	if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, ExecID: "sleeper", Signal: 9}); !errdefs.IsNotFound(err) {
		t.Errorf("kill of an exited exec: %v, want NotFound", err)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id, ExecID: "sleeper"}); err != nil {
		t.Fatal(err)
	}

	if err := c.Pause(nsCtx()); err != nil {
		t.Fatalf("pause: %v", err)
	}
	wantStatus(t, init, "paused")
	if err := c.Pause(nsCtx()); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("pause of a paused container: %v", err)
	}
	if err := c.Resume(nsCtx()); err != nil {
		t.Fatalf("resume: %v", err)
	}
	wantStatus(t, init, "running")

	res, _ := json.Marshal(&specs.LinuxResources{Pids: &specs.LinuxPids{Limit: ptr(int64(100))}})
	if err := c.Update(nsCtx(), &taskAPI.UpdateTaskRequest{ID: e.id, Resources: &anypb.Any{Value: res}}); err != nil {
		t.Errorf("update: %v", err)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("delete of a running init: %v, want FailedPrecondition", err)
	}

	if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, Signal: uint32(unix.SIGTERM)}); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if status := waitExit(t, init); status != 7 {
		t.Errorf("exit status after SIGTERM %d, want 7", status)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	e.checkGone()
}

// A new runtime (as in a new daemon instance) rebuilds a running container
// from its record and drives it on.
func TestRecordRestore(t *testing.T) {
	e := newEnv(t, false, longRunning...)
	out := fifo(t, "stdout")
	since := time.Now()
	c0, err := e.rt.Create(nsCtx(), e.request(stdio.Stdio{Stdout: out}))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c0.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id}); err != nil {
		t.Fatal(err)
	}
	// An exec that ended and one that was never started are restored too.
	if status, _ := execRun(t, c0, "done", false, "true"); status != 0 {
		t.Fatalf("exec status %d", status)
	}
	ok, _ := c0.ReserveProcess("later")
	if !ok {
		t.Fatal("reserve")
	}
	if _, err := c0.Exec(nsCtx(), execRequest(t, e.id, "later", stdio.Stdio{}, "sh", "-c", "exit 5")); err != nil {
		t.Fatal(err)
	}
	record, err := c0.(task.Recorded).Record()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("record: %s", record)

	rt := newRuntime(t, e.root)
	restored, err := rt.Restore(context.Background(), record)
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	init, _ := restored.Process("")
	deliver(restored, init, exits.await(c0.Pid(), since))
	if restored.ID() != e.id || restored.Bundle() != e.bundle || restored.Pid() != c0.Pid() {
		t.Errorf("restored %s %s %d, want %s %s %d", restored.ID(), restored.Bundle(), restored.Pid(), e.id, e.bundle, c0.Pid())
	}
	init0, _ := c0.Process("")
	if init.(task.StartTimer).StartTime() != init0.(task.StartTimer).StartTime() {
		t.Error("start time not restored")
	}
	wantStatus(t, init, "running")
	if init.Stdio().Stdout != out {
		t.Errorf("restored stdout %q", init.Stdio().Stdout)
	}
	if restored.Cgroup() == nil {
		t.Error("restored container has no cgroup")
	}
	done, err := restored.Process("done")
	if err != nil {
		t.Fatalf("ended exec not restored: %v", err)
	}
	wantStatus(t, done, "stopped")
	if err := done.Wait(context.Background()); err != nil {
		t.Error(err)
	}
	later, err := restored.Process("later")
	if err != nil {
		t.Fatalf("unstarted exec not restored: %v", err)
	}
	wantStatus(t, later, "created")
	since = time.Now()
	if _, err := restored.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id, ExecID: "later"}); err != nil {
		t.Fatalf("start restored exec: %v", err)
	}
	deliver(restored, later, exits.await(later.Pid(), since))
	if status := waitExit(t, later); status != 5 {
		t.Errorf("restored exec status %d, want 5", status)
	}
	if status, out := execRun(t, restored, "after", true, "sh", "-c", "echo again; exit 4"); status != 4 || out != "again\n" {
		t.Errorf("exec after restore: %d %q", status, out)
	}
	// A terminal-less process has nothing to resize.
	if err := restored.ResizePty(nsCtx(), &taskAPI.ResizePtyRequest{ID: e.id, Width: 80, Height: 24}); err != nil {
		t.Errorf("resize of a non-terminal process: %v", err)
	}
	if err := restored.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, Signal: uint32(unix.SIGTERM)}); err != nil {
		t.Fatalf("kill restored: %v", err)
	}
	if status := waitExit(t, init); status != 7 {
		t.Errorf("restored init exit %d, want 7", status)
	}
	// The record of a stopped container restores stopped.
	rec2, err := restored.(task.Recorded).Record()
	if err != nil {
		t.Fatal(err)
	}
	again, err := rt.Restore(context.Background(), rec2)
	if err != nil {
		t.Fatal(err)
	}
	init2, _ := again.Process("")
	wantStatus(t, init2, "stopped")
	if init2.ExitStatus() != 7 || !init2.ExitedAt().Equal(init.ExitedAt()) {
		t.Errorf("restored exit %d at %v, want 7 at %v", init2.ExitStatus(), init2.ExitedAt(), init.ExitedAt())
	}
	if err := init2.Wait(context.Background()); err != nil {
		t.Error(err)
	}

	if _, err := restored.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id, ExecID: "done"}); err != nil {
		t.Errorf("delete restored stopped exec: %v", err)
	}
	if _, err := restored.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id, ExecID: "later"}); err != nil {
		t.Errorf("delete restored exec: %v", err)
	}
	if _, err := restored.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
		t.Fatalf("delete restored: %v", err)
	}
	e.checkGone()
}

func TestRestoreGarbage(t *testing.T) {
	rt := newRuntime(t, t.TempDir())
	good := map[string]any{
		"version": 1, "id": "c1", "bundle": "/run/b/c1",
		"runtime": map[string]any{"binary": "runc", "root": "/run/runc/default"},
		"init":    map[string]any{"pid": 42, "start_time": 1, "status": "running", "stdio": map[string]any{}},
	}
	data, _ := json.Marshal(good)
	if _, err := rt.Restore(context.Background(), data); err != nil {
		t.Fatalf("good record refused: %v", err)
	}
	with := func(path string, v any) []byte {
		var m map[string]any
		json.Unmarshal(data, &m)
		cur := m
		keys := strings.Split(path, ".")
		for _, k := range keys[:len(keys)-1] {
			cur = cur[k].(map[string]any)
		}
		if v == nil {
			delete(cur, keys[len(keys)-1])
		} else {
			cur[keys[len(keys)-1]] = v
		}
		b, _ := json.Marshal(m)
		return b
	}
	exec := func(e map[string]any) []byte { return with("execs", []any{e}) }
	for name, rec := range map[string][]byte{
		"empty":             nil,
		"not json":          []byte("garbage"),
		"null":              []byte("null"),
		"array":             []byte("[]"),
		"trailing":          append(append([]byte{}, data...), "{}"...),
		"version 0":         with("version", 0),
		"version 2":         with("version", 2),
		"no id":             with("id", nil),
		"bad id":            with("id", "../x"),
		"relative bundle":   with("bundle", "b/c1"),
		"dotted bundle":     with("bundle", "/run/../etc"),
		"no binary":         with("runtime.binary", nil),
		"relative binary":   with("runtime.binary", "bin/runc"),
		"relative root":     with("runtime.root", "run"),
		"no root":           with("runtime.root", nil),
		"init status":       with("init.status", "exploded"),
		"init pid 0":        with("init.pid", 0),
		"negative pid":      with("init.pid", -1),
		"exit status":       with("init.exit_status", 1000),
		"init with exec id": with("init.id", "x"),
		"pid type":          with("init.pid", "42"),
		"exec bad id":       exec(map[string]any{"id": "a/b", "status": "created", "spec": map[string]any{"args": []string{"sh"}}}),
		"exec no spec":      exec(map[string]any{"id": "e", "status": "created"}),
		"exec paused":       exec(map[string]any{"id": "e", "pid": 3, "status": "paused", "spec": map[string]any{"args": []string{"sh"}}}),
		"exec running pid0": exec(map[string]any{"id": "e", "status": "running", "spec": map[string]any{"args": []string{"sh"}}}),
		"exec twice": with("execs", []any{
			map[string]any{"id": "e", "status": "created", "spec": map[string]any{"args": []string{"sh"}}},
			map[string]any{"id": "e", "status": "created", "spec": map[string]any{"args": []string{"sh"}}},
		}),
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := rt.Restore(context.Background(), rec); !errdefs.IsInvalidArgument(err) {
				t.Errorf("Restore(%s) = %v, want InvalidArgument", rec, err)
			}
		})
	}
}

func TestCreateError(t *testing.T) {
	e := newEnv(t, false, "/no/such/binary")
	out := fifo(t, "stdout")
	_, err := e.rt.Create(nsCtx(), e.request(stdio.Stdio{Stdout: out}))
	if err == nil {
		t.Fatal("create of a container whose binary is missing succeeded")
	}
	t.Logf("create error: %v", err)
	if !strings.Contains(err.Error(), "/no/such/binary") {
		t.Errorf("error %q does not carry runc's message", err)
	}
	if e.runcState() == nil {
		t.Error("runc state left after a failed create")
	}
	if mounted(t, filepath.Join(e.bundle, "rootfs")) {
		t.Error("rootfs left mounted after a failed create")
	}
	if _, err := os.Stat(filepath.Join(e.bundle, "init.pid")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("init.pid left: %v", err)
	}
	if held := heldFIFOs(t, out); len(held) > 0 {
		t.Errorf("FIFO held after a failed create: %v", held)
	}

	// Refused before anything is made.
	bad := e.request(stdio.Stdio{Stdout: "binary:///bin/logger"})
	if _, err := e.rt.Create(nsCtx(), bad); !errdefs.IsNotImplemented(err) {
		t.Errorf("binary logging: %v, want NotImplemented", err)
	}
	if _, err := e.rt.Create(context.Background(), e.request(stdio.Stdio{})); !errdefs.IsInvalidArgument(err) {
		t.Errorf("no namespace: %v, want InvalidArgument", err)
	}
	if _, err := oci.NewRuntime(task.RuntimeConfig{}, nil); !errdefs.IsInvalidArgument(err) {
		t.Errorf("no root: %v, want InvalidArgument", err)
	}
}

func TestTerminal(t *testing.T) {
	e := newEnv(t, true, "sh", "-c", `[ -t 0 ] && [ -t 1 ] && echo tty; exit 2`)
	out := fifo(t, "stdout")
	// The console is copied to the FIFO by the daemon, which opens it
	// write-only: containerd's reader comes first.
	got := readFIFO(t, out)
	c := e.create(stdio.Stdio{Stdout: out, Terminal: true})
	init, _ := c.Process("")
	if err := c.ResizePty(nsCtx(), &taskAPI.ResizePtyRequest{ID: e.id, Width: 100, Height: 30}); err != nil {
		t.Errorf("resize: %v", err)
	}
	record, err := c.(task.Recorded).Record()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id}); err != nil {
		t.Fatalf("start: %v", err)
	}
	if status := waitExit(t, init); status != 2 {
		t.Errorf("exit status %d, want 2", status)
	}
	if s := recv(t, "console output", got); !strings.Contains(s, "tty") {
		t.Errorf("console output %q, want tty", s)
	}
	// Restored, the terminal process has no console.
	restored, err := newRuntime(t, e.root).Restore(context.Background(), record)
	if err != nil {
		t.Fatal(err)
	}
	if err := restored.ResizePty(nsCtx(), &taskAPI.ResizePtyRequest{ID: e.id, Width: 80, Height: 24}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("resize of a restored terminal: %v, want FailedPrecondition", err)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	e.checkGone()
}

func TestOpenStdio(t *testing.T) {
	dir := t.TempDir()
	out, in := filepath.Join(dir, "out"), filepath.Join(dir, "in")
	for _, p := range []string{out, in} {
		if err := unix.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// No reader or writer anywhere: neither open blocks nor fails.
	files, err := oci.OpenStdio(stdio.Stdio{Stdin: in, Stdout: out})
	if err != nil {
		t.Fatal(err)
	}
	if files[0] == nil || files[1] == nil || files[2] != nil {
		t.Fatalf("files %v", files)
	}
	for i, f := range files[:2] {
		fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
		if err != nil || fl&unix.O_NONBLOCK != 0 {
			t.Errorf("file %d flags %#x, %v: want blocking", i, fl, err)
		}
		fdfl, _ := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0)
		if fdfl&unix.FD_CLOEXEC == 0 {
			t.Errorf("file %d is not close-on-exec", i)
		}
		f.Close()
	}
	logFile := filepath.Join(dir, "logs", "c.log")
	files, err = oci.OpenStdio(stdio.Stdio{Stdout: "file://" + logFile, Stderr: "file://" + logFile})
	if err != nil {
		t.Fatal(err)
	}
	files[1].WriteString("a")
	files[2].WriteString("b")
	for _, f := range files[1:] {
		f.Close()
	}
	if b, _ := os.ReadFile(logFile); string(b) != "ab" {
		t.Errorf("log file %q", b)
	}
	if _, err := oci.OpenStdio(stdio.Stdio{Stdout: "binary:///bin/logger"}); !errdefs.IsNotImplemented(err) {
		t.Errorf("binary: %v", err)
	}
	if _, err := oci.OpenStdio(stdio.Stdio{Stdout: filepath.Join(dir, "missing")}); !errdefs.IsNotFound(err) {
		t.Errorf("missing: %v", err)
	}
}

// A created, never started container is deleted (runc kills its init) and
// its Wait returns.
func TestDeleteCreated(t *testing.T) {
	e := newEnv(t, false, longRunning...)
	c := e.create(stdio.Stdio{})
	init, _ := c.Process("")
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	waitExit(t, init)
	e.checkGone()
	if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, Signal: 9}); !errdefs.IsNotFound(err) {
		t.Errorf("kill of a deleted init: %v, want NotFound", err)
	}
}
