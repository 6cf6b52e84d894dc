#!/usr/bin/env bash
# Installs what building, the demo and the tests need on a Debian 12 host:
# Debian packages (only those missing) and pinned Go tools. Idempotent.
set -euo pipefail

# Debian packages the sandboxers and their tests need. Append here.
APT_PACKAGES="runc crun busybox-static iproute2 iptables kmod systemd util-linux e2fsprogs procps psmisc qemu-system-x86 linux-image-cloud-amd64 protobuf-compiler"

# Pinned Go tools installed into $HOME/go/bin.
GOTESTSUM_VERSION=v1.13.0

export PATH="/usr/local/go/bin:${HOME}/go/bin:${PATH}"
export DEBIAN_FRONTEND=noninteractive

if ! command -v go >/dev/null; then
	echo "deps: Go is not installed (expected at /usr/local/go)" >&2
	exit 1
fi

missing=()
for p in $APT_PACKAGES; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
	if [ "$(id -u)" -ne 0 ]; then
		echo "deps: missing Debian packages (${missing[*]}); run as root to install them" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "${WITH_GOTESTSUM:-1}" = 1 ] && ! gotestsum --version 2>/dev/null | grep -q "${GOTESTSUM_VERSION}\$"; then
	GOWORK=off GOFLAGS=-mod=mod go install "gotest.tools/gotestsum@${GOTESTSUM_VERSION}"
fi
