package sandbox

import (
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
		ok   bool
	}{
		{"defaults", func(*Config) {}, true},
		{"crun", func(c *Config) { c.Runtime.Binary = "crun" }, true},
		{"empty binary", func(c *Config) { c.Runtime.Binary = "" }, false},
		{"relative root", func(c *Config) { c.Runtime.Root = "state/runc" }, false},
		{"absolute root", func(c *Config) { c.Runtime.Root = "/var/run/kg-runc" }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := DefaultConfig()
			tc.edit(c)
			if err := c.Validate(); (err == nil) != tc.ok {
				t.Errorf("Validate() = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestDeployedConfigDocumentsDefaults(t *testing.T) {
	testenv.CheckDocumentedConfig(t, "../../deploy/config/runc-sandboxer.toml", &Config{}, DefaultConfig())
}
