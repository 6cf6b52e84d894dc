package hypervisor

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A writer that keeps its offset (QEMU's file chardev) goes on writing
// after CapFile: the file's storage stays bounded and FileTail finds the
// newest lines.
func TestCapFileBoundsAWriterThatKeepsItsOffset(t *testing.T) {
	path := filepath.Join(t.TempDir(), "console.log")
	w, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	const limit = 64 << 10
	line := bytes.Repeat([]byte("x"), 1023)
	line = append(line, '\n')
	for round := 0; round < 20; round++ {
		for i := 0; i < 64; i++ {
			if _, err := w.Write(line); err != nil {
				t.Fatal(err)
			}
		}
		if err := CapFile(path, limit); err != nil {
			t.Fatal(err)
		}
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if used := st.Blocks * 512; used > limit+8192 {
			t.Fatalf("round %d: %d bytes stored, limit %d", round, used, limit)
		}
	}
	if _, err := w.Write([]byte("the last line\n")); err != nil {
		t.Fatal(err)
	}
	if tail := FileTail(path); !strings.HasSuffix(tail, "the last line") || len(tail) > 2048 {
		t.Fatalf("tail: %d bytes ending %q", len(tail), tail[max(0, len(tail)-20):])
	}
}

func TestFileTail(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, content, want string
	}{
		{"empty", "", "(empty log)"},
		{"short", "  boot\nok\n", "boot\nok"},
		{"long", strings.Repeat("a", 5000) + "end", strings.Repeat("a", 2045) + "end"},
	} {
		path := filepath.Join(dir, tc.name)
		if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		if got := FileTail(path); got != tc.want {
			t.Errorf("%s: FileTail = %q, want %q", tc.name, got, tc.want)
		}
	}
	if got := FileTail(filepath.Join(dir, "missing")); !strings.HasPrefix(got, "(no log:") {
		t.Errorf("missing file: %q", got)
	}
}
