// Package validate checks identifiers and paths that arrive from containerd
// before they are used to build file names, cgroup paths or runtime calls.
package validate

import (
	"fmt"
	"path/filepath"
	"regexp"

	"github.com/containerd/errdefs"
)

// MaxIDLength bounds IDs so that paths derived from them stay well under
// PATH_MAX and socket paths under sun_path's 108 bytes where IDs appear in them.
const MaxIDLength = 76

// idPattern is containerd's identifier grammar (alphanumerics with '.', '_'
// and '-' separators), which excludes '/', '..' as a path element and spaces.
var idPattern = regexp.MustCompile(`^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$`)

// ID returns an InvalidArgument error unless id is a safe identifier. kind
// names what the ID is ("sandbox", "container", "exec") in the error.
func ID(kind, id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%s id must not be empty: %w", kind, errdefs.ErrInvalidArgument)
	case len(id) > MaxIDLength:
		return fmt.Errorf("%s id %.20q... is %d bytes, longer than %d: %w", kind, id, len(id), MaxIDLength, errdefs.ErrInvalidArgument)
	case !idPattern.MatchString(id):
		return fmt.Errorf("%s id %q must match %s (no '/', no '..', no spaces): %w", kind, id, idPattern, errdefs.ErrInvalidArgument)
	}
	return nil
}

// AbsPath returns an InvalidArgument error unless p is absolute and clean
// (no '..' elements, no trailing slash), so it cannot escape where it points.
func AbsPath(kind, p string) error {
	if p == "" {
		return fmt.Errorf("%s path must not be empty: %w", kind, errdefs.ErrInvalidArgument)
	}
	if !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return fmt.Errorf("%s path %q must be absolute and clean: %w", kind, p, errdefs.ErrInvalidArgument)
	}
	return nil
}
