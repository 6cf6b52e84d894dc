package oci_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"go.uber.org/zap/zaptest"

	"github.com/kuasar-go/kuasar-go/shared/task"
	"github.com/kuasar-go/kuasar-go/shared/task/oci"
)

// testHook replaces each process by a shell that prints the file it gets
// as descriptor 3 and reports "ready" (or what fail says) on descriptor 4,
// a pipe whose other end Ready reads.
type testHook struct {
	t        *testing.T
	fail     error  // Init and Exec fail with it
	notReady string // the process reports this instead of "ready"
	released chan string
}

func (h *testHook) prepare(content, then string) (*oci.Prepared, []string, error) {
	if h.fail != nil {
		return nil, nil, h.fail
	}
	f, err := os.CreateTemp(h.t.TempDir(), "input")
	if err != nil {
		return nil, nil, err
	}
	f.WriteString(content)
	f.Seek(0, io.SeekStart)
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	report := "ready"
	if h.notReady != "" {
		report = h.notReady
	}
	args := []string{"sh", "-c", fmt.Sprintf("cat <&3; echo %s >&4; exec 4>&-; %s", report, then)}
	return &oci.Prepared{
		Files: []*os.File{f, w},
		Ready: func(ctx context.Context) error {
			b, err := io.ReadAll(r)
			if err != nil {
				return err
			}
			if s := strings.TrimSpace(string(b)); s != "ready" {
				return fmt.Errorf("not ready: %q: %w", s, errdefs.ErrInvalidArgument)
			}
			return nil
		},
		Release: func() {
			r.Close()
			h.released <- content
		},
	}, args, nil
}

func (h *testHook) Init(ctx context.Context, bundle string, spec *specs.Spec) (*oci.Prepared, error) {
	p, args, err := h.prepare("init-input:"+spec.Process.Args[0]+"\n", "sleep 1000")
	if err == nil {
		spec.Process.Args = args
	}
	return p, err
}

func (h *testHook) Exec(ctx context.Context, bundle string, spec *specs.Spec, ps *specs.Process) (*oci.Prepared, error) {
	p, args, err := h.prepare("exec-input:"+ps.Args[0]+"\n", "exit 6")
	if err == nil {
		ps.Args = args
	}
	return p, err
}

func newHookEnv(t *testing.T, h *testHook) *env {
	t.Helper()
	e := newEnv(t, false, "original")
	rt, err := oci.NewRuntime(task.RuntimeConfig{Root: e.root}, zaptest.NewLogger(t), oci.WithHook(h))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	e.rt = rt
	return e
}

// TestHook: a hook adapts the init's spec (written back to the bundle for
// runc) and each exec's process, hands them descriptors, and Start waits
// until the process says it is ready; the record keeps the exec as it was
// asked for.
func TestHook(t *testing.T) {
	h := &testHook{t: t, released: make(chan string, 4)}
	e := newHookEnv(t, h)
	out := fifo(t, "stdout")
	got := readFIFO(t, out)
	c := e.create(stdio.Stdio{Stdout: out})
	init, _ := c.Process("")
	var spec specs.Spec
	data, _ := os.ReadFile(filepath.Join(e.bundle, "config.json"))
	if err := json.Unmarshal(data, &spec); err != nil || spec.Process.Args[0] != "sh" {
		t.Fatalf("bundle spec not adapted: %v %q", err, spec.Process.Args)
	}
	if _, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id}); err != nil {
		t.Fatalf("start: %v", err)
	}
	if r := recv(t, "release", h.released); r != "init-input:original\n" {
		t.Errorf("released %q", r)
	}
	status, output := execRun(t, c, "exec1", false, "exec-original")
	if status != 6 || output != "exec-input:exec-original\n" {
		t.Errorf("exec: status %d, output %q", status, output)
	}
	recv(t, "exec release", h.released)
	rec, err := c.(task.Recorded).Record()
	if err != nil || !strings.Contains(string(rec), `"args":["exec-original"]`) {
		t.Errorf("record %s, %v: want the exec as asked for", rec, err)
	}
	if err := c.Kill(nsCtx(), &taskAPI.KillRequest{ID: e.id, Signal: 9, All: true}); err != nil {
		t.Fatal(err)
	}
	waitExit(t, init)
	if s := recv(t, "stdout", got); s != "init-input:original\n" {
		t.Errorf("init output %q", s)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id, ExecID: "exec1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
		t.Fatal(err)
	}
	e.checkGone()
}

// TestHookFailures: a hook's error fails Create and leaves nothing; a
// process that does not get ready fails Start and is killed; a created,
// never started container releases what the hook prepared at Delete.
func TestHookFailures(t *testing.T) {
	t.Run("init", func(t *testing.T) {
		h := &testHook{t: t, fail: fmt.Errorf("no such module: %w", errdefs.ErrInvalidArgument), released: make(chan string, 4)}
		e := newHookEnv(t, h)
		if _, err := e.rt.Create(nsCtx(), e.request(stdio.Stdio{})); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Fatalf("create: %v, want the hook's error", err)
		}
		e.checkGone()
	})
	t.Run("not ready", func(t *testing.T) {
		h := &testHook{t: t, notReady: "link-error", released: make(chan string, 4)}
		e := newHookEnv(t, h)
		c := e.create(stdio.Stdio{})
		init, _ := c.Process("")
		_, err := c.Start(nsCtx(), &taskAPI.StartRequest{ID: e.id})
		if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "link-error") {
			t.Fatalf("start: %v, want the process's report", err)
		}
		// Killed: it would have slept for 1000 s.
		if status := waitExit(t, init); status != 137 {
			t.Errorf("exit status %d, want 137", status)
		}
		recv(t, "release", h.released)
		if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
			t.Fatal(err)
		}
		e.checkGone()
	})
	t.Run("deleted unstarted", func(t *testing.T) {
		h := &testHook{t: t, released: make(chan string, 4)}
		e := newHookEnv(t, h)
		c := e.create(stdio.Stdio{})
		select {
		case r := <-h.released:
			t.Fatalf("released %q before Start or Delete", r)
		default:
		}
		if _, err := c.Delete(nsCtx(), &taskAPI.DeleteRequest{ID: e.id}); err != nil {
			t.Fatal(err)
		}
		recv(t, "release", h.released)
		e.checkGone()
	})
}
