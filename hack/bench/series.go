package main

import (
	"fmt"
	"image/color"
	"strings"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The runtimes --runtime takes: CRI runtime handlers under one containerd.
const (
	kuasar = "kuasar-runc"  // runc-sandboxer
	shim   = "runc"         // containerd-shim-runc-v2 + pause (containerd's podsandbox)
	wasm   = "kuasar-wasm"  // wasm-sandboxer; one series per engine
	quark  = "kuasar-quark" // quark-sandboxer's gVisor engine; one series per platform
)

// knownRuntimes in the order their series are listed.
var knownRuntimes = []string{kuasar, shim, wasm, quark}

// Annotations that choose a series' variant per pod.
const (
	// wasmEngineAnnotation is wasm-sandboxer's wasmrt.EngineAnnotation
	// (CRI passes it on because the handler lists it in pod_annotations).
	wasmEngineAnnotation = "wasm.kuasar-go.io/engine"
	// gvisorPlatformAnnotation is quark-sandboxer's sandbox.AnnotationPlatform
	// (read from the CRI pod config by the sandbox controller).
	gvisorPlatformAnnotation = "quark.kuasar-go.io/gvisor-platform"
)

// series is one line of figures: a runtime handler, and for wasm and
// quark a variant chosen per pod by annotation.
type series struct {
	// Name is the series' key in the CSVs: the handler, or handler/variant
	// ("kuasar-wasm/wazero", "kuasar-quark/systrap").
	Name    string
	Handler string
	Variant string // wasm engine or gVisor platform; "" for runc ones
}

// seriesOf parses a series name as written in the CSVs.
func seriesOf(name string) series {
	h, v, _ := strings.Cut(name, "/")
	return series{Name: name, Handler: h, Variant: v}
}

// Label is the series' name in tables and legends.
func (s series) Label() string {
	switch s.Handler {
	case shim:
		return "runc shim + pause"
	case wasm:
		if s.Variant != "" {
			return fmt.Sprintf("kuasar-wasm (%s)", s.Variant)
		}
	case quark:
		if s.Variant != "" {
			return fmt.Sprintf("kuasar-quark (gVisor %s)", s.Variant)
		}
	}
	return s.Name
}

// annotations are the pod annotations that pick the variant.
func (s series) annotations() map[string]string {
	switch {
	case s.Variant == "":
		return nil
	case s.Handler == wasm:
		return map[string]string{wasmEngineAnnotation: s.Variant}
	case s.Handler == quark:
		return map[string]string{gvisorPlatformAnnotation: s.Variant}
	}
	return nil
}

// container is the pod's one container: it prints marker, then stays up.
func (s series) container() *runtime.ContainerConfig {
	c := &runtime.ContainerConfig{
		Metadata: &runtime.ContainerMetadata{Name: "bench"},
		Image:    &runtime.ImageSpec{Image: testenv.BusyboxImage},
		Args:     []string{"sh", "-c", "echo " + marker + "; exec sleep 86400"},
		LogPath:  "bench_0.log",
		Linux:    &runtime.LinuxContainerConfig{},
	}
	if s.Handler == wasm {
		// The WASI test program: print the marker, then sleep until killed.
		c.Image = &runtime.ImageSpec{Image: testenv.WasmImage}
		c.Command = []string{"/app.wasm"}
		c.Args = []string{"echo", marker, "forever"}
	}
	return c
}

// parseSeries turns --runtime, --wasm-engines and --gvisor-platforms into
// the series of a run, in the order given.
func parseSeries(runtimes, engines, platforms string) ([]series, error) {
	var out []series
	seen := map[string]bool{}
	add := func(s series) {
		if !seen[s.Name] {
			seen[s.Name] = true
			out = append(out, s)
		}
	}
	for _, rt := range splitList(runtimes) {
		switch rt {
		case kuasar, shim:
			add(series{Name: rt, Handler: rt})
		case wasm, quark:
			list, flagName := engines, "--wasm-engines"
			if rt == quark {
				list, flagName = platforms, "--gvisor-platforms"
			}
			vs := splitList(list)
			if len(vs) == 0 {
				return nil, fmt.Errorf("%s: no %s given", rt, flagName)
			}
			for _, v := range vs {
				if strings.ContainsAny(v, "/ ") {
					return nil, fmt.Errorf("%s: bad name %q", flagName, v)
				}
				add(series{Name: rt + "/" + v, Handler: rt, Variant: v})
			}
		default:
			return nil, fmt.Errorf("unknown runtime %q (known: %s)", rt, strings.Join(knownRuntimes, ", "))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no runtime given")
	}
	return out, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// handlers are the distinct runtime handlers of the series, in order.
func handlers(ss []series) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range ss {
		if !seen[s.Handler] {
			seen[s.Handler] = true
			out = append(out, s.Handler)
		}
	}
	return out
}

// hasShim tells whether the shim is in the run: the only case where ratios
// are given (every other series against it).
func hasShim(ss []series) bool {
	for _, s := range ss {
		if s.Handler == shim {
			return true
		}
	}
	return false
}

// palette: kuasar-runc blue and the shim orange as before, then the rest.
var palette = []color.Color{
	color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff}, // green
	color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff}, // red
	color.RGBA{R: 0x94, G: 0x67, B: 0xbd, A: 0xff}, // purple
	color.RGBA{R: 0x8c, G: 0x56, B: 0x4b, A: 0xff}, // brown
	color.RGBA{R: 0xe3, G: 0x77, B: 0xc2, A: 0xff}, // pink
	color.RGBA{R: 0x7f, G: 0x7f, B: 0x7f, A: 0xff}, // grey
	color.RGBA{R: 0xbc, G: 0xbd, B: 0x22, A: 0xff}, // olive
	color.RGBA{R: 0x17, G: 0xbe, B: 0xcf, A: 0xff}, // cyan
}

// colors gives each series of a run its colour.
func colors(ss []series) map[string]color.Color {
	out := map[string]color.Color{}
	i := 0
	for _, s := range ss {
		switch s.Name {
		case kuasar:
			out[s.Name] = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff} // blue
		case shim:
			out[s.Name] = color.RGBA{R: 0xff, G: 0x7f, B: 0x0e, A: 0xff} // orange
		default:
			out[s.Name] = palette[i%len(palette)]
			i++
		}
	}
	return out
}
