// Package modfile opens the WebAssembly module a wasm container runs, once:
// inside the container's root filesystem with no way out of it (openat2
// RESOLVE_IN_ROOT: symlinks and ".." resolve as they would in the
// container), as a regular file of bounded size with a module's header,
// and reads its key (engine.KeyOf) through that descriptor a buffer at a
// time. What uses the module afterwards (the compile child, the runner)
// gets the same descriptor, so every consumer sees the same file however
// the tenant changes its rootfs meanwhile.
package modfile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

// Module is an open module file.
type Module struct {
	// File is the module, read-only. Readers use ReadAt (pread): the
	// processes it is passed to share its offset.
	File *os.File
	// Guest is the module's path in the container.
	Guest string
	Size  int64
	// Key is the key of the bytes read when it was opened.
	Key string
}

// Close closes the file.
func (m *Module) Close() error { return m.File.Close() }

// resolveInRoot keeps a lookup inside the directory it starts from, as if
// it were "/", and off magic links (/proc/self/...).
const resolveInRoot = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS

// Find opens the module process.args[0] names, inside root (the container's
// root filesystem): an absolute path, a path relative to the working
// directory, or a bare name looked up in the process's PATH ("/" without
// one). maxSize bounds the module.
func Find(ctx context.Context, root string, ps *specs.Process, maxSize int64) (*Module, error) {
	if len(ps.Args) == 0 || ps.Args[0] == "" {
		return nil, fmt.Errorf("process.args is empty: it must name the module: %w", errdefs.ErrInvalidArgument)
	}
	dir, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("container rootfs %s: %w", root, err)
	}
	defer unix.Close(dir)
	for _, guest := range candidates(ps) {
		fd, err := unix.Openat2(dir, strings.TrimPrefix(guest, "/"), &unix.OpenHow{
			Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: resolveInRoot})
		if err != nil {
			continue
		}
		m, err := open(ctx, fd, guest, maxSize)
		if errors.Is(err, errNotRegular) {
			continue
		}
		return m, err
	}
	return nil, fmt.Errorf("module %q (process.args[0]) %w: %w", ps.Args[0], ErrNotFound, errdefs.ErrInvalidArgument)
}

// ErrNotFound is Find's error when no candidate is a regular file.
var ErrNotFound = errors.New("not found in the container's rootfs")

// OpenHost opens a module file of the daemon's own (a wasm OCI artifact's
// module), named guest for the container.
func OpenHost(ctx context.Context, hostPath, guest string, maxSize int64) (*Module, error) {
	fd, err := unix.Open(hostPath, unix.O_PATH|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", hostPath, err)
	}
	return open(ctx, fd, guest, maxSize)
}

func candidates(ps *specs.Process) []string {
	arg := ps.Args[0]
	switch {
	case path.IsAbs(arg):
		return []string{path.Clean(arg)}
	case strings.Contains(arg, "/"):
		return []string{path.Join("/", ps.Cwd, arg)}
	}
	dirs := "/"
	for _, kv := range ps.Env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			dirs = v
		}
	}
	var out []string
	for _, d := range strings.Split(dirs, ":") {
		out = append(out, path.Join("/", d, arg))
	}
	return out
}

var errNotRegular = errors.New("not a regular file")

// magic starts every binary module: "\0asm" and a version.
var magic = []byte{0x00, 0x61, 0x73, 0x6d}

// open takes over pathFD (O_PATH): a regular file is opened for reading
// through it (never a FIFO or a device, whose open could block or act),
// its size checked, its header checked and its key read.
func open(ctx context.Context, pathFD int, guest string, maxSize int64) (_ *Module, retErr error) {
	defer unix.Close(pathFD)
	var st unix.Stat_t
	if err := unix.Fstat(pathFD, &st); err != nil {
		return nil, fmt.Errorf("module %s: %w", guest, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, errNotRegular
	}
	if st.Size > maxSize {
		return nil, fmt.Errorf("module %s is %d bytes, more than the %d bytes allowed (wasm.max_module_size_mib): %w",
			guest, st.Size, maxSize, errdefs.ErrInvalidArgument)
	}
	// The very file the O_PATH descriptor names, whatever its path is now.
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(pathFD), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("module %s: %w", guest, err)
	}
	m := &Module{File: os.NewFile(uintptr(fd), guest), Guest: guest}
	defer func() {
		if retErr != nil {
			m.Close()
		}
	}()
	head := make([]byte, 8)
	if n, _ := m.File.ReadAt(head, 0); n < len(head) || !bytes.Equal(head[:4], magic) {
		return nil, fmt.Errorf("%s (process.args[0]) is not a WebAssembly module (no \\0asm header): %w", guest, errdefs.ErrInvalidArgument)
	}
	// pread: the file's offset is shared with the processes it goes to.
	r := &ctxReader{ctx: ctx, r: io.NewSectionReader(m.File, 0, maxSize+1)}
	cr := &countingReader{r: r}
	if m.Key, err = engine.KeyOf(cr); err != nil {
		return nil, fmt.Errorf("read module %s: %w", guest, err)
	}
	if cr.n > maxSize {
		return nil, fmt.Errorf("module %s grew past the %d bytes allowed (wasm.max_module_size_mib) while it was read: %w",
			guest, maxSize, errdefs.ErrInvalidArgument)
	}
	m.Size = cr.n
	return m, nil
}

// ctxReader stops reading when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
