package store

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestSaveLoadRoundTrip(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "sandboxes"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Microsecond)
	want := &Sandbox{
		ID: "pod-1", NetnsPath: "/run/netns/cni-1", State: StateRunning, Pid: 42,
		Address: "ttrpc+unix:///run/x.sock", Version: 3, CreatedAt: now,
		Rootfs:      []Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a"}}},
		Options:     &Any{TypeURL: "x", Value: []byte{1, 2}},
		Annotations: map[string]string{"a": "b"},
		Family:      []byte(`{"holder_pid":42}`),
	}
	if err := s.Save(want); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(s.Dir(), "pod-1.json"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, want 0600", fi.Mode().Perm())
	}
	got, err := s.LoadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !reflect.DeepEqual(got[0], want) {
		t.Fatalf("LoadAll = %+v, want %+v", got, want)
	}
	if err := s.Delete("pod-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("pod-1"); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if got, _ := s.LoadAll(); len(got) != 0 {
		t.Fatalf("after Delete: %v", got)
	}
	if entries, _ := os.ReadDir(s.Dir()); len(entries) != 0 {
		t.Fatalf("files left behind: %v", entries)
	}
}

func TestSaveRejectsBadID(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "../x", "a/b"} {
		if err := s.Save(&Sandbox{ID: id}); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Save(%q) = %v, want InvalidArgument", id, err)
		}
	}
}

func TestLoadAllReportsBadFilesButKeepsGoodOnes(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(&Sandbox{ID: "good", State: StateCreated}); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{
		"torn.json":    `{"id":"torn"`,
		"future.json":  `{"format":99,"id":"future"}`,
		"renamed.json": `{"format":1,"id":"other"}`,
		"ignored.txt":  `not state`,
	} {
		if err := os.WriteFile(filepath.Join(s.Dir(), name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.LoadAll()
	if err == nil {
		t.Fatal("LoadAll returned no error for broken files")
	}
	if len(got) != 1 || got[0].ID != "good" {
		t.Fatalf("LoadAll = %+v, want only the good sandbox", got)
	}
}
