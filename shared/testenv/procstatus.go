package testenv

import (
	"fmt"
	"os"
	"strings"
	"testing"
)

// ProcStatus is /proc/<pid>/status by field, each value's words joined by
// one space ("Uid": "0 0 0 0", "CapEff": "0000000000000000").
func ProcStatus(t testing.TB, pid int) map[string]string {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return out
}
