package sandbox

import (
	"strings"
	"testing"

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

func TestDeployedConfigDocumentsDefaults(t *testing.T) {
	testenv.CheckDocumentedConfig(t, "../../deploy/config/quark-sandboxer.toml", &Config{}, DefaultConfig())
}
