package validate

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// FuzzID: an accepted ID is safe as one path element (not empty, no '/',
// not '.' or '..', no NUL or spaces, at most MaxIDLength bytes) and the
// same after cleaning; a refused one is refused as InvalidArgument.
func FuzzID(f *testing.F) {
	for _, s := range []string{"pod-1", "a.b_c-d", "..", ".", "a/b", "a..b", "-a", "a-", strings.Repeat("x", MaxIDLength+1), "a\x00b", "é", "a\nb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		err := ID("sandbox", id)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("ID(%q): %v, not InvalidArgument", id, err)
			}
			return
		}
		switch {
		case id == "", id == ".", id == "..", len(id) > MaxIDLength:
			t.Fatalf("accepted %q", id)
		case strings.ContainsAny(id, "/\x00 \t\n\\:"):
			t.Fatalf("accepted %q with a separator or space", id)
		case strings.Contains(id, ".."):
			t.Fatalf("accepted %q containing '..'", id)
		case filepath.Base(id) != id, filepath.Clean(id) != id:
			t.Fatalf("accepted %q, not one clean path element", id)
		case filepath.Join("/state", id+".json") != "/state/"+id+".json":
			t.Fatalf("accepted %q, which moves a state file", id)
		}
		for _, r := range id {
			if r > 0x7e || r < 0x21 {
				t.Fatalf("accepted %q with a non-printable or non-ASCII rune %q", id, r)
			}
		}
	})
}

// FuzzAbsPath: an accepted path is absolute, clean, has no '..' element
// and stays itself when joined below the root.
func FuzzAbsPath(f *testing.F) {
	for _, s := range []string{"/run/netns/cni-1", "/", "relative", "/a/../b", "/a/", "//a", "/a/./b", "/..", "/a/..b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		err := AbsPath("bundle", p)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("AbsPath(%q): %v, not InvalidArgument", p, err)
			}
			return
		}
		if !strings.HasPrefix(p, "/") || filepath.Clean(p) != p {
			t.Fatalf("accepted %q: not absolute and clean", p)
		}
		for _, e := range strings.Split(p, "/") {
			if e == ".." || e == "." {
				t.Fatalf("accepted %q with a %q element", p, e)
			}
		}
		if p != "/" && strings.HasSuffix(p, "/") {
			t.Fatalf("accepted %q with a trailing slash", p)
		}
		if filepath.Join("/", p) != p {
			t.Fatalf("accepted %q, which moves under the root", p)
		}
	})
}
