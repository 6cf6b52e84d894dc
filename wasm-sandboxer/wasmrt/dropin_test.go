package wasmrt

import (
	"os"
	"path"
	"slices"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// CRI copies only the annotations a runtime handler lists into the OCI
// spec: the deployed drop-in must pass the engine annotation through, from
// pods and from containers.
func TestDeployedDropInPassesEngineAnnotation(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/containerd/wasm-sandboxer.toml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Plugins map[string]struct {
			Containerd struct {
				Runtimes map[string]struct {
					PodAnnotations       []string `toml:"pod_annotations"`
					ContainerAnnotations []string `toml:"container_annotations"`
				} `toml:"runtimes"`
			} `toml:"containerd"`
		} `toml:"plugins"`
	}
	if err := toml.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	rt := cfg.Plugins["io.containerd.cri.v1.runtime"].Containerd.Runtimes["kuasar-wasm"]
	// containerd matches these patterns with path.Match.
	passes := func(p string) bool { ok, _ := path.Match(p, EngineAnnotation); return ok }
	for what, patterns := range map[string][]string{"pod_annotations": rt.PodAnnotations, "container_annotations": rt.ContainerAnnotations} {
		if !slices.ContainsFunc(patterns, passes) {
			t.Errorf("%s %v do not pass %s through", what, patterns, EngineAnnotation)
		}
	}
}
