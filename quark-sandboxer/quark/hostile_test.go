package quark_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	"github.com/kuasar-go/kuasar-go/quark-sandboxer/quark"
	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// The tenant controls its image, and what its containers write to the
// volumes they share: neither may lead the daemon to mount outside the
// container's rootfs, and a read-only volume is read-only all the way down.

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func mounted(t *testing.T, p string) bool {
	t.Helper()
	m, err := mountinfo.Mounted(p)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// volumeContainer is a busybox container in image with one bind mount.
func volumeContainer(image string, m specs.Mount) quark.TaskResource {
	m.Type = "bind"
	return quark.TaskResource{
		TaskID: "c1",
		Spec:   &specs.Spec{Process: processSpec("/bin/true"), Mounts: []specs.Mount{m}},
		Rootfs: []quark.Mount{{Type: "bind", Source: image, Options: []string{"rbind"}}},
	}
}

// TestHostileTenantQuarkVolumeSymlink: symlinks in the image at a volume's
// mount point resolve inside the container's rootfs, as runc resolves
// them, even when they are swapped in while the daemon mounts; the host
// path they name is never touched, and what the image has at the mount
// point is never opened.
func TestHostileTenantQuarkVolumeSymlink(t *testing.T) {
	r := newRig(t, "")
	const id = "symlinks"
	r.run(t, id, nil, "")
	rootfs := filepath.Join(r.podDir(id), "sandbox", "c1", "rootfs")

	// outside is a host directory the image's symlinks name; the image has
	// a directory of the same path, where they must land.
	outside := t.TempDir()
	t.Cleanup(func() {
		for mounted(t, outside) {
			if err := unix.Unmount(outside, unix.MNT_DETACH); err != nil {
				t.Errorf("unmount %s: %v", outside, err)
				return
			}
		}
	})
	image := busyboxRootfs(t)
	inImage := filepath.Join(image, outside)
	writeFile(t, filepath.Join(inImage, "app.conf"), "from-the-image\n")
	symlink(t, outside, filepath.Join(image, "data"))
	symlink(t, strings.Repeat("../", 8)+outside+"/app.conf", filepath.Join(image, "app.conf"))
	symlink(t, outside+"/made", filepath.Join(image, "dangling"))

	vol := t.TempDir()
	writeFile(t, filepath.Join(vol, "msg"), "from-the-volume\n")
	volFile := filepath.Join(t.TempDir(), "app.conf")
	writeFile(t, volFile, "from-a-volume-file\n")

	hostUntouched := func(t *testing.T) {
		t.Helper()
		if mounted(t, outside) {
			t.Errorf("the host directory %s the image names was mounted over", outside)
		}
		if ents, _ := os.ReadDir(outside); len(ents) != 0 {
			t.Errorf("the daemon created %v in the host directory %s the image names", ents, outside)
		}
	}

	for _, tc := range []struct {
		name  string
		mount specs.Mount
		// lands is the file, below the rootfs, where the volume's file
		// shows; "" for a mount point that is refused.
		lands, want string
	}{
		{name: "absolute symlink to a directory", mount: specs.Mount{Destination: "/data", Source: vol, Options: []string{"rbind", "ro"}},
			lands: filepath.Join(outside, "msg"), want: "from-the-volume\n"},
		{name: "below an absolute symlink", mount: specs.Mount{Destination: "/data/sub", Source: vol, Options: []string{"rbind"}},
			lands: filepath.Join(outside, "sub", "msg"), want: "from-the-volume\n"},
		{name: "relative symlink climbing out to a file", mount: specs.Mount{Destination: "/app.conf", Source: volFile, Options: []string{"bind", "ro"}},
			lands: filepath.Join(outside, "app.conf"), want: "from-a-volume-file\n"},
		{name: "dangling symlink", mount: specs.Mount{Destination: "/dangling", Source: vol, Options: []string{"rbind"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := r.update(id, volumeContainer(image, tc.mount))
			if tc.lands == "" {
				testenv.WantCode(t, "Update", err, codes.InvalidArgument, tc.mount.Destination)
			} else {
				if err != nil {
					t.Fatalf("Update: %v", err)
				}
				if b, err := os.ReadFile(filepath.Join(rootfs, tc.lands)); string(b) != tc.want {
					t.Errorf("volume at %s inside the rootfs: %q, %v; want %q", tc.lands, b, err, tc.want)
				}
			}
			hostUntouched(t)
			if err := r.update(id); err != nil {
				t.Fatalf("Update removing c1: %v", err)
			}
			hostUntouched(t)
		})
	}

	// The image has a FIFO at a file volume's mount point: opening it
	// (rather than a handle that does not open it) blocks the daemon until
	// someone writes; the tenant then swaps the FIFO's directory for a
	// symlink to the host before a mount by path walks it again.
	t.Run("FIFO at the mount point, swapped while the daemon waits", func(t *testing.T) {
		dir := filepath.Join(image, "fifo")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mkfifo(filepath.Join(dir, "app.conf"), 0o644); err != nil {
			t.Fatal(err)
		}
		hostFile := filepath.Join(outside, "app.conf")
		writeFile(t, hostFile, "host-file\n")
		t.Cleanup(func() {
			for mounted(t, hostFile) {
				if err := unix.Unmount(hostFile, unix.MNT_DETACH); err != nil {
					t.Errorf("unmount %s: %v", hostFile, err)
					return
				}
			}
			os.Remove(hostFile)
		})
		done := make(chan error, 1)
		go func() {
			done <- r.update(id, volumeContainer(image, specs.Mount{Destination: "/fifo/app.conf", Source: volFile, Options: []string{"bind", "ro"}}))
		}()
		deadline := time.After(30 * time.Second)
	wait:
		for {
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Update: %v", err)
				}
				break wait
			case <-deadline:
				t.Fatal("Update neither returned nor waited on the FIFO")
			case <-time.After(10 * time.Millisecond):
				if !waitingOnFIFO(t) {
					continue
				}
				t.Errorf("the daemon opened the FIFO the image has at a volume's mount point and waits for a writer")
				moved := dir + ".moved"
				if err := os.Rename(dir, moved); err != nil {
					t.Fatal(err)
				}
				symlink(t, outside, dir)
				w, err := os.OpenFile(filepath.Join(moved, "app.conf"), os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				w.Close()
			}
		}
		if mounted(t, hostFile) {
			t.Errorf("the volume was mounted on the host file %s", hostFile)
		}
		if b, err := os.ReadFile(filepath.Join(rootfs, "fifo", "app.conf")); string(b) != "from-a-volume-file\n" {
			t.Errorf("volume on the image's FIFO: %q, %v", b, err)
		}
		if err := r.update(id); err != nil {
			t.Fatalf("Update removing c1: %v", err)
		}
	})
	hostUntouched(t)
	r.shutdown(t, id)
	assertNothingLeft(t, r, id)
}

// waitingOnFIFO tells whether a thread of this process (the daemon, in
// process) waits in an open of a FIFO for the other end.
func waitingOnFIFO(t *testing.T) bool {
	t.Helper()
	tasks, err := filepath.Glob("/proc/self/task/*/wchan")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range tasks {
		if b, _ := os.ReadFile(p); string(b) == "wait_for_partner" {
			return true
		}
	}
	return false
}

// tmpfs mounts a small tmpfs on dir for the test.
func tmpfs(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
}

// TestHostileTenantQuarkReadOnlyVolume: a read-only volume is read-only
// with every mount below it, nosuid, nodev and noexec as the spec asks,
// and was never attached writable: mount propagation (systemd makes the
// host's mounts shared) copies a mount into its peers as it is attached,
// and a later remount does not reach the copies.
func TestHostileTenantQuarkReadOnlyVolume(t *testing.T) {
	r := newRig(t, "")
	const id = "read-only"
	r.run(t, id, nil, "")
	sandboxDir := filepath.Join(r.podDir(id), "sandbox")
	// The sandbox bundle on a shared mount with a peer, as on a host whose
	// root is shared; Shutdown removes the bundle's own mount.
	peer := t.TempDir()
	if err := unix.Mount(sandboxDir, sandboxDir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("", sandboxDir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(sandboxDir, peer, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(peer, unix.MNT_DETACH) })

	src := t.TempDir()
	tmpfs(t, src)
	if err := os.Mkdir(filepath.Join(src, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	tmpfs(t, filepath.Join(src, "sub"))
	image := busyboxRootfs(t)
	c1 := volumeContainer(image, specs.Mount{Destination: "/data", Source: src, Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
	if err := r.update(id, c1); err != nil {
		t.Fatalf("Update: %v", err)
	}
	if !mounted(t, filepath.Join(peer, "c1", "rootfs", "data")) {
		t.Fatal("the volume was not propagated to the peer: the test cannot see what was attached")
	}
	const want = unix.ST_RDONLY | unix.ST_NOSUID | unix.ST_NODEV | unix.ST_NOEXEC
	for _, dir := range []string{sandboxDir, peer} {
		for _, p := range []string{"data", "data/sub"} {
			p := filepath.Join(dir, "c1", "rootfs", p)
			if err := os.WriteFile(filepath.Join(p, "f"), []byte("x"), 0o644); !errors.Is(err, unix.EROFS) {
				t.Errorf("write below %s: %v, want EROFS", p, err)
			}
			var st unix.Statfs_t
			if err := unix.Statfs(p, &st); err != nil {
				t.Fatal(err)
			}
			if st.Flags&want != want {
				t.Errorf("%s mounted with flags %#x, want %#x (ro, nosuid, nodev, noexec)", p, st.Flags, want)
			}
		}
	}
	if err := r.update(id); err != nil {
		t.Fatalf("Update removing c1: %v", err)
	}
	r.shutdown(t, id)
	assertNothingLeft(t, r, id)
	if left := mountsBelow(t, peer); len(left) > 1 {
		t.Errorf("mounts left in the peer: %v", left)
	}
}
