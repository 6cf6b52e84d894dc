//go:build tools

// Package tools pins the third-party binaries that hack/build-tools.sh builds
// (containerd, ctr, the runc shim and the CNI plugins). It is a separate
// module, outside go.work: build it with GOWORK=off.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
	_ "github.com/containernetworking/plugins/plugins/ipam/host-local"
	_ "github.com/containernetworking/plugins/plugins/main/bridge"
	_ "github.com/containernetworking/plugins/plugins/main/loopback"
)
