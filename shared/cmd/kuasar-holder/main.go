// Command kuasar-holder is PID 1 of a host pod's namespaces (see package
// holder). runc- and wasm-sandboxer start it from beside their own binary;
// it is a separate, small binary because every pod runs one.
package main

import "github.com/kuasar-go/kuasar-go/shared/holder/pid1"

func main() { pid1.Main() }
