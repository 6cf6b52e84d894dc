package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"sync"
	"testing"
	"time"

	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

const (
	// WasmImage holds the WASI test program (GOOS=wasip1) as /app.wasm,
	// the hand-made modules of WasmModules and /etc/greeting.
	WasmImage = "localhost/kuasar-go/wasm-test:latest"
	// WasmNativeImage holds the same program built for Linux as /app, for
	// comparing a wasm container with a native one.
	WasmNativeImage = "localhost/kuasar-go/wasm-test-native:latest"
	// WasmGreeting is the content of /etc/greeting in both images.
	WasmGreeting = "greetings from the image's rootfs"
)

// wasmProgramSource is the test program, built for wasip1 and for Linux.
// Its arguments are commands run in order:
//
//	args | env | cwd            print os.Args, the environment, the working directory
//	echo WORD | stderr WORD    print WORD to stdout / stderr
//	cat PATH | write PATH TEXT read or write a file
//	alloc MIB                  allocate and touch MIB MiB, then print "allocated MIB MiB"
//	sleep SECONDS | forever    sleep (forever: until killed)
//	ticks                      print tick-0, tick-1, ... twice a second, until killed
//	exit CODE                  exit with CODE
const wasmProgramSource = `package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

var keep [][]byte

func need(i int) string {
	if i >= len(os.Args) {
		fmt.Fprintf(os.Stderr, "missing operand for %s\n", os.Args[i-1])
		os.Exit(64)
	}
	return os.Args[i]
}

func num(s string) int {
	n, err := strconv.Atoi(s)
	if err != nil {
		fmt.Fprintf(os.Stderr, "not a number: %q\n", s)
		os.Exit(64)
	}
	return n
}

func main() {
	for i := 1; i < len(os.Args); i++ {
		switch cmd := os.Args[i]; cmd {
		case "args":
			for j, a := range os.Args {
				fmt.Printf("arg[%d]=%s\n", j, a)
			}
		case "env":
			for _, e := range os.Environ() {
				fmt.Printf("env:%s\n", e)
			}
		case "cwd":
			d, err := os.Getwd()
			fmt.Printf("cwd=%s %v\n", d, err)
		case "echo":
			i++
			fmt.Println(need(i))
		case "stderr":
			i++
			fmt.Fprintln(os.Stderr, need(i))
		case "cat":
			i++
			b, err := os.ReadFile(need(i))
			if err != nil {
				fmt.Fprintf(os.Stderr, "cat: %v\n", err)
				os.Exit(1)
			}
			fmt.Printf("%s\n", b)
		case "write":
			i += 2
			if err := os.WriteFile(need(i-1), []byte(need(i)), 0o644); err != nil {
				fmt.Fprintf(os.Stderr, "write: %v\n", err)
				os.Exit(1)
			}
		case "alloc":
			i++
			n := num(need(i))
			for k := 0; k < n; k++ {
				b := make([]byte, 1<<20)
				for p := 0; p < len(b); p += 4096 {
					b[p] = 1
				}
				keep = append(keep, b)
			}
			fmt.Printf("allocated %d MiB\n", n)
		case "sleep":
			i++
			time.Sleep(time.Duration(num(need(i))) * time.Second)
		case "forever":
			fmt.Println("running until killed")
			for {
				time.Sleep(time.Second)
			}
		case "ticks":
			for n := 0; ; n++ {
				fmt.Printf("tick-%d\n", n)
				time.Sleep(500 * time.Millisecond)
			}
		case "exit":
			i++
			os.Exit(num(need(i)))
		default:
			fmt.Fprintf(os.Stderr, "unknown command %q\n", cmd)
			os.Exit(64)
		}
	}
}
`

// WasmModules are small hand-assembled modules the wasm image carries
// beside /app.wasm, by path.
var WasmModules = map[string][]byte{
	// _start executes unreachable: a trap.
	"/trap.wasm": {
		0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
		0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // type 0: () -> ()
		0x03, 0x02, 0x01, 0x00, // func 0: type 0
		0x07, 0x0a, 0x01, 0x06, '_', 's', 't', 'a', 'r', 't', 0x00, 0x00, // export _start
		0x0a, 0x05, 0x01, 0x03, 0x00, 0x00, 0x0b, // body: unreachable
	},
	// imports env.nosuch, which no engine provides, and calls it.
	"/badimport.wasm": {
		0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
		0x01, 0x04, 0x01, 0x60, 0x00, 0x00,
		0x02, 0x0e, 0x01, 0x03, 'e', 'n', 'v', 0x06, 'n', 'o', 's', 'u', 'c', 'h', 0x00, 0x00,
		0x03, 0x02, 0x01, 0x00,
		0x07, 0x0a, 0x01, 0x06, '_', 's', 't', 'a', 'r', 't', 0x00, 0x01,
		0x0a, 0x06, 0x01, 0x04, 0x00, 0x10, 0x00, 0x0b, // body: call 0
	},
	// exits through _start returning: status 0, no output.
	"/empty.wasm": {
		0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
		0x01, 0x04, 0x01, 0x60, 0x00, 0x00,
		0x03, 0x02, 0x01, 0x00,
		0x07, 0x0a, 0x01, 0x06, '_', 's', 't', 'a', 'r', 't', 0x00, 0x00,
		0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b,
	},
	// not a module at all.
	"/notwasm.wasm": []byte("#!/bin/sh\necho this is not wasm\n"),
}

var (
	programMu    sync.Mutex
	programCache = map[string][]byte{}
)

// WasmTestProgram builds the test program for goos/goarch ("wasip1",
// "wasm" or "linux", runtime.GOARCH) with reproducible flags, once per
// process and target, and returns the binary.
func WasmTestProgram(goos, goarch string) ([]byte, error) {
	key := goos + "/" + goarch
	programMu.Lock()
	defer programMu.Unlock()
	if b, ok := programCache[key]; ok {
		return b, nil
	}
	goBin, err := goBinary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "kgwasm-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module wasmtest\n\ngo 1.21\n"), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(wasmProgramSource), 0o644); err != nil {
		return nil, err
	}
	out := filepath.Join(dir, "prog")
	cmd := exec.Command(goBin, "build", "-trimpath", "-buildvcs=false",
		"-ldflags=-s -w -buildid=", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOOS="+goos, "GOARCH="+goarch, "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build wasm test program for %s: %v: %s", key, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return nil, err
	}
	programCache[key] = b
	return b, nil
}

// WasmImageTar builds WasmImage: /app.wasm (the test program for wasip1),
// the WasmModules, /etc/greeting and /data (a writable directory);
// Entrypoint ["/app.wasm"].
func WasmImageTar() ([]byte, error) {
	prog, err := WasmTestProgram("wasip1", "wasm")
	if err != nil {
		return nil, err
	}
	files := append(baseFiles(),
		ImageFile{Path: "/app.wasm", Mode: 0o755, Data: prog},
		ImageFile{Path: "/etc/greeting", Mode: 0o644, Data: []byte(WasmGreeting)},
		ImageFile{Path: "/data", Dir: true, Mode: 0o777},
	)
	for p, b := range WasmModules {
		files = append(files, ImageFile{Path: p, Mode: 0o755, Data: b})
	}
	return ImageTar(ImageSpec{
		Name:       WasmImage,
		Files:      files,
		Env:        []string{"IMAGE_ENV=from-image"},
		Entrypoint: []string{"/app.wasm"},
	})
}

// WasmNativeImageTar builds WasmNativeImage: the same program for Linux as
// /app and /etc/greeting; Entrypoint ["/app"].
func WasmNativeImageTar() ([]byte, error) {
	prog, err := WasmTestProgram("linux", goruntime.GOARCH)
	if err != nil {
		return nil, err
	}
	return ImageTar(ImageSpec{
		Name: WasmNativeImage,
		Files: append(baseFiles(),
			ImageFile{Path: "/app", Mode: 0o755, Data: prog},
			ImageFile{Path: "/etc/greeting", Mode: 0o644, Data: []byte(WasmGreeting)},
		),
		Env:        []string{"IMAGE_ENV=from-image"},
		Entrypoint: []string{"/app"},
	})
}

// ImportImage imports an OCI image layout tar into the env's containerd
// (namespace k8s.io) and waits until CRI sees ref. importArgs go to
// `ctr images import`, e.g. --all-platforms for an image of another
// platform (a wasm artifact's wasip1/wasm).
func (e *Env) ImportImage(t testing.TB, layout []byte, ref string, importArgs ...string) {
	t.Helper()
	p := filepath.Join(e.Dir, "import-"+randHex(8)+".tar")
	if err := os.WriteFile(p, layout, 0o644); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	defer os.Remove(p)
	if _, err := e.Ctr(append(append([]string{"images", "import"}, importArgs...), p)...); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := e.Images.ImageStatus(ctx, &runtime.ImageStatusRequest{Image: &runtime.ImageSpec{Image: ref}})
		cancel()
		if err == nil && st.GetImage() != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("testenv: CRI does not see imported image %s (err %v)", ref, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Media types of wasm OCI artifacts: the CNCF TAG Runtime "Wasm OCI
// Artifact" layout (config application/vnd.wasm.config.v0+json, layers
// application/wasm) and the module and component layers runwasi accepts.
const (
	MediaTypeWasmConfig         = "application/vnd.wasm.config.v0+json"
	MediaTypeWasmLayer          = "application/wasm"
	MediaTypeWasmModuleLayer    = "application/vnd.w3c.wasm.module.v1+wasm"
	MediaTypeWasmComponentLayer = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
)

// WasmArtifactTar builds an OCI image layout tar holding name as a wasm
// artifact: a manifest whose config has configMediaType and whose one layer
// is the raw module with layerMediaType (no tar), platform wasip1/wasm, the
// layout of the CNCF TAG Runtime Wasm OCI Artifact and of runwasi's images.
func WasmArtifactTar(name, configMediaType, layerMediaType string, wasm []byte) ([]byte, error) {
	type descriptor struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations,omitempty"`
		Platform    map[string]string `json:"platform,omitempty"`
	}
	// The config lists the layers but has no rootfs: containerd then
	// unpacks nothing (no layer of an artifact is a tar) and CRI runs the
	// container on an empty rootfs.
	config := map[string]any{
		"created":      epoch.Format(time.RFC3339),
		"architecture": "wasm",
		"os":           "wasip1",
		"layerDigests": []string{digestOf(wasm)},
	}
	if layerMediaType == MediaTypeWasmComponentLayer {
		config["os"] = "wasip2"
		config["component"] = map[string]any{"target": "wasi:cli/command@0.2.0"}
	}
	cfg, err := json.Marshal(config)
	if err != nil {
		return nil, err
	}
	man, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeManifest,
		"artifactType":  configMediaType,
		"config":        descriptor{MediaType: configMediaType, Digest: digestOf(cfg), Size: len(cfg)},
		"layers":        []descriptor{{MediaType: layerMediaType, Digest: digestOf(wasm), Size: len(wasm)}},
	})
	if err != nil {
		return nil, err
	}
	tag := "latest"
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		tag = name[i+1:]
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeIndex,
		"manifests": []descriptor{{
			MediaType: mediaTypeManifest, Digest: digestOf(man), Size: len(man),
			Annotations: map[string]string{"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
			Platform:    map[string]string{"architecture": "wasm", "os": "wasip1"},
		}},
	})
	if err != nil {
		return nil, err
	}
	files := []ImageFile{
		{Path: "/blobs/sha256", Dir: true, Mode: 0o755},
		{Path: "/index.json", Mode: 0o644, Data: index},
		{Path: "/oci-layout", Mode: 0o644, Data: []byte(`{"imageLayoutVersion":"1.0.0"}`)},
	}
	for _, b := range [][]byte{cfg, man, wasm} {
		files = append(files, ImageFile{Path: "/blobs/sha256/" + strings.TrimPrefix(digestOf(b), "sha256:"), Mode: 0o644, Data: b})
	}
	return layerTar(files)
}
