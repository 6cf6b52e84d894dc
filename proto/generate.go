// Package proto holds the guest agent API (vmm-task, vmmtask/v1) and its
// generated Go code. Regenerate with `make proto` (go generate): protoc from
// Debian's protobuf-compiler, the generators pinned as tools in go.mod.
package proto

//go:generate go build -o ../_output/protoc-gen/ google.golang.org/protobuf/cmd/protoc-gen-go github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc
//go:generate protoc --plugin=protoc-gen-go=../_output/protoc-gen/protoc-gen-go --plugin=protoc-gen-go-ttrpc=../_output/protoc-gen/protoc-gen-go-ttrpc --go_out=. --go_opt=paths=source_relative --go-ttrpc_out=. --go-ttrpc_opt=paths=source_relative vmmtask/v1/agent.proto
