package spawn

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sync"
	"syscall"
	"time"
	"unsafe"

	runc "github.com/containerd/go-runc"
	"github.com/kuasar-go/kuasar-go/shared/nsenter"
)

// Client talks to a Server at Socket.
type Client struct{ Socket string }

// Exit is a process's exit as the server recorded it.
type Exit struct {
	Seq       uint64
	Pid       int
	StartTime uint64 // clock ticks since boot, /proc/<pid>/stat field 22
	Status    int    // exit code, or 128+signal
	ExitedAt  time.Time
	// Spawned: a process a client started (Start), not an orphan.
	Spawned bool
}

var _ runc.ProcessMonitor = (*Client)(nil)

// running maps the exit channel handed out by Start to what Wait needs,
// since go-runc gives Wait only the command and that channel.
var running sync.Map // chan runc.Exit -> *spawned

type spawned struct {
	pid            int
	copies         int        // copying goroutines started
	copyErrs       chan error // one result per copying goroutine
	closeAfterWait []io.Closer
	exited         chan struct{} // closed once the exit (or a lost connection) is known
	watcherDone    chan struct{} // closed when the context watcher has returned
	err            error         // connection lost before the exit; set before exited closes
}

// Start starts cmd through the server, as exec.Cmd.Start would locally.
func (c *Client) Start(cmd *exec.Cmd) (chan runc.Exit, error) {
	return c.startWith(cmd, nil)
}

// StartIn starts cmd through the server, born in the namespaces of join
// (CLONE_NEW* flag -> namespace file; see package nsenter).
func (c *Client) StartIn(cmd *exec.Cmd, join map[int]string) (chan runc.Exit, error) {
	for flag := range join {
		if !nsenter.Supported(flag) {
			return nil, fmt.Errorf("spawn: joining namespaces of type %#x is not supported", flag)
		}
	}
	return c.startWith(cmd, join)
}

// StartLocked is Start: go-runc locks the starting thread for the sake of
// Pdeathsig, but the process's parent is the server, not this thread.
func (c *Client) StartLocked(cmd *exec.Cmd) (chan runc.Exit, error) {
	return c.startWith(cmd, nil)
}

// Wait returns cmd's status once its exit is known and its output has been
// copied, as exec.Cmd.Wait would; it releases cmd.Process. If the
// connection to the server broke first, the status is 255 with an error.
func (c *Client) Wait(cmd *exec.Cmd, ec chan runc.Exit) (int, error) {
	v, ours := running.LoadAndDelete(ec)
	e, ok := <-ec
	if !ours {
		if !ok {
			return 255, errors.New("spawn: exit channel closed without an exit")
		}
		return e.Status, nil
	}
	p := v.(*spawned)
	if p.err != nil {
		// The process may still run and hold the pipes: stop copying now
		// rather than wait for it.
		closeAll(p.closeAfterWait)
	}
	var copyErr error
	for i := 0; i < p.copies; i++ {
		if err := <-p.copyErrs; err != nil && copyErr == nil {
			copyErr = err
		}
	}
	closeAll(p.closeAfterWait)
	<-p.watcherDone
	if cmd.Process != nil {
		_ = cmd.Process.Release()
	}
	if p.err != nil {
		return 255, p.err
	}
	return e.Status, copyErr
}

func (c *Client) startWith(cmd *exec.Cmd, join map[int]string) (_ chan runc.Exit, err error) {
	if cmd.Process != nil {
		return nil, errors.New("spawn: already started")
	}
	hidden := cmdInternals(cmd)
	// Like exec.Cmd: descriptors meant for the child only are closed once
	// it has them; the parent's ends of pipes once it has been waited for,
	// or at once if it could not be started.
	closeAfterStart := append([]io.Closer(nil), hidden.childIOFiles...)
	closeAfterWait := append([]io.Closer(nil), hidden.parentIOPipes...)
	defer func() {
		if err != nil {
			closeAll(closeAfterStart)
			closeAll(closeAfterWait)
		}
	}()
	if cmd.Path == "" && cmd.Err == nil {
		cmd.Err = errors.New("exec: no command")
	}
	if cmd.Err != nil {
		return nil, cmd.Err
	}
	ctx := hidden.ctx
	if ctx != nil {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	} else {
		ctx = context.Background()
	}
	req, err := spawnRequest(cmd)
	if err != nil {
		return nil, err
	}
	req.Join = join

	var files []*os.File
	add := func(f *os.File) int {
		if f == nil {
			return -1
		}
		files = append(files, f)
		return len(files) - 1
	}
	var copies []func() error
	pipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err != nil {
			return nil, nil, fmt.Errorf("spawn: pipe: %w", err)
		}
		return r, w, nil
	}
	// stdin
	switch in := cmd.Stdin.(type) {
	case nil:
		req.Files = append(req.Files, -1)
	case *os.File:
		req.Files = append(req.Files, add(in))
	default:
		pr, pw, err := pipe()
		if err != nil {
			return nil, err
		}
		closeAfterStart = append(closeAfterStart, pr)
		closeAfterWait = append(closeAfterWait, pw)
		req.Files = append(req.Files, add(pr))
		copies = append(copies, func() error {
			_, err := io.Copy(pw, in)
			// The child need not read all its input (exec.Cmd agrees).
			if errors.Is(err, syscall.EPIPE) {
				err = nil
			}
			if cerr := pw.Close(); err == nil {
				err = cerr
			}
			return err
		})
	}
	// stdout, stderr
	output := func(w io.Writer) (int, error) {
		switch out := w.(type) {
		case nil:
			return -1, nil
		case *os.File:
			return add(out), nil
		}
		pr, pw, err := pipe()
		if err != nil {
			return 0, err
		}
		closeAfterStart = append(closeAfterStart, pw)
		closeAfterWait = append(closeAfterWait, pr)
		copies = append(copies, func() error {
			_, err := io.Copy(w, pr)
			_ = pr.Close() // in case copying stopped at a write error
			return err
		})
		return add(pw), nil
	}
	stdout, err := output(cmd.Stdout)
	if err != nil {
		return nil, err
	}
	stderr := stdout
	// One writer for both gets one pipe and one copier, as with exec.Cmd:
	// two would write to it concurrently.
	if cmd.Stderr == nil || !interfaceEqual(cmd.Stderr, cmd.Stdout) {
		if stderr, err = output(cmd.Stderr); err != nil {
			return nil, err
		}
	}
	req.Files = append(req.Files, stdout, stderr)
	for _, f := range cmd.ExtraFiles {
		req.Files = append(req.Files, add(f))
	}
	if len(files) > maxFDs {
		return nil, fmt.Errorf("spawn: %d descriptors exceed %d", len(files), maxFDs)
	}
	req.NFDs = len(files)
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}

	conn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = conn.Close()
		}
	}()
	err = writeMsg(conn, req, fds)
	runtime.KeepAlive(files) // the descriptors must stay open until sent
	if err != nil {
		return nil, fmt.Errorf("spawn %s: %w", cmd.Path, err)
	}
	// The server holds its own references now.
	closeAll(closeAfterStart)
	closeAfterStart = nil
	var reply spawnReply
	if err := readMsg(conn, &reply); err != nil {
		return nil, fmt.Errorf("spawn %s: %w", cmd.Path, err)
	}
	if reply.Error != "" {
		return nil, fmt.Errorf("spawn %s: %w", cmd.Path, errors.New(reply.Error))
	}
	if reply.Pid <= 0 {
		return nil, fmt.Errorf("spawn %s: server replied pid %d", cmd.Path, reply.Pid)
	}
	// Never fails on Linux; with a pidfd behind it, Kill cannot hit a
	// reused pid although the process is not our child.
	cmd.Process, _ = os.FindProcess(reply.Pid)

	p := &spawned{
		pid:            reply.Pid,
		copies:         len(copies),
		copyErrs:       make(chan error, len(copies)),
		closeAfterWait: closeAfterWait,
		exited:         make(chan struct{}),
		watcherDone:    make(chan struct{}),
	}
	for _, fn := range copies {
		go func() { p.copyErrs <- fn() }()
	}
	ec := make(chan runc.Exit, 1)
	running.Store(ec, p)
	go func() {
		var r exitReply
		err := readMsg(conn, &r)
		_ = conn.Close()
		if err != nil {
			p.err = fmt.Errorf("spawn: connection to %s lost before pid %d exited: %w", c.Socket, p.pid, err)
			r = exitReply{Status: 255, ExitedAt: time.Now()}
		}
		close(p.exited)
		ec <- runc.Exit{Timestamp: r.ExitedAt, Pid: p.pid, Status: r.Status}
		close(ec)
	}()
	// exec.CommandContext kills the process when its context ends; go-runc
	// relies on that to bound runtime commands.
	go func() {
		defer close(p.watcherDone)
		select {
		case <-ctx.Done():
			if cmd.Cancel != nil {
				_ = cmd.Cancel()
			} else {
				_ = cmd.Process.Kill()
			}
		case <-p.exited:
		}
	}()
	return ec, nil
}

// spawnRequest carries cmd's fields over, resolved as exec.Cmd.Start would
// resolve them in this process: the server runs elsewhere, with its own
// working directory and environment.
func spawnRequest(cmd *exec.Cmd) (*request, error) {
	req := &request{Op: opSpawn, Dir: cmd.Dir, Path: cmd.Path, Args: cmd.Args}
	if len(req.Args) == 0 {
		req.Args = []string{cmd.Path}
	}
	if req.Dir != "" && !filepath.IsAbs(req.Dir) {
		dir, err := filepath.Abs(req.Dir)
		if err != nil {
			return nil, fmt.Errorf("spawn: resolve dir: %w", err)
		}
		req.Dir = dir
	}
	// A relative Path is relative to Dir, or else to the current directory.
	if !filepath.IsAbs(req.Path) {
		if req.Dir != "" {
			req.Path = filepath.Join(req.Dir, req.Path)
		} else {
			path, err := filepath.Abs(req.Path)
			if err != nil {
				return nil, fmt.Errorf("spawn: resolve path: %w", err)
			}
			req.Path = path
		}
	}
	// Environ applies exec.Cmd's rules: nil is this process's environment
	// (with PWD following Dir), duplicates resolved.
	req.Env = cmd.Environ()
	if req.Env == nil {
		req.Env = []string{}
	}
	if a := cmd.SysProcAttr; a != nil {
		rest := *a
		rest.Setpgid, rest.Setsid, rest.Pdeathsig, rest.Cloneflags = false, false, 0, 0
		if !reflect.ValueOf(rest).IsZero() {
			return nil, errors.New("spawn: only Setpgid, Setsid, Pdeathsig and Cloneflags of SysProcAttr are supported")
		}
		req.Setpgid, req.Setsid, req.Pdeathsig, req.Cloneflags = a.Setpgid, a.Setsid, int(a.Pdeathsig), a.Cloneflags
	}
	return req, nil
}

func (c *Client) dial(ctx context.Context) (*net.UnixConn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Socket)
	if err != nil {
		return nil, fmt.Errorf("spawn: dial %s: %w", c.Socket, err)
	}
	return conn.(*net.UnixConn), nil
}

// Hold has the server keep duplicates of files under key (replacing what
// key held) until Release: the IO ends of processes that must not see
// their peer go away while the daemon restarts.
func (c *Client) Hold(ctx context.Context, key string, files ...*os.File) error {
	fds := make([]int, len(files))
	for i, f := range files {
		fds[i] = int(f.Fd())
	}
	err := c.holdCall(ctx, request{Op: opHold, Key: key, NFDs: len(fds)}, fds)
	runtime.KeepAlive(files) // open until sent
	return err
}

// Release closes what the server holds under key and under every key
// below it ("key/...").
func (c *Client) Release(ctx context.Context, key string) error {
	return c.holdCall(ctx, request{Op: opRelease, Key: key}, nil)
}

func (c *Client) holdCall(ctx context.Context, req request, fds []int) error {
	conn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if err := writeMsg(conn, req, fds); err != nil {
		return fmt.Errorf("spawn: %s %s: %w", req.Op, req.Key, err)
	}
	var reply holdReply
	if err := readMsg(bufio.NewReader(conn), &reply); err != nil {
		return fmt.Errorf("spawn: %s %s: %w", req.Op, req.Key, err)
	}
	if reply.Error != "" {
		return fmt.Errorf("spawn: %s", reply.Error)
	}
	return nil
}

// Recorded returns every exit the server still records, oldest
// first, and the sequence number to Subscribe after so that no exit is
// missed nor seen twice: a restarted daemon reads what ended while it was
// down, then follows.
func (c *Client) Recorded(ctx context.Context) ([]Exit, uint64, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, 0, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if err := writeMsg(conn, request{Op: opRecorded}, nil); err != nil {
		return nil, 0, fmt.Errorf("spawn: recorded: %w", err)
	}
	var reply recordedReply
	if err := readMsg(bufio.NewReader(conn), &reply); err != nil {
		return nil, 0, fmt.Errorf("spawn: recorded: %w", err)
	}
	out := make([]Exit, len(reply.Exits))
	for i, e := range reply.Exits {
		out[i] = exitOf(e)
	}
	return out, reply.LastSeq, nil
}

// Subscribe streams recorded exits after since until ctx ends or the
// connection breaks (channel closed).
func (c *Client) Subscribe(ctx context.Context, since uint64) (<-chan Exit, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	fail := func(err error) (<-chan Exit, error) {
		stop()
		_ = conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("spawn: subscribe: %w", ctx.Err())
		}
		return nil, fmt.Errorf("spawn: subscribe: %w", err)
	}
	if err := writeMsg(conn, request{Op: opSubscribe, Since: since}, nil); err != nil {
		return fail(err)
	}
	r := bufio.NewReader(conn)
	var ack subscribeReply
	if err := readMsg(r, &ack); err != nil {
		return fail(err)
	}
	if ack.Error != "" {
		return fail(errors.New(ack.Error))
	}
	out := make(chan Exit)
	go func() {
		defer close(out)
		defer stop()
		defer conn.Close()
		for {
			var e exitRecord
			if err := readMsg(r, &e); err != nil {
				return
			}
			select {
			case out <- exitOf(e):
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

// internals are exec.Cmd's unexported fields that matter to go-runc:
// exec.CommandContext keeps its context private, and cmd.StdoutPipe (used by
// runc.Stats and runc.Events) keeps the child's end of the pipe private,
// for exec.Cmd.Start to close; without closing it the reader never sees EOF.
// Missing fields (a future Go) leave the zero value.
type internals struct {
	ctx           context.Context
	childIOFiles  []io.Closer
	parentIOPipes []io.Closer
}

func cmdInternals(cmd *exec.Cmd) internals {
	var in internals
	v := reflect.ValueOf(cmd).Elem()
	field := func(name string, typ reflect.Type) (any, bool) {
		f := v.FieldByName(name)
		if !f.IsValid() || f.Type() != typ {
			return nil, false
		}
		return reflect.NewAt(typ, unsafe.Pointer(f.UnsafeAddr())).Elem().Interface(), true
	}
	if x, ok := field("ctx", reflect.TypeFor[context.Context]()); ok && x != nil {
		in.ctx = x.(context.Context)
	}
	if x, ok := field("childIOFiles", reflect.TypeFor[[]io.Closer]()); ok {
		in.childIOFiles = x.([]io.Closer)
	}
	if x, ok := field("parentIOPipes", reflect.TypeFor[[]io.Closer]()); ok {
		in.parentIOPipes = x.([]io.Closer)
	}
	return in
}

func closeAll(cs []io.Closer) {
	for _, c := range cs {
		_ = c.Close()
	}
}

// interfaceEqual is a == b without panicking on uncomparable types, as
// exec.Cmd compares Stdout and Stderr.
func interfaceEqual(a, b any) (eq bool) {
	defer func() {
		if recover() != nil {
			eq = false
		}
	}()
	return a == b
}

func exitOf(e exitRecord) Exit {
	return Exit{Seq: e.Seq, Pid: e.Pid, StartTime: e.StartTime, Status: e.Status, ExitedAt: e.ExitedAt, Spawned: e.Spawned}
}
