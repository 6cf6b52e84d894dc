// Command quark-sandboxer will serve quark pods; it is not built yet.
package main

import (
	"fmt"
	"os"

	"github.com/kuasar-go/kuasar-go/shared/version"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Println(version.String("quark-sandboxer"))
		return
	}
	fmt.Fprintln(os.Stderr, "quark-sandboxer: not built yet (see the project's issues)")
	os.Exit(1)
}
