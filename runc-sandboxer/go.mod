module github.com/kuasar-go/kuasar-go/runc-sandboxer

go 1.26.6

require (
	github.com/kuasar-go/kuasar-go/shared v0.0.0
	github.com/pelletier/go-toml/v2 v2.2.4
)

replace github.com/kuasar-go/kuasar-go/shared => ../shared
