package sandbox

import (
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string // substring of the error; "" for valid
	}{
		{name: "defaults", mutate: func(*Config) {}},
		{name: "quark by default", mutate: func(c *Config) { c.Engine = EngineQuark }},
		{name: "ptrace", mutate: func(c *Config) { c.GVisor.Platform = PlatformPtrace }},
		{name: "kvm", mutate: func(c *Config) { c.GVisor.Platform = PlatformKVM }},
		{name: "unknown engine", mutate: func(c *Config) { c.Engine = "kata" }, want: `engine: unknown engine "kata"`},
		{name: "unknown platform", mutate: func(c *Config) { c.GVisor.Platform = "xen" }, want: `gvisor.platform: unknown gVisor platform "xen"`},
		{name: "empty runsc", mutate: func(c *Config) { c.GVisor.Binary = "" }, want: "gvisor.binary"},
		{name: "relative root", mutate: func(c *Config) { c.GVisor.Root = "runsc" }, want: "gvisor.root"},
		{name: "relative debug logs", mutate: func(c *Config) { c.GVisor.DebugLogDir = "logs" }, want: "gvisor.debug_log_dir"},
		{name: "extra runsc flag", mutate: func(c *Config) { c.GVisor.ExtraArgs = []string{"--overlay2=none"} }},
		{name: "extra args repeat the platform", mutate: func(c *Config) { c.GVisor.ExtraArgs = []string{"--platform=kvm"} }, want: "--platform is set by the daemon"},
		{name: "extra args not a flag", mutate: func(c *Config) { c.GVisor.ExtraArgs = []string{"kvm"} }, want: `"kvm" is not a flag`},
		{name: "empty quark", mutate: func(c *Config) { c.Quark.Binary = "" }, want: "quark.binary"},
		{name: "allowed engines", mutate: func(c *Config) { c.AllowedEngines = []string{EngineGVisor, EngineQuark} }},
		{name: "unknown allowed engine", mutate: func(c *Config) { c.AllowedEngines = []string{EngineGVisor, "kata"} }, want: `allowed_engines: unknown engine "kata"`},
		{name: "allowed engines without the default", mutate: func(c *Config) { c.AllowedEngines = []string{EngineQuark} }, want: `must include engine "gvisor"`},
		{name: "allowed platforms", mutate: func(c *Config) { c.GVisor.AllowedPlatforms = []string{PlatformSystrap, PlatformKVM} }},
		{name: "unknown allowed platform", mutate: func(c *Config) { c.GVisor.AllowedPlatforms = []string{PlatformSystrap, "xen"} }, want: `gvisor.allowed_platforms: unknown gVisor platform "xen"`},
		{name: "allowed platforms without the default", mutate: func(c *Config) { c.GVisor.AllowedPlatforms = []string{PlatformPtrace} }, want: `must include gvisor.platform "systrap"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.mutate(c)
			err := c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("Validate: %v, want an error naming %q", err, tc.want)
			}
		})
	}
}

// TestAllowedChoices: a pod's annotation picks only among what the config
// allows (by default the configured engine and platform alone); an
// unknown name is InvalidArgument, a known one not allowed
// PermissionDenied naming the config key.
func TestAllowedChoices(t *testing.T) {
	allowAll := func(c *Config) {
		c.AllowedEngines = []string{EngineGVisor, EngineQuark}
		c.GVisor.AllowedPlatforms = []string{PlatformSystrap, PlatformPtrace, PlatformKVM}
	}
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		check  func(*Config, string) error
		choice string
		want   error  // nil: allowed
		key    string // named in the error
	}{
		{name: "default engine", check: (*Config).AllowEngine, choice: EngineGVisor},
		{name: "other engine by default", check: (*Config).AllowEngine, choice: EngineQuark, want: errdefs.ErrPermissionDenied, key: "allowed_engines"},
		{name: "other engine allowed", mutate: allowAll, check: (*Config).AllowEngine, choice: EngineQuark},
		{name: "unknown engine", mutate: allowAll, check: (*Config).AllowEngine, choice: "kata", want: errdefs.ErrInvalidArgument, key: `"kata"`},
		{name: "default platform", check: (*Config).AllowPlatform, choice: PlatformSystrap},
		{name: "kvm by default", check: (*Config).AllowPlatform, choice: PlatformKVM, want: errdefs.ErrPermissionDenied, key: "gvisor.allowed_platforms"},
		{name: "ptrace by default", check: (*Config).AllowPlatform, choice: PlatformPtrace, want: errdefs.ErrPermissionDenied, key: "gvisor.allowed_platforms"},
		{name: "kvm allowed", mutate: allowAll, check: (*Config).AllowPlatform, choice: PlatformKVM},
		{name: "unknown platform", mutate: allowAll, check: (*Config).AllowPlatform, choice: "xen", want: errdefs.ErrInvalidArgument, key: `"xen"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			if tc.mutate != nil {
				tc.mutate(c)
			}
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			err := tc.check(c, tc.choice)
			switch {
			case tc.want == nil && err != nil:
				t.Fatalf("%s refused: %v", tc.choice, err)
			case tc.want != nil && (!errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.key)):
				t.Fatalf("%s: %v; want %v naming %s", tc.choice, err, tc.want, tc.key)
			}
		})
	}
}

func TestDeployedConfigDocumentsDefaults(t *testing.T) {
	testenv.CheckDocumentedConfig(t, "../../deploy/config/quark-sandboxer.toml", &Config{}, DefaultConfig())
}
