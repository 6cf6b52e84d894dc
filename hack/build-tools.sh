#!/usr/bin/env bash
# Build the pinned third-party binaries the tests and the demo need, from the
# Go module proxy, using the separate modules in hack/tools (pins in its
# go.mod) and hack/tools/runsc (gVisor, kept apart from containerd's
# dependency set):
#
#   OUTDIR/bin/{containerd,ctr,containerd-shim-runc-v2}
#   OUTDIR/bin/runsc   (static: CGO_ENABLED=0, as runsc needs inside its chroot)
#   OUTDIR/cni/bin/{bridge,loopback,host-local}
#
# Usage: hack/build-tools.sh [OUTDIR]   (default: _output at the repo root)
#
# Skipped when OUTDIR/.tools.stamp matches the sha256 of both modules' go.mod
# and go.sum, this script and the Go version, and all binaries exist.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS="$ROOT/hack/tools"
OUTDIR=${1:-$ROOT/_output}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
BIN="$OUTDIR/bin"
CNI="$OUTDIR/cni/bin"
STAMP="$OUTDIR/.tools.stamp"

GO=${GO:-go}
export GOWORK=off CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"

# The OpenAPI generator's modules (hack/tools/openapi), for the test that
# regenerates the Cloud Hypervisor client: cheap when already cached.
"$GO" -C "$TOOLS/openapi" mod download

want=("$BIN/containerd" "$BIN/ctr" "$BIN/containerd-shim-runc-v2" "$BIN/runsc"
      "$CNI/bridge" "$CNI/loopback" "$CNI/host-local")

stamp=$( { cat "$TOOLS/go.mod" "$TOOLS/go.sum" "$TOOLS/runsc/go.mod" "$TOOLS/runsc/go.sum" \
	"${BASH_SOURCE[0]}"; "$GO" env GOVERSION; } \
	| sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$stamp" ]]; then
	ok=1
	for f in "${want[@]}"; do [[ -x "$f" ]] || ok=0; done
	if ((ok)); then
		echo "tools: up to date in $OUTDIR (stamp $STAMP)"
		exit 0
	fi
fi

cd "$TOOLS"
modver() { "$GO" list -m -f '{{.Version}}' "$1"; }
CTD_VER=$(modver github.com/containerd/containerd/v2)
CNI_VER=$(modver github.com/containernetworking/plugins)

CTD=github.com/containerd/containerd/v2
CTD_LDFLAGS="-s -w -X $CTD/version.Version=$CTD_VER -X $CTD/version.Package=$CTD"
CNI_LDFLAGS="-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_VER"

# Build into a scratch directory and move into place, so an interrupted build
# never leaves a half-written binary behind.
TMP=$(mktemp -d "$OUTDIR/.tools-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin" "$TMP/cni" "$BIN" "$CNI"

# containerd's own Makefile uses the tag urfave_cli_no_docs for every binary
# and adds no_grpc for the shim. With CGO_ENABLED=0 the btrfs snapshotter
# (the only cgo piece: libbtrfs headers) is left out by its own build
# constraint; no_btrfs says so explicitly. devmapper and zfs are pure Go
# (they exec dmsetup / zfs) and stay in, as in the stock build.
"$GO" build -trimpath -tags "urfave_cli_no_docs no_btrfs" -ldflags "$CTD_LDFLAGS" \
	-o "$TMP/bin/" "$CTD/cmd/containerd" "$CTD/cmd/ctr"
"$GO" build -trimpath -tags "urfave_cli_no_docs no_btrfs no_grpc" -ldflags "$CTD_LDFLAGS" \
	-o "$TMP/bin/" "$CTD/cmd/containerd-shim-runc-v2"
"$GO" build -trimpath -ldflags "$CNI_LDFLAGS" -o "$TMP/cni/" \
	github.com/containernetworking/plugins/plugins/main/bridge \
	github.com/containernetworking/plugins/plugins/main/loopback \
	github.com/containernetworking/plugins/plugins/ipam/host-local

# gVisor's runsc from its own module (hack/tools/runsc). Static, as the
# design brief requires: a dynamically linked runsc fails inside its chroot.
RUNSC_VER=$(cd "$TOOLS/runsc" && modver gvisor.dev/gvisor)
(cd "$TOOLS/runsc" && "$GO" build -trimpath \
	-ldflags "-s -w -X gvisor.dev/gvisor/runsc/version.version=$RUNSC_VER" \
	-o "$TMP/bin/runsc" gvisor.dev/gvisor/runsc)

for b in containerd ctr containerd-shim-runc-v2; do
	mv -f "$TMP/bin/$b" "$BIN/$b"
	echo "built $BIN/$b (containerd $CTD_VER)"
done
mv -f "$TMP/bin/runsc" "$BIN/runsc"
echo "built $BIN/runsc (gVisor $RUNSC_VER)"
for b in bridge loopback host-local; do
	mv -f "$TMP/cni/$b" "$CNI/$b"
	echo "built $CNI/$b (CNI plugins $CNI_VER)"
done
echo "$stamp" >"$STAMP"
