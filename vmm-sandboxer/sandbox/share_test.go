package sandbox

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/safemount"
)

// TestMakeShare: what virtiofsd serves is read-only around the mounts the
// host makes, which it receives, also in a mount namespace made before
// them (virtiofsd makes its own at start), with their own flags.
func TestMakeShare(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare (util-linux) not installed")
	}
	dir := t.TempDir()
	mounts, share := filepath.Join(dir, "mounts"), filepath.Join(dir, "share")
	if err := makeShare(mounts, share); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := errors.Join(unmountAll(share), unmountAll(mounts)); err != nil {
			t.Error(err)
		}
	})
	// virtiofsd's view: a namespace of its own whose mounts are slaves.
	ns := exec.Command("unshare", "--mount", "--propagation", "slave", "sleep", "60")
	if err := ns.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Process.Kill(); ns.Wait() })
	nsRoot := "/proc/" + strconv.Itoa(ns.Process.Pid) + "/root"
	waitNamespace(t, ns.Process.Pid)

	// The guest cannot write around the mounts.
	for _, view := range []string{share, nsRoot + share} {
		if err := os.Symlink("/etc", filepath.Join(view, "c1")); !errors.Is(err, unix.EROFS) {
			t.Fatalf("plant a link in %s: %v, want EROFS", view, err)
		}
	}

	// The host mounts a rootfs and a read-only volume after both views
	// exist.
	root, err := safemount.OpenDir(mounts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { root.Close() })
	cdir, err := safemount.Mkdir(root, "c1", 0o700)
	if err != nil {
		t.Fatal(err)
	}
	defer cdir.Close()
	rootfs, err := safemount.Target(cdir, "rootfs", true)
	if err != nil {
		t.Fatal(err)
	}
	defer rootfs.Close()
	if err := unix.Mount("tmpfs", safemount.ProcPath(rootfs), "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	vol, err := safemount.Target(cdir, "m1-vol", true)
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	if err := safemount.Bind(t.TempDir(), vol, true, safemount.ReadOnly); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, m := range []string{"c1/m1-vol", "c1/rootfs"} {
			if err := safemount.Unmount(root, m); err != nil {
				t.Error(err)
			}
		}
	})
	for _, view := range []string{share, nsRoot + share} {
		if err := os.WriteFile(filepath.Join(view, "c1", "rootfs", "f"), []byte("x"), 0o644); err != nil {
			t.Errorf("write in the rootfs through %s: %v", view, err)
		}
		if err := os.WriteFile(filepath.Join(view, "c1", "m1-vol", "f"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
			t.Errorf("write in the read-only volume through %s: %v, want EROFS", view, err)
		}
	}
}

// waitNamespace waits until pid runs in a mount namespace other than ours.
func waitNamespace(t *testing.T, pid int) {
	t.Helper()
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 500; i++ {
		if other, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/mnt"); err == nil && other != self {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the process never entered its own mount namespace")
}
