package modfile

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

func module(body string) []byte { return append([]byte{0, 'a', 's', 'm', 1, 0, 0, 0}, body...) }

// rootfs is a container root with modules, symlinks inside and out of it,
// and things that are not modules; outside is a module beside it that no
// lookup may reach.
func rootfs(t *testing.T) (root, outside string) {
	t.Helper()
	base := t.TempDir()
	root, outside = filepath.Join(base, "rootfs"), filepath.Join(base, "outside.wasm")
	files := map[string][]byte{
		"app.wasm":          module("app"),
		"bin/tool.wasm":     module("tool"),
		"srv/rel/run.wasm":  module("run"),
		"notwasm.wasm":      []byte("#!/bin/sh\n"),
		"short.wasm":        {0, 'a', 's'},
		"inner/target.wasm": module("inner"),
	}
	for p, data := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(outside, module("outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(root, "dir.wasm"), 0o755)
	for link, target := range map[string]string{
		"link.wasm":       "/app.wasm",
		"abs-escape.wasm": outside,                    // resolves to <root>/<outside path>: absent
		"rel-escape.wasm": "../../../../outside.wasm", // ".." stops at the root
		"abs-inner.wasm":  "/inner/target.wasm",
		"proc.wasm":       "/proc/self/root" + outside, // a magic link
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mkfifo(filepath.Join(root, "fifo.wasm"), 0o644); err != nil {
		t.Fatal(err)
	}
	return root, outside
}

func TestFind(t *testing.T) {
	root, _ := rootfs(t)
	tests := []struct {
		name      string
		ps        specs.Process
		wantGuest string
		wantBody  string
		wantErr   string
	}{
		{name: "absolute", ps: specs.Process{Args: []string{"/app.wasm"}}, wantGuest: "/app.wasm", wantBody: "app"},
		{name: "relative to cwd", ps: specs.Process{Args: []string{"rel/run.wasm"}, Cwd: "/srv"}, wantGuest: "/srv/rel/run.wasm", wantBody: "run"},
		{name: "PATH lookup", ps: specs.Process{Args: []string{"tool.wasm"}, Env: []string{"PATH=/usr/bin:/bin"}}, wantGuest: "/bin/tool.wasm", wantBody: "tool"},
		{name: "bare name without PATH", ps: specs.Process{Args: []string{"app.wasm"}}, wantGuest: "/app.wasm", wantBody: "app"},
		{name: "symlink inside", ps: specs.Process{Args: []string{"/link.wasm"}}, wantGuest: "/link.wasm", wantBody: "app"},
		{name: "absolute symlink resolves inside", ps: specs.Process{Args: []string{"/abs-inner.wasm"}}, wantGuest: "/abs-inner.wasm", wantBody: "inner"},
		{name: "absolute symlink out of the rootfs", ps: specs.Process{Args: []string{"/abs-escape.wasm"}}, wantErr: "not found in the container's rootfs"},
		{name: "relative symlink out of the rootfs", ps: specs.Process{Args: []string{"/rel-escape.wasm"}}, wantErr: "not found"},
		{name: "magic link", ps: specs.Process{Args: []string{"/proc.wasm"}}, wantErr: "not found"},
		{name: "dot-dot", ps: specs.Process{Args: []string{"/../../outside.wasm"}}, wantErr: "not found"},
		{name: "dot-dot relative", ps: specs.Process{Args: []string{"../../../outside.wasm"}, Cwd: "/srv"}, wantErr: "not found"},
		{name: "missing", ps: specs.Process{Args: []string{"/nosuch.wasm"}}, wantErr: "not found"},
		{name: "directory", ps: specs.Process{Args: []string{"/dir.wasm"}}, wantErr: "not found"},
		{name: "FIFO", ps: specs.Process{Args: []string{"/fifo.wasm"}}, wantErr: "not found"},
		{name: "not wasm", ps: specs.Process{Args: []string{"/notwasm.wasm"}}, wantErr: "is not a WebAssembly module"},
		{name: "shorter than a header", ps: specs.Process{Args: []string{"/short.wasm"}}, wantErr: "is not a WebAssembly module"},
		{name: "no args", ps: specs.Process{}, wantErr: "process.args is empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Find(context.Background(), root, &tc.ps, 1<<20)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("error %v, want InvalidArgument %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			data, err := io.ReadAll(io.NewSectionReader(m.File, 0, 1<<20))
			if err != nil || m.Guest != tc.wantGuest || string(data[8:]) != tc.wantBody {
				t.Fatalf("got %q %q %v; want %q %q", m.Guest, data, err, tc.wantGuest, tc.wantBody)
			}
			if m.Key != engine.Key(data) || m.Size != int64(len(data)) {
				t.Errorf("key %s size %d; want %s %d", m.Key, m.Size, engine.Key(data), len(data))
			}
		})
	}
}

// TestSameFile: once open, the module is the file that was found, whatever
// becomes of its path; and its offset stays at 0 for the processes that
// share it.
func TestSameFile(t *testing.T) {
	root, outside := rootfs(t)
	m, err := Find(context.Background(), root, &specs.Process{Args: []string{"/app.wasm"}}, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	p := filepath.Join(root, "app.wasm")
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, p); err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(m.File) // read(2), from the shared offset
	if err != nil || !bytes.Equal(data, module("app")) || engine.Key(data) != m.Key {
		t.Errorf("read %q, %v; want the module found, with its key", data, err)
	}
}

// TestSizeLimit: a module past the limit is refused from its size, before
// a byte of it is read: a sparse file the size of the limit and more is
// refused at once, without reading it.
func TestSizeLimit(t *testing.T) {
	root, _ := rootfs(t)
	const limit = 1 << 30
	f, err := os.Create(filepath.Join(root, "huge.wasm"))
	if err != nil {
		t.Fatal(err)
	}
	f.Write(module(""))
	if err := f.Truncate(limit + 1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// A cancelled context fails any read: only the size check can answer.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = Find(ctx, root, &specs.Process{Args: []string{"/huge.wasm"}}, limit)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "wasm.max_module_size_mib") {
		t.Fatalf("error %v, want InvalidArgument naming the limit", err)
	}
	// Just under the limit, the key is read, until the context ends.
	if err := os.Truncate(filepath.Join(root, "huge.wasm"), limit); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	<-ctx.Done()
	if _, err := Find(ctx, root, &specs.Process{Args: []string{"/huge.wasm"}}, limit); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want the context's", err)
	}
}

func TestOpenHost(t *testing.T) {
	_, outside := rootfs(t)
	m, err := OpenHost(context.Background(), outside, "app.wasm", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Guest != "app.wasm" || m.Key != engine.Key(module("outside")) {
		t.Errorf("guest %q key %s", m.Guest, m.Key)
	}
	link := filepath.Join(t.TempDir(), "link.wasm")
	os.Symlink(outside, link)
	if _, err := OpenHost(context.Background(), link, "app.wasm", 1<<20); err == nil {
		t.Error("OpenHost followed a symlink")
	}
}
