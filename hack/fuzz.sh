#!/usr/bin/env bash
# Runs every Go fuzz target of the workspace in turn, each for FUZZTIME
# (default 10s). Packages are those with a `func Fuzz` in a _test.go file;
# targets come from `go test -list`. Their seed corpora (testdata/fuzz/)
# also run as ordinary tests in `go test`.
#
#   hack/fuzz.sh [PKG...]     e.g. hack/fuzz.sh ./shared/validate
#   FUZZTIME=30s hack/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10s}
# Minimizing each new interesting input can stall a short run for a minute:
# bound it by executions (a crasher is still reduced).
FUZZMINIMIZETIME=${FUZZMINIMIZETIME:-200x}

if [ $# -gt 0 ]; then
	pkgs=("$@")
else
	mapfile -t pkgs < <(grep -rl --include='*_test.go' '^func Fuzz' \
		proto shared runc-sandboxer wasm-sandboxer vmm-sandboxer quark-sandboxer hack 2>/dev/null |
		xargs -r -n1 dirname | sort -u | sed 's|^|./|')
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# A package with C files of its own (cgo) is fuzzed with Go's
# AddressSanitizer interop (gcc's libasan): its C code's out-of-bounds
# accesses, uses after free and leaks fail the run.
asan() {
	[ -z "$($GO list -f '{{join .CFiles ""}}' "$1")" ] || echo -asan
}

fuzz() {
	$GO test $(asan "$1") -run '^$' -fuzz "^${2}\$" -fuzztime "$FUZZTIME" \
		-fuzzminimizetime "$FUZZMINIMIZETIME" "$1" >"$log" 2>&1
}

# deadline_flake tells Go's fuzz coordinator race at the end of -fuzztime
# (go.dev/issue/75804, fixed in Go 1.27) from a finding: the run fails with
# a bare "context deadline exceeded" and writes no failing input.
deadline_flake() {
	grep -q 'context deadline exceeded' "$log" &&
		! grep -qE 'Failing input written|panic:|_test\.go:[0-9]+:' "$log"
}

fail=0
for pkg in "${pkgs[@]}"; do
	mapfile -t targets < <($GO test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true)
	for t in "${targets[@]}"; do
		echo "=== FUZZ $pkg $t ($FUZZTIME)"
		ok=0
		if fuzz "$pkg" "$t"; then
			ok=1
		elif deadline_flake; then
			echo "fuzz: the run ended on Go's deadline race (go.dev/issue/75804), no input failed; once more"
			fuzz "$pkg" "$t" && ok=1
		fi
		if [ $ok = 1 ]; then
			grep -E '^fuzz: elapsed' "$log" | tail -n 1
		else
			# The failing input is written under the package's testdata/fuzz/.
			tail -n 60 "$log"
			# A fuzzing worker that AddressSanitizer stops dies without its
			# report: the target's corpus, run as a test, prints it.
			if [ -n "$(asan "$pkg")" ]; then
				$GO test -asan -run "^${t}\$" "$pkg" 2>&1 | tail -n 60 || true
			fi
			echo "--- FAIL FUZZ $pkg $t"
			fail=1
		fi
	done
done
exit $fail
