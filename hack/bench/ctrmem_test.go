package main

import (
	"fmt"
	"strings"
	"testing"
)

func TestCtrMemReport(t *testing.T) {
	c := config{wasmEngines: []string{"wasmtime"}, ctrMem: 3, ctrMemShim: true}
	r := &results{}
	for i, pss := range []int64{3072, 2048, 4096} { // median 3 MiB, min 2, max 4
		r.ctrMem = append(r.ctrMem, ctrMem{Kind: "wasm (wasmtime)", Index: i + 1, Procs: 1,
			rollup: rollup{PSS: pss, RSS: 10240, Anon: 1024, Private: 1536}})
	}
	for i := 0; i < 3; i++ {
		r.ctrMem = append(r.ctrMem, ctrMem{Kind: "native (runc shim)", Index: i + 1, Procs: 1,
			rollup: rollup{PSS: 768, RSS: 2048, Anon: 512, Private: 512}})
	}
	r.ctrMem = append(r.ctrMem, ctrMem{Kind: "native (runc shim)", Pod: true, Procs: 2, rollup: rollup{PSS: 3 * 5120, RSS: 16384, Anon: 6144}})

	var b strings.Builder
	r.ctrMemMarkdown(func(f string, a ...any) { b.WriteString(strings.TrimSpace(fmt.Sprintf(f, a...)) + "\n") }, c)
	md := b.String()
	for _, want := range []string{
		"| wasm (wasmtime) | 3 | 3.00 | 2.00 | 4.00 | 1.00 | 1.50 | 10.00 | 1 |",
		"| native (runc shim) | 3 | 0.75 | 0.75 | 0.75 | 0.50 | 0.50 | 2.00 | 1 |",
		"take 15.00 MiB PSS (6.00 Anonymous, 16.00 RSS) more, 5.00 MiB per container with 3 containers",
		"- wasm (wasmtime): 3.00, 2.00, 4.00",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	// No kuasar-runc containers were measured: no row for them.
	if strings.Contains(md, "native (kuasar-runc) |") {
		t.Errorf("row for a kind without containers:\n%s", md)
	}
	rows := r.ctrMemCSV()
	if len(rows) != 1+7 || rows[7][1] != "pod" || rows[1][3] != "3072" {
		t.Errorf("CSV: %v", rows)
	}
}
