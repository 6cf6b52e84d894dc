package testenv

import (
	"bytes"
	"strings"
	"testing"
)

func TestRunnerFatalUnwindsAndCleansUp(t *testing.T) {
	var out bytes.Buffer
	r := NewRunner("demo", &out)
	var order []string
	err := r.Run(func(tb testing.TB) {
		tb.Cleanup(func() { order = append(order, "first") })
		tb.Cleanup(func() { order = append(order, "second") })
		tb.Fatalf("stop here %d", 1)
		order = append(order, "not reached")
	})
	if err == nil {
		t.Fatal("Run returned nil after Fatalf")
	}
	if got := strings.Join(order, ","); got != "second,first" {
		t.Errorf("cleanup order %q, want second,first", got)
	}
	if !strings.Contains(out.String(), "stop here 1") {
		t.Errorf("log %q lacks the Fatalf message", out.String())
	}
}

func TestRunnerSuccess(t *testing.T) {
	r := NewRunner("ok", &bytes.Buffer{})
	ran := false
	if err := r.Run(func(tb testing.TB) { tb.Logf("fine"); ran = true }); err != nil || !ran {
		t.Fatalf("Run = %v, ran %v", err, ran)
	}
}
