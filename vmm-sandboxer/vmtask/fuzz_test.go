package vmtask

import (
	"encoding/json"
	"path"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-go/kuasar-go/shared/validate"
)

const fuzzShare = "/run/kuasar/shared"

// FuzzGuestSpec rewrites a host OCI spec for the guest. Whatever the spec,
// the guest's keeps no namespace given by a (host) path and no network
// namespace of its own, every bind mount's source is in the container's
// share (under a name exposedName made: one path element, never '.' or
// '..'), or /dev/shm is the VM's tmpfs; hooks, annotations and LSM labels
// are gone, the cgroup is the guest's, and the host spec is unchanged.
func FuzzGuestSpec(f *testing.F) {
	f.Add(`{"process":{"args":["sh"],"apparmorProfile":"p","selinuxLabel":"l"},"root":{"path":"rootfs"},"hooks":{"prestart":[{"path":"/h"}]},"annotations":{"a":"b"},`+
		`"mounts":[{"destination":"/proc","type":"proc","source":"proc"},{"destination":"/etc/hosts","type":"bind","source":"/var/lib/cri/p/hosts","options":["rbind","ro"]},`+
		`{"destination":"/data","source":"/var/lib/kubelet/v","options":["bind"]},{"destination":"/dev/shm","type":"bind","source":"/run/cri/p/shm","options":["rbind"]}],`+
		`"linux":{"cgroupsPath":"kubepods.slice:cri-containerd:c1","mountLabel":"m","namespaces":[{"type":"pid"},{"type":"ipc","path":"/proc/42/ns/ipc"},{"type":"network","path":"/proc/42/ns/net"},{"type":"network"},{"type":"mount"}]}}`, "c1")
	f.Add(`{"mounts":[{"destination":"/x","type":"bind","source":"relative/path"}]}`, "c1")
	f.Add(`{"mounts":[{"destination":"/x","type":"none","source":"/","options":["rbind"]},{"destination":"/y","type":"bind","source":"/a/.."}]}`, "c-2")
	f.Add(`{"linux":{"namespaces":[{"type":"user","path":"/proc/1/ns/user"},{"type":"cgroup","path":""}]}}`, "c1")
	f.Fuzz(func(t *testing.T, specJSON, id string) {
		if validate.ID("container", id) != nil {
			return
		}
		var host specs.Spec
		if json.Unmarshal([]byte(specJSON), &host) != nil {
			return
		}
		before, _ := json.Marshal(&host)
		n := 0
		var exposedSrc []string
		g, err := guestSpec(&host, id, func(src string, _ []string) (string, error) {
			name := exposedName(n, src)
			n++
			if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
				t.Fatalf("exposedName(%q) = %q, not one path element", src, name)
			}
			if !path.IsAbs(src) {
				t.Fatalf("exposed relative source %q", src)
			}
			exposedSrc = append(exposedSrc, src)
			return path.Join(fuzzShare, id, name), nil
		})
		if after, _ := json.Marshal(&host); string(after) != string(before) {
			t.Fatalf("guestSpec changed the host spec:\n%s\n%s", before, after)
		}
		if err != nil {
			return
		}
		if g.Hooks != nil || g.Annotations != nil {
			t.Fatal("hooks or annotations kept")
		}
		if g.Process != nil && (g.Process.ApparmorProfile != "" || g.Process.SelinuxLabel != "") {
			t.Fatal("LSM labels kept")
		}
		if (g.Linux == nil) != (host.Linux == nil) {
			t.Fatal("linux section appeared or vanished")
		}
		if g.Linux != nil {
			if g.Linux.CgroupsPath != "/kuasar/"+id || g.Linux.MountLabel != "" {
				t.Fatalf("cgroup %q, mount label %q", g.Linux.CgroupsPath, g.Linux.MountLabel)
			}
			for _, ns := range g.Linux.Namespaces {
				if ns.Path != "" || ns.Type == specs.NetworkNamespace {
					t.Fatalf("guest spec keeps namespace %+v", ns)
				}
			}
		}
		if len(g.Mounts) != len(host.Mounts) {
			t.Fatalf("%d mounts became %d", len(host.Mounts), len(g.Mounts))
		}
		binds := 0
		for i, m := range g.Mounts {
			if m.Destination != host.Mounts[i].Destination {
				t.Fatalf("mount %d moved from %q to %q", i, host.Mounts[i].Destination, m.Destination)
			}
			if !isBind(m) {
				if isBind(host.Mounts[i]) && m.Destination != "/dev/shm" {
					t.Fatalf("bind mount %+v lost its bind", host.Mounts[i])
				}
				continue
			}
			dir := path.Join(fuzzShare, id) + "/"
			if !strings.HasPrefix(m.Source, dir) || path.Clean(m.Source) != m.Source {
				t.Fatalf("bind mount %s from %q, outside the share", m.Destination, m.Source)
			}
			if !reflect.DeepEqual(m.Options, host.Mounts[i].Options) {
				t.Fatalf("options of %s changed", m.Destination)
			}
			binds++
		}
		if binds != len(exposedSrc) {
			t.Fatalf("%d bind mounts, %d exposed", binds, len(exposedSrc))
		}
	})
}

// FuzzContainerRecord decodes the record of a container a restarted daemon
// finds beside a pod. A refused record is InvalidArgument. An accepted one
// is the container's, names an absolute bundle and a valid namespace,
// absolute stdio paths (they are opened) and mount points that are each
// one name strictly inside the container's directory in the share (what
// is unmounted and removed there when the container goes), and it is
// written back as it was read.
func FuzzContainerRecord(f *testing.F) {
	f.Add([]byte(`{"id":"c1","bundle":"/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1","namespace":"k8s.io",`+
		`"mounts":["rootfs","0-hosts","1-data"],"stdout":"/run/containerd/fifo/1/c1-stdout","stderr":"/run/containerd/fifo/1/c1-stderr","pid":7}`), "c1")
	f.Add([]byte(`{"id":"c1","bundle":"/b","namespace":"default","mounts":["/run/kuasar/shared/c1/rootfs"],"stdin":"/f/in","terminal":true,"pid":1}`), "c1")
	f.Add([]byte(`{"id":"c1","bundle":"/b","namespace":"default","mounts":[]}`), "c1")
	f.Fuzz(func(t *testing.T, data []byte, id string) {
		if validate.ID("container", id) != nil {
			return
		}
		dir := path.Join(fuzzShare, id)
		r, err := decodeRecord(data, id, dir)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			return
		}
		if r.ID != id {
			t.Fatalf("the record of %s holds %q", id, r.ID)
		}
		if validate.AbsPath("bundle", r.Bundle) != nil || identifiers.Validate(r.Namespace) != nil {
			t.Fatalf("bundle %q, namespace %q", r.Bundle, r.Namespace)
		}
		for _, p := range []string{r.Stdin, r.Stdout, r.Stderr} {
			if p != "" && validate.AbsPath("stdio", p) != nil {
				t.Fatalf("stdio path %q", p)
			}
		}
		for _, m := range r.Mounts {
			if p := path.Join(dir, m); path.Dir(p) != dir || p == dir || m != path.Base(p) {
				t.Fatalf("mount point %q is %s, not a name in %s", m, p, dir)
			}
		}
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		again, err := decodeRecord(b, id, dir)
		if err != nil || !reflect.DeepEqual(r, again) {
			t.Fatalf("record written back as %s reads as %+v, %v; want %+v", b, again, err, r)
		}
	})
}
