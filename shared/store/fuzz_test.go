package store

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// FuzzLoadState decodes a state file of any name and content, as a
// restarted daemon does. A sandbox it loads has a valid ID (the pod's
// directories, cgroups and sockets are named after it) that matches the
// file name, and saving and reloading it changes nothing after the first
// save (which sets the format and compacts the family's JSON).
func FuzzLoadState(f *testing.F) {
	f.Add("p1.json", []byte(`{"format":1,"id":"p1","state":"running","pid":42,"created_at":"2025-01-02T03:04:05Z","family":{"holder":42}}`))
	f.Add("p1.json", []byte(`{"format":2,"id":"p1"}`))
	f.Add("p2.json", []byte(`{"id":"p2","options":{"type_url":"runtime.v1.PodSandboxConfig","value":"CgA="},"annotations":{"a":"b"},"rootfs":[{"type":"overlay","source":"overlay","options":["lowerdir=/a"]}]}`))
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
		first, _ := st.LoadAll()
		if len(first) > 1 {
			t.Fatalf("one file gave %d sandboxes", len(first))
		}
		if len(first) == 0 {
			return
		}
		sb := first[0]
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
