// Package unixsock makes the unix sockets the daemons serve on: root-only from
// the first moment, and never taking over a socket another process serves.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

var umaskMu sync.Mutex

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
	// The socket is created with mode 0600 from the start: no window in
	// which another user could connect.
	umaskMu.Lock()
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		return nil, err
	}
	return l, nil
}
