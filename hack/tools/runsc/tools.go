//go:build tools

// Package tools pins gVisor's runsc, which hack/build-tools.sh builds
// statically (CGO_ENABLED=0) into _output/bin/runsc for quark-sandboxer's
// gVisor engine. It is a module of its own, outside go.work and apart from
// hack/tools (which pins containerd's exact dependency set): build it with
// GOWORK=off.
package tools

import (
	_ "gvisor.dev/gvisor/runsc"
)
