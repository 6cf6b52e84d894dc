package gvisor

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"

	"golang.org/x/sys/unix"
)

// waiterMarker tells a re-executed daemon binary to act as a waiter.
const waiterMarker = "KUASAR_GO_RUNSC_WAIT"

// exitKilled is a container's status when its sandbox ended before it did
// (`runsc wait` cannot answer): killed, as the pod's processes were.
const exitKilled = 128 + int(unix.SIGKILL)

// IsWaiter reports whether this process was started as a waiter.
func IsWaiter() bool { return os.Getenv(waiterMarker) == "1" }

// WaiterMain is the whole life of a waiter: the host process that stands
// for a container's init, which runs inside the gVisor sandbox and so is
// no child of the daemon. It runs `runsc wait` and exits with the
// container's exit status, so that the daemon's task service sees the
// container's exit as it sees every other: a reaped child. (`runsc exec
// --detach` does the same for exec'd processes.) Arguments: the runsc
// command line.
func WaiterMain() {
	runtime.GOMAXPROCS(1)
	// Only the container's end may end the waiter.
	signal.Ignore(unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGPIPE)
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "kuasar-runsc-wait: usage: RUNSC ARGS... wait ID")
		os.Exit(exitKilled)
	}
	out, err := exec.Command(os.Args[1], os.Args[2:]...).Output()
	var res struct {
		ExitStatus *int `json:"exitStatus"`
	}
	if err == nil && json.Unmarshal(out, &res) == nil && res.ExitStatus != nil {
		os.Exit(*res.ExitStatus & 0xff)
	}
	fmt.Fprintf(os.Stderr, "kuasar-runsc-wait: runsc wait: %v %s\n", err, out)
	os.Exit(exitKilled)
}
