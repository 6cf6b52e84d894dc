package spawn

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	runc "github.com/containerd/go-runc"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// The server becomes a child subreaper and reaps every child of its
// process, which would steal the exits of the test's own children: it runs
// in a copy of the test binary instead, selected by these variables.
const (
	serverSocketEnv = "SPAWN_TEST_SERVER_SOCKET"
	serverRingEnv   = "SPAWN_TEST_SERVER_RING"
)

func TestMain(m *testing.M) {
	if sock := os.Getenv(serverSocketEnv); sock != "" {
		os.Exit(runServer(sock))
	}
	os.Exit(m.Run())
}

func runServer(sock string) int {
	ring, _ := strconv.Atoi(os.Getenv(serverRingEnv))
	cfg := zap.NewDevelopmentConfig()
	cfg.Level = zap.NewAtomicLevelAt(zap.WarnLevel)
	log, err := cfg.Build()
	if err != nil {
		log = zap.NewNop()
	}
	s, err := NewServer(log, ring)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		_ = s.Close()
	}()
	if err := s.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

type testServer struct {
	*Client
	cmd    *exec.Cmd
	exited chan error // the server process's exit
	killed bool       // the test killed the server on purpose
}

// startServer runs a server in a child process; ringSize 0 is the default.
func startServer(t *testing.T, ringSize int) *testServer {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	if len(sock) >= 100 { // sun_path holds 108 bytes
		d, err := os.MkdirTemp("", "spawn")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(d) })
		sock = filepath.Join(d, "s.sock")
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), serverSocketEnv+"="+sock, serverRingEnv+"="+strconv.Itoa(ringSize))
	if os.Getenv("GORACE") == "" {
		// Under -race a program waits 1s at exit for late race reports.
		cmd.Env = append(cmd.Env, "GORACE=atexit_sleep_ms=100")
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	srv := &testServer{cmd: cmd, exited: make(chan error, 1)}
	go func() { srv.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		// SIGTERM makes it Close, after which Serve returns nil and the
		// server exits 0; SIGKILL if that takes too long.
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-srv.exited:
			if err != nil && !srv.killed {
				t.Errorf("server exited after SIGTERM: %v", err)
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-srv.exited
			t.Error("server did not exit within 10s of SIGTERM")
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			_ = c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not listen on %s: %v", sock, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	srv.Client = &Client{Socket: sock}
	return srv
}

func run(t *testing.T, c *Client, cmd *exec.Cmd) (int, error) {
	t.Helper()
	ec, err := c.Start(cmd)
	if err != nil {
		t.Fatalf("start %v: %v", cmd.Args, err)
	}
	return c.Wait(cmd, ec)
}

func TestExitCode(t *testing.T) {
	srv := startServer(t, 0)
	status, err := run(t, srv.Client, exec.Command("sh", "-c", "exit 3"))
	if err != nil || status != 3 {
		t.Fatalf("got %d, %v; want 3", status, err)
	}
}

func TestKilledBySignal(t *testing.T) {
	srv := startServer(t, 0)
	t.Run("self", func(t *testing.T) {
		status, err := run(t, srv.Client, exec.Command("sh", "-c", "kill -9 $$"))
		if err != nil || status != 137 {
			t.Fatalf("got %d, %v; want 137", status, err)
		}
	})
	t.Run("cmd.Process.Kill", func(t *testing.T) {
		cmd := exec.Command("sleep", "30")
		ec, err := srv.Start(cmd)
		if err != nil {
			t.Fatal(err)
		}
		if cmd.Process == nil || cmd.Process.Pid <= 0 {
			t.Fatalf("cmd.Process not set: %+v", cmd.Process)
		}
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		status, err := srv.Wait(cmd, ec)
		if err != nil || status != 137 {
			t.Fatalf("got %d, %v; want 137", status, err)
		}
	})
	t.Run("context", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		cmd := exec.CommandContext(ctx, "sleep", "30")
		ec, err := srv.Start(cmd)
		if err != nil {
			t.Fatal(err)
		}
		cancel()
		status, err := srv.Wait(cmd, ec)
		if err != nil || status != 137 {
			t.Fatalf("got %d, %v; want 137", status, err)
		}
	})
}

func TestStdio(t *testing.T) {
	srv := startServer(t, 0)
	t.Run("reader and writer", func(t *testing.T) {
		in := strings.Repeat("some input\n", 10000) // more than a pipe buffer
		var out bytes.Buffer
		cmd := exec.Command("cat")
		cmd.Stdin = strings.NewReader(in)
		cmd.Stdout = &out
		if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
			t.Fatalf("got %d, %v", status, err)
		}
		if out.String() != in {
			t.Fatalf("output: %d bytes, want %d", out.Len(), len(in))
		}
	})
	t.Run("combined", func(t *testing.T) {
		// go-runc's cmdOutput: one buffer for both.
		var out bytes.Buffer
		cmd := exec.Command("sh", "-c", "echo out; echo err >&2")
		cmd.Stdout, cmd.Stderr = &out, &out
		if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
			t.Fatalf("got %d, %v", status, err)
		}
		if out.String() != "out\nerr\n" {
			t.Fatalf("output %q", out.String())
		}
	})
	t.Run("separate", func(t *testing.T) {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command("sh", "-c", "echo out; echo err >&2; exit 1")
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if status, err := run(t, srv.Client, cmd); err != nil || status != 1 {
			t.Fatalf("got %d, %v", status, err)
		}
		if stdout.String() != "out\n" || stderr.String() != "err\n" {
			t.Fatalf("stdout %q, stderr %q", stdout.String(), stderr.String())
		}
	})
	t.Run("no stdio is /dev/null", func(t *testing.T) {
		cmd := exec.Command("sh", "-c", `[ "$(readlink /proc/self/fd/0)" = /dev/null ] && [ "$(readlink /proc/$$/fd/1)" = /dev/null ]`)
		if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
			t.Fatalf("got %d, %v", status, err)
		}
	})
	t.Run("file", func(t *testing.T) {
		f, err := os.Create(filepath.Join(t.TempDir(), "out"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd := exec.Command("echo", "to a file")
		cmd.Stdout = f
		if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
			t.Fatalf("got %d, %v", status, err)
		}
		b, err := os.ReadFile(f.Name())
		if err != nil || string(b) != "to a file\n" {
			t.Fatalf("file holds %q, %v", b, err)
		}
	})
	t.Run("StdoutPipe", func(t *testing.T) {
		// runc.Stats and runc.Events read through cmd.StdoutPipe until EOF.
		cmd := exec.Command("echo", "piped")
		rd, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		ec, err := srv.Start(cmd)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		var b []byte
		go func() {
			defer close(done)
			b, err = io.ReadAll(rd)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("no EOF on StdoutPipe: the child's end stayed open")
		}
		if err != nil || string(b) != "piped\n" {
			t.Fatalf("read %q, %v", b, err)
		}
		if status, err := srv.Wait(cmd, ec); err != nil || status != 0 {
			t.Fatalf("got %d, %v", status, err)
		}
	})
}

func TestExtraFiles(t *testing.T) {
	srv := startServer(t, 0)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command("sh", "-c", "echo hi >&3")
	cmd.ExtraFiles = []*os.File{w}
	status, err := run(t, srv.Client, cmd)
	_ = w.Close()
	if err != nil || status != 0 {
		t.Fatalf("got %d, %v", status, err)
	}
	b, err := io.ReadAll(r)
	if err != nil || string(b) != "hi\n" {
		t.Fatalf("read %q, %v", b, err)
	}
}

func TestSysProcAttr(t *testing.T) {
	srv := startServer(t, 0)
	var out bytes.Buffer
	cmd := exec.Command("sh", "-c", `echo $$ $(cut -d" " -f5 /proc/$$/stat)`)
	cmd.Stdout = &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
		t.Fatalf("got %d, %v", status, err)
	}
	f := strings.Fields(out.String())
	if len(f) != 2 || f[0] != f[1] {
		t.Fatalf("pid and process group: %q, want equal", out.String())
	}

	cmd = exec.Command("true")
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: "/"}
	if _, err := srv.Start(cmd); err == nil {
		t.Fatal("unsupported SysProcAttr field accepted")
	}
}

func TestStartErrors(t *testing.T) {
	srv := startServer(t, 0)
	cmd := exec.Command("/nonexistent/program")
	var out bytes.Buffer
	cmd.Stdout = &out
	if _, err := srv.Start(cmd); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("got %v, want no such file", err)
	}
	if cmd.Process != nil {
		t.Fatal("cmd.Process set after a failed start")
	}
	// The server is still fine afterwards.
	if status, err := run(t, srv.Client, exec.Command("true")); err != nil || status != 0 {
		t.Fatalf("got %d, %v", status, err)
	}
	// No server at all.
	bad := &Client{Socket: filepath.Join(t.TempDir(), "none.sock")}
	if _, err := bad.Start(exec.Command("true")); err == nil {
		t.Fatal("start without a server succeeded")
	}
}

// A relative Dir and Path resolve in the client's working directory, not the
// server's.
func TestRelativeDir(t *testing.T) {
	srv := startServer(t, 0)
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command("pwd")
	cmd.Dir = "."
	cmd.Stdout = &out
	if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
		t.Fatalf("got %d, %v", status, err)
	}
	if got := strings.TrimSpace(out.String()); got != wd {
		t.Fatalf("ran in %q, want %q", got, wd)
	}
}

func TestConcurrentSpawns(t *testing.T) {
	srv := startServer(t, 0)
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var out bytes.Buffer
			cmd := exec.Command("sh", "-c", fmt.Sprintf("echo %d; exit %d", i, i))
			cmd.Stdout = &out
			ec, err := srv.Start(cmd)
			if err != nil {
				errs <- err
				return
			}
			status, err := srv.Wait(cmd, ec)
			if err != nil || status != i || out.String() != fmt.Sprintf("%d\n", i) {
				errs <- fmt.Errorf("%d: got %d, %q, %v", i, status, out.String(), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// spawnOrphan starts a shell that leaves behind a child exiting with
// status after a while, and returns that child's pid and start time as
// /proc showed them while it ran.
func spawnOrphan(t *testing.T, c *Client, status int) (pid int, startTime uint64, parent int) {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command("sh", "-c", fmt.Sprintf(`sh -c "sleep 0.3; exit %d" >/dev/null & echo $!; exit 0`, status))
	cmd.Stdout = &out
	ec, err := c.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	parent = cmd.Process.Pid
	if st, err := c.Wait(cmd, ec); err != nil || st != 0 {
		t.Fatalf("parent: %d, %v", st, err)
	}
	pid, err = strconv.Atoi(strings.TrimSpace(out.String()))
	if err != nil {
		t.Fatalf("orphan pid %q: %v", out.String(), err)
	}
	startTime, err = proc.StartTime(pid)
	if err != nil {
		t.Fatalf("orphan start time: %v", err)
	}
	return pid, startTime, parent
}

// next returns the next exit, failing after a timeout.
// next returns the next orphan exit, skipping those of spawned processes.
func next(t *testing.T, ch <-chan Exit) Exit {
	t.Helper()
	for {
		if e := nextAny(t, ch); !e.Spawned {
			return e
		}
	}
}

func nextAny(t *testing.T, ch <-chan Exit) Exit {
	t.Helper()
	select {
	case e, ok := <-ch:
		if !ok {
			t.Fatal("subscription closed")
		}
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no exit within 10s")
	}
	panic("unreachable")
}

func TestSubscribeOrphan(t *testing.T) {
	srv := startServer(t, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	live, err := srv.Subscribe(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	pid, startTime, parent := spawnOrphan(t, srv.Client, 7)
	e := next(t, live)
	if e.Pid == parent {
		t.Fatalf("direct child %d reported as an orphan", parent)
	}
	if e.Pid != pid || e.Status != 7 {
		t.Fatalf("got %+v, want pid %d status 7", e, pid)
	}
	if e.StartTime == 0 || e.StartTime != startTime {
		t.Fatalf("start time %d, /proc said %d", e.StartTime, startTime)
	}
	if e.Seq == 0 || e.ExitedAt.IsZero() {
		t.Fatalf("incomplete exit %+v", e)
	}
	// Ending the context closes the channel.
	cancel()
	select {
	case _, ok := <-live:
		for ok {
			_, ok = <-live
		}
	case <-time.After(10 * time.Second):
		t.Fatal("subscription not closed after its context ended")
	}
}

func TestSubscribeSince(t *testing.T) {
	srv := startServer(t, 0)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	live, err := srv.Subscribe(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	pidA, _, _ := spawnOrphan(t, srv.Client, 7)
	a := next(t, live)
	pidB, _, _ := spawnOrphan(t, srv.Client, 9)
	b := next(t, live)
	if a.Pid != pidA || b.Pid != pidB || b.Seq <= a.Seq {
		t.Fatalf("got %+v then %+v; want pids %d then %d", a, b, pidA, pidB)
	}

	all, err := srv.Subscribe(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if e := next(t, all); e != a {
		t.Fatalf("replay from 0: %+v, want %+v", e, a)
	}
	if e := next(t, all); e != b {
		t.Fatalf("replay from 0: %+v, want %+v", e, b)
	}

	later, err := srv.Subscribe(ctx, a.Seq)
	if err != nil {
		t.Fatal(err)
	}
	if e := next(t, later); e != b {
		t.Fatalf("replay after %d: %+v, want %+v", a.Seq, e, b)
	}
	// Then only what is new.
	pidC, _, _ := spawnOrphan(t, srv.Client, 11)
	if e := next(t, later); e.Pid != pidC || e.Status != 11 || e.Seq <= b.Seq {
		t.Fatalf("live after replay: %+v, want pid %d status 11", e, pidC)
	}
}

func TestRingKeepsLastExits(t *testing.T) {
	srv := startServer(t, 2)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	live, err := srv.Subscribe(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	orphans := map[int]bool{}
	for i := range 3 {
		pid, _, _ := spawnOrphan(t, srv.Client, i)
		orphans[pid] = true
	}
	// Three orphans and their three parents, in the order they ended.
	var seen []Exit
	for n := 0; n < 3; {
		e := nextAny(t, live)
		seen = append(seen, e)
		if orphans[e.Pid] {
			n++
		}
	}
	for len(seen) < 6 {
		seen = append(seen, nextAny(t, live))
	}
	want := seen[len(seen)-2:]
	replay, err := srv.Subscribe(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range want {
		if e := nextAny(t, replay); e.Seq != w.Seq || e.Pid != w.Pid || e.Spawned != w.Spawned {
			t.Fatalf("ring of 2 replayed %+v, want %+v", e, w)
		}
	}
	select {
	case e := <-replay:
		t.Fatalf("ring of 2 replayed a third exit %+v", e)
	case <-time.After(100 * time.Millisecond):
	}

	// Recorded lists the same two, and Subscribe after its last sequence
	// number sees only what comes next.
	recorded, last, err := srv.Recorded(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(recorded) != 2 || recorded[0].Seq != want[0].Seq || recorded[1].Seq != want[1].Seq || last != want[1].Seq {
		t.Fatalf("Recorded = %+v, last %d; want %+v", recorded, last, want)
	}
	after, err := srv.Subscribe(ctx, last)
	if err != nil {
		t.Fatal(err)
	}
	pid, _, _ := spawnOrphan(t, srv.Client, 9)
	if e := next(t, after); e.Pid != pid || e.Status != 9 {
		t.Fatalf("after Recorded: %+v, want pid %d status 9", e, pid)
	}
}

// A direct child whose client went away is not lost: its exit goes to the
// ring.
func TestClientGoneRecordsExit(t *testing.T) {
	srv := startServer(t, 0)
	conn, err := srv.dial(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	req := &request{Op: opSpawn, Path: "/bin/sh", Args: []string{"sh", "-c", "sleep 0.2; exit 5"}, Env: []string{}}
	if err := writeMsg(conn, req, nil); err != nil {
		t.Fatal(err)
	}
	var reply spawnReply
	if err := readMsg(conn, &reply); err != nil || reply.Pid <= 0 {
		t.Fatalf("reply %+v, %v", reply, err)
	}
	_ = conn.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	live, err := srv.Subscribe(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if e := nextAny(t, live); e.Pid != reply.Pid || e.Status != 5 || !e.Spawned {
		t.Fatalf("got %+v, want pid %d status 5, spawned", e, reply.Pid)
	}
}

func TestConnectionLost(t *testing.T) {
	srv := startServer(t, 0)
	var out bytes.Buffer
	cmd := exec.Command("sh", "-c", "echo started; exec sleep 30")
	cmd.Stdout = &out
	ec, err := srv.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	srv.killed = true
	if err := srv.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	status, err := srv.Wait(cmd, ec)
	if err == nil || status != 255 {
		t.Fatalf("got %d, %v; want 255 and an error", status, err)
	}
	t.Log(err)
	if p, _ := os.FindProcess(pid); p != nil {
		_ = p.Kill()
		_ = p.Release()
	}
}

func TestNoProcessHandleLeak(t *testing.T) {
	srv := startServer(t, 0)
	serverFDs := fmt.Sprintf("/proc/%d/fd/*", srv.cmd.Process.Pid)
	count := func(glob string) int {
		fds, _ := filepath.Glob(glob)
		return len(fds)
	}
	// Warm up whatever the runtime opens once.
	if _, err := run(t, srv.Client, exec.Command("true")); err != nil {
		t.Fatal(err)
	}
	before, serverBefore := count("/proc/self/fd/*"), count(serverFDs)
	for range 20 {
		var out bytes.Buffer
		cmd := exec.Command("echo")
		cmd.Stdout, cmd.Stdin = &out, strings.NewReader("x")
		if status, err := run(t, srv.Client, cmd); err != nil || status != 0 {
			t.Fatalf("got %d, %v", status, err)
		}
	}
	if after := count("/proc/self/fd/*"); after > before {
		t.Errorf("%d descriptors open after 20 commands, %d before", after, before)
	}
	// The server closes a connection just after its last reply: allow it
	// a moment.
	deadline := time.Now().Add(5 * time.Second)
	for count(serverFDs) > serverBefore && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if after := count(serverFDs); after > serverBefore {
		t.Errorf("server: %d descriptors open after 20 commands, %d before", after, serverBefore)
	}
}

// cmdInternals reads exec.Cmd's private fields: fail loudly if a Go release
// renames them, rather than hang runc.Events or ignore cancellation.
func TestCmdInternals(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := exec.CommandContext(ctx, "true")
	rd, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	in := cmdInternals(cmd)
	if in.ctx != ctx || len(in.childIOFiles) != 1 || len(in.parentIOPipes) != 1 {
		t.Fatalf("exec.Cmd internals not found: %+v", in)
	}
	closeAll(in.childIOFiles)
	if in := cmdInternals(exec.Command("true")); in.ctx != nil {
		t.Fatalf("context found on a plain command: %+v", in)
	}
}

func TestRuncVersion(t *testing.T) {
	if _, err := exec.LookPath("runc"); err != nil {
		t.Skipf("runc not on PATH (%v): skipping go-runc through the server", err)
	}
	srv := startServer(t, 0)
	prev := runc.Monitor
	runc.Monitor = srv.Client
	t.Cleanup(func() { runc.Monitor = prev })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v, err := (&runc.Runc{}).Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v.Runc == "" {
		t.Fatalf("no runc version in %+v", v)
	}
	t.Logf("runc %s (spec %s)", v.Runc, v.Spec)

	// A failing command reports its status and output as with exec.Cmd.
	err = (&runc.Runc{Root: t.TempDir()}).Start(ctx, "no-such-container")
	if err == nil || !strings.Contains(err.Error(), "did not terminate successfully") {
		t.Fatalf("start of a missing container: %v", err)
	}
	t.Log(err)
}

// A held pipe end keeps the pipe open after the client closed its own, until
// released: a reader sees EOF only then. Release of a prefix releases the
// keys below it.
func TestHoldRelease(t *testing.T) {
	srv := startServer(t, 0)
	ctx := t.Context()
	eof := func(r *os.File) bool {
		r.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, err := r.Read(make([]byte, 1))
		return errors.Is(err, io.EOF)
	}
	var readers []*os.File
	for _, key := range []string{"pod/a", "pod/b", "other"} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		if err := srv.Hold(ctx, key, w); err != nil {
			t.Fatalf("Hold(%s): %v", key, err)
		}
		w.Close()
		if eof(r) {
			t.Fatalf("%s: EOF while the server holds the write end", key)
		}
		readers = append(readers, r)
	}
	if err := srv.Release(ctx, "pod"); err != nil {
		t.Fatal(err)
	}
	if !eof(readers[0]) || !eof(readers[1]) {
		t.Error("the keys below pod/ are still held after Release(pod)")
	}
	if eof(readers[2]) {
		t.Error("Release(pod) released other")
	}
	if err := srv.Hold(ctx, ""); err == nil {
		t.Error("Hold with an empty key succeeded")
	}
}

// StartIn: the child is born in the namespaces it was given (the server
// switches a thread into them, package nsenter), with new ones from
// Cloneflags.
func TestStartIn(t *testing.T) {
	srv := startServer(t, 0)
	// A network namespace of its own, held by a process.
	owner := exec.Command("unshare", "--net", "sleep", "60")
	if err := owner.Start(); err != nil {
		t.Skipf("unshare --net: %v", err)
	}
	t.Cleanup(func() { owner.Process.Kill(); owner.Wait() })
	netns := fmt.Sprintf("/proc/%d/ns/net", owner.Process.Pid)
	var self unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &self); err != nil {
		t.Fatal(err)
	}
	var want unix.Stat_t
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		// unshare switches after it starts.
		if err := unix.Stat(netns, &want); err == nil && want.Ino != self.Ino {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new netns for %d", owner.Process.Pid)
		}
	}
	if err := unix.Stat(netns, &want); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command("/bin/sh", "-c", "readlink /proc/self/ns/net; hostname")
	cmd.Stdout = &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWUTS}
	ec, err := srv.StartIn(cmd, map[int]string{unix.CLONE_NEWNET: netns})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := srv.Wait(cmd, ec); err != nil || st != 0 {
		t.Fatalf("child: %d, %v", st, err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 || lines[0] != fmt.Sprintf("net:[%d]", want.Ino) {
		t.Errorf("child's netns %q, want net:[%d]", out.String(), want.Ino)
	}
	if _, err := srv.StartIn(exec.Command("/bin/true"), map[int]string{unix.CLONE_NEWNET: "/nosuch"}); err == nil {
		t.Error("StartIn into a missing namespace succeeded")
	}
	if _, err := srv.StartIn(exec.Command("/bin/true"), map[int]string{unix.CLONE_NEWNS: "/proc/1/ns/mnt"}); err == nil {
		t.Error("StartIn into a mount namespace (unsupported) succeeded")
	}
}
