package validate

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestID(t *testing.T) {
	for _, tc := range []struct {
		name, id string
		ok       bool
	}{
		{"hex", strings.Repeat("ab12", 16), true},
		{"dotted", "pod.a_b-c", true},
		{"empty", "", false},
		{"slash", "a/b", false},
		{"dotdot", "..", false},
		{"dotdot inside", "a..b", false},
		{"leading dot", ".a", false},
		{"space", "a b", false},
		{"nul", "a\x00b", false},
		{"too long", strings.Repeat("a", MaxIDLength+1), false},
		{"max length", strings.Repeat("a", MaxIDLength), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ID("sandbox", tc.id)
			if tc.ok && err != nil {
				t.Fatalf("ID(%q) = %v, want nil", tc.id, err)
			}
			if !tc.ok && !errdefs.IsInvalidArgument(err) {
				t.Fatalf("ID(%q) = %v, want InvalidArgument", tc.id, err)
			}
		})
	}
}

func TestAbsPath(t *testing.T) {
	for _, tc := range []struct {
		p  string
		ok bool
	}{
		{"/run/netns/x", true},
		{"", false},
		{"relative/x", false},
		{"/run/../etc", false},
		{"/run/netns/", false},
	} {
		err := AbsPath("netns", tc.p)
		if tc.ok != (err == nil) {
			t.Errorf("AbsPath(%q) = %v, ok want %v", tc.p, err, tc.ok)
		}
		if err != nil && !errdefs.IsInvalidArgument(err) {
			t.Errorf("AbsPath(%q) = %v, want InvalidArgument", tc.p, err)
		}
	}
}
