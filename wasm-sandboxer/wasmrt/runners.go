package wasmrt

import (
	"debug/elf"
	"fmt"
	"os"

	"github.com/kuasar-go/kuasar-go/shared/safemount"
)

// openRunner checks that the runner at path can run inside a container's
// root (a static program every user may execute) and returns a read-only
// clone of it: what each module process gets as runner.BinaryFD and runc
// execs, so that no process of a container can write the program every
// container runs, whatever its capabilities.
func openRunner(path string) (*os.File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("%w (make build puts it beside wasm-sandboxer)", err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 != 0o111 {
		return nil, fmt.Errorf("%s must be a regular file every user may execute (mode %v)", path, fi.Mode())
	}
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("%s is dynamically linked: a module process runs in the container's root, where no library of the host is; it must be static", path)
		}
	}
	return safemount.Clone(path, false, safemount.ReadOnly|safemount.NoSuid|safemount.NoDev)
}
