package testenv

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteBusyboxRootfs lays out in dir, as a directory, the file tree of the
// busybox image (BusyboxImageTar): /bin/busybox with its applet symlinks
// in /bin, /etc/passwd, /etc/group, /tmp and the usual empty directories.
// It serves tests that hand a rootfs to a runtime without an image store
// (a VM's shared directory).
func WriteBusyboxRootfs(dir string) error {
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return fmt.Errorf("read busybox (install busybox-static): %w", err)
	}
	files := append(baseFiles(), ImageFile{Path: "/bin/busybox", Mode: 0o755, Data: bb})
	for _, a := range BusyboxApplets {
		files = append(files, ImageFile{Path: "/bin/" + a, Mode: 0o777, Link: "busybox"})
	}
	for _, f := range files {
		p := filepath.Join(dir, f.Path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		switch {
		case f.Dir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(p, f.Mode); err != nil {
				return err
			}
		case f.Link != "":
			if err := os.Symlink(f.Link, p); err != nil {
				return err
			}
		default:
			if err := os.WriteFile(p, f.Data, f.Mode.Perm()); err != nil {
				return err
			}
		}
	}
	return nil
}
