module github.com/kuasar-go/kuasar-go/runc-sandboxer

go 1.25.0
