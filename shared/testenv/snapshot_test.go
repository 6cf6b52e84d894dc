package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSnapshotDiff(t *testing.T) {
	dir := t.TempDir()
	before := Snapshot(dir)
	// Other test packages run beside this one and change the machine: only
	// what concerns dir must be unchanged.
	for _, l := range before.Diff(Snapshot(dir)) {
		if strings.Contains(l, dir) {
			t.Fatalf("diff of nothing in %s: %s", dir, l)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "leak"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	id := strings.Repeat("ab", 32)
	for _, d := range []string{"infra/k8s.io", "infra/k8s.io/" + id} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// A process naming the tracked directory counts as ours.
	cmd := exec.Command("/bin/sh", "-c", "sleep 30 # "+dir)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	time.Sleep(100 * time.Millisecond)
	d := strings.Join(before.Diff(Snapshot(dir)), "\n")
	if !strings.Contains(d, "file: "+filepath.Join(dir, "leak")) {
		t.Errorf("file leak not reported:\n%s", d)
	}
	if !strings.Contains(d, "file: "+filepath.Join(dir, "infra/k8s.io", id)) || strings.Contains(d, "infra/k8s.io\n") {
		t.Errorf("directories: want the id-named one only:\n%s", d)
	}
	if !strings.Contains(d, "process: ") || !strings.Contains(d, dir) {
		t.Errorf("process leak not reported:\n%s", d)
	}
}

func TestParseCRILog(t *testing.T) {
	in := "2024-01-02T03:04:05.123456789Z stdout P hel\n" +
		"2024-01-02T03:04:05.123456790Z stdout F lo\n" +
		"2024-01-02T03:04:05.2Z stderr F err msg\n" +
		"2024-01-02T03:04:05.3Z stdout F \n"
	lines, err := ParseCRILog([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if got := LogText(lines, ""); got != "hello\nerr msg\n\n" {
		t.Errorf("all = %q", got)
	}
	if got := LogText(lines, "stderr"); got != "err msg\n" {
		t.Errorf("stderr = %q", got)
	}
}

// Processes of another package's test binary, and their children, are
// that test's; this test's own children are this test's.
func TestOtherTest(t *testing.T) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep")
	}
	other := filepath.Join(t.TempDir(), "other.test")
	b, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		bin  string
		want bool
	}{{sleep, false}, {other, true}} {
		cmd := exec.Command(tc.bin, "30")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		if got := otherTest(cmd.Process.Pid, os.Getpid()); got != tc.want {
			t.Errorf("otherTest(%s) = %v, want %v", filepath.Base(tc.bin), got, tc.want)
		}
	}
}
