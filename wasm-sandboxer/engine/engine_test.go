package engine

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// The tests run modules in a child process (this test binary re-executed),
// as the sandboxer does: engines write to the process's own streams.
const helperEnv = "KUASAR_GO_ENGINE_TEST_HELPER"

type helperReq struct {
	Engine   string
	Module   string // path
	Args     []string
	Env      []string
	Root     string
	CacheDir string
	MaxMem   uint64
}

type helperResp struct {
	Code      int
	Err       string
	Cached    bool
	CompileMS int64
	PeakRSSKB int64
	// SharedCode: the compiled code is mapped from a shared file.
	SharedCode bool
	// Released: the engine dropped its decoded copy of the module after
	// instantiation (DecodedReleaser, as the module process does).
	Released bool
}

func TestMain(m *testing.M) {
	if req := os.Getenv(helperEnv); req != "" {
		os.Exit(helper(req))
	}
	os.Exit(m.Run())
}

// helper compiles and runs one module and reports on fd 3.
func helper(reqJSON string) int {
	var req helperReq
	if err := json.Unmarshal([]byte(reqJSON), &req); err != nil {
		panic(err)
	}
	out := os.NewFile(3, "resp")
	resp := helperResp{}
	defer func() { json.NewEncoder(out).Encode(resp) }()
	ctx := context.Background()
	wasm, err := os.ReadFile(req.Module)
	if err != nil {
		resp.Err = err.Error()
		return 0
	}
	opts := Options{MaxMemoryBytes: req.MaxMem}
	if req.CacheDir != "" {
		// One entry per module, as the sandboxer's compile child fills them.
		opts.Cache = EntryDir(req.CacheDir, req.Engine, Key(wasm))
	}
	e, err := New(req.Engine, opts)
	if err != nil {
		resp.Err = err.Error()
		return 0
	}
	t0 := time.Now()
	m, err := e.Compile(ctx, wasm)
	resp.CompileMS = time.Since(t0).Milliseconds()
	resp.PeakRSSKB = peakRSS()
	if err != nil {
		resp.Err = err.Error()
		return 0
	}
	resp.Cached = m.Cached()
	if maps, err := os.ReadFile("/proc/self/maps"); err == nil {
		resp.SharedCode = bytes.Contains(maps, []byte(".code\n"))
	}
	inst, err := m.Instantiate(ctx, RunConfig{Args: req.Args, Env: req.Env, Root: req.Root, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
	if err != nil {
		resp.Err = err.Error()
		return 0
	}
	defer inst.Close(ctx)
	if r, ok := inst.(DecodedReleaser); ok {
		resp.Released = r.ReleaseDecoded()
	}
	resp.Code, err = inst.Run(ctx)
	if err != nil {
		resp.Err = err.Error()
	}
	return 0
}

func peakRSS() int64 {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM:") {
			var kb int64
			for _, f := range strings.Fields(l)[1:2] {
				for _, c := range f {
					kb = kb*10 + int64(c-'0')
				}
			}
			return kb
		}
	}
	return 0
}

type run struct {
	resp           helperResp
	stdout, stderr string
}

func runHelper(t *testing.T, req helperReq) run {
	t.Helper()
	data, _ := json.Marshal(req)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+string(data))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.ExtraFiles = []*os.File{w}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	var resp helperResp
	decErr := json.NewDecoder(r).Decode(&resp)
	if err := cmd.Wait(); err != nil || decErr != nil {
		t.Fatalf("helper: %v, %v; stderr %s", err, decErr, stderr.String())
	}
	return run{resp: resp, stdout: stdout.String(), stderr: stderr.String()}
}

// fixture writes the test program and the hand-made modules into a root
// directory with a file to read.
func fixture(t *testing.T) string {
	t.Helper()
	prog, err := testenv.WasmTestProgram("wasip1", "wasm")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	files := map[string][]byte{"/app.wasm": prog, "/etc/greeting": []byte(testenv.WasmGreeting)}
	for p, b := range testenv.WasmModules {
		files[p] = b
	}
	for p, b := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// TestEngines runs modules with every built-in engine, each run in a
// process of its own sharing one cache directory: the first run compiles
// the test program, the later ones load it from the cache, much faster.
func TestEngines(t *testing.T) {
	if len(Names()) == 0 {
		t.Fatal("no engine built in")
	}
	root := fixture(t)
	for _, name := range Names() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			cache := t.TempDir()
			tests := []struct {
				name       string
				module     string
				args       []string
				maxMem     uint64
				wantCode   int
				wantErr    error
				wantStdout []string
				wantStderr string
			}{
				{name: "args env file exit code", module: "/app.wasm",
					args:     []string{"/app.wasm", "args", "env", "cat", "/etc/greeting", "stderr", "to-stderr", "exit", "7"},
					wantCode: 7,
					wantStdout: []string{"arg[0]=/app.wasm\n", "arg[8]=7\n", "env:GREETING=hello world\n",
						testenv.WasmGreeting + "\n"},
					wantStderr: "to-stderr\n"},
				{name: "write then read in the root", module: "/app.wasm",
					args:       []string{"/app.wasm", "write", "/written", "round-trip", "cat", "/written"},
					wantStdout: []string{"round-trip\n"}},
				{name: "no escape above the root", module: "/app.wasm",
					args:     []string{"/app.wasm", "cat", "/../../../../etc/hostname"},
					wantCode: 1, wantStderr: "cat: "},
				{name: "allocation within the memory cap", module: "/app.wasm", maxMem: 256 << 20,
					args: []string{"/app.wasm", "alloc", "32"}, wantStdout: []string{"allocated 32 MiB\n"}},
				{name: "allocation past the memory cap", module: "/app.wasm", maxMem: 64 << 20,
					args: []string{"/app.wasm", "alloc", "128"}, wantCode: 2, wantStderr: "out of memory"},
				{name: "_start returns", module: "/empty.wasm", args: []string{"/empty.wasm"}},
				{name: "trap", module: "/trap.wasm", args: []string{"/trap.wasm"}, wantErr: ErrTrap},
				{name: "missing import", module: "/badimport.wasm", args: []string{"/badimport.wasm"}, wantErr: ErrLink},
				{name: "not wasm", module: "/notwasm.wasm", args: []string{"/notwasm.wasm"}, wantErr: ErrInvalidModule},
			}
			var compiles []helperResp // of /app.wasm, in order
			for _, tc := range tests {
				got := runHelper(t, helperReq{
					Engine: name, Module: filepath.Join(root, tc.module), Args: tc.args,
					Env: []string{"GREETING=hello world"}, Root: root, CacheDir: cache, MaxMem: tc.maxMem,
				})
				if tc.module == "/app.wasm" {
					compiles = append(compiles, got.resp)
				}
				if tc.wantErr != nil {
					if !strings.Contains(got.resp.Err, errMsg(tc.wantErr)) {
						t.Errorf("%s: error %q, want %q", tc.name, got.resp.Err, tc.wantErr)
					}
					continue
				}
				// wazero's decoded bodies and data segments are dropped
				// before the module runs (and it still runs right).
				if name == "wazero" && !got.resp.Released {
					t.Errorf("%s: wazero's decoded module not released", tc.name)
				}
				if got.resp.Err != "" || got.resp.Code != tc.wantCode {
					t.Errorf("%s: exit %d, error %q; want exit %d; stderr %q", tc.name, got.resp.Code, got.resp.Err, tc.wantCode, got.stderr)
				}
				for _, s := range tc.wantStdout {
					if !strings.Contains(got.stdout, s) {
						t.Errorf("%s: stdout lacks %q:\n%s", tc.name, s, got.stdout)
					}
				}
				if !strings.Contains(got.stderr, tc.wantStderr) {
					t.Errorf("%s: stderr %q lacks %q", tc.name, got.stderr, tc.wantStderr)
				}
			}
			if _, err := os.Stat(filepath.Join(root, "written")); err != nil {
				t.Errorf("file written by the module is not in the root: %v", err)
			}

			// The cache: compiled once, then loaded.
			first, second := compiles[0], compiles[1]
			t.Logf("%s: compile %d ms (peak RSS %d MiB), from cache %d ms (peak RSS %d MiB)", name,
				first.CompileMS, first.PeakRSSKB>>10, second.CompileMS, second.PeakRSSKB>>10)
			for i, c := range compiles {
				if c.Cached != (i > 0) {
					t.Errorf("run %d of /app.wasm: cached %v", i, c.Cached)
				}
				// wazero's code: written to a file by the compile, mapped
				// from it by the later processes.
				if name == "wazero" && c.SharedCode != (i > 0) {
					t.Errorf("run %d of /app.wasm: code mapped from a shared file %v", i, c.SharedCode)
				}
			}
			if second.CompileMS*3 > first.CompileMS {
				t.Errorf("loading from the cache took %d ms, compiling %d ms: not a cache hit", second.CompileMS, first.CompileMS)
			}
			prog, _ := os.ReadFile(filepath.Join(root, "app.wasm"))
			entry := EntryDir(cache, name, Key(prog))
			if files, _ := filepath.Glob(filepath.Join(entry, "*")); len(files) == 0 {
				t.Errorf("cache entry %s holds no code", entry)
			}
			if !InCache(cache, name, Key(prog)) || InCache(cache, name, Key([]byte("other"))) || InCache("", name, Key(prog)) {
				t.Error("InCache does not tell the cached module from others")
			}
			// wazero's shared code file is used only when it holds the very
			// bytes of the code: a corrupted one leaves the private copy.
			if name == "wazero" {
				files, _ := filepath.Glob(filepath.Join(entry, "shared", "*.code"))
				if len(files) == 0 {
					t.Fatal("no shared code file")
				}
				for _, f := range files {
					fi, err := os.Stat(f)
					if err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(f, bytes.Repeat([]byte{0xcc}, int(fi.Size())), 0o600); err != nil {
						t.Fatal(err)
					}
				}
				r := runHelper(t, helperReq{Engine: name, Module: filepath.Join(root, "app.wasm"), Root: root, CacheDir: cache,
					Args: []string{"/app.wasm", "echo", "still-runs", "exit", "4"}})
				if r.resp.SharedCode || r.resp.Err != "" || r.resp.Code != 4 || !strings.Contains(r.stdout, "still-runs") {
					t.Errorf("corrupted code file: shared %v, exit %d, error %q, stdout %q", r.resp.SharedCode, r.resp.Code, r.resp.Err, r.stdout)
				}
			}
			// Without a cache directory nothing is cached.
			if r := runHelper(t, helperReq{Engine: name, Module: filepath.Join(root, "empty.wasm"), Args: []string{"empty.wasm"}}); r.resp.Cached || r.resp.Err != "" {
				t.Errorf("without a cache: cached %v, err %q", r.resp.Cached, r.resp.Err)
			}
		})
	}
}

func errMsg(err error) string { return err.Error() }

func TestUnknownEngine(t *testing.T) {
	_, err := New("nosuch", Options{})
	if !errors.Is(err, ErrUnknownEngine) || !strings.Contains(err.Error(), "wazero") {
		t.Errorf("New(nosuch): %v; want ErrUnknownEngine listing the built-in engines", err)
	}
	if err := Check("wazero"); err != nil {
		t.Errorf("Check(wazero): %v", err)
	}
}

// TestKey: the streamed key is the key of the bytes; another module has
// another key; entries are per engine and key.
func TestKey(t *testing.T) {
	wasm := bytes.Repeat([]byte("\x00asm\x01\x00\x00\x00"), 100_000)
	streamed, err := KeyOf(bytes.NewReader(wasm))
	if err != nil || streamed != Key(wasm) || len(streamed) != 64 {
		t.Fatalf("KeyOf %q, %v; Key %q", streamed, err, Key(wasm))
	}
	if Key(wasm[1:]) == Key(wasm) {
		t.Error("two modules, one key")
	}
	if a, b := EntryDir("/c", "wazero", "k"), EntryDir("/c", "wazero", "l"); a == b || filepath.Dir(a) != filepath.Dir(b) {
		t.Errorf("entries %s and %s", a, b)
	}
}
