package controller

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// podConfigType is the protobuf name CRI uses for the options it passes.
const podConfigType = "runtime.v1.PodSandboxConfig"

// PodConfig decodes the CRI pod config carried in the sandbox's options. It
// returns an empty config when the sandbox was created without one (not
// through CRI) and InvalidArgument when the options cannot be decoded.
func PodConfig(sb *store.Sandbox) (*runtimeapi.PodSandboxConfig, error) {
	cfg := &runtimeapi.PodSandboxConfig{}
	if sb.Options == nil || len(sb.Options.Value) == 0 {
		return cfg, nil
	}
	if !strings.HasSuffix(sb.Options.TypeURL, "/"+podConfigType) && sb.Options.TypeURL != podConfigType {
		return nil, fmt.Errorf("sandbox options of type %q, want %s: %w", sb.Options.TypeURL, podConfigType, errdefs.ErrInvalidArgument)
	}
	if err := proto.Unmarshal(sb.Options.Value, cfg); err != nil {
		return nil, fmt.Errorf("decode pod sandbox config: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return cfg, nil
}

// validateNetns accepts an empty path (the node's network) or the path of a
// network namespace file (a nsfs bind mount such as CRI creates).
func validateNetns(path string) error {
	if path == "" {
		return nil
	}
	if err := validate.AbsPath("netns", path); err != nil {
		return err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("netns path %q does not exist: %w", path, errdefs.ErrInvalidArgument)
		}
		return fmt.Errorf("netns path %q: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("netns path %q is not a namespace file: %w", path, errdefs.ErrInvalidArgument)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open netns %q: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	defer unix.Close(fd)
	// NS_GET_NSTYPE tells a network namespace from other namespace files.
	nstype, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("netns %q: %v: %w", path, err, errdefs.ErrInvalidArgument)
	}
	if nstype != unix.CLONE_NEWNET {
		return fmt.Errorf("netns path %q is not a network namespace: %w", path, errdefs.ErrInvalidArgument)
	}
	return nil
}
