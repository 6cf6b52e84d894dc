// Package wasmtimerunner is config.c, the configuration reader of
// kuasar-wasm-runner-wasmtime, seen from Go for its tests: the runner
// itself (main.c, C on wasmtime's C API that make build links statically)
// is no part of it.
package wasmtimerunner

// #cgo CFLAGS: -std=gnu11 -Wall
// #include <stdlib.h>
// #include "config.h"
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/runner"
)

// parseConfig is what the runner reads in data. The C reader reads data
// where it is (no copy): a test can place it before an inaccessible page.
// Key is left empty: the runner does not keep it.
func parseConfig(data []byte) (runner.RunConfig, error) {
	var c C.struct_config
	var at C.size_t
	why := C.parse_config((*C.char)(unsafe.Pointer(unsafe.SliceData(data))), C.size_t(len(data)), &c, &at)
	if why != nil {
		return runner.RunConfig{}, fmt.Errorf("%s at byte %d", C.GoString(why), at)
	}
	defer C.free_config(&c)
	cfg := runner.RunConfig{
		Cached:      c.cached != 0,
		Args:        goStrings(c.args),
		Env:         goStrings(c.env),
		MemoryLimit: uint64(c.memory_limit),
	}
	if c.engine != nil {
		cfg.Engine = C.GoString(c.engine)
	}
	return cfg, nil
}

func goStrings(sv C.struct_strv) []string {
	if sv.n == 0 {
		return nil
	}
	var out []string
	for _, s := range unsafe.Slice(sv.v, sv.n) {
		out = append(out, C.GoString(s))
	}
	return out
}
