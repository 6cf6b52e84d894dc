module github.com/kuasar-go/kuasar-go/wasm-sandboxer

go 1.26.6

require (
	github.com/bytecodealliance/wasmtime-go/v39 v39.0.1
	github.com/kuasar-go/kuasar-go/shared v0.0.0
	github.com/tetratelabs/wazero v1.12.0
)

require (
	golang.org/x/net v0.58.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.41.0 // indirect
	google.golang.org/genproto/googleapis/rpc v0.0.0-20261019180522-ce908d29299b // indirect
	google.golang.org/grpc v1.83.2 // indirect
	google.golang.org/protobuf v1.36.12 // indirect
	k8s.io/cri-api v0.34.1 // indirect
)

replace github.com/kuasar-go/kuasar-go/shared => ../shared
