// Package guest builds the pod VM's boot files from a distribution kernel:
// the kernel image as it is, and an initramfs (newc cpio, gzip) holding
// vmm-task as /init, the kernel modules the guest needs in load order and
// any extra files. The build is reproducible: the same inputs give the same
// bytes (fixed times, owners and inode numbers, sorted entries).
package guest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// DefaultModules are what a pod VM needs from a kernel where virtio is
// modular (Debian's cloud kernel): PCI transport, the agent's serial port,
// disks, network, entropy, virtio-fs and overlay for rootfs, and vsock.
// Modules the kernel has built in are skipped.
var DefaultModules = []string{
	"virtio_pci", "virtio_console", "virtio_blk", "virtio_net", "virtio_rng",
	"virtiofs", "overlay", "vmw_vsock_virtio_transport",
}

// Paths inside the image.
const (
	// InitPath is where the agent goes: the kernel runs /init.
	InitPath = "init"
	// ModuleListPath lists the module files to load, one per line, in
	// an order that satisfies their dependencies.
	ModuleListPath = "etc/vmm-task/modules"
	// Names of the build's outputs in the output directory.
	KernelName = "vmlinuz"
	InitrdName = "initramfs.img"
)

// Spec is what goes into a guest image.
type Spec struct {
	// ModulesRoot holds one directory per kernel version (/lib/modules).
	ModulesRoot string
	// BootDir holds vmlinuz-<version> (/boot).
	BootDir string
	// KernelVersion picks the kernel; empty means the newest version that
	// has both modules and a kernel image.
	KernelVersion string
	// Modules are module names ('-' and '_' are the same) to include with
	// everything they depend on; nil means DefaultModules.
	Modules []string
	// Agent is the static vmm-task binary.
	Agent string
	// Files are extra files: path in the image -> path on the host.
	Files map[string]string
	// MTime is every entry's modification time (the Unix epoch when zero).
	MTime time.Time
}

// Result describes a built image.
type Result struct {
	KernelVersion string
	Kernel        string   // path of the copied kernel image
	Initrd        string   // path of the initramfs
	Modules       []string // module files in load order, relative to the version's directory
	Builtin       []string // requested modules the kernel has built in
	InitrdSize    int64
}

// Build writes vmlinuz and initramfs.img into outDir.
func Build(spec Spec, outDir string) (*Result, error) {
	if spec.ModulesRoot == "" {
		spec.ModulesRoot = "/lib/modules"
	}
	if spec.BootDir == "" {
		spec.BootDir = "/boot"
	}
	if spec.Modules == nil {
		spec.Modules = DefaultModules
	}
	if spec.Agent == "" {
		return nil, errors.New("guest: no agent binary (vmm-task) given")
	}
	ver := spec.KernelVersion
	if ver == "" {
		v, err := NewestKernel(spec.ModulesRoot, spec.BootDir)
		if err != nil {
			return nil, err
		}
		ver = v
	}
	kernel := filepath.Join(spec.BootDir, "vmlinuz-"+ver)
	if _, err := os.Stat(kernel); err != nil {
		return nil, fmt.Errorf("guest: kernel %s: %w", ver, err)
	}
	modDir := filepath.Join(spec.ModulesRoot, ver)
	mods, builtin, err := ResolveModules(modDir, spec.Modules)
	if err != nil {
		return nil, err
	}
	res := &Result{KernelVersion: ver, Modules: mods, Builtin: builtin}

	files := map[string]string{InitPath: spec.Agent}
	for _, m := range mods {
		files[path.Join("lib/modules", ver, m)] = filepath.Join(modDir, m)
	}
	for g, h := range spec.Files {
		g = strings.TrimPrefix(path.Clean("/"+g), "/")
		if g == "" || g == InitPath || g == ModuleListPath {
			return nil, fmt.Errorf("guest: extra file %q would replace a file the build owns", g)
		}
		files[g] = h
	}
	list := ""
	for _, m := range mods {
		list += "/" + path.Join("lib/modules", ver, m) + "\n"
	}

	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, fmt.Errorf("guest: %w", err)
	}
	res.Kernel = filepath.Join(outDir, KernelName)
	if err := copyFile(kernel, res.Kernel); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	var mtime int64
	if !spec.MTime.IsZero() {
		mtime = spec.MTime.Unix()
	}
	if err := writeInitramfs(&buf, files, []byte(list), mtime); err != nil {
		return nil, err
	}
	res.Initrd = filepath.Join(outDir, InitrdName)
	if err := writeAtomic(res.Initrd, buf.Bytes()); err != nil {
		return nil, err
	}
	res.InitrdSize = int64(buf.Len())
	return res, nil
}

// NewestKernel is the highest version under modulesRoot that also has
// bootDir/vmlinuz-<version>.
func NewestKernel(modulesRoot, bootDir string) (string, error) {
	ents, err := os.ReadDir(modulesRoot)
	if err != nil {
		return "", fmt.Errorf("guest: kernel modules: %w (install linux-image-cloud-amd64)", err)
	}
	var vers []string
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(bootDir, "vmlinuz-"+e.Name())); err == nil {
			vers = append(vers, e.Name())
		}
	}
	if len(vers) == 0 {
		return "", fmt.Errorf("guest: no kernel under %s has its image in %s (install linux-image-cloud-amd64)", modulesRoot, bootDir)
	}
	sort.Slice(vers, func(i, j int) bool { return versionLess(vers[i], vers[j]) })
	return vers[len(vers)-1], nil
}

// versionLess compares kernel versions by their numeric runs.
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' })
	}
	as, bs := split(a), split(b)
	for i := 0; i < len(as) && i < len(bs); i++ {
		if as[i] == bs[i] {
			continue
		}
		var an, bn int
		_, ea := fmt.Sscanf(as[i], "%d", &an)
		_, eb := fmt.Sscanf(bs[i], "%d", &bn)
		if ea == nil && eb == nil && an != bn {
			return an < bn
		}
		return as[i] < bs[i]
	}
	return len(as) < len(bs)
}

// modName is a module's canonical name: the file's base name without
// .ko[.xz|.zst|.gz], '-' as '_'.
func modName(p string) string {
	b := path.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// ResolveModules reads modDir/modules.dep and returns the files of names
// and everything they need, each after its dependencies. Names the kernel
// has built in (modules.builtin) are returned apart; unknown names fail.
func ResolveModules(modDir string, names []string) (files, builtin []string, err error) {
	deps := map[string][]string{} // file -> its dependencies' files
	byName := map[string]string{} // name -> file
	f, err := os.Open(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, nil, fmt.Errorf("guest: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		byName[modName(mod)] = mod
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("guest: modules.dep: %w", err)
	}
	isBuiltin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			isBuiltin[modName(l)] = true
		}
	}
	seen := map[string]bool{}
	var visit func(mod string, chain []string) error
	visit = func(mod string, chain []string) error {
		if seen[mod] {
			return nil
		}
		for _, c := range chain {
			if c == mod {
				return fmt.Errorf("guest: module dependency cycle: %s -> %s", strings.Join(chain, " -> "), mod)
			}
		}
		d, ok := deps[mod]
		if !ok {
			return fmt.Errorf("guest: %s is needed by %s but not in modules.dep", mod, strings.Join(chain, " -> "))
		}
		// modules.dep lists a module's needs last-needed-first: walk
		// them backwards, each after its own needs.
		for i := len(d) - 1; i >= 0; i-- {
			if err := visit(d[i], append(chain, mod)); err != nil {
				return err
			}
		}
		seen[mod] = true
		files = append(files, mod)
		return nil
	}
	for _, n := range names {
		n = modName(n)
		mod, ok := byName[n]
		if !ok {
			if isBuiltin[n] {
				builtin = append(builtin, n)
				continue
			}
			return nil, nil, fmt.Errorf("guest: module %s is neither in %s/modules.dep nor built in", n, modDir)
		}
		if err := visit(mod, nil); err != nil {
			return nil, nil, err
		}
	}
	return files, builtin, nil
}

// writeInitramfs writes the gzip-compressed cpio archive: directories, the
// device nodes the kernel needs before devtmpfs is mounted, the module
// list and the files, sorted by path.
func writeInitramfs(w io.Writer, files map[string]string, moduleList []byte, mtime int64) error {
	// The default level: BestCompression saves 0.3% of an image with runc
	// in it and takes three times as long.
	zw, err := gzip.NewWriterLevel(w, gzip.DefaultCompression)
	if err != nil {
		return err
	}
	// Header fields that would vary: none (no name, zero time).
	cw := &cpioWriter{w: zw}
	type item struct {
		e    cpioEntry
		host string
	}
	items := map[string]item{}
	addDirs := func(p string) {
		for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
			items[d] = item{e: cpioEntry{name: d, mode: modeDir | 0o755, mtime: mtime}}
		}
	}
	for _, d := range []string{"dev", "proc", "sys", "run", "tmp", "etc", "root", "mnt"} {
		items[d] = item{e: cpioEntry{name: d, mode: modeDir | 0o755, mtime: mtime}}
	}
	items["tmp"] = item{e: cpioEntry{name: "tmp", mode: modeDir | 0o1777, mtime: mtime}}
	items["dev/console"] = item{e: cpioEntry{name: "dev/console", mode: modeChr | 0o600, mtime: mtime, rmaj: 5, rminor: 1}}
	items["dev/null"] = item{e: cpioEntry{name: "dev/null", mode: modeChr | 0o666, mtime: mtime, rmaj: 1, rminor: 3}}
	items[ModuleListPath] = item{e: cpioEntry{name: ModuleListPath, mode: modeFile | 0o644, mtime: mtime, data: moduleList}}
	addDirs(ModuleListPath)
	for g, h := range files {
		st, err := os.Stat(h)
		if err != nil {
			return fmt.Errorf("guest: %s: %w", g, err)
		}
		if !st.Mode().IsRegular() {
			return fmt.Errorf("guest: %s: %s is not a regular file", g, h)
		}
		perm := uint32(0o644)
		if st.Mode()&0o111 != 0 {
			perm = 0o755
		}
		items[g] = item{e: cpioEntry{name: g, mode: modeFile | perm, mtime: mtime}, host: h}
		addDirs(g)
	}
	names := make([]string, 0, len(items))
	for n := range items {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		it := items[n]
		if it.host != "" {
			b, err := os.ReadFile(it.host)
			if err != nil {
				return fmt.Errorf("guest: %s: %w", n, err)
			}
			it.e.data = b
		}
		if err := cw.entry(it.e); err != nil {
			return fmt.Errorf("guest: write initramfs: %w", err)
		}
	}
	if err := cw.close(); err != nil {
		return fmt.Errorf("guest: write initramfs: %w", err)
	}
	return zw.Close()
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	return writeAtomic(dst, b)
}

func writeAtomic(p string, b []byte) error {
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("guest: %w", err)
	}
	return nil
}
