package vmtask

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// exposeFunc makes the host path src visible in the share, bound with the
// mount's options (rbind, ro, nosuid...), and returns its guest path.
type exposeFunc func(src string, options []string) (string, error)

// guestSpec adjusts a container's OCI spec, written by containerd for the
// host, to run in the pod's VM:
//   - namespaces given as host paths (the pod's, which containerd points at
//     the VMM process) are dropped: the container then shares the VM's own,
//     which is the pod's; so is the network namespace, where the guest has
//     the pod's interfaces;
//   - bind mounts of host files and directories (volumes, /etc/hosts,
//     resolv.conf) are exposed through the share; the pod's /dev/shm
//     becomes a tmpfs of the VM's;
//   - the cgroup path becomes one of the guest's own, and hooks and LSM
//     labels, which name host things, are dropped.
func guestSpec(spec *specs.Spec, containerID string, expose exposeFunc) (*specs.Spec, error) {
	out := *spec
	if spec.Process != nil {
		p := *spec.Process
		p.ApparmorProfile, p.SelinuxLabel = "", ""
		out.Process = &p
	}
	out.Hooks = nil
	out.Annotations = nil
	out.Mounts = nil
	for _, m := range spec.Mounts {
		if !isBind(m) {
			out.Mounts = append(out.Mounts, m)
			continue
		}
		if m.Destination == "/dev/shm" {
			out.Mounts = append(out.Mounts, specs.Mount{Destination: "/dev/shm", Type: "tmpfs", Source: "shm",
				Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}})
			continue
		}
		if !filepath.IsAbs(m.Source) {
			return nil, fmt.Errorf("mount %s: bind source %q is not an absolute path: %w", m.Destination, m.Source, errdefs.ErrInvalidArgument)
		}
		src, err := expose(m.Source, m.Options)
		if err != nil {
			return nil, fmt.Errorf("mount %s: %w", m.Destination, err)
		}
		m.Source = src
		out.Mounts = append(out.Mounts, m)
	}
	if spec.Linux != nil {
		l := *spec.Linux
		l.CgroupsPath = "/kuasar/" + containerID
		l.Namespaces = nil
		for _, ns := range spec.Linux.Namespaces {
			if ns.Path != "" || ns.Type == specs.NetworkNamespace {
				continue
			}
			l.Namespaces = append(l.Namespaces, ns)
		}
		l.MountLabel = ""
		out.Linux = &l
	}
	return &out, nil
}

func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// exposedName is the name under a container's share directory of the n-th
// host path it exposes.
func exposedName(n int, src string) string {
	base := strings.Map(func(r rune) rune {
		if r == '/' || r == 0 {
			return '_'
		}
		return r
	}, filepath.Base(src))
	return fmt.Sprintf("m%d-%s", n, base)
}
