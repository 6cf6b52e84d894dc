// Command mkguest builds a pod VM's boot files (vmlinuz + initramfs.img)
// from an installed distribution kernel, its modules and a static vmm-task:
//
//	mkguest -agent _output/guest/vmm-task -out _output/guest
//
// The guest runs containers with runc: -runc (default /usr/sbin/runc, the
// Debian package) puts it in the image with its ELF interpreter and the
// shared libraries it needs, found by reading the binaries' DT_NEEDED
// entries (guest.BinaryFiles); -runc "" leaves it out.
//
// The output is reproducible: the same inputs give the same bytes.
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/guest"
)

type fileFlags map[string]string

func (f fileFlags) String() string { return fmt.Sprint(map[string]string(f)) }
func (f fileFlags) Set(v string) error {
	g, h, ok := strings.Cut(v, "=")
	if !ok || g == "" || h == "" {
		return fmt.Errorf("want GUEST_PATH=HOST_PATH, got %q", v)
	}
	f[g] = h
	return nil
}

func main() {
	var (
		out     = flag.String("out", "_output/guest", "output directory")
		agent   = flag.String("agent", "", "the static vmm-task binary (required)")
		version = flag.String("kernel-version", "", "kernel version (default: the newest installed)")
		modRoot = flag.String("modules-root", "/lib/modules", "kernel modules directory")
		bootDir = flag.String("boot-dir", "/boot", "directory of vmlinuz-<version>")
		modules = flag.String("modules", strings.Join(guest.DefaultModules, ","), "modules to include, with their dependencies")
		runcBin = flag.String("runc", guest.DefaultRunc, "OCI runtime put in the image at its own path with its libraries (\"\" for none)")
		files   = fileFlags{}
	)
	flag.Var(files, "file", "extra file GUEST_PATH=HOST_PATH (repeatable)")
	flag.Parse()
	if *agent == "" {
		fmt.Fprintln(os.Stderr, "mkguest: -agent is required")
		os.Exit(2)
	}
	// SOURCE_DATE_EPOCH, where set, is the entries' time (the usual
	// convention for reproducible builds); otherwise the Unix epoch.
	mtime := time.Unix(0, 0)
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mkguest: SOURCE_DATE_EPOCH %q: %v\n", s, err)
			os.Exit(2)
		}
		mtime = time.Unix(n, 0)
	}
	var mods []string
	for _, m := range strings.Split(*modules, ",") {
		if m = strings.TrimSpace(m); m != "" {
			mods = append(mods, m)
		}
	}
	if mods == nil {
		mods = []string{}
	}
	if *runcBin != "" {
		bf, err := guest.BinaryFiles(*runcBin, nil)
		if err != nil {
			fmt.Fprintf(os.Stderr, "mkguest: -runc: %v (install Debian's runc, or -runc \"\" for an image without it)\n", err)
			os.Exit(1)
		}
		for g, h := range bf {
			if _, ok := files[g]; !ok {
				files[g] = h
			}
		}
	}
	t0 := time.Now()
	res, err := guest.Build(guest.Spec{
		ModulesRoot: *modRoot, BootDir: *bootDir, KernelVersion: *version,
		Modules: mods, Agent: *agent, Files: files, MTime: mtime,
	}, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkguest:", err)
		os.Exit(1)
	}
	builtin := ""
	if len(res.Builtin) > 0 {
		builtin = " (built in: " + strings.Join(res.Builtin, " ") + ")"
	}
	fmt.Printf("mkguest: kernel %s, %d modules%s, initramfs %d bytes, in %s\n  %s\n  %s\n",
		res.KernelVersion, len(res.Modules), builtin, res.InitrdSize,
		time.Since(t0).Round(time.Millisecond), res.Kernel, res.Initrd)
}
