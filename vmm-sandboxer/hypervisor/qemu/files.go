package qemu

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/unixsock"
)

// fileKind is how the daemon opens a file it hands QEMU.
type fileKind int

const (
	fileGiven     fileKind = iota // opened by the caller: a tap
	fileListen                    // a unix socket QEMU serves, left at its path for clients
	fileDial                      // a unix socket QEMU is a client of
	fileLog                       // created or truncated, for QEMU to write
	fileRead                      // a read-only disk image
	fileReadWrite                 // a disk image, /dev/vhost-vsock
)

// hostFile is a file QEMU gets as a descriptor instead of a path: QEMU,
// which may run as an unprivileged user, opens nothing in the VM's
// directory (root's alone: the pod's records, share and sockets are
// there), and the daemon follows nothing QEMU could have planted in it.
type hostFile struct {
	kind fileKind
	path string
	file *os.File // fileGiven
}

// open returns the descriptor to pass; owned says it is the caller's to
// close once QEMU has its copy.
func (h hostFile) open() (f *os.File, owned bool, err error) {
	switch h.kind {
	case fileGiven:
		return h.file, false, nil
	case fileListen:
		l, err := unixsock.Listen(h.path)
		if err != nil {
			return nil, false, err
		}
		ul := l.(*net.UnixListener)
		// The socket stays for clients (the daemon, again after a
		// restart); QEMU accepts on its copy of the descriptor.
		ul.SetUnlinkOnClose(false)
		defer ul.Close()
		f, err = ul.File()
		if err != nil {
			_ = os.Remove(h.path)
		}
		return f, true, err
	case fileDial:
		c, err := dial(h.path)
		if err != nil {
			return nil, false, err
		}
		defer c.Close()
		f, err = c.File()
		return f, true, err
	case fileLog:
		f, err = os.OpenFile(h.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
		return f, true, err
	case fileRead:
		f, err = os.Open(h.path)
		return f, true, err
	case fileReadWrite:
		f, err = os.OpenFile(h.path, os.O_RDWR, 0)
		return f, true, err
	}
	return nil, false, fmt.Errorf("file kind %d", h.kind)
}

// dialWait bounds how long a server's socket may refuse connections: a
// server binds its socket (which then exists) before it listens.
const dialWait = time.Second

// dial connects to a unix socket a server has just made.
func dial(path string) (*net.UnixConn, error) {
	deadline := time.Now().Add(dialWait)
	for {
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			return c, err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openedFiles are the descriptors of a QEMU start or a hot-plug.
type openedFiles struct {
	files   []*os.File
	owned   []*os.File
	sockets []string // listened on: removed when the start fails
}

// openFiles opens hs in order; on an error it undoes what it did.
func openFiles(hs []hostFile) (*openedFiles, error) {
	o := &openedFiles{}
	for _, h := range hs {
		f, owned, err := h.open()
		if err != nil {
			o.close(true)
			return nil, fmt.Errorf("%s: %w", h.path, err)
		}
		o.files = append(o.files, f)
		if owned {
			o.owned = append(o.owned, f)
		}
		if h.kind == fileListen {
			o.sockets = append(o.sockets, h.path)
		}
	}
	return o, nil
}

// close closes the descriptors opened here (QEMU holds its copies) and,
// when failed, removes the sockets nothing will serve.
func (o *openedFiles) close(failed bool) {
	for _, f := range o.owned {
		f.Close()
	}
	if failed {
		for _, s := range o.sockets {
			_ = os.Remove(s)
		}
	}
}
