module github.com/kuasar-go/kuasar-go/shared

go 1.25.0
