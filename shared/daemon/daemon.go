package daemon

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/ttrpc"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/kuasar-go/kuasar-go/shared/controller"
	"github.com/kuasar-go/kuasar-go/shared/events"
	"github.com/kuasar-go/kuasar-go/shared/keeper"
	"github.com/kuasar-go/kuasar-go/shared/sdnotify"
	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/unixsock"
	"github.com/kuasar-go/kuasar-go/shared/version"
)

// CommonConfig holds the config keys every sandboxer has. Family configs
// embed it.
type CommonConfig struct {
	// LogLevel is debug, info, warn or error; --log-level overrides it.
	LogLevel string `toml:"log_level"`
}

// Common returns the shared part of a family config.
func (c *CommonConfig) Common() *CommonConfig { return c }

// Config is a family's configuration.
type Config interface {
	Common() *CommonConfig
	// Validate reports impossible values, naming the key.
	Validate() error
}

// Base is what a sandboxer has once its flags and config are read: the
// logger, the state store and the event forwarder to containerd.
type Base struct {
	Name   string
	Flags  Flags
	Log    *zap.Logger
	Store  *store.Store
	Events *events.Forwarder
	// Keeper serves the task sockets containerd dials and forwards them to
	// the daemon, across daemon restarts.
	Keeper *keeper.Client
}

// ErrVersionPrinted is returned by Init after --version was handled.
var ErrVersionPrinted = errors.New("version printed")

// Init parses args, prints the version if asked, loads cfg (defaults on
// entry), sets up logging and the state directory, and finds or starts
// the daemon's keeper (package keeper). Families that run container
// processes on the host have the keeper start them (reap.Use).
func Init(name string, args []string, cfg Config, stdout, stderr io.Writer) (*Base, error) {
	// Every sandboxer binary doubles as its own keeper (package keeper).
	if keeper.IsKeeper() {
		keeper.Main()
	}
	flags, err := ParseFlags(name, args, stderr)
	if err != nil {
		return nil, err
	}
	if flags.Version {
		fmt.Fprintln(stdout, version.String(name))
		return nil, ErrVersionPrinted
	}
	if err := flags.LoadConfig(cfg); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("config %s: %w", flags.Config, err)
	}
	level := cfg.Common().LogLevel
	if flags.LogLevel != "" {
		level = flags.LogLevel
	}
	log, err := NewLogger(name, level)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(flags.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	st, err := store.Open(filepath.Join(flags.Dir, "sandboxes"))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kp, err := keeper.Ensure(ctx, flags.Dir, log)
	if err != nil {
		return nil, err
	}
	return &Base{
		Name:   name,
		Flags:  flags,
		Log:    log,
		Store:  st,
		Events: events.NewForwarder(flags.ContainerdAddress, log.Named("events")),
		Keeper: kp,
	}, nil
}

// shutdownGrace bounds how long SIGTERM waits for calls in flight.
// containerd keeps a Wait call open per sandbox and per task, which never
// end by themselves: containerd retries them against the next instance.
const shutdownGrace = 2 * time.Second

// TaskSocket is the path of the task socket containerd dials; the keeper
// serves it and forwards to TaskBackendSocket.
func (b *Base) TaskSocket() string { return filepath.Join(b.Flags.Dir, "task.sock") }

// TaskBackendSocket is where the daemon serves its ttrpc task API.
func (b *Base) TaskBackendSocket() string { return filepath.Join(b.Flags.Dir, "task-backend.sock") }

// TaskAddress is the task address containerd connects to.
func (b *Base) TaskAddress() string { return "ttrpc+unix://" + b.TaskSocket() }

// Serve serves the controller on --listen and, when registerTasks is not
// nil, the task API on TaskSocket, until SIGTERM or SIGINT. Pods keep
// running after it returns: a restarted daemon finds them again.
func (b *Base) Serve(ctrl *controller.Server, registerTasks func(*ttrpc.Server)) error {
	defer b.Events.Close()
	var (
		ttrpcSrv *ttrpc.Server
		taskL    net.Listener
		err      error
	)
	errc := make(chan error, 2)
	if registerTasks != nil {
		if ttrpcSrv, err = ttrpc.NewServer(RecoverTTRPC(b.Log)); err != nil {
			return err
		}
		registerTasks(ttrpcSrv)
		if taskL, err = unixsock.Listen(b.TaskBackendSocket()); err != nil {
			return fmt.Errorf("task socket: %w", err)
		}
		go func() { errc <- ttrpcSrv.Serve(context.Background(), taskL) }()
		if err := b.Keeper.Listen(context.Background(), b.TaskSocket(), b.TaskBackendSocket()); err != nil {
			ttrpcSrv.Close()
			return fmt.Errorf("task socket: %w", err)
		}
	}
	ctrlL, err := unixsock.Listen(b.Flags.Listen)
	if err != nil {
		if ttrpcSrv != nil {
			ttrpcSrv.Close()
		}
		return fmt.Errorf("controller socket: %w", err)
	}
	grpcSrv := grpc.NewServer(RecoverGRPC(b.Log))
	sandboxapi.RegisterControllerServer(grpcSrv, ctrl)
	go func() { errc <- grpcSrv.Serve(ctrlL) }()

	if _, err := sdnotify.Notify(sdnotify.Ready); err != nil {
		b.Log.Warn("systemd notify", zap.Error(err))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go sdnotify.RunWatchdog(ctx)
	b.Log.Info("serving", zap.String("version", version.Version), zap.String("controller", b.Flags.Listen),
		zap.String("tasks", b.TaskSocket()), zap.Strings("sandboxes", ctrl.IDs()))

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT)
	defer signal.Stop(sigs)
	var serveErr error
	select {
	case sig := <-sigs:
		b.Log.Info("shutting down", zap.String("signal", sig.String()))
	case serveErr = <-errc:
		b.Log.Error("server failed", zap.Error(serveErr))
	}
	sdnotify.Notify(sdnotify.Stopping)
	stopped := make(chan struct{})
	go func() {
		grpcSrv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(shutdownGrace):
		grpcSrv.Stop()
	}
	if ttrpcSrv != nil {
		sctx, scancel := context.WithTimeout(context.Background(), shutdownGrace)
		if err := ttrpcSrv.Shutdown(sctx); err != nil {
			ttrpcSrv.Close()
		}
		scancel()
		os.Remove(b.TaskBackendSocket())
	}
	os.Remove(b.Flags.Listen)
	return serveErr
}

// StopIdleKeeper ends the keeper when no pod is left: with pods, it keeps
// containerd's task connections, and the containers it started, for the
// next instance of the daemon. Call it last, once nothing uses the keeper.
func (b *Base) StopIdleKeeper(ctrl *controller.Server) {
	if ids := ctrl.IDs(); len(ids) > 0 {
		b.Log.Info("keeper stays for the pods", zap.Int("keeper", b.Keeper.Pid()), zap.Int("pods", len(ids)))
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := b.Keeper.Exit(ctx); err != nil {
		b.Log.Warn("stop keeper", zap.Error(err))
	}
}

// Exit ends a sandboxer's main with the outcome of running it: nothing for
// success, --version or --help, else the error on stderr and status 1.
func Exit(name string, err error) {
	if err == nil || errors.Is(err, ErrVersionPrinted) {
		return
	}
	if !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
	}
	os.Exit(1)
}
