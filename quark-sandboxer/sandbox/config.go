// Package sandbox is quark-sandboxer's pod lifecycle: one sandbox family
// whose pods run under an application kernel, with the engine (gVisor or
// Quark) chosen per pod behind one Engine interface.
package sandbox

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/daemon"
)

// Engine names.
const (
	EngineGVisor = "gvisor"
	EngineQuark  = "quark"
)

// gVisor platforms: how the Sentry intercepts the workload's system calls.
const (
	PlatformSystrap = "systrap"
	PlatformPtrace  = "ptrace"
	PlatformKVM     = "kvm"
)

// Config is quark-sandboxer's configuration file.
type Config struct {
	daemon.CommonConfig
	// Engine is the engine of pods that do not name one in the
	// AnnotationEngine annotation: "gvisor" (default) or "quark".
	Engine string `toml:"engine"`
	// AllowedEngines are the engines a pod may choose with the
	// AnnotationEngine annotation; empty allows Engine only. Pod specs are
	// not trusted: an annotation only picks among what the operator allows.
	AllowedEngines []string     `toml:"allowed_engines"`
	GVisor         GVisorConfig `toml:"gvisor"`
	Quark          QuarkConfig  `toml:"quark"`
}

// GVisorConfig configures runsc.
type GVisorConfig struct {
	// Binary is runsc's name on PATH or its path; default "runsc".
	Binary string `toml:"binary"`
	// Root is runsc's state directory (--root); default <dir>/runsc.
	Root string `toml:"root"`
	// Platform is systrap (default), ptrace or kvm; a pod may choose its own
	// with the AnnotationPlatform annotation.
	Platform string `toml:"platform"`
	// AllowedPlatforms are the platforms a pod may choose with the
	// AnnotationPlatform annotation; empty allows Platform only.
	AllowedPlatforms []string `toml:"allowed_platforms"`
	// DebugLogDir, when set, turns on runsc's debug logs, one directory per
	// pod below it (<debug_log_dir>/<pod id>/), kept after the pod.
	DebugLogDir string `toml:"debug_log_dir"`
	// ExtraArgs are more global runsc flags for every call (e.g.
	// "--overlay2=none"); they must not repeat the ones the sandboxer sets.
	ExtraArgs []string `toml:"extra_args"`
}

// QuarkConfig configures Quark.
type QuarkConfig struct {
	// Binary is quark's name on PATH or its path; default "quark".
	Binary string `toml:"binary"`
}

// reservedRunscFlags are the runsc flags the daemon sets itself.
var reservedRunscFlags = []string{"root", "log", "log-format", "platform", "network", "debug", "debug-log"}

// DefaultConfig is the configuration without a config file.
func DefaultConfig() *Config {
	return &Config{
		CommonConfig: daemon.CommonConfig{LogLevel: "info"},
		Engine:       EngineGVisor,
		GVisor:       GVisorConfig{Binary: "runsc", Platform: PlatformSystrap},
		Quark:        QuarkConfig{Binary: "quark"},
	}
}

// ValidateEngine reports whether name is a known engine.
func ValidateEngine(name string) error {
	switch name {
	case EngineGVisor, EngineQuark:
		return nil
	}
	return fmt.Errorf("unknown engine %q (want %q or %q)", name, EngineGVisor, EngineQuark)
}

// ValidatePlatform reports whether name is a gVisor platform.
func ValidatePlatform(name string) error {
	switch name {
	case PlatformSystrap, PlatformPtrace, PlatformKVM:
		return nil
	}
	return fmt.Errorf("unknown gVisor platform %q (want %s, %s or %s)", name, PlatformSystrap, PlatformPtrace, PlatformKVM)
}

// AllowEngine tells whether a pod may choose engine name:
// InvalidArgument for an unknown engine, PermissionDenied for one the
// operator did not allow.
func (c *Config) AllowEngine(name string) error {
	return allow("engine", "allowed_engines", name, orDefault(c.AllowedEngines, c.Engine), ValidateEngine)
}

// AllowPlatform tells whether a pod may choose gVisor platform name, as
// AllowEngine does for engines.
func (c *Config) AllowPlatform(name string) error {
	return allow("gVisor platform", "gvisor.allowed_platforms", name, orDefault(c.GVisor.AllowedPlatforms, c.GVisor.Platform), ValidatePlatform)
}

func orDefault(allowed []string, def string) []string {
	if len(allowed) == 0 {
		return []string{def}
	}
	return allowed
}

// allow checks a pod's choice against what the config's key allows.
func allow(what, key, name string, allowed []string, valid func(string) error) error {
	if err := valid(name); err != nil {
		return fmt.Errorf("%v: %w", err, errdefs.ErrInvalidArgument)
	}
	if !slices.Contains(allowed, name) {
		return fmt.Errorf("%s %q is not allowed on this node (%s: %q): %w", what, name, key, allowed, errdefs.ErrPermissionDenied)
	}
	return nil
}

// validateAllowed checks a list of allowed names, which must hold the
// default.
func validateAllowed(key string, allowed []string, defKey, def string, valid func(string) error) error {
	for _, name := range allowed {
		if err := valid(name); err != nil {
			return fmt.Errorf("%s: %w", key, err)
		}
	}
	if len(allowed) > 0 && !slices.Contains(allowed, def) {
		return fmt.Errorf("%s %q must include %s %q", key, allowed, defKey, def)
	}
	return nil
}

// Validate reports impossible values, naming the key.
func (c *Config) Validate() error {
	if err := ValidateEngine(c.Engine); err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	if err := validateAllowed("allowed_engines", c.AllowedEngines, "engine", c.Engine, ValidateEngine); err != nil {
		return err
	}
	if c.GVisor.Binary == "" {
		return fmt.Errorf("gvisor.binary must not be empty")
	}
	if c.GVisor.Root != "" && !filepath.IsAbs(c.GVisor.Root) {
		return fmt.Errorf("gvisor.root %q must be an absolute path", c.GVisor.Root)
	}
	if err := ValidatePlatform(c.GVisor.Platform); err != nil {
		return fmt.Errorf("gvisor.platform: %w", err)
	}
	if err := validateAllowed("gvisor.allowed_platforms", c.GVisor.AllowedPlatforms, "gvisor.platform", c.GVisor.Platform, ValidatePlatform); err != nil {
		return err
	}
	if c.GVisor.DebugLogDir != "" && !filepath.IsAbs(c.GVisor.DebugLogDir) {
		return fmt.Errorf("gvisor.debug_log_dir %q must be an absolute path", c.GVisor.DebugLogDir)
	}
	for _, a := range c.GVisor.ExtraArgs {
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") {
			return fmt.Errorf("gvisor.extra_args: %q is not a flag", a)
		}
		if slices.Contains(reservedRunscFlags, name) {
			return fmt.Errorf("gvisor.extra_args: --%s is set by the daemon (use gvisor.%s or leave it)", name, name)
		}
	}
	if c.Quark.Binary == "" {
		return fmt.Errorf("quark.binary must not be empty")
	}
	return nil
}
