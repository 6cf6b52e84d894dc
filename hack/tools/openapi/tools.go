//go:build tools

// Package tools pins the OpenAPI code generator that makes vmm-sandboxer's
// Cloud Hypervisor client. It is a module of its own, built with GOWORK=off,
// so the generator's dependencies stay out of the workspace's graph.
package tools

import _ "github.com/oapi-codegen/oapi-codegen/v2/cmd/oapi-codegen"
