package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
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
}

type plugged struct {
	dev  hypervisor.Device
	slot int // root port index, -1 when not on PCIe
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
	args, files, err := Args(&q.cfg)
	if err != nil {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	bin, err := exec.LookPath(q.cfg.Binary)
	if err != nil {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	if err := os.MkdirAll(q.cfg.Dir, 0o700); err != nil {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	// A stale socket from a VM that was killed would make QEMU fail.
	_ = os.Remove(q.cfg.ControlSocket())
	logf, err := os.OpenFile(q.cfg.VMMLog(), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: %w", q.cfg.ID, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = files
	// Its own session: the VM outlives the daemon and is not hit by
	// signals sent to the daemon's process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		logf.Close()
		q.mu.Unlock()
		return fmt.Errorf("qemu: vm %s: start %s: %w", q.cfg.ID, bin, err)
	}
	logf.Close()
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

// connect waits for QMP's socket, connects and checks that the VM runs.
func (q *QEMU) connect(ctx context.Context) error {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(q.cfg.ControlSocket()); err == nil {
			c, err := DialQMP(ctx, q.cfg.ControlSocket())
			if err == nil {
				q.mu.Lock()
				q.qmp = c
				q.mu.Unlock()
				go c.LogEvents(q.log)
				if err := q.Ping(ctx); err != nil {
					return err
				}
				return nil
			}
		}
		select {
		case <-q.exited:
			return fmt.Errorf("qemu: vm %s: qemu exited (%s) before QMP answered: %s", q.cfg.ID, q.status, q.logTail())
		case <-ctx.Done():
			return fmt.Errorf("qemu: vm %s: waiting for QMP at %s: %w", q.cfg.ID, q.cfg.ControlSocket(), ctx.Err())
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
