# kuasar-go: build, test and install the sandboxers.
SHELL := /bin/bash
OUT   ?= $(CURDIR)/_output
BIN   := $(OUT)/bin
GO    ?= go
VERSION  ?= $(shell git describe --tags --dirty 2>/dev/null || echo v0.1.0-dev)
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X github.com/kuasar-go/kuasar-go/shared/version.Version=$(VERSION) \
            -X github.com/kuasar-go/kuasar-go/shared/version.Revision=$(REVISION)
SANDBOXERS := runc wasm vmm quark
MODULES    := hack proto shared runc-sandboxer wasm-sandboxer vmm-sandboxer quark-sandboxer

SANDBOXER  ?= runc
PREFIX     ?= /usr/local
DESTDIR    ?=
# Packages of every module, for go test and go vet from the workspace root.
PKGS       := $(foreach m,$(MODULES),./$(m)/...)
GOTESTSUM  := $(shell command -v gotestsum 2>/dev/null || ls $(HOME)/go/bin/gotestsum 2>/dev/null)
# One PASS/FAIL/SKIP line per test in CI logs.
ifneq ($(GOTESTSUM),)
GOTEST := $(GOTESTSUM) --format testname --
else
GOTEST := $(GO) test -v
endif
TESTFLAGS ?= -race -count=1 -timeout 25m

.PHONY: all deps build tools test fuzz vet demo bench install uninstall clean

all: build

build:
	@mkdir -p $(BIN)
	@# Static Go binaries, but wasm-sandboxer links wasmtime's static library (cgo).
	@for s in $(SANDBOXERS); do \
		cgo=0; [ $$s = wasm ] && cgo=1; \
		CGO_ENABLED=$$cgo $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/$$s-sandboxer ./$$s-sandboxer/cmd/$$s-sandboxer || exit 1; \
	done
	@# PID 1 of every runc/wasm pod, found beside the sandboxer binary.
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/kuasar-holder ./shared/cmd/kuasar-holder
	@# What containerd looks for, by runtime name, to reload the sandboxers'
	@# tasks after its own restart (not a shim; see its doc comment).
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/containerd-shim-kuasar-v1 ./shared/cmd/containerd-shim-kuasar-v1
	@for s in $(SANDBOXERS); do ln -sf containerd-shim-kuasar-v1 $(BIN)/containerd-shim-kuasar-$$s-v1; done
	@# wasm-sandboxer's module processes, found beside it. runc execs them
	@# inside the container's root, where no host library is: static.
	@# wazero's: Go without cgo (so wazero only).
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w' -o $(BIN)/kuasar-wasm-runner ./wasm-sandboxer/cmd/kuasar-wasm-runner
	@# wasmtime's, without a Go runtime: C on wasmtime's C API, the headers
	@# and static library of the wasmtime-go module the daemon is built
	@# with (so the same wasmtime: the daemon's cached code loads), from the
	@# Go module cache. Static glibc: the linker's warnings about the NSS and
	@# dlopen paths of the library (getpwuid_r, getaddrinfo, dlopen), which
	@# a WASI preview 1 runner never takes, are silenced.
	@w=$$(cd wasm-sandboxer && $(GO) mod download github.com/bytecodealliance/wasmtime-go/v39 && \
		$(GO) list -m -f '{{.Dir}}' github.com/bytecodealliance/wasmtime-go/v39) && [ -n "$$w" ] || exit 1; \
	arch=$$(uname -m | sed 's/arm64/aarch64/'); \
	echo "$(CC) -O2 -s -static ... -o $(BIN)/kuasar-wasm-runner-wasmtime (wasmtime from $$w)"; \
	$(CC) -std=gnu11 -O2 -s -static -Wall -Wl,--gc-sections -Wl,--no-warnings -I$$w/build/include \
		-o $(BIN)/kuasar-wasm-runner-wasmtime $(addprefix wasm-sandboxer/cmd/kuasar-wasm-runner-wasmtime/,main.c config.c) \
		$$w/build/linux-$$arch/libwasmtime.a -lpthread -ldl -lm

# Debian packages and pinned Go tools (installs only what is missing).
deps:
	bash hack/deps.sh

# Pinned third-party binaries the tests and the demo need (containerd, ctr,
# containerd-shim-runc-v2, CNI plugins), built from the Go module proxy.
tools:
	bash hack/build-tools.sh $(OUT)

# The main job: containerd + runc-sandboxer in a temporary directory, one
# pod with a container through CRI, its output and IP, then teardown.
demo: deps build tools
	KUASAR_GO_OUTPUT=$(OUT) $(GO) run ./hack/demo

# Pod start latency and management memory, runc-sandboxer beside
# containerd's runc shim (docs/performance.md). Root; not part of `test`.
# make bench BENCH_FLAGS=--quick for a run under two minutes.
bench: deps build tools
	KUASAR_GO_OUTPUT=$(OUT) $(GO) run ./hack/bench --out $(or $(BENCH_OUT),results) $(BENCH_FLAGS)

vet:
	$(GO) vet $(PKGS)

# Everything: unit tests and, as root, the end-to-end tests through
# containerd and CRI (they skip with a message when not root).
test: deps build guest tools vet
	KUASAR_GO_OUTPUT=$(OUT) $(GOTEST) $(TESTFLAGS) $(PKGS) && $(MAKE) fuzz FUZZTIME=5s

# Every Go fuzz target (decoding and validation of what containerd and the
# host send: IDs, paths, bundles, OCI specs, options, state files, IO and
# transport framing), each for FUZZTIME; hack/fuzz.sh lists them per
# package. Their seed corpora (testdata/fuzz/) also run as normal tests in
# `go test`; a failing input found here is written there.
FUZZTIME ?= 10s
fuzz:
	FUZZTIME=$(FUZZTIME) GO=$(GO) bash hack/fuzz.sh

# No dependency on build, so `sudo make install` doesn't compile as root;
# install.sh fails clearly if _output/bin/<name>-sandboxer is missing.
install:
	bash hack/install.sh --prefix '$(PREFIX)' --destdir '$(DESTDIR)' --output '$(OUT)' $(SANDBOXER)

uninstall:
	bash hack/install.sh --uninstall --prefix '$(PREFIX)' --destdir '$(DESTDIR)' $(SANDBOXER)

clean:
	rm -rf $(OUT)

# vmm pods' guest: a static vmm-task and the kernel + initramfs pair built
# from the installed Debian kernel (reproducible) into $(OUT)/guest.
.PHONY: guest proto
guest:
	@mkdir -p $(OUT)/guest
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(OUT)/guest/vmm-task ./vmm-sandboxer/cmd/vmm-task
	$(GO) run ./vmm-sandboxer/cmd/mkguest -agent $(OUT)/guest/vmm-task -out $(OUT)/guest

# Regenerates proto/'s Go code: protoc (Debian protobuf-compiler) with the
# generators pinned as tools in proto/go.mod.
proto:
	cd proto && $(GO) generate ./...
