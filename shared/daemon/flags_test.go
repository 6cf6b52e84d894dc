package daemon

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type testConfig struct {
	CommonConfig
	Section struct {
		Value int `toml:"value"`
	} `toml:"section"`
}

func (c *testConfig) Validate() error { return nil }

func TestParseFlagsDefaults(t *testing.T) {
	f, err := ParseFlags("x-sandboxer", nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if f.Listen != "/run/kuasar-go/x-sandboxer.sock" || f.Dir != "/run/kuasar-go/x-sandboxer" ||
		f.Config != "/etc/kuasar-go/x-sandboxer.toml" || f.ContainerdAddress != DefaultContainerdAddress {
		t.Errorf("defaults: %+v", f)
	}
	if _, err := ParseFlags("x", []string{"stray"}, io.Discard); err == nil {
		t.Error("a stray argument was accepted")
	}
	if _, err := ParseFlags("x", []string{"--no-such-flag"}, io.Discard); err == nil {
		t.Error("an unknown flag was accepted")
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, body string
		explicit   bool
		wantErr    string
		wantLevel  string
		wantValue  int
	}{
		{name: "good", body: "log_level = \"debug\"\n[section]\nvalue = 3\n", explicit: true, wantLevel: "debug", wantValue: 3},
		{name: "unknown key", body: "[section]\nvalu = 3\n", explicit: true, wantErr: "valu"},
		{name: "wrong type", body: "log_level = 3\n", explicit: true, wantErr: "log_level"},
		{name: "missing explicit", explicit: true, wantErr: "no such file"},
		{name: "missing default", explicit: false, wantLevel: "info"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "absent.toml")
			if tc.body != "" {
				path = write(strings.ReplaceAll(tc.name, " ", "-")+".toml", tc.body)
			}
			args := []string{}
			if tc.explicit {
				args = append(args, "--config", path)
			}
			f, err := ParseFlags("x", args, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			if !tc.explicit {
				f.Config = path
			}
			cfg := &testConfig{CommonConfig: CommonConfig{LogLevel: "info"}}
			err = f.LoadConfig(cfg)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("LoadConfig = %v, want an error mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.LogLevel != tc.wantLevel || cfg.Section.Value != tc.wantValue {
				t.Errorf("config %+v", cfg)
			}
		})
	}
}
