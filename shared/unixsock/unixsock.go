// Package unixsock makes the unix sockets the daemons serve on: root-only from
// the first moment, and never taking over a socket another process serves.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Listen listens on a unix socket only root can connect to. A stale
// socket file is replaced; a socket something still serves is an error.
func Listen(path string) (net.Listener, error) {
	if len(path) >= 108 {
		return nil, fmt.Errorf("socket path %s is %d bytes, the limit is 107", path, len(path))
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s is served by another process", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	return listen(path)
}

// listen binds a socket whose own mode is 0600 before bind: Linux creates
// the socket file with that mode (less the umask), so the file is
// root-only from its first moment. Narrowing the umask instead would
// narrow it for every file other goroutines create meanwhile: it is
// process-wide.
func listen(path string) (net.Listener, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("socket for %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close() // FileListener holds a duplicate
	if err := unix.Fchmod(fd, 0o600); err != nil {
		return nil, fmt.Errorf("chmod the socket for %s: %w", path, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return nil, fmt.Errorf("bind %s: %w", path, err)
	}
	if err := unix.Listen(fd, unix.SOMAXCONN); err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l, err := net.FileListener(f)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ul := l.(*net.UnixListener) // a unix socket's, as made above
	// As net.Listen's listener does: Close removes the socket file.
	ul.SetUnlinkOnClose(true)
	return ul, nil
}
