#!/usr/bin/env bash
# Install or uninstall kuasar-go sandboxers on this node.
#
#   hack/install.sh [options] SANDBOXER...     SANDBOXER: runc|wasm|vmm|quark|all
#
# For each sandboxer NAME it installs
#   _output/bin/NAME-sandboxer           -> DESTDIR PREFIX/bin/NAME-sandboxer          (0755)
#   _output/bin/kuasar-holder (runc, wasm, quark) -> DESTDIR PREFIX/bin/kuasar-holder (0755)
#   _output/bin/kuasar-wasm-runner (wasm)  -> DESTDIR PREFIX/bin/kuasar-wasm-runner    (0755)
#   _output/bin/kuasar-wasm-runner-wasmtime (wasm) -> DESTDIR PREFIX/bin/kuasar-wasm-runner-wasmtime (0755)
#   _output/bin/containerd-shim-kuasar-v1 -> DESTDIR PREFIX/bin/containerd-shim-kuasar-v1 (0755)
#     and the link PREFIX/bin/containerd-shim-kuasar-NAME-v1 to it, which containerd
#     looks up by runtime name to reload the sandboxer's tasks after its restart
#   deploy/systemd/NAME-sandboxer.service -> DESTDIR/etc/systemd/system/              (0644)
#   deploy/config/NAME-sandboxer.toml     -> DESTDIR/etc/kuasar-go/  never overwritten (0644)
#   deploy/containerd/NAME-sandboxer.toml -> DESTDIR/etc/containerd/conf.d/            (0644)
#   _output/guest/{vmlinuz,initramfs.img} (vmm: the pods' guest image, built by
#                                 `make guest`) -> DESTDIR/usr/share/kuasar-go/vmm/ (0644)
# and tells how to make containerd import the drop-in when its config does not.
# Running it twice changes nothing more; --uninstall removes what it installed
# (the guest image included) except the configuration file. "all" means every sandboxer that has a unit
# file under deploy/.
set -euo pipefail

usage() {
	cat <<EOF
usage: $0 [--prefix DIR] [--destdir DIR] [--output DIR] [--dry-run] [--uninstall] SANDBOXER...
  SANDBOXER     runc, wasm, vmm, quark or all
  --prefix DIR  installation prefix of the binary (default /usr/local; the unit's ExecStart follows it)
  --destdir DIR stage everything under DIR instead of / (packaging, tests)
  --output DIR  build output holding bin/NAME-sandboxer and, for vmm, guest/{vmlinuz,initramfs.img}
                (default <repo>/_output, as make build and make guest)
  --dry-run     print what would be done, change nothing
  --uninstall   remove the binary, the unit, the containerd drop-in and vmm's guest image
                (keeps the config)
EOF
}

die() {
	echo "install.sh: error: $*" >&2
	exit 1
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KNOWN=(runc wasm vmm quark)

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
OUTPUT=${OUT:-$REPO/_output}
DRY_RUN=0
UNINSTALL=0
NAMES=()

while [ $# -gt 0 ]; do
	case "$1" in
	--prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
	--prefix=*) PREFIX=${1#*=}; shift ;;
	--destdir) [ $# -ge 2 ] || die "--destdir needs a value"; DESTDIR=$2; shift 2 ;;
	--destdir=*) DESTDIR=${1#*=}; shift ;;
	--output) [ $# -ge 2 ] || die "--output needs a value"; OUTPUT=$2; shift 2 ;;
	--output=*) OUTPUT=${1#*=}; shift ;;
	--dry-run) DRY_RUN=1; shift ;;
	--uninstall) UNINSTALL=1; shift ;;
	-h | --help) usage; exit 0 ;;
	--) shift; NAMES+=("$@"); break ;;
	-*) usage >&2; die "unknown option $1" ;;
	*) NAMES+=("$1"); shift ;;
	esac
done

[ ${#NAMES[@]} -gt 0 ] || { usage >&2; die "no sandboxer named"; }
case "$PREFIX" in
/*) ;;
*) die "--prefix must be an absolute path, got '$PREFIX'" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || PREFIX=/
DESTDIR=${DESTDIR%/}

if [ "$PREFIX" = / ]; then BINDIR=/bin; else BINDIR=$PREFIX/bin; fi
UNITDIR=/etc/systemd/system
CONFDIR=/etc/kuasar-go
DROPINDIR=/etc/containerd/conf.d
CONTAINERD_CONFIG=/etc/containerd/config.toml

# Sources of one sandboxer.
src_bin() { echo "$OUTPUT/bin/$1-sandboxer"; }
src_unit() { echo "$REPO/deploy/systemd/$1-sandboxer.service"; }
src_config() { echo "$REPO/deploy/config/$1-sandboxer.toml"; }
src_dropin() { echo "$REPO/deploy/containerd/$1-sandboxer.toml"; }
# kuasar-holder lies beside the sandboxers that start it: PID 1 of each
# runc/wasm pod, and the pause process of gVisor pods.
HOLDER=kuasar-holder
HOLDER_USERS=(runc wasm quark)
uses_holder() {
	local u
	for u in "${HOLDER_USERS[@]}"; do [ "$u" = "$1" ] && return 0; done
	return 1
}
# wasm-sandboxer's module processes run kuasar-wasm-runner, found beside it;
# wasmtime's run kuasar-wasm-runner-wasmtime (C, no Go runtime) beside it.
WASM_RUNNER=kuasar-wasm-runner
WASM_RUNNERS=("$WASM_RUNNER" kuasar-wasm-runner-wasmtime)
# containerd reloads a task after its own restart only when it finds a
# binary by the task's runtime name: one stub, one link per sandboxer.
SHIM_STUB=containerd-shim-kuasar-v1
shim_link() { echo "containerd-shim-kuasar-$1-v1"; }
# vmm-sandboxer's pods boot this guest image, where its config's defaults
# ([guest] kernel, initrd) look for it: a fixed path, whatever the prefix.
src_guest() { echo "$OUTPUT/guest"; }
GUEST_DIR=/usr/share/kuasar-go/vmm
GUEST_FILES=(vmlinuz initramfs.img)

# Resolve the names: "all" expands to every sandboxer with a unit under deploy/
# (for --uninstall, to every known one); duplicates are dropped.
SELECTED=()
add_name() {
	local n
	for n in "${SELECTED[@]+"${SELECTED[@]}"}"; do
		[ "$n" = "$1" ] && return 0
	done
	SELECTED+=("$1")
}
for name in "${NAMES[@]}"; do
	name=${name%-sandboxer}
	if [ "$name" = all ]; then
		found=0
		for k in "${KNOWN[@]}"; do
			if [ "$UNINSTALL" = 1 ] || [ -f "$(src_unit "$k")" ]; then
				add_name "$k"
				found=1
			fi
		done
		[ "$found" = 1 ] || die "'all': no sandboxer has a unit under $REPO/deploy/systemd"
		continue
	fi
	known=0
	for k in "${KNOWN[@]}"; do
		[ "$k" = "$name" ] && known=1
	done
	[ "$known" = 1 ] || die "unknown sandboxer '$name' (want one of: ${KNOWN[*]} all)"
	add_name "$name"
done

# run CMD...: execute, or print under --dry-run.
run() {
	if [ "$DRY_RUN" = 1 ]; then
		echo "would run: $*"
	else
		"$@"
	fi
}

# put SRC DEST MODE [LABEL]: install SRC as DEST with MODE, atomically (a new
# file renamed over the old one, so a running binary is never written into).
# LABEL names SRC in messages.
put() {
	local src=$1 dest=$2 mode=$3 label=${4:-$1}
	if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
		echo "unchanged  $dest"
		return 0
	fi
	if [ "$DRY_RUN" = 1 ]; then
		echo "would install $label -> $dest (mode $mode)"
		return 0
	fi
	mkdir -p "$(dirname "$dest")"
	local tmp
	tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
	if ! install -m "$mode" "$src" "$tmp" || ! mv -f "$tmp" "$dest"; then
		rm -f "$tmp"
		die "cannot install $dest"
	fi
	echo "installed  $dest"
}

# remove DEST: delete a file if it is there.
remove() {
	local dest=$1
	if [ ! -e "$dest" ] && [ ! -L "$dest" ]; then
		echo "absent     $dest"
		return 0
	fi
	if [ "$DRY_RUN" = 1 ]; then
		echo "would remove $dest"
		return 0
	fi
	rm -f "$dest"
	echo "removed    $dest"
}

# link TARGET DEST: make DEST a symbolic link to TARGET (a name in the same
# directory).
link() {
	local target=$1 dest=$2
	if [ -L "$dest" ] && [ "$(readlink "$dest")" = "$target" ]; then
		echo "unchanged  $dest -> $target"
		return 0
	fi
	if [ "$DRY_RUN" = 1 ]; then
		echo "would link $dest -> $target"
		return 0
	fi
	mkdir -p "$(dirname "$dest")"
	ln -sfn "$target" "$dest" || die "cannot link $dest"
	echo "linked     $dest -> $target"
}

# remove_empty_dir DIR: delete a directory the installer made, if it is
# there and empty.
remove_empty_dir() {
	local dir=$1
	[ -d "$dir" ] && [ -z "$(ls -A "$dir")" ] || return 0
	if [ "$DRY_RUN" = 1 ]; then
		echo "would remove $dir/"
		return 0
	fi
	rmdir "$dir"
	echo "removed    $dir/"
}

# systemd is only driven for a real install on a host booted with it.
live_systemd() {
	[ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

TMPDIR_INSTALL=$(mktemp -d)
trap 'rm -rf "$TMPDIR_INSTALL"' EXIT

do_install() {
	local name missing=() missing_guest=() f
	# Check every source first so that nothing is half installed.
	for name in "${SELECTED[@]}"; do
		if [ "$name" = vmm ]; then
			for f in "${GUEST_FILES[@]}"; do
				[ -f "$(src_guest)/$f" ] || missing_guest+=("$(src_guest)/$f")
			done
		fi
		for f in "$(src_bin "$name")" "$(src_unit "$name")" "$(src_config "$name")" "$(src_dropin "$name")"; do
			[ -f "$f" ] || missing+=("$f")
		done
		if uses_holder "$name" && [ ! -f "$OUTPUT/bin/$HOLDER" ]; then
			missing+=("$OUTPUT/bin/$HOLDER")
		fi

		if [ "$name" = wasm ]; then
			for f in "${WASM_RUNNERS[@]}"; do
				[ -f "$OUTPUT/bin/$f" ] || missing+=("$OUTPUT/bin/$f")
			done
		fi
	done
	[ -f "$OUTPUT/bin/$SHIM_STUB" ] || missing+=("$OUTPUT/bin/$SHIM_STUB")
	for f in "${missing[@]+"${missing[@]}"}" "${missing_guest[@]+"${missing_guest[@]}"}"; do
		echo "install.sh: missing $f" >&2
	done
	if [ ${#missing_guest[@]} -gt 0 ]; then
		local also=""
		[ ${#missing[@]} -eq 0 ] || also=", and 'make build' for binaries under $OUTPUT/bin"
		die "vmm's guest image is missing: run 'make guest' to build it into $(src_guest)$also"
	fi
	if [ ${#missing[@]} -gt 0 ]; then
		die "missing files (run 'make build' for binaries under $OUTPUT/bin)"
	fi

	for name in "${SELECTED[@]}"; do
		local unit="$TMPDIR_INSTALL/$name-sandboxer.service"
		# The unit names /usr/local/bin; follow --prefix.
		sed "s|/usr/local/bin/|$BINDIR/|g" "$(src_unit "$name")" >"$unit"

		put "$(src_bin "$name")" "$DESTDIR$BINDIR/$name-sandboxer" 755
		put "$OUTPUT/bin/$SHIM_STUB" "$DESTDIR$BINDIR/$SHIM_STUB" 755
		link "$SHIM_STUB" "$DESTDIR$BINDIR/$(shim_link "$name")"
		if uses_holder "$name"; then
			put "$OUTPUT/bin/$HOLDER" "$DESTDIR$BINDIR/$HOLDER" 755
		fi
		if [ "$name" = wasm ]; then
			for f in "${WASM_RUNNERS[@]}"; do
				put "$OUTPUT/bin/$f" "$DESTDIR$BINDIR/$f" 755
			done
		fi
		if [ "$name" = vmm ]; then
			for f in "${GUEST_FILES[@]}"; do
				put "$(src_guest)/$f" "$DESTDIR$GUEST_DIR/$f" 644
			done
		fi
		put "$unit" "$DESTDIR$UNITDIR/$name-sandboxer.service" 644 \
			"$(src_unit "$name") (ExecStart in $BINDIR)"
		local conf="$DESTDIR$CONFDIR/$name-sandboxer.toml"
		if [ -e "$conf" ]; then
			echo "kept       $conf (existing configuration is never overwritten)"
		else
			put "$(src_config "$name")" "$conf" 644
		fi
		put "$(src_dropin "$name")" "$DESTDIR$DROPINDIR/$name-sandboxer.toml" 644
	done

	if live_systemd; then
		run systemctl daemon-reload
	fi

	# containerd reads the drop-ins only through an imports line.
	local cc="$DESTDIR$CONTAINERD_CONFIG"
	if [ -f "$cc" ] && grep -Eq '^[[:space:]]*imports[[:space:]]*=.*(/etc/containerd/)?conf\.d/\*\.toml' "$cc"; then
		echo "ok         $cc imports $DROPINDIR/*.toml"
	else
		echo
		if [ -f "$cc" ]; then
			echo "NOTE: $cc does not import $DROPINDIR/*.toml. Add this line at its top,"
			echo "      before the first [table] (append to an existing imports list if there is one):"
		else
			echo "NOTE: $cc does not exist. Create it with at least:"
			echo "        version = 3"
		fi
		echo "        imports = [\"$DROPINDIR/*.toml\"]"
	fi
	echo
	echo "Next steps:"
	echo "  systemctl restart containerd     # containerd reads config and drop-ins at start"
	for name in "${SELECTED[@]}"; do
		echo "  systemctl enable --now $name-sandboxer"
	done
	# vmm pods need QEMU and virtiofsd on the node (the config's defaults).
	if [ -z "$DESTDIR" ] && [[ " ${SELECTED[*]} " == *" vmm "* ]]; then
		if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || [ ! -x /usr/lib/qemu/virtiofsd ]; then
			echo "  apt-get install qemu-system-x86 virtiofsd   # vmm pods need qemu-system-x86_64 and /usr/lib/qemu/virtiofsd"
		fi
	fi
}

do_uninstall() {
	local name
	for name in "${SELECTED[@]}"; do
		if live_systemd && systemctl cat "$name-sandboxer.service" >/dev/null 2>&1; then
			# KillMode=process: stopping the daemon leaves running pods alone.
			run systemctl disable --now "$name-sandboxer.service"
		fi
		remove "$DESTDIR$UNITDIR/$name-sandboxer.service"
		remove "$DESTDIR$DROPINDIR/$name-sandboxer.toml"
		remove "$DESTDIR$BINDIR/$name-sandboxer"
		remove "$DESTDIR$BINDIR/$(shim_link "$name")"
		if [ "$name" = wasm ]; then
			for f in "${WASM_RUNNERS[@]}"; do
				remove "$DESTDIR$BINDIR/$f"
			done
		fi
		if [ "$name" = vmm ]; then
			for f in "${GUEST_FILES[@]}"; do
				remove "$DESTDIR$GUEST_DIR/$f"
			done
			# The directories go too when nothing else is in them.
			remove_empty_dir "$DESTDIR$GUEST_DIR"
			remove_empty_dir "$DESTDIR$(dirname "$GUEST_DIR")"
		fi
		if [ -e "$DESTDIR$CONFDIR/$name-sandboxer.toml" ]; then
			echo "kept       $DESTDIR$CONFDIR/$name-sandboxer.toml (delete it by hand if no longer wanted)"
		fi
	done
	# The holder goes with the last sandboxer that uses it.
	local u still=0
	for u in "${HOLDER_USERS[@]}"; do
		[ -e "$DESTDIR$BINDIR/$u-sandboxer" ] && still=1
	done
	if [ "$still" = 0 ]; then
		remove "$DESTDIR$BINDIR/$HOLDER"
	fi
	# So does the stub, with the last sandboxer.
	still=0
	for u in "${KNOWN[@]}"; do
		[ -e "$DESTDIR$BINDIR/$u-sandboxer" ] && still=1
	done
	if [ "$still" = 0 ]; then
		remove "$DESTDIR$BINDIR/$SHIM_STUB"
	fi
	if live_systemd; then
		run systemctl daemon-reload
	fi
	echo
	echo "Restart containerd to drop the removed runtime handlers: systemctl restart containerd"
}

if [ "$UNINSTALL" = 1 ]; then
	do_uninstall
else
	do_install
fi
