package task

import (
	"context"
	"fmt"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/runc"
	"github.com/containerd/containerd/v2/pkg/stdio"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"go.uber.org/zap"
	"google.golang.org/protobuf/types/known/anypb"
)

// RuntimeConfig is the OCI runtime CLI a RuncRuntime drives when
// containerd's runtime options do not name one.
type RuntimeConfig struct {
	// Binary is the runtime CLI: "runc" (default), "crun", "runsc" or a path.
	Binary string
	// Root is the runtime's state directory (--root); required.
	Root string
	// SystemdCgroup makes the runtime use the systemd cgroup driver.
	SystemdCgroup bool
}

// RuncRuntime runs containers with an OCI runtime CLI through containerd's
// runc process library (FIFO and terminal IO, exec, pause, update).
type RuncRuntime struct {
	cfg      RuntimeConfig
	platform stdio.Platform
	log      *zap.Logger
}

// WithDefaults fills in the default CLI and checks that the root is set.
func (cfg RuntimeConfig) WithDefaults() (RuntimeConfig, error) {
	if cfg.Binary == "" {
		cfg.Binary = "runc"
	}
	if cfg.Root == "" {
		return cfg, fmt.Errorf("runtime root must be set: %w", errdefs.ErrInvalidArgument)
	}
	return cfg, nil
}

// NewRuncRuntime returns a runtime driving cfg's CLI.
func NewRuncRuntime(cfg RuntimeConfig, log *zap.Logger) (*RuncRuntime, error) {
	cfg, err := cfg.WithDefaults()
	if err != nil {
		return nil, err
	}
	platform, err := runc.NewPlatform()
	if err != nil {
		return nil, err
	}
	return &RuncRuntime{cfg: cfg, platform: platform, log: log}, nil
}

// Create implements Runtime.
func (rt *RuncRuntime) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (Container, error) {
	opts, err := rt.options(r.Options)
	if err != nil {
		return nil, err
	}
	r.Options = opts
	c, err := runc.NewContainer(ctx, rt.platform, r)
	if err != nil {
		return nil, err
	}
	return &runcContainer{Container: c, log: rt.log}, nil
}

// Close implements Runtime.
func (rt *RuncRuntime) Close() error { return rt.platform.Close() }

// options fills the runtime binary and root from the daemon config where
// containerd's runtime options leave them empty.
func (rt *RuncRuntime) options(in *anypb.Any) (*anypb.Any, error) {
	opts, err := rt.cfg.Resolve(in)
	if err != nil {
		return nil, err
	}
	return typeurl.MarshalAnyToProto(opts)
}

// Resolve decodes containerd's runc runtime options (nil or empty: none)
// and fills the binary and root from cfg where they leave them empty, so
// that every runc-family runtime resolves a request's options alike.
// Options of another type are InvalidArgument.
func (cfg RuntimeConfig) Resolve(in *anypb.Any) (*options.Options, error) {
	opts := &options.Options{}
	if in.GetValue() != nil {
		v, err := typeurl.UnmarshalAny(in)
		if err != nil {
			return nil, fmt.Errorf("runtime options: %v: %w", err, errdefs.ErrInvalidArgument)
		}
		o, ok := v.(*options.Options)
		if !ok {
			return nil, fmt.Errorf("runtime options of type %T: %w", v, errdefs.ErrInvalidArgument)
		}
		opts = o
	}
	if opts.BinaryName == "" {
		opts.BinaryName = cfg.Binary
	}
	if opts.Root == "" {
		opts.Root = cfg.Root
	}
	if cfg.SystemdCgroup {
		opts.SystemdCgroup = true
	}
	return opts, nil
}

// runcContainer adapts containerd's runc container to Container.
type runcContainer struct {
	*runc.Container
	log *zap.Logger
}

func (c *runcContainer) ID() string     { return c.Container.ID }
func (c *runcContainer) Bundle() string { return c.Container.Bundle }
func (c *runcContainer) Cgroup() any    { return c.Container.Cgroup() }

func (c *runcContainer) init() (*process.Init, error) {
	p, err := c.Process("")
	if err != nil {
		return nil, err
	}
	init, ok := p.(*process.Init)
	if !ok {
		return nil, fmt.Errorf("init process of type %T: %w", p, errdefs.ErrNotImplemented)
	}
	return init, nil
}

func (c *runcContainer) Pids(ctx context.Context) ([]int, error) {
	init, err := c.init()
	if err != nil {
		return nil, err
	}
	return init.Runtime().Ps(ctx, c.Container.ID)
}

// InitExited kills the container's other processes when it shares a PID
// namespace (with the pod): they would not die with the init.
func (c *runcContainer) InitExited(ctx context.Context) {
	if !runc.ShouldKillAllOnExit(ctx, c.Container.Bundle) {
		return
	}
	init, err := c.init()
	if err == nil {
		err = init.KillAll(ctx)
	}
	if err != nil {
		c.log.Warn("kill container processes after init exit", zap.String("container", c.Container.ID), zap.Error(err))
	}
}
