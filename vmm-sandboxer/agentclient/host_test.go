package agentclient_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap/zaptest"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agent"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/guest"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// unixDialer reaches one unix socket per port: the agent's ports served on
// the host, without a VM.
type unixDialer map[uint32]string

func (d unixDialer) Dial(ctx context.Context, port uint32) (net.Conn, error) {
	var nd net.Dialer
	return nd.DialContext(ctx, "unix", d[port])
}
func (d unixDialer) Close() error { return nil }

var reapOnce sync.Once

// TestClientAgainstAgentOnHost runs the agent's container service on the
// host (runc, as in the guest) behind real sockets and drives it with the
// client, under the race detector: create from a bundle, stdout and
// stderr, exit status, exec with stdin, kill, delete, nothing left.
func TestClientAgainstAgentOnHost(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root (runc)")
	}
	if _, err := os.Stat(guest.DefaultRunc); err != nil {
		t.Skipf("%s not installed", guest.DefaultRunc)
	}
	log := zaptest.NewLogger(t)
	reapOnce.Do(func() {
		if err := reap.Start(log); err != nil {
			t.Fatal(err)
		}
	})
	dir := t.TempDir()
	cs, err := agent.NewContainers(filepath.Join(dir, "containers"), guest.DefaultRunc, filepath.Join(dir, "runc"), log)
	if err != nil {
		t.Fatal(err)
	}
	agentSock, ioSock := filepath.Join(dir, "agent.sock"), filepath.Join(dir, "io.sock")
	al, err := net.Listen("unix", agentSock)
	if err != nil {
		t.Fatal(err)
	}
	il, err := net.Listen("unix", ioSock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	vmmtask.RegisterAgentService(srv, &agent.Service{Log: log, Containers: cs})
	go srv.Serve(context.Background(), al)
	go cs.ServeIO(il)
	t.Cleanup(func() { srv.Close(); il.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := agentclient.Dial(ctx, unixDialer{transport.AgentPort: agentSock, transport.IOPort: ioSock})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	share := agentclient.Share{HostDir: filepath.Join(dir, "shared"), GuestDir: filepath.Join(dir, "shared")}

	bundle := writeBundle(t, share.HostDir, "c1", "sh", "-c", "echo out; echo err >&2; exit 3")
	var stdout, stderr bytes.Buffer
	p, err := c.CreateFromBundle(ctx, "c1", bundle, share, agentclient.Stdio{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if code, err := p.Wait(ctx); err != nil || code != 3 {
		t.Errorf("exit %d, %v; want 3", code, err)
	}
	if stdout.String() != "out\n" || stderr.String() != "err\n" {
		t.Errorf("stdout %q, stderr %q", stdout.String(), stderr.String())
	}
	if _, err := p.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateFromBundle(ctx, "c1", filepath.Join(dir, "elsewhere"), share, agentclient.Stdio{}); err == nil {
		t.Error("a bundle without config.json was accepted")
	}

	bundle = writeBundle(t, share.HostDir, "c2", "sleep", "600")
	p, err = c.CreateFromBundle(ctx, "c2", bundle, share, agentclient.Stdio{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	e, err := c.Exec(ctx, "c2", "e1", &specs.Process{Args: []string{"sh", "-c", "read x; echo got-$x; cat"}, Cwd: "/", Env: []string{"PATH=/bin"}},
		agentclient.Stdio{Stdin: strings.NewReader("one\ntwo\n"), Stdout: &out})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if code, err := e.Wait(ctx); err != nil || code != 0 || out.String() != "got-one\ntwo\n" {
		t.Errorf("exec: exit %d, %v, stdout %q; want 0 and %q", code, err, out.String(), "got-one\ntwo\n")
	}
	if _, err := e.Delete(ctx); err != nil {
		t.Error(err)
	}
	if _, err := c.Exec(ctx, "nope", "e1", &specs.Process{Args: []string{"true"}, Cwd: "/"}, agentclient.Stdio{}); err == nil ||
		!strings.Contains(err.Error(), "not found") {
		t.Errorf("exec in a missing container: %v", err)
	}
	if err := p.Signal(ctx, uint32(syscall.SIGKILL), false); err != nil {
		t.Fatal(err)
	}
	if code, err := p.Wait(ctx); err != nil || code != 137 {
		t.Errorf("killed: exit %d, %v; want 137", code, err)
	}
	if _, err := p.Delete(ctx); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(cs.Root)
	if len(ents) != 0 {
		t.Errorf("left in %s: %v", cs.Root, ents)
	}
}

func writeBundle(t *testing.T, shared, id string, args ...string) string {
	t.Helper()
	bundle := filepath.Join(shared, id)
	if err := testenv.WriteBusyboxRootfs(filepath.Join(bundle, "rootfs")); err != nil {
		t.Fatal(err)
	}
	spec := &specs.Spec{
		Version: specs.Version,
		Root:    &specs.Root{Path: "rootfs"},
		Process: &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
		},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
			{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}, {Type: specs.NetworkNamespace}}},
	}
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return bundle
}
