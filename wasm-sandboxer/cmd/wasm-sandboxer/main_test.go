package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// TestDaemonCommandLine runs the built binary: its version, configs it
// refuses with a message naming the key, and a child mode it does not know.
func TestDaemonCommandLine(t *testing.T) {
	bin := testenv.Binary("wasm-sandboxer")
	testenv.RequireFiles(t, bin)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	common := []string{"--listen", filepath.Join(dir, "s.sock"), "--dir", filepath.Join(dir, "state")}
	tests := []struct {
		name     string
		args     []string
		env      []string
		wantCode int
		wantOut  string
	}{
		{name: "version", args: []string{"--version"}, wantOut: "wasm-sandboxer"},
		{name: "unknown engine", args: append(common, "--config", write("bad.toml", "[wasm]\nengine = \"v8\"\n")),
			wantCode: 1, wantOut: `wasm.engine: unknown wasm engine "v8" (this build has: wasmtime, wazero)`},
		{name: "unknown key", args: append(common, "--config", write("typo.toml", "[wasm]\nengin = \"wazero\"\n")),
			wantCode: 1, wantOut: "unknown key"},
		{name: "unknown child mode", env: []string{"KUASAR_GO_WASM_CHILD=nosuch"}, wantCode: 1, wantOut: `unknown child mode "nosuch"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(bin, tc.args...)
			cmd.Env = append(os.Environ(), tc.env...)
			out, _ := cmd.CombinedOutput()
			if code := cmd.ProcessState.ExitCode(); code != tc.wantCode || !strings.Contains(string(out), tc.wantOut) {
				t.Errorf("exit %d, output %q; want %d, %q", code, out, tc.wantCode, tc.wantOut)
			}
		})
	}
}
