package controller

import (
	"testing"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestUpdatedSpec(t *testing.T) {
	stored, err := proto.Marshal(&types.Sandbox{
		SandboxID: "p", Labels: map[string]string{"a": "1", "b": "2"},
		Extensions: map[string]*anypb.Any{"x": {TypeUrl: "x"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	upd := &types.Sandbox{SandboxID: "p", Labels: map[string]string{"a": "9", "c": "3"}, Sandboxer: "other"}
	for _, tc := range []struct {
		name       string
		fields     []string
		wantLabels map[string]string
		wantExt    int
		wantErr    bool
	}{
		{name: "all", wantLabels: map[string]string{"a": "9", "c": "3"}, wantExt: 0},
		{name: "labels", fields: []string{"labels"}, wantLabels: map[string]string{"a": "9", "c": "3"}, wantExt: 1},
		{name: "one label", fields: []string{"labels.a"}, wantLabels: map[string]string{"a": "9", "b": "2"}, wantExt: 1},
		{name: "removed label", fields: []string{"labels.b"}, wantLabels: map[string]string{"a": "1"}, wantExt: 1},
		{name: "one extension removed", fields: []string{"extensions.x"}, wantLabels: map[string]string{"a": "1", "b": "2"}, wantExt: 0},
		{name: "unknown field", fields: []string{"id"}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := updatedSpec(stored, upd, tc.fields)
			if tc.wantErr {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("err = %v, want InvalidArgument", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got types.Sandbox
			if err := proto.Unmarshal(b, &got); err != nil {
				t.Fatal(err)
			}
			if len(got.Labels) != len(tc.wantLabels) {
				t.Fatalf("labels %v, want %v", got.Labels, tc.wantLabels)
			}
			for k, v := range tc.wantLabels {
				if got.Labels[k] != v {
					t.Errorf("label %s = %q, want %q", k, got.Labels[k], v)
				}
			}
			if len(got.Extensions) != tc.wantExt {
				t.Errorf("extensions %v, want %d", got.Extensions, tc.wantExt)
			}
		})
	}
}
