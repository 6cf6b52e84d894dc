package guest

import (
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fakeKernel lays out /lib/modules/<ver> and /boot/vmlinuz-<ver> with a
// modules.dep whose lists are last-needed-first, as depmod writes them.
func fakeKernel(t *testing.T, ver string) (modRoot, boot string) {
	t.Helper()
	root := t.TempDir()
	modRoot, boot = filepath.Join(root, "lib/modules"), filepath.Join(root, "boot")
	dir := filepath.Join(modRoot, ver)
	dep := `kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/broken.ko: kernel/fs/missing.ko
`
	for _, l := range strings.Split(dep, "\n") {
		if m, _, ok := strings.Cut(l, ":"); ok && !strings.Contains(m, "broken") {
			p := filepath.Join(dir, m)
			os.MkdirAll(filepath.Dir(p), 0o755)
			os.WriteFile(p, []byte("module "+m), 0o644)
		}
	}
	must(t, os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\n"), 0o644))
	must(t, os.MkdirAll(boot, 0o755))
	must(t, os.WriteFile(filepath.Join(boot, "vmlinuz-"+ver), []byte("kernel "+ver), 0o644))
	return modRoot, boot
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestResolveModules(t *testing.T) {
	modRoot, _ := fakeKernel(t, "6.1.0-1-cloud-amd64")
	dir := filepath.Join(modRoot, "6.1.0-1-cloud-amd64")
	tests := []struct {
		name    string
		in      []string
		want    []string
		builtin []string
		err     string
	}{
		{"dependencies first, last-needed first", []string{"virtio_pci"}, []string{
			"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
			"kernel/drivers/virtio/virtio_pci_modern_dev.ko", "kernel/drivers/virtio/virtio_pci.ko",
		}, nil, ""},
		{"shared dependencies once, dashes and underscores alike", []string{"virtio_console", "virtio_rng", "virtio-net"}, []string{
			"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
			"kernel/drivers/char/virtio_console.ko", "kernel/drivers/char/hw_random/virtio-rng.ko",
			"kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko",
		}, nil, ""},
		{"built in", []string{"ext4"}, nil, []string{"ext4"}, ""},
		{"unknown", []string{"nosuch"}, nil, nil, "module nosuch is neither"},
		{"dangling dependency", []string{"broken"}, nil, nil, "kernel/fs/missing.ko is needed by kernel/fs/broken.ko"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, builtin, err := ResolveModules(dir, tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) || !reflect.DeepEqual(builtin, tc.builtin) {
				t.Fatalf("got %q (builtin %q), want %q (builtin %q)", got, builtin, tc.want, tc.builtin)
			}
		})
	}
}

func TestNewestKernel(t *testing.T) {
	modRoot, boot := fakeKernel(t, "6.1.0-9-cloud-amd64")
	for _, v := range []string{"6.1.0-10-cloud-amd64", "6.12.0-1-cloud-amd64"} {
		must(t, os.MkdirAll(filepath.Join(modRoot, v), 0o755))
	}
	must(t, os.WriteFile(filepath.Join(boot, "vmlinuz-6.1.0-10-cloud-amd64"), nil, 0o644))
	// 6.12 has modules but no image: not a candidate.
	got, err := NewestKernel(modRoot, boot)
	if err != nil || got != "6.1.0-10-cloud-amd64" {
		t.Fatalf("got %q, %v", got, err)
	}
	if _, err := NewestKernel(filepath.Join(t.TempDir(), "none"), boot); err == nil || !strings.Contains(err.Error(), "linux-image-cloud-amd64") {
		t.Fatalf("no modules dir: %v", err)
	}
}

// cpioEntries reads back a gzip'd newc archive: name -> (mode, data).
func cpioEntries(t *testing.T, img []byte) ([]string, map[string]cpioEntry) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(img))
	must(t, err)
	raw, err := io.ReadAll(zr)
	must(t, err)
	var order []string
	ents := map[string]cpioEntry{}
	off := 0
	align := func() { off = (off + 3) &^ 3 }
	for {
		if string(raw[off:off+6]) != "070701" {
			t.Fatalf("bad cpio magic at %d", off)
		}
		field := func(i int) int {
			n, err := strconv.ParseUint(string(raw[off+6+8*i:off+14+8*i]), 16, 32)
			must(t, err)
			return int(n)
		}
		mode, mtime, size, rmaj, namesize := field(1), field(5), field(6), field(9), field(11)
		name := string(raw[off+110 : off+110+namesize-1])
		off += 110 + namesize
		align()
		data := raw[off : off+size]
		off += size
		align()
		if name == "TRAILER!!!" {
			break
		}
		order = append(order, name)
		ents[name] = cpioEntry{name: name, mode: uint32(mode), mtime: int64(mtime), data: data, rmaj: uint32(rmaj)}
	}
	return order, ents
}

func TestBuildReproducible(t *testing.T) {
	ver := "6.1.0-1-cloud-amd64"
	modRoot, boot := fakeKernel(t, ver)
	agent := filepath.Join(t.TempDir(), "vmm-task")
	must(t, os.WriteFile(agent, []byte("\x7fELF agent"), 0o755))
	extra := filepath.Join(t.TempDir(), "runc")
	must(t, os.WriteFile(extra, []byte("runc"), 0o755))
	spec := Spec{ModulesRoot: modRoot, BootDir: boot, Modules: []string{"virtio_pci", "virtio_console", "ext4"},
		Agent: agent, Files: map[string]string{"/usr/bin/runc": extra}}

	build := func(s Spec) ([]byte, *Result) {
		out := t.TempDir()
		res, err := Build(s, out)
		must(t, err)
		b, err := os.ReadFile(res.Initrd)
		must(t, err)
		return b, res
	}
	a, res := build(spec)
	// Different times on the inputs change nothing.
	must(t, os.Chtimes(agent, time.Now(), time.Now().Add(-time.Hour)))
	b, _ := build(spec)
	if !bytes.Equal(a, b) {
		t.Fatal("two builds of the same inputs differ")
	}
	if k, _ := os.ReadFile(res.Kernel); string(k) != "kernel "+ver {
		t.Fatalf("kernel copy: %q", k)
	}
	if res.KernelVersion != ver || len(res.Modules) != 5 || !reflect.DeepEqual(res.Builtin, []string{"ext4"}) {
		t.Fatalf("result %+v", res)
	}
	// A different time or content gives different bytes.
	spec2 := spec
	spec2.MTime = time.Unix(1700000000, 0)
	if c, _ := build(spec2); bytes.Equal(a, c) {
		t.Fatal("MTime did not change the image")
	}

	order, ents := cpioEntries(t, a)
	if !sortedStrings(order) {
		t.Errorf("entries not sorted: %q", order)
	}
	init := ents["init"]
	if init.mode != modeFile|0o755 || string(init.data) != "\x7fELF agent" {
		t.Errorf("/init: mode %o data %q", init.mode, init.data)
	}
	if c := ents["dev/console"]; c.mode != modeChr|0o600 || c.rmaj != 5 {
		t.Errorf("/dev/console: %+v", c)
	}
	if r := ents["usr/bin/runc"]; string(r.data) != "runc" || ents["usr/bin"].mode != modeDir|0o755 {
		t.Errorf("extra file or its directory missing: %+v", r)
	}
	list := strings.Fields(string(ents[ModuleListPath].data))
	want := []string{
		"/lib/modules/" + ver + "/kernel/drivers/virtio/virtio_ring.ko",
		"/lib/modules/" + ver + "/kernel/drivers/virtio/virtio.ko",
		"/lib/modules/" + ver + "/kernel/drivers/virtio/virtio_pci_modern_dev.ko",
		"/lib/modules/" + ver + "/kernel/drivers/virtio/virtio_pci.ko",
		"/lib/modules/" + ver + "/kernel/drivers/char/virtio_console.ko",
	}
	if !reflect.DeepEqual(list, want) {
		t.Fatalf("module list %q, want %q", list, want)
	}
	for _, m := range list {
		if _, ok := ents[strings.TrimPrefix(m, "/")]; !ok {
			t.Errorf("listed module %s not in the image", m)
		}
	}
	for _, e := range ents {
		if e.mtime != 0 {
			t.Errorf("%s has mtime %d", e.name, e.mtime)
		}
	}
	if _, err := Build(Spec{ModulesRoot: modRoot, BootDir: boot, Agent: agent, Files: map[string]string{"init": extra}}, t.TempDir()); err == nil {
		t.Error("an extra file replacing /init was accepted")
	}
}

func sortedStrings(s []string) bool {
	for i := 1; i < len(s); i++ {
		if s[i-1] >= s[i] {
			return false
		}
	}
	return true
}

// TestBuildInstalledKernel builds from the installed Debian kernel twice
// and compares the bytes. A few modules only: under the race detector
// compression is slow, and the e2e test builds the full image.
func TestBuildInstalledKernel(t *testing.T) {
	ver, err := NewestKernel("/lib/modules", "/boot")
	if err != nil {
		t.Skipf("no installed kernel: %v", err)
	}
	agent := filepath.Join(t.TempDir(), "vmm-task")
	must(t, os.WriteFile(agent, bytes.Repeat([]byte("agent"), 1000), 0o755))
	var imgs [][]byte
	for i := 0; i < 2; i++ {
		t0 := time.Now()
		res, err := Build(Spec{KernelVersion: ver, Agent: agent, Modules: []string{"virtio_pci", "virtio_console"}}, t.TempDir())
		must(t, err)
		b, err := os.ReadFile(res.Initrd)
		must(t, err)
		imgs = append(imgs, b)
		t.Logf("kernel %s: %d modules %q, builtin %q, initramfs %d bytes in %s", ver, len(res.Modules), res.Modules, res.Builtin, len(b), time.Since(t0))
	}
	if !bytes.Equal(imgs[0], imgs[1]) {
		t.Fatal("two builds from the installed kernel differ")
	}
}
