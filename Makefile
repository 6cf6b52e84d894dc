# kuasar-go: build, test and install the sandboxers.
SHELL := /bin/bash
OUT   ?= $(CURDIR)/_output
BIN   := $(OUT)/bin
GO    ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo v0.1.0-dev)
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X github.com/kuasar-go/kuasar-go/shared/version.Version=$(VERSION) \
            -X github.com/kuasar-go/kuasar-go/shared/version.Revision=$(REVISION)
SANDBOXERS := runc wasm vmm quark
MODULES    := proto shared runc-sandboxer wasm-sandboxer vmm-sandboxer quark-sandboxer

.PHONY: all build tools test unit e2e demo install uninstall clean

all: build

build:
	@mkdir -p $(BIN)
	@for s in $(SANDBOXERS); do \
		CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/$$s-sandboxer ./$$s-sandboxer/cmd/$$s-sandboxer || exit 1; \
	done

# Pinned third-party binaries the tests and the demo need (containerd, ctr,
# containerd-shim-runc-v2, CNI plugins), built from the Go module proxy.
tools:
	bash hack/build-tools.sh $(OUT)

clean:
	rm -rf $(OUT)
