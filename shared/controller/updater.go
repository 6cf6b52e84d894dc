package controller

import (
	"context"

	"github.com/containerd/containerd/api/types"

	"github.com/kuasar-go/kuasar-go/shared/store"
)

// Updater is implemented by families that act on a sandbox update, such as
// quark-sandboxer, whose Quark pods learn their containers from the "tasks"
// extension (Kuasar's contract). Update is called with the sandbox's lock
// held, before the new spec is stored; an error leaves the stored spec as
// it was. Changes to sb.Family are persisted with the spec.
type Updater interface {
	Update(ctx context.Context, sb *store.Sandbox, update *types.Sandbox, fields []string) error
}
