// Package virtiofs runs virtiofsd, the host side of a pod VM's shared
// directory: a vhost-user file system server on a unix socket that the VMM
// connects to (hypervisor.VirtioFS) and the guest mounts as -t virtiofs.
// The guest's RAM must be shared memory (hypervisor.Config.SharedMemory).
package virtiofs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
)

// DefaultBinary is the virtiofsd of Debian 12's qemu-system-common.
const DefaultBinary = "/usr/lib/qemu/virtiofsd"

// Config is one shared directory.
type Config struct {
	// Binary is virtiofsd; DefaultBinary when empty.
	Binary string
	// SocketPath is the vhost-user socket virtiofsd listens on.
	SocketPath string
	// SharedDir is the host directory the guest sees.
	SharedDir string
	// Cache is virtiofsd's cache mode: none (default: the host changes
	// files under the guest, as bundles appear), auto or always.
	Cache string
	// LogPath receives virtiofsd's output; SocketPath + ".log" when empty.
	LogPath string
}

// Daemon is a running virtiofsd.
type Daemon struct {
	cfg    Config
	cmd    *exec.Cmd
	exited chan struct{}
	err    error
	log    *zap.Logger
}

// Start runs virtiofsd and returns once its socket accepts the VMM. It
// serves one VMM connection and exits when that VMM goes away; Stop ends
// it earlier.
func Start(ctx context.Context, cfg Config, log *zap.Logger) (*Daemon, error) {
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.Cache == "" {
		cfg.Cache = "none"
	}
	if cfg.LogPath == "" {
		cfg.LogPath = cfg.SocketPath + ".log"
	}
	if log == nil {
		log = zap.NewNop()
	}
	if cfg.SocketPath == "" || cfg.SharedDir == "" {
		return nil, errors.New("virtiofs: socket path and shared directory are required")
	}
	if st, err := os.Stat(cfg.SharedDir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("virtiofs: shared directory %s: not a directory (%v)", cfg.SharedDir, err)
	}
	if _, err := os.Stat(cfg.Binary); err != nil {
		return nil, fmt.Errorf("virtiofs: %w (Debian package qemu-system-common)", err)
	}
	_ = os.Remove(cfg.SocketPath)
	logf, err := os.OpenFile(cfg.LogPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("virtiofs: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(cfg.Binary, "--socket-path="+cfg.SocketPath,
		"-o", "source="+cfg.SharedDir, "-o", "cache="+cfg.Cache, "-o", "log_level=warn")
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session, like the VMM; killed with the daemon only by Stop.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("virtiofs: start %s: %w", cfg.Binary, err)
	}
	d := &Daemon{cfg: cfg, cmd: cmd, exited: make(chan struct{}), log: log}
	go func() {
		d.err = cmd.Wait()
		close(d.exited)
	}()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, err := os.Stat(cfg.SocketPath); err == nil {
			log.Debug("virtiofsd ready", zap.Int("pid", cmd.Process.Pid), zap.String("dir", cfg.SharedDir))
			return d, nil
		}
		select {
		case <-d.exited:
			return nil, fmt.Errorf("virtiofs: virtiofsd exited (%v) before listening: %s", d.err, d.logTail())
		case <-ctx.Done():
			d.Stop(context.Background())
			return nil, fmt.Errorf("virtiofs: waiting for %s: %w", cfg.SocketPath, ctx.Err())
		case <-tick.C:
		}
	}
}

// PID is virtiofsd's process ID.
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Exited is closed once virtiofsd has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

func (d *Daemon) logTail() string { return hypervisor.FileTail(d.cfg.LogPath) }

// Stop ends virtiofsd (SIGTERM, then SIGKILL when ctx ends or after two
// seconds), waits for it and removes its socket and log.
func (d *Daemon) Stop(ctx context.Context) error {
	select {
	case <-d.exited:
	default:
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(2 * time.Second)
		defer t.Stop()
		select {
		case <-d.exited:
		case <-ctx.Done():
		case <-t.C:
		}
		select {
		case <-d.exited:
		default:
			d.log.Warn("virtiofsd did not stop on SIGTERM; killing it", zap.Int("pid", d.PID()))
			_ = d.cmd.Process.Kill()
			<-d.exited
		}
	}
	_ = os.Remove(d.cfg.SocketPath)
	_ = os.Remove(d.cfg.LogPath)
	return nil
}
