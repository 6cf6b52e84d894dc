package agent

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containerd/ttrpc"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/reap"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// Where the guest keeps containers: bundles, runc's state, runc itself
// (mkguest puts Debian's runc at its own path).
const (
	ContainersRoot = "/run/kuasar/containers"
	RuncRoot       = "/run/runc"
	RuncPath       = "/usr/sbin/runc"
)

// consoleLogger logs in plain text to the console (PID 1's stderr), which
// the host keeps as the VM's console log.
func consoleLogger(debug bool) *zap.Logger {
	lvl := zapcore.InfoLevel
	if debug {
		lvl = zapcore.DebugLevel
	}
	enc := zap.NewDevelopmentEncoderConfig()
	enc.EncodeTime = func(time.Time, zapcore.PrimitiveArrayEncoder) {} // the kernel log has times
	enc.TimeKey = ""
	core := zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(os.Stderr), lvl)
	return zap.New(core).Named("vmm-task")
}

// A MainOption changes what Main serves.
type MainOption func(*mainConfig)

type mainConfig struct {
	wrap func(*Service) vmmtask.AgentService
	link []transport.GuestOption
}

// WrapService has Main serve what wrap makes of the agent's service: the
// tests' hostile guest (vmm-sandboxer/e2e/hostileguest) misbehaves that
// way while the rest of the guest is the real one.
func WrapService(wrap func(*Service) vmmtask.AgentService) MainOption {
	return func(c *mainConfig) { c.wrap = wrap }
}

// WithLink passes options to the guest's transport (transport.OpenGuest):
// the hostile guest wraps the serial link with them.
func WithLink(opts ...transport.GuestOption) MainOption {
	return func(c *mainConfig) { c.link = append(c.link, opts...) }
}

// Main is PID 1 of the guest. It returns only on a fatal error, after
// which the caller powers off.
func Main(mopts ...MainOption) error {
	var mc mainConfig
	for _, o := range mopts {
		o(&mc)
	}
	// Until /proc is mounted there is no command line to read.
	warnings, err := MountBase()
	if err != nil {
		return err
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	opts := ParseCmdline(string(cmdline))
	log := consoleLogger(opts.Debug)
	defer log.Sync()
	log.Debug("mounted base file systems", zap.Duration("boot", BootClock()))

	n, w, err := LoadModules(ModuleList)
	warnings = append(warnings, w...)
	if err != nil {
		warnings = append(warnings, "module list: "+err.Error())
	}
	log.Debug("loaded modules", zap.Int("count", n), zap.Duration("boot", BootClock()))
	if err := LoopbackUp(); err != nil {
		warnings = append(warnings, err.Error())
	}
	if err := reap.Start(log); err != nil {
		warnings = append(warnings, err.Error())
	}
	for _, w := range warnings {
		log.Warn(w)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	gl, err := transport.OpenGuest(ctx, opts.PortName, func(f string, a ...any) { log.Warn(fmt.Sprintf(f, a...)) }, mc.link...)
	cancel()
	if err != nil {
		return err
	}
	l, err := gl.Listen(transport.AgentPort)
	if err != nil {
		return fmt.Errorf("listen on the agent port: %w", err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	svc := &Service{Log: log}
	svc.Containers, svc.ContainersErr = NewContainers(ContainersRoot, RuncPath, RuncRoot, log)
	if svc.ContainersErr != nil {
		warnings = append(warnings, "containers: "+svc.ContainersErr.Error())
		log.Warn("containers unavailable", zap.Error(svc.ContainersErr))
	} else {
		iol, err := gl.Listen(transport.IOPort)
		if err != nil {
			return fmt.Errorf("listen on the IO port: %w", err)
		}
		go func() {
			if err := svc.Containers.ServeIO(iol); err != nil {
				log.Warn("io port", zap.Error(err))
			}
		}()
	}
	svc.ServingSince = BootClock()
	svc.AddWarnings(warnings...)
	var served vmmtask.AgentService = svc
	if mc.wrap != nil {
		served = mc.wrap(svc)
	}
	vmmtask.RegisterAgentService(srv, served)
	log.Info("serving", zap.String("transport", gl.Kind), zap.String("device", gl.Device),
		zap.Duration("boot", svc.ServingSince))
	return srv.Serve(context.Background(), l)
}
