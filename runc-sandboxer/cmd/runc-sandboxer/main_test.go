package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// daemonRig runs the built runc-sandboxer binary as a user would.
type daemonRig struct {
	t      *testing.T
	bin    string
	dir    string
	notify *net.UnixConn
	cmd    *exec.Cmd
	stderr *bytes.Buffer
}

func newDaemonRig(t *testing.T) *daemonRig {
	testenv.RequireRoot(t)
	bin := testenv.Binary("runc-sandboxer")
	testenv.RequireFiles(t, bin)
	dir, err := os.MkdirTemp("/tmp", "kg-daemon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// A keeper a failed test left behind: its command line names the state
	// directory.
	t.Cleanup(func() { testenv.KillProcessesMentioning(dir) })
	addr := &net.UnixAddr{Name: filepath.Join(dir, "notify.sock"), Net: "unixgram"}
	conn, err := net.ListenUnixgram("unixgram", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &daemonRig{t: t, bin: bin, dir: dir, notify: conn}
}

func (r *daemonRig) sock() string { return filepath.Join(r.dir, "ctrl.sock") }

func (r *daemonRig) args(extra ...string) []string {
	return append([]string{
		"--listen", r.sock(),
		"--dir", filepath.Join(r.dir, "state"),
		"--config", filepath.Join(r.dir, "absent-is-fine.toml"),
		"--containerd-address", filepath.Join(r.dir, "no-containerd.sock.ttrpc"),
		"--log-level", "debug",
	}, extra...)
}

// start runs the daemon and waits for READY=1 on the notify socket.
func (r *daemonRig) start() {
	r.t.Helper()
	// An explicit --config that is absent is an error; create an empty one.
	if err := os.WriteFile(filepath.Join(r.dir, "absent-is-fine.toml"), nil, 0o600); err != nil {
		r.t.Fatal(err)
	}
	r.cmd = exec.Command(r.bin, r.args()...)
	r.stderr = &bytes.Buffer{}
	r.cmd.Stderr = r.stderr
	r.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+r.notify.LocalAddr().String())
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	cmd := r.cmd
	r.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	r.notify.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 256)
	for {
		n, err := r.notify.Read(buf)
		if err != nil {
			r.t.Fatalf("no READY=1 from the daemon: %v\n%s", err, r.stderr)
		}
		if strings.Contains(string(buf[:n]), "READY=1") {
			return
		}
	}
}

// stop sends SIGTERM and expects a clean exit that removes the sockets.
func (r *daemonRig) stop() {
	r.t.Helper()
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		r.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			r.t.Fatalf("daemon exit after SIGTERM: %v\n%s", err, r.stderr)
		}
	case <-time.After(20 * time.Second):
		r.t.Fatalf("daemon did not exit after SIGTERM\n%s", r.stderr)
	}
	for _, s := range []string{r.sock(), filepath.Join(r.dir, "state", "task-backend.sock")} {
		if _, err := os.Stat(s); err == nil {
			r.t.Errorf("socket %s left after shutdown", s)
		}
	}
}

// taskSocketServed tells whether something (the keeper) answers on the
// task socket containerd dials.
func (r *daemonRig) taskSocketServed() bool {
	c, err := net.DialTimeout("unix", filepath.Join(r.dir, "state", "task.sock"), time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (r *daemonRig) client() sandboxapi.ControllerClient {
	r.t.Helper()
	conn, err := grpc.NewClient("unix://"+r.sock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { conn.Close() })
	return sandboxapi.NewControllerClient(conn)
}

func TestDaemonVersionAndBadConfig(t *testing.T) {
	bin := testenv.Binary("runc-sandboxer")
	testenv.RequireFiles(t, bin)
	out, err := exec.Command(bin, "--version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "runc-sandboxer v") {
		t.Errorf("--version: %q, %v", out, err)
	}
	cfg := filepath.Join(t.TempDir(), "bad.toml")
	if err := os.WriteFile(cfg, []byte("log_level = \"info\"\n[runtime]\nbinnary = \"runc\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(bin, "--config", cfg, "--dir", t.TempDir()).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "binnary") {
		t.Errorf("unknown key: exit %v, output %q; want a failure naming the key", err, out)
	}
	out, err = exec.Command(bin, "--config", filepath.Join(t.TempDir(), "missing.toml")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "missing.toml") {
		t.Errorf("missing explicit config: exit %v, output %q", err, out)
	}
}

// TestDaemonRestartKeepsPods: the daemon notifies systemd, makes its socket
// root-only, exits cleanly on SIGTERM leaving the pod running, and a new
// instance finds the pod in its state directory and notices its end.
func TestDaemonRestartKeepsPods(t *testing.T) {
	r := newDaemonRig(t)
	r.start()
	fi, err := os.Stat(r.sock())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("controller socket mode %v, want 0600", fi.Mode().Perm())
	}
	ctx := context.Background()
	c := r.client()
	const id = "restart-pod"
	if _, err := c.Create(ctx, &sandboxapi.ControllerCreateRequest{SandboxID: id, NetnsPath: testenv.NewNetns(t)}); err != nil {
		t.Fatalf("Create: %v", err)
	}
	started, err := c.Start(ctx, &sandboxapi.ControllerStartRequest{SandboxID: id})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	holder := int(started.Pid)
	t.Cleanup(func() { unix.Kill(holder, unix.SIGKILL) })
	r.stop()
	if err := unix.Kill(holder, 0); err != nil {
		t.Fatalf("holder %d did not survive the daemon's shutdown: %v", holder, err)
	}
	// The keeper stays for the pod, serving containerd's task socket.
	if !r.taskSocketServed() {
		t.Error("nothing serves the task socket after the daemon stopped with a pod running")
	}

	r.start()
	c = r.client()
	st, err := c.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	if err != nil || st.State != "SANDBOX_READY" || int(st.Pid) != holder {
		t.Fatalf("after restart Status = %+v, %v; want READY with pid %d", st, err, holder)
	}
	// The pod ends while the new daemon watches it (not its child any more).
	if err := unix.Kill(holder, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := c.Wait(wctx, &sandboxapi.ControllerWaitRequest{SandboxID: id}); err != nil {
		t.Fatalf("Wait after the holder was killed: %v", err)
	}
	st, err = c.Status(ctx, &sandboxapi.ControllerStatusRequest{SandboxID: id})
	if err != nil || st.State != "SANDBOX_NOTREADY" {
		t.Fatalf("Status = %+v, %v; want NOTREADY", st, err)
	}
	if _, err := c.Shutdown(ctx, &sandboxapi.ControllerShutdownRequest{SandboxID: id}); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	entries, _ := os.ReadDir(filepath.Join(r.dir, "state", "sandboxes"))
	if len(entries) != 0 {
		t.Errorf("state left after Shutdown: %v", entries)
	}
	r.stop()
	// No pod left: the keeper went with the daemon.
	for _, s := range []string{"task.sock", "keeper.sock"} {
		if _, err := os.Stat(filepath.Join(r.dir, "state", s)); err == nil {
			t.Errorf("%s left after the daemon stopped with no pod", s)
		}
	}
	if strings.Contains(r.stderr.String(), `"level":"error"`) {
		t.Errorf("daemon logged errors:\n%s", r.stderr)
	}
}
