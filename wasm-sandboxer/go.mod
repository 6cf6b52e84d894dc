module github.com/kuasar-go/kuasar-go/wasm-sandboxer

go 1.25.0

require github.com/kuasar-go/kuasar-go/shared v0.0.0

replace github.com/kuasar-go/kuasar-go/shared => ../shared
