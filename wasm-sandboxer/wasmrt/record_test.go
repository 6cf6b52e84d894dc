package wasmrt

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/task"
)

// TestRecordRestore: a record restores the container it describes, its
// spec read from the bundle; garbage is InvalidArgument.
func TestRecordRestore(t *testing.T) {
	rt := newRuntime(t)
	bundle := t.TempDir()
	spec := `{"ociVersion":"1.2.0","process":{"args":["/app.wasm"],"cwd":"/"},"root":{"path":"rootfs"},"hostname":"h"}`
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), []byte(spec), 0o600); err != nil {
		t.Fatal(err)
	}
	valid := `{"version":1,"id":"c1","bundle":"` + bundle + `","engine":"wazero",
		"init":{"pid":4242,"start_time":9,"stdio":{"Stdout":"/run/fifo/out"},"started":true},
		"execs":[{"id":"e1","pid":4243,"started":true,"exited":true,"status":3},{"id":"e2","pid":4244}]}`
	ctx := context.Background()
	c, err := rt.Restore(ctx, []byte(valid))
	if err != nil {
		t.Fatalf("Restore(valid): %v", err)
	}
	init, _ := c.Process("")
	if st, _ := init.Status(ctx); st != "running" || init.Pid() != 4242 || init.(task.StartTimer).StartTime() != 9 || init.Stdio().Stdout != "/run/fifo/out" {
		t.Errorf("restored init: %s, pid %d, %+v", st, init.Pid(), init.Stdio())
	}
	if e1, err := c.Process("e1"); err != nil {
		t.Errorf("exited exec not restored: %v", err)
	} else if st, _ := e1.Status(ctx); st != "stopped" || e1.ExitStatus() != 3 {
		t.Errorf("restored exec e1: %s, exit %d; want stopped, 3", st, e1.ExitStatus())
	}
	// e2 never started: its runner waited on a pipe that closed with the
	// daemon, so it is not kept.
	if _, err := c.Process("e2"); !errdefs.IsNotFound(err) {
		t.Errorf("unstarted exec e2: %v, want NotFound", err)
	}
	if err := init.Start(ctx); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Start of a restored started init: %v, want FailedPrecondition", err)
	}
	// The exit the service reports ends the restored process.
	init.SetExited(7)
	if err := init.Wait(ctx); err != nil || init.ExitStatus() != 7 {
		t.Errorf("after SetExited: %v, exit %d", err, init.ExitStatus())
	}
	data, err := c.(task.Recorded).Record()
	if err != nil {
		t.Fatal(err)
	}
	var r record
	if err := json.Unmarshal(data, &r); err != nil || !r.Init.Exited || r.Init.Status != 7 || len(r.Execs) != 1 {
		t.Errorf("Record after the exit: %s, %v", data, err)
	}

	for name, rec := range map[string]string{
		"not json":        `{`,
		"other version":   strings.Replace(valid, `"version":1`, `"version":9`, 1),
		"bad id":          strings.Replace(valid, `"id":"c1"`, `"id":"a/b"`, 1),
		"relative bundle": strings.Replace(valid, `"bundle":"`+bundle+`"`, `"bundle":"rel"`, 1),
		"no pid":          strings.Replace(valid, `"pid":4242,`, ``, 1),
		"bad exec id":     strings.Replace(valid, `"id":"e1"`, `"id":".."`, 1),
		"status 300":      strings.Replace(valid, `"status":3`, `"status":300`, 1),
		"relative cgroup": strings.Replace(valid, `"engine":"wazero",`, `"engine":"wazero","cgroup":"x/y",`, 1),
	} {
		if _, err := rt.Restore(ctx, []byte(rec)); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: Restore = %v, want InvalidArgument", name, err)
		}
	}
}
