package keeper

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/unixsock"
)

func TestMain(m *testing.M) {
	// Ensure re-executes the test binary as the keeper.
	if IsKeeper() {
		Main()
	}
	os.Exit(m.Run())
}

// connectService answers Connect with a fixed shim PID, so that a test can
// tell which backend answered.
type connectService struct {
	taskAPI.TTRPCTaskService // nil: only Connect is called
	pid                      uint32
}

func (s *connectService) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return &taskAPI.ConnectResponse{ShimPid: s.pid}, nil
}

func serveBackend(t *testing.T, path string, pid uint32) *ttrpc.Server {
	t.Helper()
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	taskAPI.RegisterTTRPCTaskService(srv, &connectService{pid: pid})
	l, err := unixsock.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
	return srv
}

func connect(t *testing.T, address string) (uint32, error) {
	t.Helper()
	c, err := net.Dial("unix", address)
	if err != nil {
		return 0, err
	}
	client := ttrpc.NewClient(c)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := taskAPI.NewTTRPCTaskClient(client).Connect(ctx, &taskAPI.ConnectRequest{ID: "c"})
	return resp.GetShimPid(), err
}

func TestKeeperOutlivesItsDaemon(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the keeper's sockets are root-only")
	}
	dir := t.TempDir()
	ctx := t.Context()
	log := zaptest.NewLogger(t)
	k, err := Ensure(ctx, dir, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Kill(k.Pid(), unix.SIGKILL) })
	if k.Pid() == os.Getpid() || k.Pid() == 0 {
		t.Fatalf("keeper pid %d", k.Pid())
	}
	cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(k.Pid()) + "/cmdline")
	if !strings.Contains(string(cmdline), dir) {
		t.Errorf("keeper's command line %q does not name its directory", cmdline)
	}

	address, backend := filepath.Join(dir, "task.sock"), filepath.Join(dir, "backend.sock")
	first := serveBackend(t, backend, 1)
	if err := k.Listen(ctx, address, backend); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(address); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("task socket %v, %v; want mode 0600", fi, err)
	}
	if pid, err := connect(t, address); err != nil || pid != 1 {
		t.Fatalf("through the keeper: %d, %v; want the first backend's 1", pid, err)
	}

	// A restarted daemon finds the same keeper and says again what it
	// serves; the address now reaches the new backend.
	first.Close()
	os.Remove(backend)
	again, err := Ensure(ctx, dir, log)
	if err != nil || again.Pid() != k.Pid() {
		t.Fatalf("Ensure after restart: %v, pid %d; want the keeper %d", err, again.Pid(), k.Pid())
	}
	serveBackend(t, backend, 2)
	if err := again.Listen(ctx, address, backend); err != nil {
		t.Errorf("Listen again on the same address and backend: %v", err)
	}
	if pid, err := connect(t, address); err != nil || pid != 2 {
		t.Errorf("after the restart: %d, %v; want the second backend's 2", pid, err)
	}

	for _, c := range []struct{ name, address, backend string }{
		{"other backend", address, filepath.Join(dir, "other.sock")},
		{"relative address", "task.sock", backend},
		{"relative backend", filepath.Join(dir, "t2.sock"), "backend.sock"},
		{"address outside the directory", "/tmp/elsewhere.sock", backend},
		{"address escaping the directory", filepath.Join(dir, "..", "escape.sock"), backend},
	} {
		if err := again.Listen(ctx, c.address, c.backend); err == nil {
			t.Errorf("%s: Listen(%q, %q) succeeded", c.name, c.address, c.backend)
		}
	}

	// Processes started through the keeper are its children, and what they
	// leave behind is recorded there for the next daemon instance.
	sp := again.Spawner()
	cmd := exec.Command("sh", "-c", "sh -c 'exit 7' & wait; exit 3")
	ec, err := sp.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if status, err := sp.Wait(cmd, ec); err != nil || status != 3 {
		t.Errorf("a command through the keeper: %d, %v; want 3", status, err)
	}
	orphan := exec.Command("sh", "-c", "(sleep 0.1; exit 5) & echo $!")
	var out strings.Builder
	orphan.Stdout = &out
	if ec, err = sp.Start(orphan); err != nil {
		t.Fatal(err)
	}
	sp.Wait(orphan, ec)
	orphanPid, _ := strconv.Atoi(strings.TrimSpace(out.String()))
	var found bool
	for deadline := time.Now().Add(5 * time.Second); !found && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		exits, _, err := sp.Recorded(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range exits {
			found = found || (e.Pid == orphanPid && e.Status == 5)
		}
	}
	if !found {
		t.Errorf("the orphan %d's exit 5 is not recorded by the keeper", orphanPid)
	}

	if err := again.Close(ctx, address); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(address); err == nil {
		t.Error("the task socket is still there after Close")
	}
	if err := again.Exit(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, SocketName)); err == nil {
		t.Error("the control socket is still there after Exit")
	}
}
