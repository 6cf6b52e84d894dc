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
	"github.com/kuasar-go/kuasar-go/shared/sdnotify"
	"github.com/kuasar-go/kuasar-go/shared/store"
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
}

// ErrVersionPrinted is returned by Init after --version was handled.
var ErrVersionPrinted = errors.New("version printed")

// Init parses args, prints the version if asked, loads cfg (defaults on
// entry), sets up logging and the state directory. Families that run
// container processes on the host also start reaping (package reap).
func Init(name string, args []string, cfg Config, stdout, stderr io.Writer) (*Base, error) {
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
	return &Base{
		Name:   name,
		Flags:  flags,
		Log:    log,
		Store:  st,
		Events: events.NewForwarder(flags.ContainerdAddress, log.Named("events")),
	}, nil
}

// shutdownGrace bounds how long SIGTERM waits for calls in flight.
// containerd keeps a Wait call open per sandbox and per task, which never
// end by themselves: containerd retries them against the next instance.
const shutdownGrace = 2 * time.Second

// TaskSocket is the path of the daemon's ttrpc task socket.
func (b *Base) TaskSocket() string { return filepath.Join(b.Flags.Dir, "task.sock") }

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
		if ttrpcSrv, err = ttrpc.NewServer(); err != nil {
			return err
		}
		registerTasks(ttrpcSrv)
		if taskL, err = ListenUnix(b.TaskSocket()); err != nil {
			return fmt.Errorf("task socket: %w", err)
		}
		go func() { errc <- ttrpcSrv.Serve(context.Background(), taskL) }()
	}
	ctrlL, err := ListenUnix(b.Flags.Listen)
	if err != nil {
		if ttrpcSrv != nil {
			ttrpcSrv.Close()
		}
		return fmt.Errorf("controller socket: %w", err)
	}
	grpcSrv := grpc.NewServer()
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
		os.Remove(b.TaskSocket())
	}
	os.Remove(b.Flags.Listen)
	return serveErr
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
