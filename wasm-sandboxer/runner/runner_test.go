package runner

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

// The children are this test binary re-executed.
func TestMain(m *testing.M) {
	if IsChild() {
		Main()
		return
	}
	os.Exit(m.Run())
}

func program(t *testing.T) string {
	t.Helper()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "app.wasm")
	if err := os.WriteFile(p, prog, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func openFile(t *testing.T, p string, flags int) *os.File {
	t.Helper()
	f, err := os.OpenFile(p, flags, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// compile runs a compile child on module into entry.
func compile(t *testing.T, module, entry string, maxSize int64) (CompileResult, int, string) {
	t.Helper()
	req, _ := json.Marshal(CompileRequest{Engine: "wazero", Entry: entry, MaxSize: maxSize})
	cmd := exec.Command(os.Args[0])
	cmd.Env = []string{EnvMode + "=" + ModeCompile}
	cmd.Stdin = bytes.NewReader(req)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.ExtraFiles = []*os.File{openFile(t, module, os.O_RDONLY)}
	cmd.Run()
	var res CompileResult
	json.Unmarshal(stdout.Bytes(), &res)
	return res, cmd.ProcessState.ExitCode(), stderr.String()
}

// TestCompile: a compile child fills the entry it is given and reports
// the key of the bytes it read from its descriptor; it refuses a module
// past the size it is given and one the engine rejects.
func TestCompile(t *testing.T) {
	prog := program(t)
	wasm, _ := os.ReadFile(prog)
	entry := filepath.Join(t.TempDir(), "entry")
	res, code, stderr := compile(t, prog, entry, 64<<20)
	if code != 0 || res.Key != engine.Key(wasm) {
		t.Fatalf("exit %d, key %q (stderr %q); want 0, %s", code, res.Key, stderr, engine.Key(wasm))
	}
	if files, _ := filepath.Glob(filepath.Join(entry, "*", "*")); len(files) == 0 {
		t.Errorf("entry %s not filled", entry)
	}
	if _, code, stderr := compile(t, prog, filepath.Join(t.TempDir(), "e"), int64(len(wasm)-1)); code != ExitInvalidModule || !strings.Contains(stderr, "larger than") {
		t.Errorf("module past the size: exit %d, %q", code, stderr)
	}
	bad := filepath.Join(t.TempDir(), "bad.wasm")
	os.WriteFile(bad, []byte("\x00asm\x01\x00\x00\x00garbage"), 0o644)
	if _, code, stderr := compile(t, bad, filepath.Join(t.TempDir(), "e"), 1<<20); code != ExitInvalidModule || !strings.Contains(stderr, "invalid wasm module") {
		t.Errorf("invalid module: exit %d, %q", code, stderr)
	}
}

// run runs a module process as runc would, with its descriptors (the
// runner itself is /dev/null here) and returns its status, exit code and
// output.
func run(t *testing.T, cfg RunConfig, module, entry string) (Status, int, string) {
	t.Helper()
	data, _ := json.Marshal(cfg)
	config := filepath.Join(t.TempDir(), "config")
	os.WriteFile(config, data, 0o600)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	files := []*os.File{openFile(t, os.DevNull, os.O_RDONLY), openFile(t, config, os.O_RDONLY), w, openFile(t, module, os.O_RDONLY)}
	if entry != "" {
		files = append(files, openFile(t, entry, unix.O_PATH|unix.O_DIRECTORY))
	}
	// The module's offset is not at its start: the runner must not rely on it.
	io.CopyN(io.Discard, files[3], 10)
	cmd := exec.Command(os.Args[0])
	cmd.Env = []string{EnvMode + "=" + ModeRun}
	var stdout bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stdout
	cmd.ExtraFiles = files
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	var st Status
	json.NewDecoder(r).Decode(&st)
	cmd.Wait()
	return st, cmd.ProcessState.ExitCode(), stdout.String()
}

// TestRun: a module process reads its configuration, module and cache
// entry from its descriptors, reports ready (from the cache) or why not,
// then runs the module with its args and env.
func TestRun(t *testing.T) {
	prog := program(t)
	wasm, _ := os.ReadFile(prog)
	entry := filepath.Join(t.TempDir(), "entry")
	if _, code, stderr := compile(t, prog, entry, 64<<20); code != 0 {
		t.Fatalf("compile: %d %s", code, stderr)
	}
	cfg := RunConfig{Engine: "wazero", Key: engine.Key(wasm), Args: []string{"app.wasm", "env", "echo", "ran", "exit", "3"}, Env: []string{"A=b"}}
	for _, cached := range []bool{true, false} {
		c, e := cfg, ""
		if cached {
			c.Cached, e = true, entry
		}
		st, code, out := run(t, c, prog, e)
		if st.Error != "" || st.Cached != cached || code != 3 || !strings.Contains(out, "env:A=b\nran\n") {
			t.Errorf("cached %v: status %+v, exit %d, output %q", cached, st, code, out)
		}
		if strings.Contains(out, EnvMode) {
			t.Errorf("the module sees the runner's environment: %q", out)
		}
	}
	// Other bytes than the daemon read: refused, the container's fault.
	other := cfg
	other.Key = engine.Key([]byte("other"))
	if st, code, _ := run(t, other, prog, ""); !st.Invalid || !strings.Contains(st.Error, "changed") || code != 1 {
		t.Errorf("changed module: status %+v, exit %d", st, code)
	}
}
