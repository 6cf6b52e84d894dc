package gvisor

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

func TestRecordRestore(t *testing.T) {
	e := New(Options{Config: sandbox.DefaultConfig().GVisor, StateDir: t.TempDir(), Pause: "/bin/true"}, zap.NewNop())
	rt, err := NewRuntime(e, nil, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	valid := `{"version":1,"id":"c1","bundle":"/run/b/c1","sandbox_id":"pod1",
		"runsc":{"binary":"runsc","root":"` + e.root + `","args":["--platform=systrap","--network=host"]},
		"rootfs":"/run/b/c1/rootfs","stdio":{"Stdout":"/run/fifo/out","Terminal":true},
		"pid":42,"start_time":7,"started":true}`
	ctx := context.Background()
	c, err := rt.Restore(ctx, []byte(valid))
	if err != nil {
		t.Fatalf("Restore(valid): %v", err)
	}
	init, _ := c.Process("")
	if st, _ := init.Status(ctx); st != "running" || init.Pid() != 42 || init.(task.StartTimer).StartTime() != 7 {
		t.Errorf("restored init: %s, pid %d; want running, 42, start time 7", st, init.Pid())
	}
	if init.Stdio().Stdout != "/run/fifo/out" || init.Stdio().Terminal {
		t.Errorf("restored stdio %+v: want the FIFO and no terminal (the console was the daemon's)", init.Stdio())
	}
	// What it records again restores the same container.
	data, err := c.(task.Recorded).Record()
	if err != nil {
		t.Fatal(err)
	}
	var r record
	if err := json.Unmarshal(data, &r); err != nil || r.ID != "c1" || r.SandboxID != "pod1" || r.Pid != 42 || !r.Started ||
		strings.Join(r.Runsc.Args, " ") != "--platform=systrap --network=host" || r.Rootfs != "/run/b/c1/rootfs" {
		t.Errorf("Record after Restore: %s, %v", data, err)
	}

	for name, rec := range map[string]string{
		"not json":        `{`,
		"other version":   strings.Replace(valid, `"version":1`, `"version":2`, 1),
		"bad id":          strings.Replace(valid, `"id":"c1"`, `"id":"../c1"`, 1),
		"no sandbox":      strings.Replace(valid, `"sandbox_id":"pod1",`, ``, 1),
		"relative bundle": strings.Replace(valid, `"bundle":"/run/b/c1"`, `"bundle":"b/c1"`, 1),
		"other runsc":     strings.Replace(valid, `"binary":"runsc"`, `"binary":"/tmp/runsc"`, 1),
		"other root":      strings.Replace(valid, e.root, "/etc", 1),
		"no platform":     strings.Replace(valid, `"--platform=systrap",`, ``, 1),
		"bad platform":    strings.Replace(valid, `--platform=systrap`, `--platform=../x`, 1),
		"foreign rootfs":  strings.Replace(valid, `"rootfs":"/run/b/c1/rootfs"`, `"rootfs":"/etc"`, 1),
		"started, no pid": strings.Replace(valid, `"pid":42,`, ``, 1),
		"exit status 256": strings.Replace(valid, `"started":true`, `"started":true,"exited":true,"exit_status":256`, 1),
	} {
		if _, err := rt.Restore(ctx, []byte(rec)); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: Restore = %v, want InvalidArgument", name, err)
		}
	}
}

// A record chooses neither the runsc a daemon runs nor its flags: of the
// recorded flags the pod's platform and network mode count, the rest are
// the engine's as configured (a recorded --log would make runsc write
// anywhere).
func TestRestoreTakesRunscFromTheEngine(t *testing.T) {
	cfg := sandbox.DefaultConfig().GVisor
	cfg.ExtraArgs = []string{"--overlay2=none"}
	e := New(Options{Config: cfg, StateDir: t.TempDir(), Pause: "/bin/true"}, zap.NewNop())
	rt, err := NewRuntime(e, nil, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	for _, tc := range []struct {
		name   string
		args   string
		netns  string
		target string
	}{
		{"as the engine made them", `"--platform=ptrace","--network=sandbox","--overlay2=none"`, "ns", "ptrace"},
		{"a flag the engine does not give", `"--platform=kvm","--network=host","--log=/etc/cron.d/x"`, "", "kvm"},
		{"flags of another configuration", `"--platform=systrap","--network=sandbox","--overlay2=root:memory"`, "ns", "systrap"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := `{"version":1,"id":"c1","bundle":"/run/b/c1","sandbox_id":"pod1","runsc":{"binary":"runsc","root":"` + e.root +
				`","args":[` + tc.args + `]},"stdio":{},"pid":42,"start_time":7,"started":true}`
			c, err := rt.Restore(context.Background(), []byte(rec))
			if err != nil {
				t.Fatal(err)
			}
			want := e.args(&sandbox.Pod{ID: "pod1", Platform: tc.target, NetnsPath: tc.netns})
			if got := c.(*container).init.runc.ExtraArgs; !slices.Equal(got, want) {
				t.Errorf("runsc flags %q, want the engine's %q", got, want)
			}
		})
	}
}

// What a container that was created under the default configuration
// (runsc found on PATH) records restores.
func TestRestoreDefaultRunsc(t *testing.T) {
	e := New(Options{Config: sandbox.DefaultConfig().GVisor, StateDir: t.TempDir(), Pause: "/bin/true"}, zap.NewNop())
	rt, err := NewRuntime(e, nil, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	pod := &sandbox.Pod{ID: "pod1", Platform: sandbox.PlatformSystrap}
	rc := e.runsc(pod, "/run/b/c1/log.json")
	c := &container{id: "c1", bundle: "/run/b/c1", sandboxID: pod.ID, log: zap.NewNop(), init: &initProcess{
		Init: rt.newInit("c1", "/run/b/c1", "", rc, stdio.Stdio{}), rt: rt, runc: rc, id: "c1",
		pid: 42, startTime: 7, started: true,
	}}
	rec, err := c.Record()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Restore(context.Background(), rec); err != nil {
		t.Fatalf("Restore(%s): %v", rec, err)
	}
}

// A container restored exited keeps the time it exited, over restarts.
func TestRestoreKeepsExitTime(t *testing.T) {
	e := New(Options{Config: sandbox.DefaultConfig().GVisor, StateDir: t.TempDir(), Pause: "/bin/true"}, zap.NewNop())
	rt, err := NewRuntime(e, nil, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	rec := `{"version":1,"id":"c1","bundle":"/run/b/c1","sandbox_id":"pod1","runsc":{"binary":"runsc","root":"` + e.root +
		`","args":["--platform=systrap","--network=host"]},"stdio":{},"pid":42,"start_time":7,"started":true,` +
		`"exited":true,"exit_status":3,"exited_at":"2025-01-02T03:04:05Z"}`
	c, err := rt.Restore(context.Background(), []byte(rec))
	if err != nil {
		t.Fatal(err)
	}
	init, _ := c.Process("")
	want := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	if st, _ := init.Status(context.Background()); st != "stopped" || init.ExitStatus() != 3 || !init.ExitedAt().Equal(want) {
		t.Errorf("restored %s, status %d at %v; want stopped, 3 at %v", st, init.ExitStatus(), init.ExitedAt(), want)
	}
}

// The stdio of `runsc start` are FIFOs only: a restored container's come
// from its record, which must not make the workload write any file.
func TestOpenIORefusesFiles(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	reader, err := os.OpenFile(fifo, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reader.Close() })
	for _, tc := range []struct {
		name string
		s    stdio.Stdio
		ok   bool
	}{
		{"fifo", stdio.Stdio{Stdout: fifo}, true},
		{"file as stdout", stdio.Stdio{Stdout: file}, false},
		{"file as stdin", stdio.Stdio{Stdin: file}, false},
		{"directory", stdio.Stdio{Stderr: dir}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files, err := openIO(tc.s)
			closeAll(files)
			if (err == nil) != tc.ok {
				t.Errorf("openIO(%+v) = %v, want ok %v", tc.s, err, tc.ok)
			}
		})
	}
}
