package keeper

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/spawn"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Client is a daemon's handle on the keeper of its state directory.
type Client struct {
	dir string
	pid int
}

// startTimeout bounds how long a new keeper may take to answer.
const startTimeout = 5 * time.Second

// Ensure returns a handle on the keeper of dir, starting one when none
// answers: after a daemon restart the keeper of the previous instance is
// found again, with every socket it forwards.
func Ensure(ctx context.Context, dir string, log *zap.Logger) (*Client, error) {
	if resp, err := call(ctx, dir, request{Op: opHello}); err == nil {
		log.Info("found keeper", zap.Int("pid", resp.Pid))
		return &Client{dir: dir, pid: resp.Pid}, nil
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.Command(self)
	// The directory in the command line tells operators (and test clean-up)
	// whose keeper it is.
	cmd.Args = []string{filepath.Base(self) + "-keeper", dir}
	// Nothing of the daemon's environment: not systemd's NOTIFY_SOCKET nor
	// its watchdog, which would take the keeper for the service.
	cmd.Env = []string{envMarker + "=" + dir, "PATH=" + os.Getenv("PATH"), "GOMAXPROCS=2"}
	cmd.Dir = "/"
	// Its own session: a terminal's signals to the daemon's group must not
	// reach it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start keeper: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(startTimeout)
	for {
		resp, err := call(ctx, dir, request{Op: opHello})
		if err == nil {
			log.Info("started keeper", zap.Int("pid", resp.Pid))
			return &Client{dir: dir, pid: resp.Pid}, nil
		}
		select {
		case werr := <-exited:
			return nil, fmt.Errorf("keeper exited at start (%v); see %s", werr, filepath.Join(dir, LogName))
		case <-ctx.Done():
			cmd.Process.Kill()
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, fmt.Errorf("keeper did not answer within %v: %w; see %s", startTimeout, err, filepath.Join(dir, LogName))
		}
	}
}

// Spawner starts processes through the keeper, which becomes their
// parent and the reaper of what they leave behind (container processes).
func (c *Client) Spawner() *spawn.Client {
	return &spawn.Client{Socket: filepath.Join(c.dir, SpawnSocketName)}
}

// Pid is the keeper's process ID.
func (c *Client) Pid() int { return c.pid }

// Listen makes the keeper serve address (the socket containerd dials) and
// forward it to backend (the daemon's). Listening again on an address the
// keeper serves for the same backend is a no-op, so a restarted daemon
// simply says again what it serves.
func (c *Client) Listen(ctx context.Context, address, backend string) error {
	_, err := call(ctx, c.dir, request{Op: opListen, Address: address, Backend: backend})
	return err
}

// Close stops serving address and closes containerd's connections to it.
func (c *Client) Close(ctx context.Context, address string) error {
	_, err := call(ctx, c.dir, request{Op: opClose, Address: address})
	return err
}

// Exit ends the keeper, closing every socket it serves, and waits until
// its process is gone. A daemon stops its keeper only when no pod is left.
func (c *Client) Exit(ctx context.Context) error {
	if _, err := call(ctx, c.dir, request{Op: opExit}); err != nil {
		return err
	}
	for {
		if err := unix.Kill(c.pid, 0); errors.Is(err, unix.ESRCH) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("keeper %d still runs: %w", c.pid, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}
