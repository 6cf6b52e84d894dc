package task

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-go/kuasar-go/shared/validate"
)

// FuzzReadBundle reads a bundle as containerd prepares it (config.json and
// the file naming the pod) and places the container's cgroup. What it
// accepts has a process and a root and names a pod by a valid ID; the
// cgroup placed below a pod's cgroup parent stays below it, even when the
// spec's path climbs out with "..".
func FuzzReadBundle(f *testing.F) {
	f.Add([]byte(`{"ociVersion":"1.2.0","process":{"args":["sh"],"cwd":"/"},"root":{"path":"rootfs"},"linux":{"cgroupsPath":"/kubepods/pod1/c1"}}`), []byte("pod-1\n"), "/kubepods/pod1")
	f.Add([]byte(`{"process":{},"root":{},"linux":{"cgroupsPath":"/elsewhere/c1"}}`), []byte("pod-1"), "/kuasar-go/pod-1")
	f.Add([]byte(`{"process":{},"root":{},"linux":{"cgroupsPath":"kubepods.slice:cri-containerd:c1"}}`), []byte("pod-1"), "kubepods.slice")
	f.Add([]byte(`{"process":null,"root":{}}`), []byte("pod-1"), "")
	f.Add([]byte(`{"process":{},"root":{}}`), []byte("../pod"), "")
	f.Add([]byte(`{"process":{"args":[1]}}`), []byte(""), "")
	f.Fuzz(func(t *testing.T, config, sandbox []byte, parent string) {
		bundle := t.TempDir()
		if err := os.WriteFile(filepath.Join(bundle, "config.json"), config, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(bundle, "sandbox"), sandbox, 0o600); err != nil {
			t.Fatal(err)
		}
		id, spec, err := ReadBundle(bundle)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			return
		}
		if spec.Process == nil || spec.Root == nil {
			t.Fatal("accepted a spec without process or root")
		}
		if validate.ID("sandbox", id) != nil || id != strings.TrimSpace(string(sandbox)) {
			t.Fatalf("pod %q read as %q", sandbox, id)
		}
		// CRI's cgroup parents are absolute and clean (or systemd slices),
		// and UTF-8 (protobuf strings).
		if parent == "" || !utf8.ValidString(parent) || spec.Linux == nil || (validate.AbsPath("cgroup", parent) != nil && strings.Contains(parent, "/")) {
			return
		}
		if err := placeCgroup(bundle, "c1", spec, parent); err != nil {
			t.Fatalf("placeCgroup: %v", err)
		}
		cp := spec.Linux.CgroupsPath
		under := strings.TrimSuffix(parent, "/") + "/"
		if !strings.HasPrefix(filepath.Clean(cp), under) {
			t.Fatalf("container cgroup %q is not below the pod's %q", cp, parent)
		}
		_, again, err := ReadBundle(bundle)
		if err != nil || again.Linux == nil || again.Linux.CgroupsPath != cp {
			t.Fatalf("rewritten bundle: %v", err)
		}
	})
}

// FuzzRuntimeOptions: containerd's runc options (the Any in a create
// request) are decoded and completed from the daemon's config: what is
// accepted is runc options naming a binary and a root, the request's own
// when it names them.
func FuzzRuntimeOptions(f *testing.F) {
	full, _ := typeurl.MarshalAnyToProto(&options.Options{BinaryName: "crun", Root: "/run/crun", SystemdCgroup: true, NoPivotRoot: true})
	f.Add(full.TypeUrl, full.Value)
	f.Add(full.TypeUrl, []byte{})
	f.Add("containerd.runc.v1.Options", []byte{0x52, 0x02, 0x2f, 0x78})
	f.Add("types.containerd.io/opencontainers/runtime-spec/1/Process", []byte(`{"args":["sh"]}`))
	f.Add("unknown", []byte{1})
	rt := &RuncRuntime{cfg: RuntimeConfig{Binary: "runc", Root: "/run/kuasar-runc"}}
	f.Fuzz(func(t *testing.T, typeURL string, value []byte) {
		out, err := rt.options(&anypb.Any{TypeUrl: typeURL, Value: value})
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			return
		}
		v, err := typeurl.UnmarshalAny(out)
		if err != nil {
			t.Fatalf("completed options do not decode: %v", err)
		}
		o, ok := v.(*options.Options)
		if !ok {
			t.Fatalf("completed options are %T", v)
		}
		if o.BinaryName == "" || o.Root == "" {
			t.Fatalf("options without binary or root: %v", o)
		}
		if len(value) == 0 {
			if o.BinaryName != "runc" || o.Root != "/run/kuasar-runc" {
				t.Fatalf("no options gave %v", o)
			}
			return
		}
		var in options.Options
		if proto.Unmarshal(value, &in) == nil {
			if in.BinaryName != "" && in.BinaryName != o.BinaryName {
				t.Fatalf("binary %q became %q", in.BinaryName, o.BinaryName)
			}
			if in.Root != "" && in.Root != o.Root {
				t.Fatalf("root %q became %q", in.Root, o.Root)
			}
		}
	})
}
