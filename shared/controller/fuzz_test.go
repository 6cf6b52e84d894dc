package controller

import (
	"errors"
	"maps"
	"strings"
	"testing"

	sandboxapi "github.com/containerd/containerd/api/services/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-go/kuasar-go/shared/store"
	"github.com/kuasar-go/kuasar-go/shared/validate"
)

func podConfigBytes(f *testing.F, cfg *runtimeapi.PodSandboxConfig) []byte {
	b, err := proto.Marshal(cfg)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzCreateRequest: what Create accepts has a valid sandbox ID, no netns
// or a network namespace's, options that PodConfig decodes later (the
// families decode them on every call) and the request's annotations and
// rootfs as they were; what it refuses is InvalidArgument.
func FuzzCreateRequest(f *testing.F) {
	cri := podConfigBytes(f, &runtimeapi.PodSandboxConfig{
		Metadata:    &runtimeapi.PodSandboxMetadata{Name: "web", Namespace: "default", Uid: "u1"},
		Hostname:    "web",
		Annotations: map[string]string{"quark.kuasar-go.io/engine": "gvisor"},
		Linux:       &runtimeapi.LinuxPodSandboxConfig{CgroupParent: "/kubepods/besteffort/pod1"},
	})
	f.Add("pod-1", "", "type.googleapis.com/runtime.v1.PodSandboxConfig", cri, "io.kubernetes.cri.sandbox-name", "web", "/var/lib/containerd/snap/1/fs")
	f.Add("pod-1", "/proc/self/ns/net", "runtime.v1.PodSandboxConfig", cri, "", "", "")
	f.Add("pod-1", "/proc/self/ns/uts", "", []byte(nil), "", "", "")
	f.Add("../pod", "/run/netns/../../etc/passwd", "x/runtime.v1.PodSandboxConfig", []byte{0xff, 0x01}, "a", "b", "")
	f.Fuzz(func(t *testing.T, id, netns, typeURL string, value []byte, annKey, annVal, rootfsSource string) {
		req := &sandboxapi.ControllerCreateRequest{
			SandboxID:   id,
			NetnsPath:   netns,
			Annotations: map[string]string{annKey: annVal},
			Rootfs:      []*types.Mount{{Type: "overlay", Source: rootfsSource, Options: []string{"lowerdir=" + rootfsSource}}},
		}
		if typeURL != "" || value != nil {
			req.Options = &anypb.Any{TypeUrl: typeURL, Value: value}
		}
		sb, err := sandboxFromRequest(req)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			return
		}
		if err := validate.ID("sandbox", sb.ID); err != nil || sb.ID != id {
			t.Fatalf("accepted sandbox id %q as %q: %v", id, sb.ID, err)
		}
		if sb.NetnsPath != netns {
			t.Fatalf("netns %q stored as %q", netns, sb.NetnsPath)
		}
		if netns != "" {
			var st unix.Statfs_t
			if err := unix.Statfs(netns, &st); err != nil || st.Type != unix.NSFS_MAGIC || validate.AbsPath("netns", netns) != nil {
				t.Fatalf("accepted netns %q, not a clean path of a namespace file", netns)
			}
		}
		if !maps.Equal(sb.Annotations, req.Annotations) {
			t.Fatalf("annotations %v stored as %v", req.Annotations, sb.Annotations)
		}
		if len(sb.Rootfs) != 1 || sb.Rootfs[0].Source != rootfsSource {
			t.Fatalf("rootfs stored as %+v", sb.Rootfs)
		}
		if sb.State != store.StateCreated {
			t.Fatalf("state %q", sb.State)
		}
		cfg, err := PodConfig(sb)
		if err != nil {
			t.Fatalf("Create accepted options that PodConfig refuses: %v", err)
		}
		if len(value) > 0 && cfg == nil {
			t.Fatal("no pod config")
		}
	})
}

// FuzzPodConfig decodes the CRI pod config from the options Any: what it
// accepts re-encodes to a config that decodes equal, and the annotations
// the families read (engine, platform) come through unchanged.
func FuzzPodConfig(f *testing.F) {
	f.Add("type.googleapis.com/runtime.v1.PodSandboxConfig", podConfigBytes(f, &runtimeapi.PodSandboxConfig{
		Annotations:  map[string]string{"quark.kuasar-go.io/gvisor-platform": "systrap", "wasm.kuasar-go.io/engine": "wazero"},
		Labels:       map[string]string{"app": "web"},
		DnsConfig:    &runtimeapi.DNSConfig{Servers: []string{"10.0.0.10"}},
		PortMappings: []*runtimeapi.PortMapping{{ContainerPort: 80, HostPort: 8080}},
	}))
	f.Add("runtime.v1.PodSandboxConfig", []byte{0x2a, 0x03, 0x0a, 0x01, 0x61})
	f.Add("runtime.v1.PodSandboxConfigX", []byte{0x0a})
	f.Add("type.googleapis.com/runtime.v1.PodSandboxConfig", []byte{0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, typeURL string, value []byte) {
		sb := &store.Sandbox{ID: "p", Options: &store.Any{TypeURL: typeURL, Value: value}}
		cfg, err := PodConfig(sb)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("refused with %v, not InvalidArgument", err)
			}
			if len(value) == 0 {
				t.Fatalf("empty options refused: %v", err)
			}
			return
		}
		if len(value) > 0 && typeURL != podConfigType && !strings.HasSuffix(typeURL, "/"+podConfigType) {
			t.Fatalf("accepted options of type %q", typeURL)
		}
		b, err := proto.Marshal(cfg)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		again, err := PodConfig(&store.Sandbox{ID: "p", Options: &store.Any{TypeURL: podConfigType, Value: b}})
		if err != nil {
			t.Fatalf("decode re-encoded config: %v", err)
		}
		if !proto.Equal(cfg, again) {
			t.Fatalf("round trip changed the config:\n%v\n%v", cfg, again)
		}
		if !maps.Equal(cfg.GetAnnotations(), again.GetAnnotations()) {
			t.Fatal("annotations changed")
		}
	})
}

// FuzzUpdatedSpec applies a containerd sandbox update to the stored
// record: with no fields it is the update; "labels.K" sets or removes one
// label and keeps the others; unknown fields are InvalidArgument.
func FuzzUpdatedSpec(f *testing.F) {
	stored, _ := proto.Marshal(&types.Sandbox{SandboxID: "p", Labels: map[string]string{"a": "1", "b": "2"}, Extensions: map[string]*anypb.Any{"x": {TypeUrl: "x"}}})
	upd, _ := proto.Marshal(&types.Sandbox{SandboxID: "p", Labels: map[string]string{"a": "9", "c": "3"}, Sandboxer: "other"})
	f.Add(stored, upd, "labels.a,labels.b")
	f.Add(stored, upd, "")
	f.Add(stored, upd, "labels,extensions.x,runtime,spec,sandboxer")
	f.Add([]byte{}, upd, "labels.")
	f.Add(stored, []byte{0x0a, 0x01}, "id")
	f.Fuzz(func(t *testing.T, storedB, updB []byte, fieldList string) {
		cur, u := &types.Sandbox{}, &types.Sandbox{}
		if proto.Unmarshal(storedB, cur) != nil || proto.Unmarshal(updB, u) != nil {
			return // gRPC and the store hand over only valid messages
		}
		var fields []string
		if fieldList != "" {
			fields = strings.Split(fieldList, ",")
		}
		out, err := updatedSpec(storedB, u, fields)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("update %q: %v, not InvalidArgument", fields, err)
			}
			return
		}
		got := &types.Sandbox{}
		if err := proto.Unmarshal(out, got); err != nil {
			t.Fatalf("updated spec does not decode: %v", err)
		}
		if len(fields) == 0 {
			if !proto.Equal(got, u) {
				t.Fatalf("update with no fields is not the update:\n%v\n%v", got, u)
			}
			return
		}
		labelsOnly := true
		want := maps.Clone(cur.Labels)
		if want == nil {
			want = map[string]string{}
		}
		for _, fl := range fields {
			k, ok := strings.CutPrefix(fl, "labels.")
			if !ok {
				labelsOnly = false
				break
			}
			if v, ok := u.Labels[k]; ok {
				want[k] = v
			} else {
				delete(want, k)
			}
		}
		if labelsOnly {
			if !maps.Equal(got.Labels, want) {
				t.Fatalf("labels after %q: %v, want %v", fields, got.Labels, want)
			}
			cur.Labels, got.Labels = nil, nil
			if !proto.Equal(cur, got) {
				t.Fatalf("update of labels %q changed other fields:\n%v\n%v", fields, cur, got)
			}
		}
	})
}
