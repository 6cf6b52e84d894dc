// Package version holds the build version stamped by the Makefile.
package version

import (
	"fmt"
	"runtime"
)

// Version and Revision are set at link time with -X.
var (
	Version  = "v0.1.0-dev"
	Revision = "unknown"
)

// String is what every daemon prints for --version.
func String(name string) string {
	return fmt.Sprintf("%s %s (revision %s, %s)", name, Version, Revision, runtime.Version())
}
