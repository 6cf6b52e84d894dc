package wasmrt

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// The runtime re-executes its binary: here, this test binary.
func TestMain(m *testing.M) {
	if IsChild() {
		ChildMain()
		return
	}
	code := m.Run()
	if sharedDir != "" {
		os.RemoveAll(sharedDir)
	}
	os.Exit(code)
}

var reapOnce sync.Once

func startReaping(t *testing.T) {
	reapOnce.Do(func() {
		if err := reap.Start(zap.NewNop()); err != nil {
			t.Fatal(err)
		}
	})
}

// bundle writes a bundle whose rootfs holds the test program, with process
// args, and a FIFO for stdout whose read end the test holds.
func bundle(t *testing.T, args []string, annotations map[string]string) (req *taskAPI.CreateTaskRequest, rootfs string, stdout io.Reader) {
	t.Helper()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	rootfs = filepath.Join(dir, "rootfs")
	os.MkdirAll(filepath.Join(rootfs, "etc"), 0o755)
	os.WriteFile(filepath.Join(rootfs, "app.wasm"), prog, 0o644)
	os.WriteFile(filepath.Join(rootfs, "notwasm.wasm"), []byte("#!/bin/sh\n"), 0o644)
	spec := specs.Spec{
		Root:        &specs.Root{Path: "rootfs"},
		Process:     &specs.Process{Args: args, Env: []string{"A=b"}, Cwd: "/"},
		Annotations: annotations,
	}
	data, _ := json.Marshal(spec)
	os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644)
	fifo := filepath.Join(dir, "stdout")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(fifo, os.O_RDWR, 0) // keeps the FIFO open both ways
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &taskAPI.CreateTaskRequest{ID: "c-" + filepath.Base(dir), Bundle: dir, Stdout: fifo}, rootfs, f
}

func newRuntime(t *testing.T) *Runtime {
	testenv.RequireRoot(t)
	startReaping(t)
	eng := "wazero"
	if slices.Contains(engine.Names(), "wasmtime") {
		eng = "wasmtime" // compiles much faster under -race
	}
	rt, err := New(Config{Engine: eng, CacheDir: cacheDir(t)}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

var (
	cacheOnce sync.Once
	sharedDir string
)

// cacheDir is one cache for the package's tests: one compile in all.
func cacheDir(t *testing.T) string {
	cacheOnce.Do(func() {
		d, err := os.MkdirTemp("", "kg-wasmrt-cache-")
		if err != nil {
			t.Fatal(err)
		}
		sharedDir = d
	})
	return sharedDir
}

func waitReaped(t *testing.T, p *proc) {
	t.Helper()
	select {
	case <-p.reaped:
	case <-time.After(30 * time.Second):
		t.Fatalf("process %d did not exit", p.pid)
	}
}

// TestRuntimeCreateStart: Create prepares the module process but does not
// run the module; Start does; Delete of a created process kills it.
func TestRuntimeCreateStart(t *testing.T) {
	rt := newRuntime(t)
	ctx := context.Background()

	req, rootfs, stdout := bundle(t, []string{"/app.wasm", "write", "/started", "yes", "echo", "hello", "exit", "4"}, nil)
	tc, err := rt.Create(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	c := tc.(*container)
	time.Sleep(200 * time.Millisecond)
	if _, err := os.Stat(filepath.Join(rootfs, "started")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the module ran before Start: %v", err)
	}
	if st, _ := c.init.Status(ctx); st != "created" || c.Pid() == 0 {
		t.Fatalf("after Create: status %q pid %d", st, c.Pid())
	}
	if _, err := c.Start(ctx, &taskAPI.StartRequest{ID: req.ID}); err != nil {
		t.Fatal(err)
	}
	waitReaped(t, c.init)
	buf := make([]byte, 64)
	n, _ := stdout.Read(buf)
	if got := string(buf[:n]); got != "hello\n" {
		t.Errorf("stdout %q", got)
	}
	if _, err := os.Stat(filepath.Join(rootfs, "started")); err != nil {
		t.Errorf("the module did not run: %v", err)
	}
	c.init.SetExited(4) // what the task service does with the reaped exit
	if err := c.Kill(ctx, &taskAPI.KillRequest{ID: req.ID, Signal: 9}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Kill after exit: %v, want NotFound", err)
	}
	if _, err := c.Delete(ctx, &taskAPI.DeleteRequest{ID: req.ID}); err != nil {
		t.Fatal(err)
	}

	// Created, never started, deleted: killed, and the module never ran.
	req, rootfs, _ = bundle(t, []string{"/app.wasm", "write", "/started", "yes"}, nil)
	if tc, err = rt.Create(ctx, req); err != nil {
		t.Fatal(err)
	}
	c = tc.(*container)
	if _, err := c.Delete(ctx, &taskAPI.DeleteRequest{ID: req.ID}); err != nil {
		t.Fatal(err)
	}
	if !c.init.isReaped() {
		t.Error("Delete returned before the process was gone")
	}
	if _, err := os.Stat(filepath.Join(rootfs, "started")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a deleted, unstarted module ran: %v", err)
	}
}

// TestRuntimeCreateErrors: bad requests fail with InvalidArgument and leave
// no process behind.
func TestRuntimeCreateErrors(t *testing.T) {
	rt := newRuntime(t)
	tests := []struct {
		name        string
		args        []string
		annotations map[string]string
		terminal    bool
		wantErr     string
	}{
		{name: "missing module", args: []string{"/nosuch.wasm"}, wantErr: "not found in the container's rootfs"},
		{name: "not wasm", args: []string{"/notwasm.wasm"}, wantErr: "not a WebAssembly module"},
		{name: "unknown engine", args: []string{"/app.wasm"}, annotations: map[string]string{EngineAnnotation: "nosuch"}, wantErr: `unknown wasm engine "nosuch"`},
		{name: "terminal", args: []string{"/app.wasm"}, terminal: true, wantErr: "no terminal"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _, _ := bundle(t, tc.args, tc.annotations)
			req.Terminal = tc.terminal
			before := children()
			_, err := rt.Create(context.Background(), req)
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want InvalidArgument %q", err, tc.wantErr)
			}
			if after := children(); after > before {
				t.Errorf("%d child processes left", after-before)
			}
		})
	}
}

// children counts this process's children, zombies included.
func children() int {
	n := 0
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, s := range stats {
		b, err := os.ReadFile(s)
		if err != nil {
			continue
		}
		// After the command in parentheses: state, then the parent's PID.
		i := strings.LastIndexByte(string(b), ')')
		if f := strings.Fields(string(b[i+1:])); i > 0 && len(f) > 1 && f[1] == strconv.Itoa(os.Getpid()) {
			n++
		}
	}
	return n
}

// TestRuntimeWasmtimeCRunner: with kuasar-wasm-runner-wasmtime (as make
// build leaves it in the output directory), a wasmtime container's process
// is that binary, loads the cached code, runs the module with its args and
// exit code; a cached file wasmtime cannot load fails Create clearly and is
// dropped, so that the next Create compiles again.
func TestRuntimeWasmtimeCRunner(t *testing.T) {
	testenv.RequireRoot(t)
	bin := testenv.Binary(runner.WasmtimeBinaryName)
	if _, err := os.Stat(bin); err != nil || !slices.Contains(engine.Names(), "wasmtime") {
		t.Skipf("needs wasmtime and %s (make build)", bin)
	}
	startReaping(t)
	cache := t.TempDir()
	rt, err := New(Config{Engine: "wasmtime", CacheDir: cache}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	rt.wasmtimeRunner = bin
	ctx := context.Background()

	run := func(args ...string) (*container, error) {
		req, _, stdout := bundle(t, append([]string{"/app.wasm"}, args...), nil)
		tc, err := rt.Create(ctx, req)
		if err != nil {
			return nil, err
		}
		c := tc.(*container)
		exe, _ := os.Readlink("/proc/" + strconv.Itoa(c.Pid()) + "/exe")
		if filepath.Base(exe) != runner.WasmtimeBinaryName {
			t.Errorf("module process runs %s, want %s", exe, runner.WasmtimeBinaryName)
		}
		if _, err := c.Start(ctx, &taskAPI.StartRequest{ID: req.ID}); err != nil {
			t.Fatal(err)
		}
		waitReaped(t, c.init)
		buf := make([]byte, 64)
		n, _ := stdout.Read(buf)
		if got := string(buf[:n]); got != "hi\n" {
			t.Errorf("stdout %q", got)
		}
		c.init.SetExited(3)
		if _, err := c.Delete(ctx, &taskAPI.DeleteRequest{ID: req.ID}); err != nil {
			t.Fatal(err)
		}
		return c, nil
	}
	if _, err := run("echo", "hi", "exit", "3"); err != nil {
		t.Fatal(err)
	}
	code, _ := filepath.Glob(filepath.Join(cache, "wasmtime-*", "code", "*.cwasm"))
	if len(code) != 1 {
		t.Fatalf("cached code: %v, want one file", code)
	}
	if err := os.WriteFile(code[0], bytes.Repeat([]byte{0x5a}, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := run("echo", "hi", "exit", "3"); err == nil || !strings.Contains(err.Error(), "cannot load the compiled module "+code[0]) {
		t.Errorf("Create with a bad cached module: %v", err)
	}
	if _, err := os.Stat(code[0]); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the bad cached module was not dropped: %v", err)
	}
	if _, err := run("echo", "hi", "exit", "3"); err != nil {
		t.Errorf("Create after the bad cached module was dropped: %v", err)
	}
}
