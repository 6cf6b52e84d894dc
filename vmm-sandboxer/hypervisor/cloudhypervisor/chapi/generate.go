// Package chapi is the client of Cloud Hypervisor's REST API, generated from
// the project's copy of its OpenAPI description (cloud-hypervisor v53.0) by
// the oapi-codegen pinned in hack/tools/openapi. Do not edit api.gen.go; run
// go generate here.
package chapi

// The generator is a module of its own (GOWORK=off, its go.mod by -modfile),
// so its dependencies stay out of vmm-sandboxer's graph.
//go:generate env GOWORK=off go run -modfile=../../../../hack/tools/openapi/go.mod github.com/oapi-codegen/oapi-codegen/v2/cmd/oapi-codegen -config oapi-codegen.yaml -o api.gen.go ../../../../../shared/specs/cloud-hypervisor-v53.0.openapi.yaml
