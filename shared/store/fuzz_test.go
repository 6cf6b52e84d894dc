package store

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// FuzzLoadState decodes a state file of any name and content, as a
// restarted daemon does. A file it refuses is InvalidArgument (or
// NotImplemented: a newer format). A sandbox it loads has a valid ID (the
// pod's directories, cgroups and sockets are named after it) that matches
// the file name, a known state and an absolute netns path if any, and
// saving and reloading it changes nothing after the first save (which
// sets the format and compacts the family's JSON).
func FuzzLoadState(f *testing.F) {
	f.Add("p1.json", []byte(`{"format":1,"id":"p1","state":"running","pid":42,"created_at":"2025-01-02T03:04:05Z","family":{"holder":42}}`))
	f.Add("p1.json", []byte(`{"format":2,"id":"p1"}`))
	f.Add("p2.json", []byte(`{"id":"p2","state":"created","options":{"type_url":"runtime.v1.PodSandboxConfig","value":"CgA="},"annotations":{"a":"b"},"rootfs":[{"type":"overlay","source":"overlay","options":["lowerdir=/a"]}]}`))
	f.Fuzz(func(t *testing.T, name string, data []byte) {
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 200 {
			return
		}
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return
		}
		st, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		first, err := st.LoadAll()
		if len(first) > 1 {
			t.Fatalf("one file gave %d sandboxes", len(first))
		}
		if len(first) == 0 {
			if err != nil && !errdefs.IsInvalidArgument(err) && !errdefs.IsNotImplemented(err) {
				t.Fatalf("%s refused with %v, neither InvalidArgument nor NotImplemented", name, err)
			}
			return
		}
		sb := first[0]
		switch sb.State {
		case StateCreated, StateRunning, StateStopped:
		default:
			t.Fatalf("loaded sandbox %s in state %q", sb.ID, sb.State)
		}
		if sb.NetnsPath != "" && validate.AbsPath("netns", sb.NetnsPath) != nil {
			t.Fatalf("loaded sandbox %s with netns %q", sb.ID, sb.NetnsPath)
		}
		if err := validate.ID("sandbox", sb.ID); err != nil {
			t.Fatalf("loaded %s as a sandbox with an invalid ID: %v", name, err)
		}
		if sb.ID+".json" != name {
			t.Fatalf("file %s loaded as sandbox %q", name, sb.ID)
		}
		if sb.Format > FormatVersion {
			t.Fatalf("loaded format %d", sb.Format)
		}
		if err := st.Save(sb); err != nil {
			t.Fatalf("re-save %q: %v", sb.ID, err)
		}
		second, err := st.LoadAll()
		if err != nil || len(second) != 1 {
			t.Fatalf("reload after save: %d sandboxes, %v", len(second), err)
		}
		if err := st.Save(second[0]); err != nil {
			t.Fatal(err)
		}
		third, err := st.LoadAll()
		if err != nil || len(third) != 1 {
			t.Fatalf("second reload: %d sandboxes, %v", len(third), err)
		}
		if !reflect.DeepEqual(second[0], third[0]) {
			t.Fatalf("save/load not stable:\n%+v\n%+v", second[0], third[0])
		}
	})
}
