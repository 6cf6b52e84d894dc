package compile

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/modfile"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// The compiler re-executes its binary: here, this test binary.
func TestMain(m *testing.M) {
	if runner.IsChild() {
		runner.Main()
		return
	}
	os.Exit(m.Run())
}

var reapOnce sync.Once

// generous are limits no compile of the test program reaches.
var generous = Limits{Memory: 1 << 30, Pids: 256, Timeout: 5 * time.Minute, Concurrent: 2, MaxModuleSize: 64 << 20}

func newCompiler(t *testing.T, limits Limits) (*Compiler, *observer.ObservedLogs, string) {
	t.Helper()
	testenv.RequireRoot(t)
	reapOnce.Do(func() {
		if err := reap.Start(zap.NewNop()); err != nil {
			t.Fatal(err)
		}
	})
	core, logs := observer.New(zap.InfoLevel)
	cache := t.TempDir()
	c, err := New(os.Args[0], cache, limits, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	return c, logs, cache
}

// program is the root holding the WASI test program as /app.wasm.
func program(t *testing.T) string {
	t.Helper()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "app.wasm"), prog, 0o644); err != nil {
		t.Fatal(err)
	}
	return root
}

func open(t *testing.T, root, name string) *modfile.Module {
	t.Helper()
	m, err := modfile.Find(context.Background(), root, &specs.Process{Args: []string{name}}, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// leftovers are what a compile must not leave: temporary directories in
// the cache and compile cgroups (their parent included).
func leftovers(t *testing.T, cache string) []string {
	t.Helper()
	out, _ := filepath.Glob(filepath.Join(cache, "*", tmpPrefix+"*"))
	cgs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", CgroupParent))
	cgs2, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", CgroupParent))
	return append(append(out, cgs...), cgs2...)
}

// TestEntry: every engine's compile fills the module's entry, readable by
// all and writable by none; later and concurrent requests for the module
// compile it no more.
func TestEntry(t *testing.T) {
	root := program(t)
	for _, name := range engine.Names() {
		t.Run(name, func(t *testing.T) {
			c, logs, cache := newCompiler(t, generous)
			var wg sync.WaitGroup
			errs := make([]error, 3)
			entries := make([]string, 3)
			for i := range errs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					entries[i], errs[i] = c.Entry(context.Background(), name, open(t, root, "/app.wasm"))
				}()
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
			}
			m := open(t, root, "/app.wasm")
			if entries[0] != engine.EntryDir(cache, name, m.Key) || !engine.InCache(cache, name, m.Key) {
				t.Fatalf("entry %s, want %s", entries[0], engine.EntryDir(cache, name, m.Key))
			}
			if _, err := c.Entry(context.Background(), name, m); err != nil {
				t.Fatal(err)
			}
			if n := logs.FilterMessage("module compiled").Len(); n != 1 {
				t.Errorf("compiled %d times, want once", n)
			}
			files := 0
			filepath.Walk(entries[0], func(p string, fi os.FileInfo, err error) error {
				if err != nil {
					t.Fatal(err)
				}
				want := os.FileMode(0o444)
				if fi.IsDir() {
					want = 0o555 | os.ModeDir
				} else {
					files++
				}
				if fi.Mode() != want {
					t.Errorf("%s: mode %v, want %v", p, fi.Mode(), want)
				}
				return nil
			})
			if files == 0 {
				t.Error("empty entry")
			}
			if l := leftovers(t, cache); len(l) > 0 {
				t.Errorf("left behind: %v", l)
			}
		})
	}
}

// TestLimits: a compile that needs more memory or time than allowed is
// killed, and the request fails saying which limit (ResourceExhausted); a
// module the engine rejects is InvalidArgument, one whose bytes change
// while it is compiled Aborted. None leaves an entry, a temporary
// directory or a cgroup.
func TestLimits(t *testing.T) {
	root := program(t)
	bad := append([]byte{0, 'a', 's', 'm', 1, 0, 0, 0}, "garbage"...)
	if err := os.WriteFile(filepath.Join(root, "bad.wasm"), bad, 0o644); err != nil {
		t.Fatal(err)
	}
	name := engine.Names()[0]
	if slices.Contains(engine.Names(), "wasmtime") {
		name = "wasmtime" // compiles fastest under -race
	}
	tight := func(f func(*Limits)) Limits { l := generous; f(&l); return l }
	tests := []struct {
		name    string
		limits  Limits
		module  string
		change  bool
		wantErr error
		wantMsg string
	}{
		{name: "memory", limits: tight(func(l *Limits) { l.Memory = 24 << 20 }), module: "/app.wasm",
			wantErr: errdefs.ErrResourceExhausted, wantMsg: "needs more than 24 MiB of memory (wasm.compile_memory_mib)"},
		{name: "time", limits: tight(func(l *Limits) { l.Timeout = time.Millisecond }), module: "/app.wasm",
			wantErr: errdefs.ErrResourceExhausted, wantMsg: "took longer than 1ms (wasm.compile_timeout_seconds)"},
		{name: "invalid", limits: generous, module: "/bad.wasm", wantErr: errdefs.ErrInvalidArgument, wantMsg: "invalid wasm module"},
		{name: "changed", limits: generous, module: "/app.wasm", change: true, wantErr: errdefs.ErrAborted, wantMsg: "changed while it was compiled"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, _, cache := newCompiler(t, tc.limits)
			m := open(t, root, tc.module)
			if tc.change {
				// The same file, other bytes: what the compiler reads.
				f, err := os.OpenFile(filepath.Join(root, "app.wasm"), os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				f.WriteAt([]byte("!"), m.Size-1)
				f.Close()
			}
			_, err := c.Entry(context.Background(), name, m)
			if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("error %v, want %v with %q", err, tc.wantErr, tc.wantMsg)
			}
			t.Logf("%s: %v", tc.name, err)
			if engine.InCache(cache, name, m.Key) {
				t.Error("an entry was made")
			}
			if l := leftovers(t, cache); len(l) > 0 {
				t.Errorf("left behind: %v", l)
			}
		})
	}
}
