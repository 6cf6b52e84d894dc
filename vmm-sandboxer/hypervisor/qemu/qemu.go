package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// QEMU is one VM run by a qemu-system-x86_64 process.
type QEMU struct {
	cfg hypervisor.Config
	log *zap.Logger

	mu      sync.Mutex
	cmd     *exec.Cmd
	qmp     *QMP
	exited  chan struct{} // closed when the process has exited
	status  hypervisor.ExitStatus
	plugged map[string]plugged // hot-plugged devices by ID
	slots   []bool             // hot-plug root ports in use
	nextSet int                // the fd set of the next hot-plugged device
}

type plugged struct {
	dev  hypervisor.Device
	slot int // root port index, -1 when not on PCIe
	set  int // fd set, for devices QEMU opens a file of (disks)
}

var _ hypervisor.Hypervisor = (*QEMU)(nil)

// New validates cfg and returns a VM that is not started yet. An empty
// Binary means DefaultBinary.
func New(cfg hypervisor.Config, log *zap.Logger) (*QEMU, error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if log == nil {
		log = zap.NewNop()
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("qemu: vm %s: %w", cfg.ID, err)
	}
	return &QEMU{
		cfg:     cfg,
		log:     log.With(zap.String("vm", cfg.ID)),
		plugged: map[string]plugged{},
		slots:   make([]bool, cfg.HotplugSlots),
		nextSet: len(cfg.Devices), // boot devices' sets are their indexes
	}, nil
}

// Config is the VM's configuration.
func (q *QEMU) Config() hypervisor.Config { return q.cfg }

// PID is QEMU's process ID, 0 before Start.
func (q *QEMU) PID() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.cmd == nil || q.cmd.Process == nil {
		return 0
	}
	return q.cmd.Process.Pid
}

// Start runs QEMU and returns once QMP answers and the guest runs.
func (q *QEMU) Start(ctx context.Context) error {
	q.mu.Lock()
	if q.cmd != nil {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: already started", q.cfg.ID)
	}
	cmd, err := q.command()
	if err != nil {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	t0 := time.Now()
	q.cmd = cmd
	q.exited = make(chan struct{})
	q.mu.Unlock()
	q.log.Info("qemu started", zap.Int("pid", cmd.Process.Pid), zap.String("accel", string(q.cfg.Accel)))
	go q.reap()

	if err := q.connect(ctx); err != nil {
		q.kill()
		return err
	}
	q.log.Debug("qmp ready", zap.Duration("after", time.Since(t0)))
	return nil
}

// command starts QEMU with what it inherits: its log as stdout and
// stderr, and the files of its command line.
func (q *QEMU) command() (*exec.Cmd, error) {
	args, hostFiles, err := commandLine(&q.cfg)
	if err != nil {
		return nil, err
	}
	bin, err := exec.LookPath(q.cfg.Binary)
	if err != nil {
		return nil, err
	}
	if q.cfg.RunAs != nil {
		for _, p := range []string{q.cfg.Kernel, q.cfg.Initrd} {
			if err := readableByAnyone(p); err != nil {
				return nil, fmt.Errorf("QEMU runs as user %d and cannot read the guest image: %w", q.cfg.RunAs.Uid, err)
			}
		}
	}
	if err := os.MkdirAll(q.cfg.Dir, 0o700); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(q.cfg.VMMLog(), os.O_CREATE|os.O_WRONLY|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	files, err := openFiles(hostFiles)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = files.files
	// Its own session: the VM outlives the daemon and is not hit by
	// signals sent to the daemon's process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: q.cfg.RunAs}
	if q.cfg.RunAs != nil {
		// A network namespace of its own, empty: QEMU's network is the
		// tap descriptors it is given, and a guest that escapes into it
		// reaches no host socket (it could as another user: the host's
		// services on loopback).
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNET
	}
	err = cmd.Start()
	files.close(err != nil)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	return cmd, nil
}

// readableByAnyone tells whether a user who owns nothing can read path:
// the file readable by others, each directory above it searchable.
func readableByAnyone(path string) error {
	if path == "" {
		return nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Mode().Perm()&0o004 == 0 {
		return fmt.Errorf("%s has mode %#o: make it readable by others (0644)", path, st.Mode().Perm())
	}
	for d := filepath.Dir(path); ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return err
		}
		if st.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("directory %s has mode %#o: make it searchable by others (0755)", d, st.Mode().Perm())
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

func (q *QEMU) reap() {
	err := q.cmd.Wait()
	st := hypervisor.ExitStatus{}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		st.Code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			st.Signal = ws.Signal().String()
		}
	default:
		st.Code = -1
	}
	q.mu.Lock()
	q.status = st
	q.mu.Unlock()
	close(q.exited)
	q.log.Info("qemu exited", zap.Stringer("status", st))
}

// connect connects to QMP and checks that the VM runs. The control socket
// is there from the start (the daemon listens for QEMU), so a connection
// waits in its backlog until QEMU accepts it; a QEMU that fails before
// that closes the socket's last listener.
func (q *QEMU) connect(ctx context.Context) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := DialQMP(ctx, q.cfg.ControlSocket())
		if err == nil {
			q.mu.Lock()
			q.qmp = c
			q.mu.Unlock()
			go c.LogEvents(q.log)
			if err = q.Ping(ctx); err == nil {
				return nil
			}
			q.mu.Lock()
			q.qmp = nil
			q.mu.Unlock()
			c.Close()
		}
		select {
		case <-q.exited:
			return fmt.Errorf("qemu: vm %s: qemu exited (%s) before QMP answered: %s", q.cfg.ID, q.status, q.logTail())
		case <-ctx.Done():
			return fmt.Errorf("qemu: vm %s: waiting for QMP at %s (%v): %w", q.cfg.ID, q.cfg.ControlSocket(), err, ctx.Err())
		case <-tick.C:
		}
	}
}

// logTail is the end of QEMU's own log, for errors.
func (q *QEMU) logTail() string { return hypervisor.FileTail(q.cfg.VMMLog()) }

func (q *QEMU) client() (*QMP, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.qmp == nil {
		return nil, fmt.Errorf("qemu: vm %s: not started", q.cfg.ID)
	}
	return q.qmp, nil
}

// Ping checks through QMP that the VM runs.
func (q *QEMU) Ping(ctx context.Context) error {
	c, err := q.client()
	if err != nil {
		return err
	}
	r, err := c.Execute(ctx, "query-status", nil)
	if err != nil {
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := json.Unmarshal(r, &st); err != nil {
		return fmt.Errorf("qemu: vm %s: query-status answer %s: %w", q.cfg.ID, r, err)
	}
	if !st.Running {
		return fmt.Errorf("qemu: vm %s: not running (status %s)", q.cfg.ID, st.Status)
	}
	return nil
}

// QMP returns the VM's QMP client, for commands the interface lacks.
func (q *QEMU) QMP() (*QMP, error) { return q.client() }

// Wait blocks until QEMU exits.
func (q *QEMU) Wait(ctx context.Context) (hypervisor.ExitStatus, error) {
	q.mu.Lock()
	exited := q.exited
	q.mu.Unlock()
	if exited == nil {
		return hypervisor.ExitStatus{}, fmt.Errorf("qemu: vm %s: not started", q.cfg.ID)
	}
	select {
	case <-exited:
		q.mu.Lock()
		defer q.mu.Unlock()
		return q.status, nil
	case <-ctx.Done():
		return hypervisor.ExitStatus{}, ctx.Err()
	}
}

// Stop asks QEMU to quit and kills it if it has not exited when ctx ends.
// The VM's sockets are removed.
func (q *QEMU) Stop(ctx context.Context) error {
	q.mu.Lock()
	exited, c := q.exited, q.qmp
	q.mu.Unlock()
	if exited == nil {
		return nil
	}
	defer q.cleanup()
	select {
	case <-exited:
		return nil
	default:
	}
	if c != nil {
		// QEMU may exit before it answers; what counts is the exit.
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := c.Execute(qctx, "quit", nil)
		cancel()
		if err != nil {
			q.log.Debug("qmp quit", zap.Error(err))
		}
	}
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
	}
	q.log.Warn("qemu did not quit in time; killing it")
	q.kill()
	return nil
}

// kill ends QEMU with SIGKILL and waits for it.
func (q *QEMU) kill() {
	q.mu.Lock()
	cmd, exited := q.cmd, q.exited
	q.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exited
	q.cleanup()
}

func (q *QEMU) cleanup() {
	q.mu.Lock()
	c := q.qmp
	q.qmp = nil
	q.mu.Unlock()
	if c != nil {
		c.Close()
	}
	_ = os.Remove(q.cfg.ControlSocket())
	for _, d := range q.cfg.Devices {
		if sp, ok := d.(*hypervisor.SerialPort); ok {
			_ = os.Remove(sp.SocketPath)
		}
	}
	q.mu.Lock()
	for _, p := range q.plugged {
		if sp, ok := p.dev.(*hypervisor.SerialPort); ok {
			_ = os.Remove(sp.SocketPath)
		}
	}
	q.mu.Unlock()
}
