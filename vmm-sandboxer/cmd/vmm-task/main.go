// Command vmm-task is the agent of a vmm pod: PID 1 of the VM's guest,
// serving the vmmtask.v1 Agent API to vmm-sandboxer. Built static
// (CGO_ENABLED=0) and put in the guest's initramfs as /init by mkguest.
package main

import (
	"fmt"
	"os"
	"time"

	"github.com/kuasar-go/kuasar-go/shared/version"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agent"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Println(version.String("vmm-task"))
		return
	}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "vmm-task: runs only as PID 1 of a pod VM's guest (it mounts, loads modules and powers off)")
		os.Exit(2)
	}
	err := agent.Main()
	// PID 1 must not exit: the kernel would panic. Say why and power off.
	fmt.Fprintf(os.Stderr, "vmm-task: fatal: %v; powering off\n", err)
	time.Sleep(100 * time.Millisecond)
	if err := agent.PowerOff(); err != nil {
		fmt.Fprintf(os.Stderr, "vmm-task: power off: %v\n", err)
	}
	select {}
}
