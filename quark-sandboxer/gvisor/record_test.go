package gvisor

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"go.uber.org/zap"

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
		"runsc":{"binary":"/usr/bin/runsc","root":"/run/runsc","args":["--platform=systrap"]},
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
		strings.Join(r.Runsc.Args, " ") != "--platform=systrap" || r.Rootfs != "/run/b/c1/rootfs" {
		t.Errorf("Record after Restore: %s, %v", data, err)
	}

	for name, rec := range map[string]string{
		"not json":        `{`,
		"other version":   strings.Replace(valid, `"version":1`, `"version":2`, 1),
		"bad id":          strings.Replace(valid, `"id":"c1"`, `"id":"../c1"`, 1),
		"no sandbox":      strings.Replace(valid, `"sandbox_id":"pod1",`, ``, 1),
		"relative bundle": strings.Replace(valid, `"bundle":"/run/b/c1"`, `"bundle":"b/c1"`, 1),
		"relative runsc":  strings.Replace(valid, `"binary":"/usr/bin/runsc"`, `"binary":"runsc"`, 1),
		"foreign rootfs":  strings.Replace(valid, `"rootfs":"/run/b/c1/rootfs"`, `"rootfs":"/etc"`, 1),
		"started, no pid": strings.Replace(valid, `"pid":42,`, ``, 1),
		"exit status 256": strings.Replace(valid, `"started":true`, `"started":true,"exited":true,"exit_status":256`, 1),
	} {
		if _, err := rt.Restore(ctx, []byte(rec)); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: Restore = %v, want InvalidArgument", name, err)
		}
	}
}
