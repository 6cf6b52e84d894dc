// Package pid1 is the holder's own side: what runs as PID 1 of a pod's
// namespaces. It imports nothing beyond the standard library and x/sys so
// that the kuasar-holder binary stays small: every pod runs one.
package pid1

import (
	"fmt"
	"os"
	"os/signal"
	"runtime"

	"golang.org/x/sys/unix"
)

// Environment the starter passes; fd 3 is the readiness pipe.
const (
	EnvHostname = "KUASAR_GO_HOLDER_HOSTNAME"
	ReadyFD     = 3
)

// Main sets the pod's hostname, reports readiness on fd 3, then reaps
// every orphan re-parented to it until SIGTERM or SIGINT.
func Main() {
	runtime.GOMAXPROCS(1)
	if h := os.Getenv(EnvHostname); h != "" {
		if err := unix.Sethostname([]byte(h)); err != nil {
			fmt.Fprintf(os.Stderr, "holder: set hostname: %v\n", err)
			os.Exit(1)
		}
	}
	sigs := make(chan os.Signal, 32)
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT)
	signal.Ignore(unix.SIGHUP, unix.SIGPIPE)
	ready := os.NewFile(ReadyFD, "ready")
	ready.Write([]byte{1})
	ready.Close()
	for sig := range sigs {
		if sig != unix.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
