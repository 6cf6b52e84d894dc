package oci_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/task/oci"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// FuzzRestoreRecord restores a container from whatever a restarted daemon
// finds in its record. A refused record is InvalidArgument; an accepted
// one is a single JSON document, names a valid container in an absolute
// clean bundle, lists valid and distinct execs, and records again into a
// record that restores to the same record.
func FuzzRestoreRecord(f *testing.F) {
	f.Add([]byte(`{"version":1,"id":"c1","bundle":"/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1",` +
		`"runtime":{"binary":"runc","root":"/run/kuasar/runc/k8s.io","systemd_cgroup":true,"io_uid":1000,"io_gid":1000},"rootfs_mounted":true,` +
		`"init":{"pid":42,"start_time":123,"status":"running","exit_status":0,"stdio":{"stdout":"/run/fifo/c1-stdout","stderr":"/run/fifo/c1-stderr"}},` +
		`"execs":[{"id":"e1","pid":43,"start_time":124,"status":"running","exit_status":0,"stdio":{"terminal":true},"spec":{"args":["sh"],"cwd":"/","terminal":true}},` +
		`{"id":"e2","pid":0,"status":"created","exit_status":0,"stdio":{},"spec":{"args":["true"],"cwd":"/"}},` +
		`{"id":"e3","pid":44,"status":"stopped","exit_status":3,"exited_at":"2025-01-02T03:04:05.000000006Z","stdio":{},"spec":{"args":["false"],"cwd":"/"}}]}`))
	f.Add([]byte(`{"version":1,"id":"c1","bundle":"/b","runtime":{"binary":"/usr/bin/crun","root":"/r"},` +
		`"init":{"pid":42,"status":"stopped","exit_status":137,"exited_at":"2025-01-02T03:04:05+01:00","stdio":{}}}`))
	f.Add([]byte(`{"version":1,"id":"c1","bundle":"/b","runtime":{"binary":"runc","root":"/r"},"init":{"pid":42,"status":"paused","stdio":{}}}`))
	rt, err := oci.NewRuntime(task.RuntimeConfig{Root: f.TempDir()}, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { rt.Close() })
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := rt.Restore(ctx, data)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			return
		}
		if !json.Valid(data) {
			t.Fatalf("restored a record that is not one JSON document: %q", data)
		}
		if validate.ID("container", c.ID()) != nil || !filepath.IsAbs(c.Bundle()) || filepath.Clean(c.Bundle()) != c.Bundle() {
			t.Fatalf("restored container %q in bundle %q", c.ID(), c.Bundle())
		}
		seen := map[string]bool{}
		for _, p := range c.ExecdProcesses() {
			if validate.ID("exec", p.ID()) != nil || seen[p.ID()] {
				t.Fatalf("restored exec %q", p.ID())
			}
			seen[p.ID()] = true
			if strings.ContainsRune(p.Stdio().Stdin+p.Stdio().Stdout+p.Stdio().Stderr, 0) {
				t.Fatalf("exec %s has a stdio path with a NUL byte", p.ID())
			}
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
		if a, b := canonical(t, rec), canonical(t, rec2); !reflect.DeepEqual(a, b) {
			t.Fatalf("record changed through a restore:\n%s\n%s", rec, rec2)
		}
	})
}

// canonical is a record as generic JSON, its execs (recorded in no
// particular order) sorted by ID.
func canonical(t *testing.T, rec []byte) map[string]any {
	var m map[string]any
	if err := json.Unmarshal(rec, &m); err != nil {
		t.Fatalf("record %s: %v", rec, err)
	}
	if execs, ok := m["execs"].([]any); ok {
		slices.SortFunc(execs, func(a, b any) int {
			return strings.Compare(a.(map[string]any)["id"].(string), b.(map[string]any)["id"].(string))
		})
	}
	return m
}
