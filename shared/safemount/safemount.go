// Package safemount mounts and unmounts inside directories that someone
// the daemon does not trust can write: a VM guest (the pod's virtio-fs
// share) or a tenant (an image's root filesystem). Every path below such a
// directory is resolved relative to a file descriptor of it, with openat2
// refusing symlinks, ".." and magic links, and every mount is attached to
// a file descriptor, never to a path the kernel walks again (the class of
// Kata Containers' CVE-2020-2026: a planted symlink turns a bind mount into
// one over a host directory).
//
// Bind mounts are cloned detached (open_tree), get their attributes
// (read-only, nosuid, nodev, noexec) on the whole tree before they are
// attached (mount_setattr with AT_RECURSIVE), and only then are moved into
// place (move_mount): a read-only volume is never writable, not even for a
// moment, and neither are its submounts or the copies that mount
// propagation makes of it. Linux 5.12 or later.
package safemount

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// resolveBeneath keeps a lookup below its directory and off symlinks.
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// Attr is a set of mount attributes (unix.MOUNT_ATTR_*).
type Attr uint64

const (
	ReadOnly = Attr(unix.MOUNT_ATTR_RDONLY)
	NoSuid   = Attr(unix.MOUNT_ATTR_NOSUID)
	NoDev    = Attr(unix.MOUNT_ATTR_NODEV)
	NoExec   = Attr(unix.MOUNT_ATTR_NOEXEC)
)

// BindOptions reads what matters to a bind mount from OCI or containerd
// mount options: whether it is recursive (rbind) and its attributes.
func BindOptions(options []string) (recursive bool, attr Attr) {
	for _, o := range options {
		switch o {
		case "rbind":
			recursive = true
		case "ro":
			attr |= ReadOnly
		case "rw":
			attr &^= ReadOnly
		case "nosuid":
			attr |= NoSuid
		case "nodev":
			attr |= NoDev
		case "noexec":
			attr |= NoExec
		}
	}
	return recursive, attr
}

// Bind attaches a copy of the mount at src (with every mount below it when
// recursive) on target, an open file or directory, with attr set on every
// mount of the copy before it is attached. src is a host path the caller
// trusts (from containerd or the operator).
func Bind(src string, target *os.File, recursive bool, attr Attr) error {
	tree, err := Clone(src, recursive, attr)
	if err != nil {
		return err
	}
	defer tree.Close()
	if err := unix.MoveMount(int(tree.Fd()), "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach the copy of %s on %s: %w", src, target.Name(), err)
	}
	return nil
}

// Clone makes a copy of the mount at src, a file or a directory (with
// every mount below it when recursive), with attr set on every mount of
// the copy, and attaches it nowhere: it is the returned O_PATH descriptor
// of the copy's root, and lives as long as a descriptor refers to it.
// Handed to a process, it gives it src and nothing around it (".." stays
// at the copy's root), as attr allows: with ReadOnly, not even a process
// that could write src can write through it. src is a host path the
// caller trusts.
func Clone(src string, recursive bool, attr Attr) (*os.File, error) {
	flags := uint(unix.OPEN_TREE_CLONE | unix.OPEN_TREE_CLOEXEC)
	if recursive {
		flags |= unix.AT_RECURSIVE
	}
	tree, err := unix.OpenTree(unix.AT_FDCWD, src, flags)
	if err != nil {
		return nil, fmt.Errorf("clone mount %s: %w", src, err)
	}
	if attr != 0 {
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: uint64(attr)}); err != nil {
			unix.Close(tree)
			return nil, fmt.Errorf("set attributes %#x on the copy of %s: %w", uint64(attr), src, err)
		}
	}
	return os.NewFile(uintptr(tree), src), nil
}

// SetAttr sets attr on the mount whose root f is (not its submounts).
func SetAttr(f *os.File, attr Attr) error {
	if err := unix.MountSetattr(int(f.Fd()), "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: uint64(attr)}); err != nil {
		return fmt.Errorf("set attributes %#x on %s: %w", uint64(attr), f.Name(), err)
	}
	return nil
}

// ProcPath is a path that names f itself for system calls that take only
// paths (mount(2) with a file system type): the kernel follows the magic
// link to f's file, whatever has become of the path f was opened by.
func ProcPath(f *os.File) string { return fmt.Sprintf("/proc/self/fd/%d", f.Fd()) }

// OpenDir opens dir itself, a path the caller trusts, as the anchor of the
// lookups below it.
func OpenDir(dir string) (*os.File, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// OpenBeneath opens rel, a relative path below dir, refusing symlinks,
// magic links and any way out of dir.
func OpenBeneath(dir *os.File, rel string, flags int) (*os.File, error) {
	if err := checkRel(rel); err != nil {
		return nil, err
	}
	fd, err := unix.Openat2(int(dir.Fd()), rel, &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW), Resolve: resolveBeneath})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: filepath.Join(dir.Name(), rel), Err: err}
	}
	return os.NewFile(uintptr(fd), filepath.Join(dir.Name(), rel)), nil
}

// Mkdir makes directory name in dir, unless a directory (not a symlink)
// is there already, and opens it.
func Mkdir(dir *os.File, name string, perm uint32) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	if err := unix.Mkdirat(int(dir.Fd()), name, perm); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, &os.PathError{Op: "mkdir", Path: filepath.Join(dir.Name(), name), Err: err}
	}
	return OpenBeneath(dir, name, unix.O_PATH|unix.O_DIRECTORY)
}

// Target makes a mount target called name in dir, a directory when isDir
// and an empty regular file otherwise (or takes the one of that kind that
// is there), and opens it for Bind or ProcPath.
func Target(dir *os.File, name string, isDir bool) (*os.File, error) {
	if isDir {
		return Mkdir(dir, name, 0o755)
	}
	if err := checkName(name); err != nil {
		return nil, err
	}
	f, err := OpenBeneath(dir, name, unix.O_PATH)
	if errors.Is(err, unix.ENOENT) {
		// O_EXCL: never an existing file (a device a real open would
		// wake), never through a symlink.
		fd, cerr := unix.Openat(int(dir.Fd()), name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
		if cerr != nil && !errors.Is(cerr, unix.EEXIST) {
			return nil, &os.PathError{Op: "create", Path: filepath.Join(dir.Name(), name), Err: cerr}
		}
		if cerr == nil {
			unix.Close(fd)
		}
		f, err = OpenBeneath(dir, name, unix.O_PATH)
	}
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, fmt.Errorf("mount target %s is not a regular file: %w", f.Name(), unix.EEXIST)
	}
	return f, nil
}

// Unmount detaches every mount stacked on rel below dir, with what is
// mounted below them, never following a symlink to find it. A path that
// is not a mount point, or not there, is not an error.
func Unmount(dir *os.File, rel string) error {
	if err := checkRel(rel); err != nil {
		return err
	}
	parent, name := filepath.Split(rel)
	pdir := dir
	if parent != "" {
		var err error
		if pdir, err = OpenBeneath(dir, filepath.Clean(parent), unix.O_PATH|unix.O_DIRECTORY); err != nil {
			if errors.Is(err, unix.ENOENT) {
				return nil
			}
			return err
		}
		defer pdir.Close()
	}
	// The magic link is followed to the parent only; the last component,
	// checked to be no symlink, is not.
	target := ProcPath(pdir) + "/" + name
	for {
		err := unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil:
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not (or no longer) a mount point
		default:
			return fmt.Errorf("unmount %s: %w", filepath.Join(dir.Name(), rel), err)
		}
	}
}

// Remove removes name from dir: an empty directory or a file, never what
// a symlink points to (the symlink itself goes).
func Remove(dir *os.File, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	err := unix.Unlinkat(int(dir.Fd()), name, 0)
	if errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EPERM) {
		err = unix.Unlinkat(int(dir.Fd()), name, unix.AT_REMOVEDIR)
	}
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "remove", Path: filepath.Join(dir.Name(), name), Err: err}
	}
	return nil
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return fmt.Errorf("%q is not a file name: %w", name, unix.EINVAL)
	}
	return nil
}

func checkRel(rel string) error {
	if rel == "" || filepath.IsAbs(rel) || slices.Contains(strings.Split(rel, "/"), "..") {
		return fmt.Errorf("%q is not a path below a directory: %w", rel, unix.EINVAL)
	}
	return nil
}
