package oci

import (
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// OpenStdio opens a non-terminal process's stdio for handing to it
// directly: index 0 is stdin, 1 stdout, 2 stderr; an empty path gives a
// nil file. The caller passes the files to the process (runc create/exec
// pass their own stdio on) and closes its copies once it has them, so the
// daemon holds nothing of the process's IO and the process outlives the
// daemon.
//
// Stdout and stderr FIFOs are opened read-write: the process then always
// has a reader (itself), so it blocks instead of getting EPIPE/SIGPIPE
// while containerd, which reads them, restarts. Stdin is opened read-only,
// so the process sees EOF once containerd closes its end. Both are opened
// non-blocking (a read-only open of a FIFO without a writer would hang)
// and made blocking again for the process. A file:// URI (containerd's
// cio.LogFile) opens that file for appending; binary:// needs a logging
// process the daemon would own and is not supported.
func OpenStdio(s stdio.Stdio) (files [3]*os.File, err error) {
	for i, f := range []struct {
		path string
		flag int
	}{{s.Stdin, unix.O_RDONLY}, {s.Stdout, unix.O_RDWR}, {s.Stderr, unix.O_RDWR}} {
		if files[i], err = openStdioPath(f.path, f.flag, i == 0); err != nil {
			closeFiles(files)
			return [3]*os.File{}, err
		}
	}
	return files, nil
}

func openStdioPath(path string, flag int, stdin bool) (*os.File, error) {
	if path == "" {
		return nil, nil
	}
	p, file, err := stdioTarget(path)
	if err != nil {
		return nil, err
	}
	if file {
		if stdin {
			return nil, fmt.Errorf("stdin %s is a file URI: %w", path, errdefs.ErrInvalidArgument)
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, fmt.Errorf("stdio log file %s: %w", p, err)
		}
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open stdio log file: %w", err)
		}
		return f, nil
	}
	fd, err := unix.Open(p, flag|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open stdio %s: %w", p, mapOpenError(err))
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("stdio %s: make blocking: %w", p, err)
	}
	return os.NewFile(uintptr(fd), p), nil
}

func mapOpenError(err error) error {
	switch err {
	case unix.ENOENT:
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	case unix.EACCES, unix.EPERM:
		return fmt.Errorf("%w: %w", err, errdefs.ErrPermissionDenied)
	}
	return err
}

// stdioTarget returns the path a stdio string names and whether it is a
// regular log file (file://) rather than a FIFO (a plain path or fifo://).
func stdioTarget(s string) (path string, file bool, err error) {
	if filepath.IsAbs(s) {
		// A plain path, whatever URL syntax it may hold.
		return s, false, nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", false, fmt.Errorf("stdio %q: %v: %w", s, err, errdefs.ErrInvalidArgument)
	}
	switch u.Scheme {
	case "":
		return s, false, nil
	case "fifo":
		return u.Path, false, nil
	case "file":
		return u.Path, true, nil
	case "binary":
		return "", false, fmt.Errorf("binary logging (%s) would need a logger process owned by the daemon: %w", s, errdefs.ErrNotImplemented)
	}
	return "", false, fmt.Errorf("stdio scheme %q: %w", u.Scheme, errdefs.ErrInvalidArgument)
}

// checkStdio refuses stdio this package cannot serve before anything is
// made, whatever the terminal mode.
func checkStdio(s stdio.Stdio) error {
	for _, p := range []string{s.Stdin, s.Stdout, s.Stderr} {
		if p == "" {
			continue
		}
		_, file, err := stdioTarget(p)
		if err != nil {
			return err
		}
		if file && s.Terminal {
			return fmt.Errorf("terminal output to a log file URI: %w", errdefs.ErrNotImplemented)
		}
	}
	return nil
}

func closeFiles(files [3]*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// directIO is a go-runc IO that gives the runtime CLI the process's own
// files as its stdio; the CLI passes them on to the process. Missing ones
// are /dev/null: go-runc would otherwise capture the CLI's output through
// a pipe, which the process would inherit.
type directIO struct {
	files [3]*os.File
	null  *os.File
}

func newDirectIO(s stdio.Stdio, uid, gid int) (*directIO, error) {
	files, err := OpenStdio(s)
	if err != nil {
		return nil, err
	}
	d := &directIO{files: files}
	if uid != 0 || gid != 0 {
		// The shim hands over pipes owned by IoUid/IoGid so that a process
		// in a user namespace may reopen /proc/self/fd/N; these files are
		// the ones it gets.
		for _, f := range files {
			if f == nil {
				continue
			}
			if err := f.Chown(uid, gid); err != nil {
				d.Close()
				return nil, fmt.Errorf("chown stdio to %d:%d: %w", uid, gid, err)
			}
		}
	}
	for _, f := range files {
		if f == nil {
			if d.null, err = os.OpenFile(os.DevNull, os.O_RDWR|unix.O_CLOEXEC, 0); err != nil {
				d.Close()
				return nil, err
			}
			break
		}
	}
	return d, nil
}

func (d *directIO) file(i int) *os.File {
	if d.files[i] != nil {
		return d.files[i]
	}
	return d.null
}

func (d *directIO) Set(cmd *exec.Cmd) {
	cmd.Stdin = d.file(0)
	cmd.Stdout = d.file(1)
	cmd.Stderr = d.file(2)
}

func (d *directIO) Stdin() io.WriteCloser { return nil }
func (d *directIO) Stdout() io.ReadCloser { return nil }
func (d *directIO) Stderr() io.ReadCloser { return nil }

// Close closes the daemon's copies.
func (d *directIO) Close() error {
	closeFiles(d.files)
	d.files = [3]*os.File{}
	if d.null != nil {
		d.null.Close()
		d.null = nil
	}
	return nil
}
