module github.com/kuasar-go/kuasar-go/proto

go 1.25.0
