package guest

import (
	"debug/elf"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
)

// LibraryDirs are where the dynamic loader of a Debian amd64 system looks
// for a shared library by its soname when there is no ld.so.cache (the
// guest has none): the multiarch directories first.
var LibraryDirs = []string{
	"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
	"/lib64", "/usr/lib64", "/lib", "/usr/lib",
}

// BinaryFiles returns what a dynamically linked executable needs in the
// image to run there: itself at its own path, its ELF interpreter at the
// path the binary names (PT_INTERP), and every shared library it needs
// (DT_NEEDED, recursively) at dir/soname, dir being the first of libDirs
// that holds it on the host. Paths in the result are image paths (no
// leading slash) mapped to host files; symlinks on the host resolve to
// their content. A static binary yields only itself. The host's own files
// are read, nothing is run (unlike ldd), so the result is reproducible.
func BinaryFiles(bin string, libDirs []string) (map[string]string, error) {
	if libDirs == nil {
		libDirs = LibraryDirs
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		return nil, err
	}
	files := map[string]string{}
	files[imagePath(abs)] = abs
	seen := map[string]bool{}
	var visit func(file string, chain []string) error
	visit = func(file string, chain []string) error {
		f, err := elf.Open(file)
		if err != nil {
			return fmt.Errorf("guest: %s: %w", file, err)
		}
		defer f.Close()
		for _, p := range f.Progs {
			if p.Type != elf.PT_INTERP {
				continue
			}
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				return fmt.Errorf("guest: %s: interpreter: %w", file, err)
			}
			interp := string(b)
			for len(interp) > 0 && interp[len(interp)-1] == 0 {
				interp = interp[:len(interp)-1]
			}
			if _, err := os.Stat(interp); err != nil {
				return fmt.Errorf("guest: %s: its interpreter %s: %w", file, interp, err)
			}
			files[imagePath(interp)] = interp
		}
		needed, err := f.ImportedLibraries()
		if err != nil {
			return fmt.Errorf("guest: %s: DT_NEEDED: %w", file, err)
		}
		sort.Strings(needed)
		for _, so := range needed {
			if seen[so] {
				continue
			}
			seen[so] = true
			found := ""
			for _, d := range libDirs {
				p := filepath.Join(d, so)
				if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
					found = p
					break
				}
			}
			if found == "" {
				return fmt.Errorf("guest: %s needs %s (via %v), which is in none of %v", file, so, append(chain, file), libDirs)
			}
			files[imagePath(found)] = found
			if err := visit(found, append(chain, file)); err != nil {
				return err
			}
		}
		return nil
	}
	if err := visit(abs, nil); err != nil {
		return nil, err
	}
	return files, nil
}

func imagePath(p string) string { return path.Clean(p)[1:] }

// DefaultRunc is Debian's runc, which mkguest puts in the image: vmm-task
// runs containers with it, at this same path in the guest.
const DefaultRunc = "/usr/sbin/runc"
