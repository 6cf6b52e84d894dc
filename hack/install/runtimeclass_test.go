package install

import (
	"bytes"
	"errors"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// dropinHandlers are the CRI runtime handlers the containerd drop-ins
// under deploy/containerd declare.
func dropinHandlers(t *testing.T) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(deployDir, "containerd", "*.toml"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no containerd drop-ins under %s: %v", deployDir, err)
	}
	var handlers []string
	for _, p := range paths {
		var cfg containerdConfig
		dec := toml.NewDecoder(bytes.NewReader(readFile(t, p)))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&cfg); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		for h := range cfg.Plugins.CRIRuntime.Containerd.Runtimes {
			handlers = append(handlers, h)
		}
	}
	slices.Sort(handlers)
	return handlers
}

// yamlDocuments splits a YAML stream at its "---" lines and drops
// documents that hold only comments and blank lines.
func yamlDocuments(data []byte) [][]byte {
	var docs [][]byte
	for _, doc := range regexp.MustCompile(`(?m)^---[ \t]*$`).Split(string(data), -1) {
		for _, line := range strings.Split(doc, "\n") {
			if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
				docs = append(docs, []byte(doc))
				break
			}
		}
	}
	return docs
}

// optionalScheduling uncomments the manifest's optional block: the line
// "#scheduling:" and the "#  ..." lines after it. ok is false if there is
// none.
func optionalScheduling(doc []byte) (out []byte, ok bool) {
	lines := strings.Split(string(doc), "\n")
	in := false
	for i, l := range lines {
		switch {
		case l == "#scheduling:":
			in, ok = true, true
			lines[i] = l[1:]
		case in && strings.HasPrefix(l, "#  "):
			lines[i] = l[1:]
		default:
			in = false
		}
	}
	return []byte(strings.Join(lines, "\n")), ok
}

// strictRuntimeClass decodes doc strictly against node.k8s.io/v1: a field
// the API does not have, a duplicate field or a value of the wrong type is
// an error. sigs.k8s.io/yaml's strict mode matches field names without
// regard to case (encoding/json), so the JSON is decoded again with
// sigs.k8s.io/json, case-sensitively, as the API server does.
func strictRuntimeClass(doc []byte) (*nodev1.RuntimeClass, error) {
	var rc nodev1.RuntimeClass
	if err := yaml.UnmarshalStrict(doc, &rc); err != nil {
		return nil, err
	}
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, err
	}
	var exact nodev1.RuntimeClass
	strict, err := sigsjson.UnmarshalStrict(j, &exact)
	if err == nil {
		err = errors.Join(strict...)
	}
	if err != nil {
		return nil, err
	}
	return &rc, nil
}

func decodeRuntimeClass(t *testing.T, where string, doc []byte) *nodev1.RuntimeClass {
	t.Helper()
	rc, err := strictRuntimeClass(doc)
	if err != nil {
		t.Fatalf("%s: not a valid node.k8s.io/v1 RuntimeClass: %v", where, err)
	}
	return rc
}

// checkRuntimeClass checks what the API server's validation of a
// RuntimeClass checks, and our conventions.
func checkRuntimeClass(t *testing.T, where string, rc *nodev1.RuntimeClass) {
	t.Helper()
	if rc.APIVersion != "node.k8s.io/v1" || rc.Kind != "RuntimeClass" {
		t.Errorf("%s: apiVersion %q kind %q, want node.k8s.io/v1 RuntimeClass", where, rc.APIVersion, rc.Kind)
	}
	if errs := validation.IsDNS1123Subdomain(rc.Name); len(errs) > 0 {
		t.Errorf("%s: metadata.name %q: %s", where, rc.Name, strings.Join(errs, "; "))
	}
	if rc.Namespace != "" {
		t.Errorf("%s: RuntimeClass is cluster-scoped, has namespace %q", where, rc.Namespace)
	}
	if errs := validation.IsDNS1123Label(rc.Handler); len(errs) > 0 {
		t.Errorf("%s: handler %q: %s", where, rc.Handler, strings.Join(errs, "; "))
	}
	if rc.Name != rc.Handler {
		t.Errorf("%s: metadata.name %q differs from handler %q (our convention: pods name the handler)", where, rc.Name, rc.Handler)
	}
	if o := rc.Overhead; o != nil {
		for name, q := range o.PodFixed {
			if name != corev1.ResourceCPU && name != corev1.ResourceMemory {
				t.Errorf("%s: overhead.podFixed.%s: want cpu or memory", where, name)
			}
			if q.Sign() < 0 {
				t.Errorf("%s: overhead.podFixed.%s %s is negative", where, name, q.String())
			}
		}
	}
	if s := rc.Scheduling; s != nil {
		for k, v := range s.NodeSelector {
			if errs := append(validation.IsQualifiedName(k), validation.IsValidLabelValue(v)...); len(errs) > 0 {
				t.Errorf("%s: scheduling.nodeSelector %s=%s: %s", where, k, v, strings.Join(errs, "; "))
			}
		}
	}
}

// TestRuntimeClasses: every manifest under deploy/kubernetes is a valid
// RuntimeClass (its optional scheduling block too, once uncommented), and
// there is exactly one for each runtime handler of the containerd drop-ins.
func TestRuntimeClasses(t *testing.T) {
	paths, err := filepath.Glob(filepath.Join(deployDir, "kubernetes", "*.yaml"))
	if err != nil || len(paths) == 0 {
		t.Fatalf("no manifests under %s/kubernetes: %v", deployDir, err)
	}
	byHandler := map[string]*nodev1.RuntimeClass{}
	for _, p := range paths {
		docs := yamlDocuments(readFile(t, p))
		if len(docs) == 0 {
			t.Errorf("%s: no document", p)
		}
		for i, doc := range docs {
			where := p
			if len(docs) > 1 {
				where = p + " document " + string(rune('1'+i))
			}
			rc := decodeRuntimeClass(t, where, doc)
			checkRuntimeClass(t, where, rc)
			if _, dup := byHandler[rc.Handler]; dup {
				t.Errorf("%s: a second RuntimeClass for handler %s", where, rc.Handler)
			}
			byHandler[rc.Handler] = rc

			if sched, ok := optionalScheduling(doc); ok {
				rcs := decodeRuntimeClass(t, where+" (scheduling uncommented)", sched)
				checkRuntimeClass(t, where+" (scheduling uncommented)", rcs)
				if rcs.Scheduling == nil || len(rcs.Scheduling.NodeSelector) == 0 {
					t.Errorf("%s: the commented scheduling block sets no nodeSelector", where)
				}
			}
		}
	}
	handlers := dropinHandlers(t)
	for _, h := range handlers {
		if byHandler[h] == nil {
			t.Errorf("no RuntimeClass under deploy/kubernetes for the containerd runtime handler %s", h)
		}
	}
	for h := range byHandler {
		if !slices.Contains(handlers, h) {
			t.Errorf("RuntimeClass handler %s: no containerd drop-in under deploy/containerd declares it (have %v)", h, handlers)
		}
	}
	if len(handlers) != len(sandboxers) {
		t.Errorf("drop-ins declare handlers %v, want one per sandboxer %v", handlers, sandboxers)
	}

	// A VM pod's fixed overhead covers at least the memory the VM gets
	// beyond the pod's limit (memory_overhead_mib, as documented in the
	// deployed config).
	rc := byHandler["kuasar-vmm"]
	if rc == nil {
		return
	}
	m := regexp.MustCompile(`(?m)^# memory_overhead_mib = (\d+)$`).FindSubmatch(readFile(t, filepath.Join(deployDir, "config", "vmm-sandboxer.toml")))
	if m == nil {
		t.Fatal("deploy/config/vmm-sandboxer.toml documents no memory_overhead_mib")
	}
	guestOverhead := resource.MustParse(string(m[1]) + "Mi")
	if rc.Overhead == nil {
		t.Fatalf("RuntimeClass kuasar-vmm sets no overhead; want podFixed memory above %s", guestOverhead.String())
	}
	if mem, ok := rc.Overhead.PodFixed[corev1.ResourceMemory]; !ok || mem.Cmp(guestOverhead) <= 0 {
		t.Errorf("kuasar-vmm overhead.podFixed.memory %s: want more than the guest's memory_overhead_mib (%s), for QEMU and virtiofsd too", mem.String(), guestOverhead.String())
	}
}

// TestRuntimeClassStrictness: the decoding above refuses what the API
// server would (so the test would notice a misspelt field).
func TestRuntimeClassStrictness(t *testing.T) {
	for name, doc := range map[string]string{
		"unknown field":   "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\nhandler: x\nhandlr: x\n",
		"misplaced field": "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\n  handler: x\n",
		"wrong type":      "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\nhandler: [x]\n",
		"bad quantity":    "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\nhandler: x\noverhead:\n  podFixed:\n    memory: lots\n",
		"duplicate field": "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\nhandler: x\nhandler: y\n",
		"scheduling typo": "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: x\nhandler: x\nscheduling:\n  nodeselector:\n    a: b\n",
	} {
		if rc, err := strictRuntimeClass([]byte(doc)); err == nil {
			t.Errorf("%s: decoded without error: %+v", name, rc)
		}
	}
}
