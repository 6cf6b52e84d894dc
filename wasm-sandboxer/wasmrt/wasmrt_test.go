package wasmrt

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-go/kuasar-go/wasm-sandboxer/engine"
)

// TestEngineFor: the engine annotation chooses only among the engines the
// operator allowed; an engine the build lacks is InvalidArgument.
func TestEngineFor(t *testing.T) {
	tests := []struct {
		name       string
		allowed    []string
		annotation string
		want       string
		wantErr    error
		wantMsg    string
	}{
		{name: "default", want: "wazero"},
		{name: "default named", annotation: "wazero", want: "wazero"},
		{name: "allowed", allowed: []string{"wazero", "other"}, annotation: "wazero", want: "wazero"},
		{name: "not allowed", annotation: "other", wantErr: errdefs.ErrPermissionDenied, wantMsg: "wasm.allowed_engines: wazero"},
		{name: "not in the allowed list", allowed: []string{"wazero"}, annotation: "other", wantErr: errdefs.ErrPermissionDenied, wantMsg: "did not allow"},
		{name: "unknown", allowed: []string{"wazero"}, annotation: "v8", wantErr: errdefs.ErrInvalidArgument, wantMsg: `unknown wasm engine "v8"`},
	}
	other := ""
	for _, n := range engine.Names() {
		if n != "wazero" {
			other = n
		}
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if other == "" && slices.Contains(append(tc.allowed, tc.annotation), "other") {
				t.Skip("this build has wazero only")
			}
			for i, a := range tc.allowed {
				if a == "other" {
					tc.allowed[i] = other
				}
			}
			if tc.annotation == "other" {
				tc.annotation = other
			}
			allowed := tc.allowed
			if len(allowed) == 0 {
				allowed = []string{"wazero"}
			}
			h := &hook{cfg: Config{Engine: "wazero", AllowedEngines: allowed}}
			spec := &specs.Spec{Annotations: map[string]string{}}
			if tc.annotation != "" {
				spec.Annotations[EngineAnnotation] = tc.annotation
			}
			got, err := h.engineFor(spec)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), tc.wantMsg) {
					t.Fatalf("error %v, want %v naming %q", err, tc.wantErr, tc.wantMsg)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("engine %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
