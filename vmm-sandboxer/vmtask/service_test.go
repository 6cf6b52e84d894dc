package vmtask

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	cevents "github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// fakeAgent stands in for the guest's agent in tests of the host side:
// it accepts containers and processes and runs nothing. Methods the tests
// do not call are the embedded nil interface's.
type fakeAgent struct {
	vmmtask.AgentService
	// execDelay holds ExecProcess, so that a test can act meanwhile.
	execDelay time.Duration
}

func (a *fakeAgent) CreateContainer(context.Context, *vmmtask.CreateContainerRequest) (*vmmtask.CreateContainerResponse, error) {
	return &vmmtask.CreateContainerResponse{Pid: 7}, nil
}

func (a *fakeAgent) ExecProcess(context.Context, *vmmtask.ExecProcessRequest) (*vmmtask.Empty, error) {
	time.Sleep(a.execDelay)
	return &vmmtask.Empty{}, nil
}

func (a *fakeAgent) StartProcess(context.Context, *vmmtask.StartProcessRequest) (*vmmtask.StartProcessResponse, error) {
	return &vmmtask.StartProcessResponse{Pid: 8}, nil
}

func (a *fakeAgent) WaitProcess(ctx context.Context, _ *vmmtask.WaitProcessRequest) (*vmmtask.WaitProcessResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (a *fakeAgent) SignalProcess(context.Context, *vmmtask.SignalProcessRequest) (*vmmtask.Empty, error) {
	return &vmmtask.Empty{}, nil
}

func (a *fakeAgent) DeleteProcess(context.Context, *vmmtask.DeleteProcessRequest) (*vmmtask.DeleteProcessResponse, error) {
	return &vmmtask.DeleteProcessResponse{}, nil
}

func (a *fakeAgent) Events(ctx context.Context, _ *vmmtask.EventsRequest, _ vmmtask.Agent_EventsServer) error {
	<-ctx.Done()
	return nil
}

// socketDialer reaches the agent's port on one unix socket.
type socketDialer string

func (d socketDialer) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	if port != transport.AgentPort {
		return nil, transport.ErrNoListener
	}
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", string(d))
}
func (socketDialer) Close() error { return nil }

type nopPublisher struct{}

func (nopPublisher) PublishNamespace(string, string, cevents.Event) error { return nil }

// newTestService serves agent on a socket and returns a task service of
// pod "pod" whose share's host directory is shareDir.
func newTestService(t *testing.T, agent vmmtask.AgentService, shareDir string) *Service {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	vmmtask.RegisterAgentService(srv, agent)
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
	ac, err := agentclient.Dial(context.Background(), socketDialer(sock))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ac.Close() })
	s := New("pod", ac, agentclient.Share{HostDir: shareDir, GuestDir: "/run/kuasar/shared"}, t.TempDir(), nopPublisher{}, nil, zaptest.NewLogger(t))
	t.Cleanup(s.Close)
	return s
}

// writeBundle writes a bundle of pod "pod" whose rootfs is a directory in
// it and whose spec binds volume at /data.
func writeBundle(t *testing.T, volume string) string {
	t.Helper()
	bundle := t.TempDir()
	if err := os.Mkdir(filepath.Join(bundle, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	spec := specs.Spec{
		Process: &specs.Process{Args: []string{"true"}, Cwd: "/"},
		Root:    &specs.Root{Path: "rootfs"},
		Mounts:  []specs.Mount{{Destination: "/data", Type: "bind", Source: volume, Options: []string{"rbind", "rw"}}},
	}
	b, _ := json.Marshal(&spec)
	for name, data := range map[string][]byte{"config.json": b, "sandbox": []byte("pod")} {
		if err := os.WriteFile(filepath.Join(bundle, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return bundle
}

// mountPoints lists the mount points of this process's namespace.
func mountPoints(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 {
			points = append(points, f[4])
		}
	}
	return points
}

func mountedAt(t *testing.T, path string) bool {
	return slices.Contains(mountPoints(t), path)
}

func mountedBelow(t *testing.T, dir string) bool {
	for _, p := range mountPoints(t) {
		if strings.HasPrefix(p, dir+"/") {
			return true
		}
	}
	return false
}

// TestCreateFollowsNoGuestLink plays a guest that can write in the share
// (as it could before the share became a read-only copy): it plants links
// where the host will mount a container's rootfs and volumes, before
// Create, and swaps the container's directory for a link before Delete.
// The host must create, mount and unmount nothing outside the share.
func TestCreateFollowsNoGuestLink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	for _, tc := range []struct {
		name  string
		plant func(t *testing.T, share, outside string)
	}{
		{"container directory", func(t *testing.T, share, outside string) {
			symlink(t, outside, filepath.Join(share, "c1"))
		}},
		{"rootfs", func(t *testing.T, share, outside string) {
			mkdir(t, filepath.Join(share, "c1"))
			symlink(t, outside, filepath.Join(share, "c1", "rootfs"))
		}},
		{"volume", func(t *testing.T, share, outside string) {
			mkdir(t, filepath.Join(share, "c1"))
			// exposedName of the first bind after the rootfs.
			symlink(t, outside, filepath.Join(share, "c1", "m1-vol"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			share, outside := t.TempDir(), t.TempDir()
			volume := filepath.Join(t.TempDir(), "vol")
			mkdir(t, volume)
			s := newTestService(t, &fakeAgent{}, share)
			tc.plant(t, share, outside)
			ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
			_, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: writeBundle(t, volume)})
			if err == nil {
				t.Error("Create went through a planted link")
				s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"})
			}
			if mountedAt(t, outside) {
				unix.Unmount(outside, unix.MNT_DETACH)
				t.Fatal("the host mounted over the path a planted link named")
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 0 {
				t.Fatalf("the host created %v outside the share", ents)
			}
			if mountedBelow(t, share) {
				t.Fatal("a mount is left in the share after the failed Create")
			}
		})
	}
}

// TestDeleteFollowsNoGuestLink: the guest swaps the container's directory
// for a link to a mount of the host's; Delete must not unmount or remove
// anything there.
func TestDeleteFollowsNoGuestLink(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	// A mount of the host's where the link leads: outside/rootfs.
	share, outside := t.TempDir(), t.TempDir()
	hostMount := filepath.Join(outside, "rootfs")
	mkdir(t, hostMount)
	if err := unix.Mount("tmpfs", hostMount, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(hostMount, unix.MNT_DETACH) })
	volume := filepath.Join(t.TempDir(), "vol")
	mkdir(t, volume)
	s := newTestService(t, &fakeAgent{}, share)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: writeBundle(t, volume)}); err != nil {
		t.Fatal(err)
	}
	moved := filepath.Join(share, "c1.moved")
	if err := os.Rename(filepath.Join(share, "c1"), moved); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, m := range []string{"m1-vol", "rootfs"} {
			unix.Unmount(filepath.Join(moved, m), unix.MNT_DETACH)
		}
	})
	symlink(t, outside, filepath.Join(share, "c1"))
	if _, err := s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if !mountedAt(t, hostMount) {
		t.Fatal("Delete unmounted the host's mount a planted link named")
	}
	if _, err := os.Stat(hostMount); err != nil {
		t.Fatalf("Delete removed a directory behind a planted link: %v", err)
	}
}

// TestCreateReadOnlyVolume: a read-only volume is read-only in the share
// at once, submounts included.
func TestCreateReadOnlyVolume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	share := t.TempDir()
	volume := filepath.Join(t.TempDir(), "vol")
	mkdir(t, filepath.Join(volume, "sub"))
	if err := unix.Mount("tmpfs", filepath.Join(volume, "sub"), "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(filepath.Join(volume, "sub"), unix.MNT_DETACH) })
	bundle := writeBundle(t, volume)
	var spec specs.Spec
	b, _ := os.ReadFile(filepath.Join(bundle, "config.json"))
	json.Unmarshal(b, &spec)
	spec.Mounts[0].Options = []string{"rbind", "ro"}
	b, _ = json.Marshal(&spec)
	os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600)

	s := newTestService(t, &fakeAgent{}, share)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"m1-vol/f", "m1-vol/sub/f"} {
		if err := os.WriteFile(filepath.Join(share, "c1", p), nil, 0o644); err != unix.EROFS && !os.IsPermission(err) {
			if pe, ok := err.(*os.PathError); !ok || pe.Err != unix.EROFS {
				t.Errorf("write %s in a read-only volume: %v, want EROFS", p, err)
			}
		}
	}
	if _, err := s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"}); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(share); len(ents) != 0 || mountedBelow(t, share) {
		t.Fatalf("left in the share after Delete: %v", ents)
	}
}

// TestExecRaceNoPanic: Start and Kill of an exec while Exec still waits
// for the agent find no process (NotFound), never a half-made one.
func TestExecRaceNoPanic(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	volume := filepath.Join(t.TempDir(), "vol")
	mkdir(t, volume)
	s := newTestService(t, &fakeAgent{execDelay: 300 * time.Millisecond}, t.TempDir())
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: writeBundle(t, volume)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"}) })
	spec, err := typeurl.MarshalAnyToProto(&specs.Process{Args: []string{"true"}, Cwd: "/"})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, err := s.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: spec}); err != nil {
			t.Error(err)
		}
	}()
	time.Sleep(50 * time.Millisecond)
	if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"}); err == nil {
		t.Error("Start of an exec still being made: no error")
	}
	if _, err := s.Kill(ctx, &taskAPI.KillRequest{ID: "c1", ExecID: "e1", Signal: 9}); err == nil {
		t.Error("Kill of an exec still being made: no error")
	}
	wg.Wait()
	if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Errorf("Start once made: %v", err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func mkdir(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
}
