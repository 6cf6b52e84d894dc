package proto

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestGeneratedCodeIsCurrent regenerates the Go code from the .proto files
// with the pinned generators and compares it with what is committed.
func TestGeneratedCodeIsCurrent(t *testing.T) {
	if _, err := exec.LookPath("protoc"); err != nil {
		t.Skip("protoc not installed (Debian package protobuf-compiler)")
	}
	bin, out := t.TempDir(), t.TempDir()
	run := func(name string, args ...string) {
		t.Helper()
		cmd := exec.Command(name, args...)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, b)
		}
	}
	run("go", "build", "-o", bin+"/", "google.golang.org/protobuf/cmd/protoc-gen-go", "github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc")
	run("protoc", "--plugin=protoc-gen-go="+filepath.Join(bin, "protoc-gen-go"),
		"--plugin=protoc-gen-go-ttrpc="+filepath.Join(bin, "protoc-gen-go-ttrpc"),
		"--go_out="+out, "--go_opt=paths=source_relative",
		"--go-ttrpc_out="+out, "--go-ttrpc_opt=paths=source_relative", "vmmtask/v1/agent.proto")
	for _, f := range []string{"vmmtask/v1/agent.pb.go", "vmmtask/v1/agent_ttrpc.pb.go"} {
		want, err := os.ReadFile(filepath.Join(out, f))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is not what the generators make from the .proto: run make proto", f)
		}
	}
}
