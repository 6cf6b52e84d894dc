package gvisor

import (
	"bytes"
	"context"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/sandbox"
	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// FuzzRestoreRecord restores a runsc container from whatever a restarted
// daemon finds in its record, with the engine as configured by default
// plus a debug log directory and extra flags. A refused record is
// InvalidArgument. An accepted one runs the engine's runsc with the
// engine's root and the flags the engine gives a pod (a record never
// chooses a binary, a state directory or a flag naming a file runsc
// writes), names a valid container and pod, mounts its rootfs only in its
// bundle, and records again into a record that restores to the same.
func FuzzRestoreRecord(f *testing.F) {
	const running = `{"version":1,"id":"c1","bundle":"/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1","sandbox_id":"pod1",` +
		`"runsc":{"binary":"runsc","root":"ROOT","args":["--platform=systrap","--network=sandbox","--debug","--debug-log=/var/log/runsc/pod1/","--overlay2=none"]},` +
		`"rootfs":"/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1/rootfs","stdio":{"Stdin":"","Stdout":"/run/fifo/out","Stderr":"/run/fifo/err","Terminal":false},` +
		`"pid":42,"start_time":7,"started":true}`
	f.Add([]byte(running))
	f.Add([]byte(`{"version":1,"id":"c2","bundle":"/b/c2","sandbox_id":"pod2","runsc":{"binary":"runsc","root":"ROOT","args":["--platform=ptrace","--network=host"]},` +
		`"stdio":{"Terminal":true},"pid":43,"start_time":8,"started":true,"paused":true}`))
	f.Add([]byte(`{"version":1,"id":"c3","bundle":"/b/c3","sandbox_id":"pod3","runsc":{"binary":"runsc","root":"ROOT","args":["--platform=kvm","--network=sandbox"]},` +
		`"stdio":{},"pid":44,"start_time":9,"started":true,"exited":true,"exit_status":137,"exited_at":"2025-01-02T03:04:05Z"}`))
	f.Add([]byte(`{"version":1,"id":"c4","bundle":"/b/c4","sandbox_id":"pod4","runsc":{"binary":"runsc","root":"ROOT"},"stdio":{}}`))
	cfg := sandbox.DefaultConfig().GVisor
	cfg.DebugLogDir = "/var/log/runsc"
	cfg.ExtraArgs = []string{"--overlay2=none"}
	e := New(Options{Config: cfg, StateDir: f.TempDir(), Pause: "/bin/true"}, zap.NewNop())
	rt, err := NewRuntime(e, nil, zap.NewNop())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { rt.Close() })
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, data []byte) {
		// The fuzzer cannot know the engine's runsc root: seeds say ROOT.
		data = bytes.ReplaceAll(data, []byte("ROOT"), []byte(e.root))
		c, err := rt.Restore(ctx, data)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			return
		}
		ct := c.(*container)
		rc := ct.init.runc
		if rc.Command != e.Binary() || rc.Root != e.root {
			t.Fatalf("restored to run %s --root %s; the engine runs %s --root %s", rc.Command, rc.Root, e.Binary(), e.root)
		}
		if !engineArgs(e, ct.sandboxID, rc.ExtraArgs) {
			t.Fatalf("restored with runsc flags %q, not the engine's", rc.ExtraArgs)
		}
		if validate.ID("container", ct.id) != nil || validate.ID("sandbox", ct.sandboxID) != nil || validate.AbsPath("bundle", ct.bundle) != nil {
			t.Fatalf("restored container %q of pod %q in bundle %q", ct.id, ct.sandboxID, ct.bundle)
		}
		if r := ct.init.Rootfs; r != "" && r != filepath.Join(ct.bundle, "rootfs") {
			t.Fatalf("rootfs %q outside bundle %q", r, ct.bundle)
		}
		rec, err := c.(task.Recorded).Record()
		if err != nil {
			t.Fatalf("record a restored container: %v", err)
		}
		again, err := rt.Restore(ctx, rec)
		if err != nil {
			t.Fatalf("restore what a restored container recorded: %v\n%s", err, rec)
		}
		rec2, err := again.(task.Recorded).Record()
		if err != nil {
			t.Fatal(err)
		}
		if string(rec) != string(rec2) {
			t.Fatalf("record changed through a restore:\n%s\n%s", rec, rec2)
		}
	})
}

// engineArgs reports whether args are the flags e gives some pod sandboxID.
func engineArgs(e *Engine, sandboxID string, args []string) bool {
	for _, platform := range []string{sandbox.PlatformSystrap, sandbox.PlatformPtrace, sandbox.PlatformKVM} {
		for _, netns := range []string{"", "/var/run/netns/cni-1"} {
			if slices.Equal(args, e.args(&sandbox.Pod{ID: sandboxID, Platform: platform, NetnsPath: netns})) {
				return true
			}
		}
	}
	return false
}
