package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
)

// writeBundle lays out an OCI bundle in the share: a spec like
// containerd's default one (its own namespaces but the network, the usual
// mounts, masked paths) for args, and a busybox rootfs beside it.
func writeBundle(t *testing.T, share agentclient.Share, id string, args ...string) string {
	t.Helper()
	bundle := filepath.Join(share.HostDir, id)
	if err := testenv.WriteBusyboxRootfs(filepath.Join(bundle, "rootfs")); err != nil {
		t.Fatal(err)
	}
	caps := []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"}
	spec := &specs.Spec{
		Version:  specs.Version,
		Hostname: "in-guest",
		Root:     &specs.Root{Path: "rootfs"},
		Process: &specs.Process{
			Args: args, Cwd: "/", Env: []string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"},
			Capabilities:    &specs.LinuxCapabilities{Bounding: caps, Effective: caps, Permitted: caps},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
			NoNewPrivileges: true,
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"ro", "nosuid", "noexec", "nodev"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: "/kuasar/" + id,
			Namespaces: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace}, {Type: specs.NetworkNamespace}},
			MaskedPaths:   []string{"/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
		},
	}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return bundle
}

// testContainerInGuest runs containers in the booted guest: runc in the
// guest, the rootfs a busybox tree in the virtio-fs share, stdio streamed
// over the IO port, then an exec into a long-running container, kill and
// delete. The guest keeps nothing of them afterwards.
func testContainerInGuest(t *testing.T, ctx context.Context, c *agentclient.Client, share agentclient.Share) {
	// Exits come as events too.
	ectx, ecancel := context.WithCancel(ctx)
	defer ecancel()
	events, err := c.Events(ectx, &vmmtask.EventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	exits := make(chan *vmmtask.Event, 16)
	go func() {
		for {
			e, err := events.Recv()
			if err != nil {
				close(exits)
				return
			}
			exits <- e
		}
	}()

	// A container that prints and exits with 7.
	bundle := writeBundle(t, share, "hello", "sh", "-c", "echo hello-from-the-vm; uname -r; echo to-stderr >&2; exit 7")
	var stdout, stderr bytes.Buffer
	t0 := time.Now()
	p, err := c.CreateFromBundle(ctx, "hello", bundle, share, agentclient.Stdio{Stdout: &stdout, Stderr: &stderr})
	if err != nil {
		t.Fatal(err)
	}
	created := time.Since(t0)
	if _, err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	started := time.Since(t0)
	code, err := p.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("container in the guest: create %s, start %s, to exit and end of output %s",
		created.Round(time.Millisecond), (started - created).Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	if code != 7 {
		t.Errorf("exit status %d, want 7 (stdout %q, stderr %q)", code, stdout.String(), stderr.String())
	}
	info, err := c.GuestInfo(ctx, &vmmtask.GuestInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if want := "hello-from-the-vm\n" + info.KernelRelease + "\n"; stdout.String() != want {
		t.Errorf("stdout %q, want %q", stdout.String(), want)
	}
	if stderr.String() != "to-stderr\n" {
		t.Errorf("stderr %q, want %q", stderr.String(), "to-stderr\n")
	}
	select {
	case e := <-exits:
		if e.ContainerId != "hello" || e.ExecId != "" || e.GetExit().GetExitStatus() != 7 {
			t.Errorf("event %v, want the exit of hello with 7", e)
		}
	case <-time.After(10 * time.Second):
		t.Error("no exit event for hello")
	}
	st, err := p.State(ctx)
	if err != nil || st.Status != "STOPPED" || st.ExitStatus != 7 {
		t.Errorf("state after exit: %v, %v; want STOPPED with 7", st, err)
	}
	d, err := p.Delete(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d.ExitStatus != 7 {
		t.Errorf("delete reports exit status %d, want 7", d.ExitStatus)
	}
	if _, err := p.State(ctx); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("state of a deleted container: %v, want not found", err)
	}

	// A long-running container: exec into it, then kill it.
	bundle = writeBundle(t, share, "sleeper", "sleep", "3600")
	p, err = c.CreateFromBundle(ctx, "sleeper", bundle, share, agentclient.Stdio{})
	if err != nil {
		t.Fatal(err)
	}
	pid, err := p.Start(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := p.State(ctx); err != nil || st.Status != "RUNNING" || st.Pid != pid {
		t.Errorf("state: %v, %v; want RUNNING with pid %d", st, err, pid)
	}
	var out bytes.Buffer
	t1 := time.Now()
	// stdin is streamed too, and its end reaches the process (cat exits).
	e, err := c.Exec(ctx, "sleeper", "ex1", &specs.Process{Args: []string{"sh", "-c", "echo exec-ok; hostname; cat"}, Cwd: "/",
		Env: []string{"PATH=/bin"}}, agentclient.Stdio{Stdout: &out, Stdin: strings.NewReader("from-host\n")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if code, err := e.Wait(ctx); err != nil || code != 0 {
		t.Errorf("exec: exit %d, %v", code, err)
	}
	t.Logf("exec in the guest: %s", time.Since(t1).Round(time.Millisecond))
	if want := "exec-ok\nin-guest\nfrom-host\n"; out.String() != want {
		t.Errorf("exec stdout %q, want %q", out.String(), want)
	}
	if _, err := e.Delete(ctx); err != nil {
		t.Error(err)
	}
	if stats, err := c.ContainerStats(ctx, &vmmtask.ContainerStatsRequest{ContainerId: "sleeper"}); err != nil {
		t.Errorf("stats: %v", err)
	} else if stats.Pids != 1 || stats.MemoryUsageBytes == 0 {
		t.Errorf("stats %v: want 1 pid and some memory", stats)
	}
	// A stream nobody asked for is refused with the reason.
	if _, err := c.OpenStream(ctx, "sleeper", "nope", vmmtask.IOStreamHeader_STDOUT); err == nil ||
		!strings.Contains(err.Error(), "no STDOUT stream was asked for") {
		t.Errorf("unasked stream: %v", err)
	}
	if err := p.Signal(ctx, uint32(syscall.SIGKILL), false); err != nil {
		t.Fatal(err)
	}
	if code, err := p.Wait(ctx); err != nil || code != 128+9 {
		t.Errorf("killed container: exit %d, %v; want 137", code, err)
	}
	if _, err := p.Delete(ctx); err != nil {
		t.Fatal(err)
	}

	// Nothing of them is left in the guest: no bundle mount, no process.
	info, err = c.GuestInfo(ctx, &vmmtask.GuestInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range info.Mounts {
		if strings.HasPrefix(m.Target, "/run/kuasar/containers/") {
			t.Errorf("mount left in the guest: %s on %s", m.Type, m.Target)
		}
	}
}
