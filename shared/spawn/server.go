package spawn

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/kuasar-go/kuasar-go/shared/nsenter"
	"github.com/kuasar-go/kuasar-go/shared/proc"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

const (
	defaultRingSize = 4096
	// requestTimeout bounds how long a client may take to send its
	// request once connected.
	requestTimeout = 10 * time.Second
)

// Server spawns processes for clients and reaps everything re-parented to it.
type Server struct {
	log            *zap.Logger
	requestTimeout time.Duration

	// startMu is held for reading around each start + registration and
	// taken for writing by the reaper before it reaps a pid, so that a
	// direct child that exits at once is never mistaken for an orphan.
	startMu sync.RWMutex

	mu        sync.Mutex
	children  map[int]chan exitRecord // direct children still running
	ring      []exitRecord            // circular, the last cap(ring) exits
	ringNext  int                     // where the next exit goes once ring is full
	seq       uint64                  // seq of the last recorded exit
	changed   chan struct{}           // closed and replaced at each recorded exit
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	closed    bool

	heldMu sync.Mutex
	held   map[string][]int // descriptors kept for clients (hold), by key

	done  chan struct{} // closed by Close
	sigs  chan os.Signal
	wg    sync.WaitGroup
	close sync.Once
}

// NewServer makes the calling process a child subreaper and starts reaping
// its children on SIGCHLD. It keeps the last ringSize exits for
// subscribers (0: 4096). Every child of the process is reaped here, so
// nothing else in it may wait for children (exec.Cmd.Wait would fail).
//
// Sequence numbers start from the wall clock (in nanoseconds) at NewServer,
// so the exits recorded by a restarted keeper still sort after those its
// predecessor handed out, and a client resuming from the last seq it saw
// does not skip them (unless the clock went backwards in between).
func NewServer(log *zap.Logger, ringSize int) (*Server, error) {
	if ringSize < 0 {
		return nil, fmt.Errorf("negative ring size %d", ringSize)
	}
	if ringSize == 0 {
		ringSize = defaultRingSize
	}
	if log == nil {
		log = zap.NewNop()
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("become child subreaper: %w", err)
	}
	s := &Server{
		log:            log,
		requestTimeout: requestTimeout,
		children:       make(map[int]chan exitRecord),
		ring:           make([]exitRecord, 0, ringSize),
		seq:            uint64(time.Now().UnixNano()),
		changed:        make(chan struct{}),
		listeners:      make(map[net.Listener]struct{}),
		conns:          make(map[net.Conn]struct{}),
		done:           make(chan struct{}),
		// One pending signal is enough: each wake-up reaps until no
		// zombie is left.
		sigs: make(chan os.Signal, 1),
	}
	signal.Notify(s.sigs, unix.SIGCHLD)
	s.wg.Add(1)
	go s.reapLoop()
	return s, nil
}

// Serve accepts connections on l until Close; it returns nil after Close.
// l should be a *net.UnixListener: spawning needs descriptor passing.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			select {
			case <-s.done:
				return nil
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			s.log.Warn("spawn: connection is not a unix socket", zap.String("remote", c.RemoteAddr().String()))
			_ = c.Close()
			continue
		}
		if !s.track(uc) {
			_ = uc.Close()
			return nil
		}
		go func() {
			defer s.wg.Done()
			defer s.untrack(uc)
			s.handle(uc)
		}()
	}
}

// Close stops accepting and reaping, and ends every connection. The
// process stays a child subreaper: it is meant to exit soon after.
func (s *Server) Close() error {
	var errs []error
	s.close.Do(func() {
		s.mu.Lock()
		s.closed = true
		close(s.done)
		for l := range s.listeners {
			if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, fmt.Errorf("close listener: %w", err))
			}
		}
		for c := range s.conns {
			_ = c.Close()
		}
		s.mu.Unlock()
		signal.Stop(s.sigs)
		s.wg.Wait()
	})
	return errors.Join(errs...)
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	// Added under s.mu so that Close, which sets closed under it too,
	// never waits while a handler is still being added.
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	_ = c.Close()
}

func (s *Server) handle(c *net.UnixConn) {
	req, fds, err := s.readRequest(c)
	if err != nil {
		if !errors.Is(err, io.EOF) {
			s.log.Warn("spawn: read request", zap.Error(err))
		}
		return
	}
	s.dispatch(c, &req, fds)
}

// readRequest reads a connection's request within requestTimeout: a
// client that connects and stalls must not hold a handler forever.
func (s *Server) readRequest(c *net.UnixConn) (request, []int, error) {
	var req request
	if err := c.SetReadDeadline(time.Now().Add(s.requestTimeout)); err != nil {
		return req, nil, fmt.Errorf("read request: %w", err)
	}
	fds, err := readMsgFDs(c, &req)
	if err != nil {
		return req, nil, err
	}
	// What follows (a subscription) waits as long as the client wants.
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		closeFDs(fds)
		return req, nil, fmt.Errorf("read request: %w", err)
	}
	return req, fds, nil
}

// dispatch carries out req, which came with fds; they are closed or kept
// (hold) whatever happens.
func (s *Server) dispatch(c *net.UnixConn, req *request, fds []int) {
	switch req.Op {
	case opSpawn:
		s.spawn(c, req, fds)
	case opSubscribe:
		closeFDs(fds)
		s.subscribe(c, req.Since)
	case opHold:
		_ = writeMsg(c, s.hold(req.Key, fds), nil)
	case opRelease:
		closeFDs(fds)
		s.release(req.Key)
		_ = writeMsg(c, holdReply{}, nil)
	case opRecorded:
		closeFDs(fds)
		s.mu.Lock()
		exits, _ := s.after(0)
		last := s.seq
		s.mu.Unlock()
		_ = writeMsg(c, recordedReply{LastSeq: last, Exits: exits}, nil)
	default:
		closeFDs(fds)
		_ = writeMsg(c, spawnReply{Error: fmt.Sprintf("unknown op %q", req.Op)}, nil)
	}
}

// spawn starts the requested process, answers its pid, then its status.
// The received descriptors are closed here whatever happens.
func (s *Server) spawn(c *net.UnixConn, req *request, fds []int) {
	pid, exited, err := s.start(req, fds)
	if err != nil {
		s.log.Debug("spawn: start", zap.String("path", req.Path), zap.Error(err))
		_ = writeMsg(c, spawnReply{Error: err.Error()}, nil)
		return
	}
	// If the client is gone, the exit still has to reach someone: it then
	// is in the ring for subscribers, as every exit.
	delivered := writeMsg(c, spawnReply{Pid: pid}, nil) == nil
	var e exitRecord
	select {
	case e = <-exited:
	case <-s.done:
		return
	}
	if delivered {
		delivered = writeMsg(c, exitReply{Status: e.Status, ExitedAt: e.ExitedAt}, nil) == nil
	}
	if !delivered {
		// The exit is in the ring for subscribers, as every exit.
		s.log.Info("spawn: client gone before the exit of its process",
			zap.Int("pid", e.Pid), zap.Int("status", e.Status))
	}
}

// check refuses a spawn request that came with nfds descriptors and that
// the server cannot carry out as asked. Paths are absolute: the client
// resolves them in its own working directory, which the server's is not.
func (req *request) check(nfds int) error {
	if req.NFDs != nfds {
		return fmt.Errorf("expected %d descriptors, received %d", req.NFDs, nfds)
	}
	if !filepath.IsAbs(req.Path) {
		return fmt.Errorf("path %q is not absolute", req.Path)
	}
	if req.Dir != "" && !filepath.IsAbs(req.Dir) {
		return fmt.Errorf("dir %q is not absolute", req.Dir)
	}
	if len(req.Files) > maxChildFiles {
		return fmt.Errorf("%d child descriptors exceed %d", len(req.Files), maxChildFiles)
	}
	for i, idx := range req.Files {
		if idx < -1 || idx >= nfds {
			return fmt.Errorf("child descriptor %d refers to descriptor %d of %d received", i, idx, nfds)
		}
	}
	return nil
}

func (s *Server) start(req *request, fds []int) (pid int, exited chan exitRecord, err error) {
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "fd"+strconv.Itoa(i))
	}
	var opened []*os.File
	defer func() {
		// The child has its own copies by now; keeping ours would, for a
		// pipe, keep its reader from ever seeing EOF.
		for _, f := range files {
			_ = f.Close()
		}
		for _, f := range opened {
			_ = f.Close()
		}
	}()
	if err := req.check(len(fds)); err != nil {
		return 0, nil, err
	}
	child := make([]*os.File, max(3, len(req.Files)))
	for i := range child {
		idx := -1
		if i < len(req.Files) {
			idx = req.Files[i]
		}
		switch {
		case idx >= 0:
			child[i] = files[idx]
		case i < 3:
			// As exec.Cmd does for a nil Stdin/Stdout/Stderr.
			null, err := devNull()
			if err != nil {
				return 0, nil, err
			}
			opened = append(opened, null)
			child[i] = null
		}
	}
	env := req.Env
	if env == nil {
		// Never hand the keeper's own environment to a client's process.
		env = []string{}
	}
	args := req.Args
	if len(args) == 0 {
		args = []string{req.Path}
	}
	attr := &os.ProcAttr{
		Dir:   req.Dir,
		Env:   env,
		Files: child,
		Sys: &syscall.SysProcAttr{
			Setpgid:    req.Setpgid,
			Setsid:     req.Setsid,
			Pdeathsig:  syscall.Signal(req.Pdeathsig),
			Cloneflags: req.Cloneflags,
		},
	}
	exited = make(chan exitRecord, 1)
	s.startMu.RLock()
	var p *os.Process
	err = nsenter.Do(req.Join, func() error {
		var err error
		p, err = os.StartProcess(req.Path, args, attr)
		return err
	})
	if err == nil {
		s.mu.Lock()
		s.children[p.Pid] = exited
		s.mu.Unlock()
	}
	s.startMu.RUnlock()
	if err != nil {
		return 0, nil, fmt.Errorf("start %s: %w", req.Path, err)
	}
	pid = p.Pid
	// The reaper collects the exit with wait4; the handle (a pidfd) is not
	// needed and would otherwise stay open until garbage collection.
	_ = p.Release()
	return pid, exited, nil
}

// record appends an exit to the ring and wakes subscribers.
func (s *Server) record(e exitRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	e.Seq = s.seq
	if len(s.ring) < cap(s.ring) {
		s.ring = append(s.ring, e)
	} else {
		s.ring[s.ringNext] = e
		s.ringNext = (s.ringNext + 1) % len(s.ring)
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// after returns the recorded exits with seq > since, oldest first, and a
// channel closed at the next record. Called with s.mu held.
func (s *Server) after(since uint64) ([]exitRecord, <-chan struct{}) {
	var out []exitRecord
	n := len(s.ring)
	for i := 0; i < n; i++ {
		e := s.ring[(s.ringNext+i)%n]
		if e.Seq > since {
			out = append(out, e)
		}
	}
	return out, s.changed
}

func (s *Server) subscribe(c *net.UnixConn, since uint64) {
	s.mu.Lock()
	last := s.seq
	s.mu.Unlock()
	if err := writeMsg(c, subscribeReply{LastSeq: last}, nil); err != nil {
		return
	}
	// The client sends nothing more; reading only tells when it goes away.
	gone := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, c)
		close(gone)
	}()
	for {
		s.mu.Lock()
		batch, changed := s.after(since)
		s.mu.Unlock()
		for _, e := range batch {
			if err := writeMsg(c, e, nil); err != nil {
				return
			}
			since = e.Seq
		}
		if len(batch) > 0 {
			continue
		}
		select {
		case <-changed:
		case <-gone:
			return
		case <-s.done:
			return
		}
	}
}

func (s *Server) reapLoop() {
	defer s.wg.Done()
	s.reapAll() // anything that exited before SIGCHLD was watched
	for {
		select {
		case <-s.done:
			return
		case <-s.sigs:
			s.reapAll()
		}
	}
}

// reapAll reaps every zombie child. Each is first only looked at (WNOWAIT),
// so that its start time can still be read from /proc: together with the
// pid it tells a container process from a later one that reuses the pid.
func (s *Server) reapAll() {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			if !errors.Is(err, unix.ECHILD) {
				s.log.Warn("spawn: waitid", zap.Error(err))
			}
			return
		}
		pid := siginfoPid(&info)
		if pid <= 0 {
			return // children left, none exited
		}
		startTime, serr := proc.StartTime(pid)
		if serr != nil {
			s.log.Debug("spawn: read start time", zap.Int("pid", pid), zap.Error(serr))
		}
		// Let starts in progress register their pid before deciding whose
		// this one is. A start whose exec failed reaps its own child under
		// this lock: then wait4 below finds nothing.
		s.startMu.Lock()
		s.startMu.Unlock() // a barrier: there is nothing to guard

		var ws unix.WaitStatus
		wpid, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		for errors.Is(err, unix.EINTR) {
			wpid, err = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
		}
		if errors.Is(err, unix.ECHILD) || (err == nil && wpid == 0) {
			continue // reaped elsewhere (failed exec) or pid reused: look again
		}
		if err != nil {
			s.log.Warn("spawn: wait4", zap.Int("pid", pid), zap.Error(err))
			return // try again at the next SIGCHLD rather than spin
		}
		e := exitRecord{Pid: pid, StartTime: startTime, Status: exitStatus(ws), ExitedAt: time.Now()}
		s.mu.Lock()
		ch, direct := s.children[pid]
		delete(s.children, pid)
		s.mu.Unlock()
		// Every exit goes to subscribers: a process a client started may
		// stand for a container (gVisor's waiter) and end while its client
		// (the daemon) is away.
		if direct {
			e.Spawned = true
			ch <- e // buffered, one exit per child
		} else {
			s.log.Debug("spawn: orphan exited", zap.Int("pid", pid), zap.Int("status", e.Status))
		}
		s.record(e)
	}
}

// exitStatus is the exit code, or 128+signal for a process killed by a
// signal, as containerd's reaper and go-runc report it.
func exitStatus(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// siginfoPid returns si_pid, which x/sys/unix keeps in Siginfo's padding:
// the union of fields starts at the first pointer-aligned offset after
// si_signo, si_errno and si_code.
func siginfoPid(info *unix.Siginfo) int {
	off := (3*4 + unsafe.Sizeof(uintptr(0)) - 1) &^ (unsafe.Sizeof(uintptr(0)) - 1)
	return int(*(*int32)(unsafe.Add(unsafe.Pointer(info), off)))
}

// hold keeps fds under key, replacing (and closing) what key held: a
// daemon keeps there the ends of its processes' IO that must stay open
// while it restarts.
func (s *Server) hold(key string, fds []int) holdReply {
	if key == "" {
		closeFDs(fds)
		return holdReply{Error: "hold: empty key"}
	}
	s.heldMu.Lock()
	defer s.heldMu.Unlock()
	if s.held == nil {
		s.held = map[string][]int{}
	}
	closeFDs(s.held[key])
	s.held[key] = fds
	return holdReply{}
}

// release closes what key holds, and what every key below it ("key/...")
// holds.
func (s *Server) release(key string) {
	s.heldMu.Lock()
	defer s.heldMu.Unlock()
	for k, fds := range s.held {
		if k == key || strings.HasPrefix(k, key+"/") {
			closeFDs(fds)
			delete(s.held, k)
		}
	}
}
