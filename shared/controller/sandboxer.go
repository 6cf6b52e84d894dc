// Package controller serves containerd's sandbox controller API
// (containerd.services.sandbox.v1.Controller) over gRPC for one sandbox
// family. It owns validation, the sandbox store, lifecycle ordering and
// error mapping; the family plugs in through the Sandboxer interface.
package controller

import (
	"context"
	"time"

	"github.com/containerd/containerd/api/types"

	"github.com/kuasar-go/kuasar-go/shared/store"
)

// Exit is how a sandbox ended.
type Exit struct {
	Status   uint32
	ExitedAt time.Time
}

// Sandboxer is what a sandbox family implements. The controller calls it
// with the sandbox's lock held, so a family sees one operation per sandbox at
// a time, and with sb already validated. A family records what it needs to
// find the sandbox again after a restart in sb.Family; the controller
// persists sb after each call that returns nil.
type Sandboxer interface {
	// Create prepares what the sandbox needs before it runs. On error it
	// must leave nothing behind.
	Create(ctx context.Context, sb *store.Sandbox) error
	// Start runs the sandbox and fills sb.Pid, sb.Address and sb.Version.
	// The channel delivers one Exit when the sandbox's main process ends.
	// On error it must leave nothing running.
	Start(ctx context.Context, sb *store.Sandbox) (<-chan Exit, error)
	// Stop ends the sandbox's processes, politely first when timeout > 0.
	// The Exit still arrives through Start's channel.
	Stop(ctx context.Context, sb *store.Sandbox, timeout time.Duration) error
	// Shutdown releases everything the sandbox holds (cgroups, mounts,
	// directories). It is called on stopped or never-started sandboxes and
	// must be idempotent.
	Shutdown(ctx context.Context, sb *store.Sandbox) error
	// Metrics reports the sandbox's resource usage.
	Metrics(ctx context.Context, sb *store.Sandbox) (*types.Metric, error)
}

// Recoverer is implemented by families that can reattach to a sandbox that
// was running when the daemon stopped. Recover returns the exit channel of
// the running sandbox, or an Exit already delivered if it ended meanwhile.
type Recoverer interface {
	Recover(ctx context.Context, sb *store.Sandbox) (<-chan Exit, error)
}
