package gvisor

import (
	"debug/elf"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// pauseName is the pause program's path inside the sandbox's rootfs.
const pauseName = "/kuasar-pause"

// prepareRootfs makes the read-only rootfs every pod's sandbox container
// runs from: a copy of the pause binary (by default the daemon itself,
// which acts as the shared holder: PID 1 that reaps and exits on SIGTERM)
// (or the small kuasar-holder beside it) and the mount points the sandbox
// container's spec names. runsc can only
// run programs from the container's rootfs, so the binary is copied, once
// per daemon start and only when it changed.
func prepareRootfs(dir, pause string) error {
	if err := checkStatic(pause); err != nil {
		return err
	}
	for _, d := range []string{"", "proc", "dev", "sys", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	dst := filepath.Join(dir, pauseName)
	src, err := os.Open(pause)
	if err != nil {
		return err
	}
	defer src.Close()
	si, err := src.Stat()
	if err != nil {
		return err
	}
	if di, err := os.Stat(dst); err == nil && di.Size() == si.Size() && di.ModTime().Equal(si.ModTime()) {
		return nil
	}
	tmp, err := os.CreateTemp(dir, ".pause-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, src); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chtimes(tmp.Name(), si.ModTime(), si.ModTime()); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

// checkStatic refuses a dynamically linked pause: runsc's sandbox has no
// dynamic loader (the daemon must be built with CGO_ENABLED=0).
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("pause binary %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("pause binary %s is dynamically linked; the gVisor pod's pause must be static (build with CGO_ENABLED=0)", path)
		}
	}
	return nil
}
