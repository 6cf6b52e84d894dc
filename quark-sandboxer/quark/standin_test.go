package quark_test

// The stand-in for Quark, which cannot be had on these machines: the test
// binary, run under the name "quark", honours exactly the command line and
// PID-file contract Kuasar drives Quark with,
//
//	quark -r <bundle> sandbox --task-socket <sock> --id <id> --pid-file <file>
//
// daemonizes a sandbox process and returns; the sandbox serves containerd's
// task API (v3) on the socket and runs the containers the sandboxer
// prepared in its bundle, with their IO at the in-sandbox paths the
// sandboxer bound in. Pods whose ID starts with "fail-start", "no-pid" or
// "no-socket" make it break the contract in that way.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/internal/testrig"
)

const standinSandboxEnv = "KUASAR_GO_QUARK_STANDIN_SANDBOX"

type standinArgs struct {
	bundle, socket, id, pidFile string
}

// parseStandinArgs accepts exactly Kuasar's command line.
func parseStandinArgs(args []string) (standinArgs, error) {
	var a standinArgs
	if len(args) != 9 || args[0] != "-r" || args[2] != "sandbox" || args[3] != "--task-socket" ||
		args[5] != "--id" || args[7] != "--pid-file" {
		return a, fmt.Errorf("usage: quark -r BUNDLE sandbox --task-socket SOCK --id ID --pid-file FILE; got %q", args)
	}
	a = standinArgs{bundle: args[1], socket: args[4], id: args[6], pidFile: args[8]}
	for _, p := range []string{a.bundle, a.socket, a.pidFile} {
		if !filepath.IsAbs(p) {
			return a, fmt.Errorf("path %q is not absolute", p)
		}
	}
	return a, nil
}

// standinCLI is `quark sandbox`: check the bundle, start the sandbox
// process, write its PID once it serves, return.
func standinCLI() int {
	a, err := parseStandinArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "quark:", err)
		return 2
	}
	if err := checkSandboxBundle(a.bundle); err != nil {
		fmt.Fprintln(os.Stderr, "quark:", err)
		return 1
	}
	switch {
	case strings.HasPrefix(a.id, "fail-start"):
		fmt.Fprintf(os.Stderr, "quark: cannot start sandbox %s: no memory for the guest kernel (stand-in failure)\n", a.id)
		return 1
	case strings.HasPrefix(a.id, "no-pid"):
		return 0
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "quark:", err)
		return 1
	}
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Fprintln(os.Stderr, "quark:", err)
		return 1
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), standinSandboxEnv+"=1")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "quark: start sandbox:", err)
		return 1
	}
	w.Close()
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.Read(make([]byte, 1)); err != nil {
		fmt.Fprintln(os.Stderr, "quark: sandbox did not get ready:", err)
		cmd.Process.Kill()
		return 1
	}
	if err := os.WriteFile(a.pidFile, []byte(strconv.Itoa(cmd.Process.Pid)), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "quark:", err)
		cmd.Process.Kill()
		return 1
	}
	return 0
}

// checkSandboxBundle checks what Quark needs of the sandbox bundle.
func checkSandboxBundle(bundle string) error {
	var spec specs.Spec
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		return fmt.Errorf("config.json: %w", err)
	}
	if spec.Root == nil || spec.Root.Path != "rootfs" {
		return fmt.Errorf("config.json: root %+v, want rootfs", spec.Root)
	}
	if st, err := os.Stat(filepath.Join(bundle, "rootfs", "dev")); err != nil || !st.IsDir() {
		return fmt.Errorf("rootfs has no /dev: %v", err)
	}
	if wd, _ := os.Getwd(); wd != bundle {
		return fmt.Errorf("run from %s, not the bundle %s", wd, bundle)
	}
	return nil
}

// standinSandbox is the daemonized sandbox: it serves the task API.
func standinSandbox() {
	a, err := parseStandinArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "quark sandbox:", err)
		os.Exit(2)
	}
	ready := os.NewFile(3, "ready")
	if strings.HasPrefix(a.id, "no-socket") {
		ready.Write([]byte{1})
		select {}
	}
	l, err := net.Listen("unix", a.socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "quark sandbox:", err)
		os.Exit(1)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		os.Exit(1)
	}
	taskAPI.RegisterTTRPCTaskService(srv, &standin{root: a.bundle, procs: map[string]*standinProc{}})
	ready.Write([]byte{1})
	ready.Close()
	srv.Serve(context.Background(), l)
}

type standinProc struct {
	spec   *specs.Process
	rootfs string
	io     [3]string // in-sandbox paths
	cmd    *exec.Cmd
	done   chan struct{}
	status int
	at     time.Time
}

// standin serves containers from the bundles in its sandbox bundle.
type standin struct {
	testrig.Unimplemented
	root  string
	mu    sync.Mutex
	procs map[string]*standinProc
}

func key(id, execID string) string { return id + "/" + execID }

// inSandbox resolves an IO path as Quark sees it (relative to its bundle).
func (s *standin) inSandbox(p string) string {
	if p == "" {
		return ""
	}
	return filepath.Join(s.root, filepath.Clean("/"+p))
}

func (s *standin) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid())}, nil
}

func (s *standin) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (*taskAPI.CreateTaskResponse, error) {
	bundle := filepath.Join(s.root, r.ID)
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s was not prepared in the sandbox: %v", r.ID, err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil || spec.Process == nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "container %s: bad config.json: %v", r.ID, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.procs[key(r.ID, "")] = &standinProc{spec: spec.Process, rootfs: filepath.Join(bundle, "rootfs"),
		io: [3]string{s.inSandbox(r.Stdin), s.inSandbox(r.Stdout), s.inSandbox(r.Stderr)}, done: make(chan struct{})}
	return &taskAPI.CreateTaskResponse{Pid: uint32(os.Getpid())}, nil
}

func (s *standin) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	init, ok := s.procs[key(r.ID, "")]
	if !ok {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "container %s", r.ID)
	}
	var p specs.Process
	if err := json.Unmarshal(r.Spec.GetValue(), &p); err != nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "exec spec: %v", err)
	}
	s.procs[key(r.ID, r.ExecID)] = &standinProc{spec: &p, rootfs: init.rootfs,
		io: [3]string{s.inSandbox(r.Stdin), s.inSandbox(r.Stdout), s.inSandbox(r.Stderr)}, done: make(chan struct{})}
	return &emptypb.Empty{}, nil
}

func (s *standin) proc(id, execID string) (*standinProc, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.procs[key(id, execID)]
	if !ok {
		return nil, errgrpc.ToGRPCf(errdefs.ErrNotFound, "process %s/%s", id, execID)
	}
	return p, nil
}

func (s *standin) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if len(p.spec.Args) == 0 {
		return nil, errgrpc.ToGRPCf(errdefs.ErrInvalidArgument, "no args")
	}
	cmd := exec.Command(p.spec.Args[0], p.spec.Args[1:]...)
	cmd.Env = p.spec.Env
	cmd.Dir = p.spec.Cwd
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: p.rootfs, Pdeathsig: syscall.SIGKILL}
	for i, path := range p.io {
		if path == "" {
			continue
		}
		flag := os.O_WRONLY | os.O_APPEND
		if i == 0 {
			flag = os.O_RDONLY
		}
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "io %s: %v", path, err)
		}
		defer f.Close()
		switch i {
		case 0:
			cmd.Stdin = f
		case 1:
			cmd.Stdout = f
		case 2:
			cmd.Stderr = f
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, errgrpc.ToGRPCf(errdefs.ErrFailedPrecondition, "start: %v", err)
	}
	p.cmd = cmd
	go func() {
		cmd.Wait()
		p.status = cmd.ProcessState.ExitCode()
		p.at = time.Now()
		close(p.done)
	}()
	return &taskAPI.StartResponse{Pid: uint32(cmd.Process.Pid)}, nil
}

func (s *standin) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return &taskAPI.WaitResponse{ExitStatus: uint32(p.status), ExitedAt: protobuf.ToTimestamp(p.at)}, nil
}

func (s *standin) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	p, err := s.proc(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	delete(s.procs, key(r.ID, r.ExecID))
	s.mu.Unlock()
	return &taskAPI.DeleteResponse{ExitStatus: uint32(p.status)}, nil
}
