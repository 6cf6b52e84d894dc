package wasmrt

import (
	"errors"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// nsFlags maps the namespaces a module process can join or get.
var nsFlags = map[specs.LinuxNamespaceType]int{
	specs.NetworkNamespace: unix.CLONE_NEWNET,
	specs.IPCNamespace:     unix.CLONE_NEWIPC,
	specs.UTSNamespace:     unix.CLONE_NEWUTS,
	specs.PIDNamespace:     unix.CLONE_NEWPID,
}

// podNamespaces sorts the spec's namespaces: paths to join, and flags of new
// ones to create. Mount and cgroup namespaces are not used (the process
// is confined by chroot and its cgroup); a user namespace is refused.
func podNamespaces(spec *specs.Spec) (join map[int]string, newFlags uintptr, err error) {
	join = map[int]string{}
	if spec.Linux == nil {
		return join, 0, nil
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.UserNamespace {
			return nil, 0, errUserNS
		}
		flag, ok := nsFlags[ns.Type]
		if !ok {
			continue
		}
		if ns.Path == "" {
			newFlags |= uintptr(flag)
		} else {
			join[flag] = ns.Path
		}
	}
	return join, newFlags, nil
}

var errUserNS = errors.New("user namespaces are not supported for wasm containers")
