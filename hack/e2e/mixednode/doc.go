// Package mixednode holds the node-level end-to-end tests of issue 8: one
// stock containerd with all four sandboxers registered (runc-, wasm-,
// quark- with gVisor, and vmm-sandboxer with QEMU, under TCG here), pods of
// every family side by side (TestE2EMixedNode), and a soak test that creates
// and removes pods of every family in a loop and checks after each round
// that nothing is left behind (TestSoak).
//
// Both need root, `make build`, `make tools` and `make guest`; they skip with
// the missing file's name otherwise. Run them alone with
//
//	KUASAR_GO_OUTPUT=$PWD/_output go test -race -count=1 -v \
//	    -run 'TestE2EMixedNode|TestSoak' ./hack/e2e/mixednode
//
// The soak test's length is the flag -soak.rounds (default 3, the CI
// length, well under two minutes) or, where the flag cannot be passed (make
// test runs every package), the environment variable KUASAR_SOAK_ROUNDS;
// -soak.duration (KUASAR_SOAK_DURATION) instead keeps going for a time. A
// long run:
//
//	go test -count=1 -v -timeout 0 -run TestSoak ./hack/e2e/mixednode \
//	    -args -soak.rounds=200
//	KUASAR_SOAK_DURATION=2h go test -count=1 -timeout 0 -run TestSoak ./hack/e2e/mixednode
package mixednode
