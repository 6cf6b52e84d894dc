// Command vmm-sandboxer will serve vmm pods; it is not built yet.
package main

import (
	"fmt"
	"os"

	"github.com/kuasar-go/kuasar-go/shared/version"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Println(version.String("vmm-sandboxer"))
		return
	}
	fmt.Fprintln(os.Stderr, "vmm-sandboxer: not built yet (see the project's issues)")
	os.Exit(1)
}
