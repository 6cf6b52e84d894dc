package chapi

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGeneratedCodeIsCurrent runs this package's go:generate line with the
// output redirected to a temp dir and compares the result with the
// committed api.gen.go.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	src, err := os.ReadFile("generate.go")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for l := range strings.Lines(string(src)) {
		if rest, ok := strings.CutPrefix(l, "//go:generate "); ok {
			line = strings.TrimSpace(rest)
		}
	}
	args := strings.Fields(line)
	out := filepath.Join(t.TempDir(), "api.gen.go")
	redirected := false
	for i := range args {
		if args[i] == "-o" && i+1 < len(args) && args[i+1] == "api.gen.go" {
			args[i+1], redirected = out, true
		}
	}
	if !redirected {
		t.Fatalf("go:generate line %q does not write api.gen.go with -o", line)
	}

	// Only a generator that cannot be built (no module cache, no proxy)
	// skips the test; everything after that must work.
	build := exec.Command("go", "build", "-modfile=../../../../hack/tools/openapi/go.mod", "-o", t.TempDir(),
		"github.com/oapi-codegen/oapi-codegen/v2/cmd/oapi-codegen")
	build.Env = append(os.Environ(), "GOWORK=off")
	if b, err := build.CombinedOutput(); err != nil {
		t.Skipf("cannot build the generator: %v\n%s", err, b)
	}
	if b, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", line, err, b)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("api.gen.go")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("api.gen.go is not what the generator makes from the OpenAPI description: run go generate in this package")
	}
}
