package wasmrt

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

var wasmHeader = []byte{0, 'a', 's', 'm', 1, 0, 0, 0}

func TestModulePath(t *testing.T) {
	root := t.TempDir()
	for p, data := range map[string][]byte{
		"/app.wasm":         wasmHeader,
		"/bin/tool.wasm":    wasmHeader,
		"/srv/rel/run.wasm": wasmHeader,
	} {
		full := filepath.Join(root, p)
		os.MkdirAll(filepath.Dir(full), 0o755)
		if err := os.WriteFile(full, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(filepath.Join(root, "dir.wasm"), 0o755)
	// A symlink pointing out of the rootfs resolves inside it.
	os.Symlink("/etc/passwd", filepath.Join(root, "escape.wasm"))
	os.Symlink("/app.wasm", filepath.Join(root, "link.wasm"))
	tests := []struct {
		name      string
		ps        specs.Process
		wantGuest string
		wantHost  string
		wantErr   string
	}{
		{name: "absolute", ps: specs.Process{Args: []string{"/app.wasm"}}, wantGuest: "/app.wasm", wantHost: "/app.wasm"},
		{name: "relative to cwd", ps: specs.Process{Args: []string{"rel/run.wasm"}, Cwd: "/srv"}, wantGuest: "/srv/rel/run.wasm", wantHost: "/srv/rel/run.wasm"},
		{name: "PATH lookup", ps: specs.Process{Args: []string{"tool.wasm"}, Env: []string{"PATH=/usr/bin:/bin"}}, wantGuest: "/bin/tool.wasm", wantHost: "/bin/tool.wasm"},
		{name: "bare name without PATH", ps: specs.Process{Args: []string{"app.wasm"}}, wantGuest: "/app.wasm", wantHost: "/app.wasm"},
		{name: "symlink inside", ps: specs.Process{Args: []string{"/link.wasm"}}, wantGuest: "/link.wasm", wantHost: "/app.wasm"},
		{name: "symlink out of the rootfs", ps: specs.Process{Args: []string{"/escape.wasm"}}, wantErr: "not found in the container's rootfs"},
		{name: "dot-dot", ps: specs.Process{Args: []string{"/../../etc/passwd"}}, wantErr: "not found"},
		{name: "missing", ps: specs.Process{Args: []string{"/nosuch.wasm"}}, wantErr: "not found"},
		{name: "directory", ps: specs.Process{Args: []string{"/dir.wasm"}}, wantErr: "not found"},
		{name: "no args", ps: specs.Process{}, wantErr: "process.args is empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			guest, host, err := modulePath(root, &tc.ps)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, errdefs.ErrInvalidArgument) {
					t.Fatalf("error %v, want InvalidArgument %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || guest != tc.wantGuest || host != filepath.Join(root, tc.wantHost) {
				t.Fatalf("got %q %q %v; want %q %q", guest, host, err, tc.wantGuest, filepath.Join(root, tc.wantHost))
			}
		})
	}
}

func TestReadModule(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"module", wasmHeader, ""},
		{"script", []byte("#!/bin/sh\necho hi\n"), "is not a WebAssembly module"},
		{"empty", nil, "is not a WebAssembly module"},
	} {
		p := filepath.Join(dir, tc.name)
		os.WriteFile(p, tc.data, 0o644)
		got, err := readModule("/"+tc.name, p)
		if tc.wantErr == "" {
			if err != nil || !bytes.Equal(got, tc.data) {
				t.Errorf("%s: %v", tc.name, err)
			}
		} else if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: error %v, want InvalidArgument %q", tc.name, err, tc.wantErr)
		}
	}
}

func TestPodNamespaces(t *testing.T) {
	tests := []struct {
		name     string
		ns       []specs.LinuxNamespace
		wantJoin map[int]string
		wantNew  uintptr
		wantErr  bool
	}{
		{name: "pod namespaces", ns: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace, Path: "/proc/9/ns/pid"}, {Type: specs.NetworkNamespace, Path: "/proc/9/ns/net"},
			{Type: specs.IPCNamespace, Path: "/proc/9/ns/ipc"}, {Type: specs.UTSNamespace, Path: "/proc/9/ns/uts"},
			{Type: specs.MountNamespace},
		}, wantJoin: map[int]string{unix.CLONE_NEWPID: "/proc/9/ns/pid", unix.CLONE_NEWNET: "/proc/9/ns/net",
			unix.CLONE_NEWIPC: "/proc/9/ns/ipc", unix.CLONE_NEWUTS: "/proc/9/ns/uts"}},
		{name: "own PID namespace", ns: []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace, Path: "/n"}},
			wantJoin: map[int]string{unix.CLONE_NEWNET: "/n"}, wantNew: unix.CLONE_NEWPID},
		{name: "user namespace", ns: []specs.LinuxNamespace{{Type: specs.UserNamespace}}, wantErr: true},
	}
	for _, tc := range tests {
		join, newNS, err := podNamespaces(&specs.Spec{Linux: &specs.Linux{Namespaces: tc.ns}})
		if tc.wantErr {
			if err == nil {
				t.Errorf("%s: no error", tc.name)
			}
			continue
		}
		if err != nil || newNS != tc.wantNew || len(join) != len(tc.wantJoin) {
			t.Errorf("%s: join %v new %x err %v; want %v %x", tc.name, join, newNS, err, tc.wantJoin, tc.wantNew)
		}
		for k, v := range tc.wantJoin {
			if join[k] != v {
				t.Errorf("%s: join[%x] = %q, want %q", tc.name, k, join[k], v)
			}
		}
	}
}

// TestStartIn: a process started by reap.Monitor.StartIn is born in the namespaces it
// was given, the PID namespace included, and no thread of this process is
// left in them.
func TestStartIn(t *testing.T) {
	testenv.RequireRoot(t)
	startReaping(t)
	// A process owning new PID, IPC and UTS namespaces, in a new netns.
	netns := testenv.NewNetns(t)
	owner := exec.Command("/bin/sleep", "60")
	owner.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS}
	ec, err := reap.Monitor.Start(owner)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		owner.Process.Kill()
		reap.Monitor.Wait(owner, ec)
	})
	nsOf := func(pid int, ns string) string {
		l, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "ns", ns))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	join := map[int]string{unix.CLONE_NEWNET: netns}
	for flag, ns := range map[int]string{unix.CLONE_NEWPID: "pid", unix.CLONE_NEWIPC: "ipc", unix.CLONE_NEWUTS: "uts"} {
		join[flag] = filepath.Join("/proc", strconv.Itoa(owner.Process.Pid), "ns", ns)
	}
	var out bytes.Buffer
	cmd := exec.Command("/bin/sh", "-c", "readlink /proc/self/ns/net /proc/self/ns/pid /proc/self/ns/ipc /proc/self/ns/uts")
	cmd.Stdout = &out
	cec, err := reap.Monitor.StartIn(cmd, join)
	if err != nil {
		t.Fatal(err)
	}
	if status, err := reap.Monitor.Wait(cmd, cec); err != nil || status != 0 {
		t.Fatalf("child: %d %v", status, err)
	}
	want := strings.Join([]string{
		mustReadlink(t, netns), nsOf(owner.Process.Pid, "pid"), nsOf(owner.Process.Pid, "ipc"), nsOf(owner.Process.Pid, "uts"),
	}, "\n") + "\n"
	if out.String() != want {
		t.Errorf("child's namespaces:\n%s\nwant:\n%s", out.String(), want)
	}
	self := os.Getpid()
	tasks, _ := filepath.Glob(filepath.Join("/proc", strconv.Itoa(self), "task", "*"))
	for _, task := range tasks {
		for ns, own := range map[string]string{"net": "net", "ipc": "ipc", "uts": "uts", "pid_for_children": "pid"} {
			l, err := os.Readlink(filepath.Join(task, "ns", ns))
			if err == nil && l != nsOf(self, own) {
				t.Errorf("thread %s left in %s %s", filepath.Base(task), ns, l)
			}
		}
	}
	// A path that is no namespace fails cleanly.
	if _, err := reap.Monitor.StartIn(exec.Command("/bin/true"), map[int]string{unix.CLONE_NEWNET: "/nosuch"}); err == nil {
		t.Error("StartIn with a missing namespace path succeeded")
	}
}

func mustReadlink(t *testing.T, p string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return "net:[" + strconv.Itoa(int(st.Ino)) + "]"
}

// TestEngineFor: the engine annotation chooses only among the engines the
// operator allowed; an engine the build lacks is InvalidArgument.
func TestEngineFor(t *testing.T) {
	tests := []struct {
		name       string
		allowed    []string
		annotation string
		want       string
		wantErr    error
		wantMsg    string
	}{
		{name: "default", want: "wazero"},
		{name: "default named", annotation: "wazero", want: "wazero"},
		{name: "allowed", allowed: []string{"wazero", "other"}, annotation: "wazero", want: "wazero"},
		{name: "not allowed", annotation: "other", wantErr: errdefs.ErrPermissionDenied, wantMsg: "wasm.allowed_engines: wazero"},
		{name: "not in the allowed list", allowed: []string{"wazero"}, annotation: "other", wantErr: errdefs.ErrPermissionDenied, wantMsg: "did not allow"},
		{name: "unknown", allowed: []string{"wazero"}, annotation: "v8", wantErr: errdefs.ErrInvalidArgument, wantMsg: `unknown wasm engine "v8"`},
	}
	other := ""
	for _, n := range engine.Names() {
		if n != "wazero" {
			other = n
		}
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if other == "" && slices.Contains(append(tc.allowed, tc.annotation), "other") {
				t.Skip("this build has wazero only")
			}
			for i, a := range tc.allowed {
				if a == "other" {
					tc.allowed[i] = other
				}
			}
			if tc.annotation == "other" {
				tc.annotation = other
			}
			rt := &Runtime{cfg: Config{Engine: "wazero", AllowedEngines: tc.allowed}}
			spec := &specs.Spec{Annotations: map[string]string{}}
			if tc.annotation != "" {
				spec.Annotations[EngineAnnotation] = tc.annotation
			}
			got, err := rt.engineFor(spec)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.wantMsg) {
					t.Fatalf("error %v, want %v naming %q", err, tc.wantErr, tc.wantMsg)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("engine %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
