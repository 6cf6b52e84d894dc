module github.com/kuasar-go/kuasar-go/vmm-sandboxer

go 1.26.6

require (
	github.com/kuasar-go/kuasar-go/shared v0.0.0
	go.uber.org/zap v1.28.0
	golang.org/x/sys v0.48.0
)

require go.uber.org/multierr v1.10.0 // indirect

replace github.com/kuasar-go/kuasar-go/shared => ../shared
