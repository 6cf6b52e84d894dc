package vmtask

import (
	"errors"
	"reflect"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestGuestSpec(t *testing.T) {
	host := &specs.Spec{
		Process: &specs.Process{Args: []string{"sh"}, ApparmorProfile: "cri-containerd.apparmor.d", SelinuxLabel: "x"},
		Root:    &specs.Root{Path: "rootfs"},
		Hooks:   &specs.Hooks{CreateRuntime: []specs.Hook{{Path: "/usr/bin/host-hook"}}},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/etc/hosts", Type: "bind", Source: "/var/lib/cri/sandboxes/p/hosts", Options: []string{"rbind", "rprivate", "rw"}},
			{Destination: "/data", Source: "/var/lib/kubelet/pods/v", Options: []string{"rbind", "ro"}},
			{Destination: "/dev/shm", Type: "bind", Source: "/run/cri/sandboxes/p/shm", Options: []string{"rbind"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: "kubepods-besteffort.slice:cri-containerd:c1",
			MountLabel:  "label",
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
				{Type: specs.UTSNamespace, Path: "/proc/42/ns/uts"},
				{Type: specs.MountNamespace},
				{Type: specs.NetworkNamespace, Path: "/proc/42/ns/net"},
			},
		},
	}
	type exposed struct {
		src     string
		options []string
	}
	var got []exposed
	g, err := guestSpec(host, "c1", func(src string, options []string) (string, error) {
		got = append(got, exposed{src, options})
		return "/run/kuasar/shared/c1/" + src[len(src)-4:], nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []exposed{{"/var/lib/cri/sandboxes/p/hosts", []string{"rbind", "rprivate", "rw"}}, {"/var/lib/kubelet/pods/v", []string{"rbind", "ro"}}}; !reflect.DeepEqual(got, want) {
		t.Errorf("exposed %v, want %v", got, want)
	}
	wantMounts := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/etc/hosts", Type: "bind", Source: "/run/kuasar/shared/c1/osts", Options: []string{"rbind", "rprivate", "rw"}},
		{Destination: "/data", Source: "/run/kuasar/shared/c1/ds/v", Options: []string{"rbind", "ro"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
	}
	if !reflect.DeepEqual(g.Mounts, wantMounts) {
		t.Errorf("mounts\n%v\nwant\n%v", g.Mounts, wantMounts)
	}
	wantNS := []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}}
	if !reflect.DeepEqual(g.Linux.Namespaces, wantNS) {
		t.Errorf("namespaces %v, want %v (the pod's shared ones and the network are the VM's)", g.Linux.Namespaces, wantNS)
	}
	if g.Linux.CgroupsPath != "/kuasar/c1" || g.Linux.MountLabel != "" || g.Hooks != nil ||
		g.Process.ApparmorProfile != "" || g.Process.SelinuxLabel != "" {
		t.Errorf("host-only settings kept: cgroups %q, label %q, hooks %v, apparmor %q, selinux %q",
			g.Linux.CgroupsPath, g.Linux.MountLabel, g.Hooks, g.Process.ApparmorProfile, g.Process.SelinuxLabel)
	}
	// The host's spec is not changed.
	if host.Process.ApparmorProfile == "" || len(host.Linux.Namespaces) != 5 || host.Mounts[1].Source != "/var/lib/cri/sandboxes/p/hosts" {
		t.Error("guestSpec changed the host's spec")
	}
}

func TestGuestSpecErrors(t *testing.T) {
	for _, c := range []struct {
		name   string
		mount  specs.Mount
		expose error
	}{
		{"relative bind source", specs.Mount{Destination: "/x", Type: "bind", Source: "rel/path"}, nil},
		{"source that cannot be exposed", specs.Mount{Destination: "/x", Type: "bind", Source: "/gone"}, errors.New("bind source: no such file")},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := &specs.Spec{Process: &specs.Process{}, Root: &specs.Root{Path: "rootfs"}, Mounts: []specs.Mount{c.mount}}
			_, err := guestSpec(spec, "c1", func(string, []string) (string, error) { return "/g", c.expose })
			if err == nil {
				t.Fatal("no error")
			}
		})
	}
}
