// Command containerd-shim-kuasar-v1 is not a shim: kuasar-go's sandboxers
// serve their pods' tasks themselves, and containerd connects to them
// directly. But when containerd restarts, it reloads each task only if it
// finds a binary under the task's runtime name (containerd-shim-kuasar-
// <family>-v1, links to this one), and it runs that binary with "delete"
// when a task's connection is gone for good. This answers delete (the
// task's exit is unknown: 255) and refuses anything else.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func main() {
	name := filepath.Base(os.Args[0])
	action := ""
	if len(os.Args) > 1 {
		action = os.Args[len(os.Args)-1]
	}
	if action != "delete" {
		fmt.Fprintf(os.Stderr, "%s: %q: kuasar-go sandboxers serve their tasks themselves; this binary only lets containerd reload them after a restart (it answers delete)\n", name, action)
		os.Exit(1)
	}
	b, err := proto.Marshal(&taskAPI.DeleteResponse{ExitStatus: 255, ExitedAt: timestamppb.Now()})
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
	if _, err := os.Stdout.Write(b); err != nil {
		os.Exit(1)
	}
}
