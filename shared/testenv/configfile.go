package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/pelletier/go-toml/v2"

	sharedDaemon "github.com/kuasar-go/kuasar-go/shared/daemon"
)

// CheckDocumentedConfig checks a sandboxer's default config file (under
// deploy/config): it sets nothing (every key is a "# key = value" comment),
// and with those lines uncommented it loads strictly into got as a valid
// config equal to want, the daemon's defaults.
func CheckDocumentedConfig(t *testing.T, path string, got, want sharedDaemon.Config) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var set map[string]any
	if err := toml.Unmarshal(raw, &set); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	for k, v := range set {
		if m, ok := v.(map[string]any); !ok || len(m) != 0 {
			t.Errorf("%s sets %s = %v; want only commented defaults", path, k, v)
		}
	}
	var lines []string
	for _, line := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(line, "# ") && strings.Contains(line, " = ") {
			line = strings.TrimPrefix(line, "# ")
		}
		lines = append(lines, line)
	}
	uncommented := filepath.Join(t.TempDir(), filepath.Base(path))
	if err := os.WriteFile(uncommented, []byte(strings.Join(lines, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	// The daemon's own loader: unknown keys are errors.
	if err := (sharedDaemon.Flags{Config: uncommented}).LoadConfig(got); err != nil {
		t.Fatalf("%s with its defaults uncommented: %v", path, err)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("%s: documented defaults do not validate: %v", path, err)
	}
	// An empty list documented as "[]" is the daemon's nil list.
	if diff := cmp.Diff(want, got, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("%s documents other values than the daemon's defaults (-daemon +file):\n%s", path, diff)
	}
}
