package qemu

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// KVMGroups reads a device's owner and mode; a file stands in for
// /dev/kvm, whose permissions are the host's.
func TestKVMGroups(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a file another group")
	}
	const kvmGroup = 4242
	for _, tc := range []struct {
		name    string
		mode    os.FileMode
		gid     int
		want    []uint32
		wantErr string
	}{
		{"anyone", 0o666, 0, nil, ""},
		{"the kvm group", 0o660, kvmGroup, []uint32{kvmGroup}, ""},
		{"root alone", 0o600, kvmGroup, nil, "is for root alone"},
		{"root's group", 0o660, 0, nil, "is for root alone"},
		{"a group that may only read", 0o640, kvmGroup, nil, "is for root alone"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := filepath.Join(t.TempDir(), "kvm")
			if err := os.WriteFile(dev, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(dev, 0, tc.gid); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dev, tc.mode); err != nil {
				t.Fatal(err)
			}
			got, err := KVMGroups(dev)
			switch {
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("got %v, %v; want an error containing %q", got, err, tc.wantErr)
			case tc.wantErr == "" && err != nil:
				t.Fatal(err)
			}
			if len(got) != len(tc.want) || len(got) == 1 && got[0] != tc.want[0] {
				t.Errorf("groups %v, want %v", got, tc.want)
			}
		})
	}
	if _, err := KVMGroups(filepath.Join(t.TempDir(), "none")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("no device: %v, want ErrNotExist", err)
	}
}
