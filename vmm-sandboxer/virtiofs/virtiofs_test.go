package virtiofs

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

func TestStartStop(t *testing.T) {
	if _, err := os.Stat(DefaultBinary); err != nil {
		t.Skipf("%s not installed (Debian package qemu-system-common)", DefaultBinary)
	}
	if os.Getuid() != 0 {
		t.Skip("virtiofsd needs root")
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "fs.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	d, err := Start(ctx, Config{SocketPath: sock, SharedDir: t.TempDir()}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	pid := d.PID()
	t.Cleanup(func() { d.Stop(context.Background()) })
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("socket: %v", err)
	}
	if err := d.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, 0); err != syscall.ESRCH {
		t.Errorf("virtiofsd %d still there after Stop: %v", pid, err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Errorf("left in %s: %v", dir, ents)
	}
}

func TestStartRefused(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	_, err := Start(ctx, Config{SocketPath: filepath.Join(dir, "s"), SharedDir: filepath.Join(dir, "missing")}, nil)
	if err == nil || !strings.Contains(err.Error(), "shared directory") {
		t.Errorf("missing shared dir: %v", err)
	}
	_, err = Start(ctx, Config{Binary: filepath.Join(dir, "nope"), SocketPath: filepath.Join(dir, "s"), SharedDir: dir}, nil)
	if err == nil || !strings.Contains(err.Error(), "qemu-system-common") {
		t.Errorf("missing binary: %v", err)
	}
	_, err = Start(ctx, Config{SharedDir: dir}, nil)
	if err == nil {
		t.Error("no socket path accepted")
	}
}
