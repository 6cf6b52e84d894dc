package task

import (
	"testing"

	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2/process"
	"github.com/containerd/errdefs"
)

func TestExecsTable(t *testing.T) {
	var table Execs[process.Process]
	if _, err := table.Lookup("e1"); !errdefs.IsNotFound(err) {
		t.Fatalf("Lookup of unknown = %v, want NotFound", err)
	}
	ok, cancel := table.ReserveProcess("e1")
	if !ok {
		t.Fatal("first reservation refused")
	}
	if ok, _ := table.ReserveProcess("e1"); ok {
		t.Fatal("a reserved ID was reserved twice")
	}
	cancel()
	if ok, _ := table.ReserveProcess("e1"); !ok {
		t.Fatal("a cancelled reservation still blocks the ID")
	}
	table.Add("e1", nil)
	if ok, _ := table.ReserveProcess("e1"); ok {
		t.Fatal("the ID of a live exec was reserved")
	}
	if _, err := table.Lookup("e1"); err != nil {
		t.Fatalf("Lookup after Add: %v", err)
	}
	if n := len(table.ExecdProcesses()); n != 1 {
		t.Fatalf("%d exec'd processes, want 1", n)
	}
	if p, err := table.Process(nil, "e1"); err != nil || p != nil {
		t.Fatalf("Process(e1) = %v, %v", p, err)
	}
	if _, err := table.Process(nil, "e2"); !errdefs.IsNotFound(err) {
		t.Fatalf("Process of unknown exec = %v, want NotFound", err)
	}
	table.Remove("e1")
	if _, err := table.Lookup("e1"); !errdefs.IsNotFound(err) {
		t.Fatalf("Lookup after Remove = %v, want NotFound", err)
	}
	if ok, _ := table.ReserveProcess("e1"); !ok {
		t.Fatal("a removed exec's ID stays blocked")
	}
}
