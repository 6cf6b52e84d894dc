package wasmrt

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	imagesapi "github.com/containerd/containerd/api/services/images/v1"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// Wasm OCI artifacts (a manifest whose layer is the raw module, not a
// tar) are stored by containerd 2.2 but not unpacked: CRI gives such a
// container an empty rootfs. The module is then read from containerd's
// content store, as runwasi does.

// Layer media types of a wasm module; components are refused (the engines
// run WASI preview 1 commands).
var (
	wasmLayerTypes = map[string]bool{
		"application/wasm":                           true, // CNCF TAG Runtime Wasm OCI Artifact
		"application/vnd.w3c.wasm.module.v1+wasm":    true, // runwasi
		"application/vnd.wasm.content.layer.v1+wasm": true, // wasm-to-oci
	}
	componentLayerType = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
)

// imageNameAnnotation is where CRI records a container's image.
const imageNameAnnotation = "io.kubernetes.cri.image-name"

// maxManifestSize bounds the index and manifest blobs read.
const maxManifestSize = 4 << 20

type ociDescriptor struct {
	MediaType string            `json:"mediaType"`
	Digest    string            `json:"digest"`
	Size      int64             `json:"size"`
	Platform  map[string]string `json:"platform,omitempty"`
}

type ociManifest struct {
	MediaType string          `json:"mediaType"`
	Manifests []ociDescriptor `json:"manifests"` // an index
	Layers    []ociDescriptor `json:"layers"`    // a manifest
}

// errNotArtifact: the image holds no wasm layer.
var errNotArtifact = errors.New("image is not a wasm artifact")

// artifactModule returns the host path of the module of the wasm artifact
// image named in ctx's namespace, fetched from containerd's content store
// into dir (content-addressed, verified) unless already there.
func (rt *Runtime) artifactModule(ctx context.Context, image string) (string, error) {
	if rt.cfg.ContainerdAddress == "" {
		return "", errNotArtifact
	}
	ns, ok := namespaces.Namespace(ctx)
	if !ok {
		return "", errNotArtifact
	}
	cctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), time.Minute)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+rt.cfg.ContainerdAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", fmt.Errorf("containerd %s: %w", rt.cfg.ContainerdAddress, err)
	}
	defer conn.Close()
	img, err := imagesapi.NewImagesClient(conn).Get(cctx, &imagesapi.GetImageRequest{Name: image})
	if err != nil {
		return "", fmt.Errorf("image %s: %w", image, err)
	}
	content := contentapi.NewContentClient(conn)
	target := img.GetImage().GetTarget()
	desc := ociDescriptor{MediaType: target.GetMediaType(), Digest: target.GetDigest(), Size: target.GetSize()}
	for depth := 0; ; depth++ {
		if depth > 2 {
			return "", fmt.Errorf("image %s: indexes nest too deep", image)
		}
		data, err := readBlob(cctx, content, desc.Digest, maxManifestSize)
		if err != nil {
			return "", fmt.Errorf("image %s: %w", image, err)
		}
		var m ociManifest
		if err := json.Unmarshal(data, &m); err != nil {
			return "", fmt.Errorf("image %s: manifest %s: %w", image, desc.Digest, err)
		}
		if len(m.Manifests) > 0 {
			desc = pickManifest(m.Manifests)
			continue
		}
		for _, l := range m.Layers {
			if l.MediaType == componentLayerType {
				return "", fmt.Errorf("image %s is a WASI component (%s); only WASI preview 1 modules run here: %w", image, l.MediaType, errdefs.ErrInvalidArgument)
			}
			if wasmLayerTypes[l.MediaType] {
				return rt.fetchModule(cctx, content, l)
			}
		}
		return "", errNotArtifact
	}
}

// pickManifest prefers a wasm platform entry of an index.
func pickManifest(ms []ociDescriptor) ociDescriptor {
	for _, m := range ms {
		if m.Platform["architecture"] == "wasm" || strings.HasPrefix(m.Platform["os"], "wasi") {
			return m
		}
	}
	return ms[0]
}

// fetchModule copies a layer blob to <modules dir>/<hex>.wasm.
func (rt *Runtime) fetchModule(ctx context.Context, content contentapi.ContentClient, l ociDescriptor) (string, error) {
	hexDigest, ok := strings.CutPrefix(l.Digest, "sha256:")
	if !ok || len(hexDigest) != 64 || strings.ContainsAny(hexDigest, "/.") {
		return "", fmt.Errorf("wasm layer digest %q: %w", l.Digest, errdefs.ErrInvalidArgument)
	}
	path := filepath.Join(rt.cfg.ModulesDir, hexDigest+".wasm")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	data, err := readBlob(ctx, content, l.Digest, maxModuleSize)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(rt.cfg.ModulesDir, 0o700); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(rt.cfg.ModulesDir, ".tmp-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return path, os.Rename(f.Name(), path)
}

// readBlob reads a blob of at most max bytes and checks its digest.
func readBlob(ctx context.Context, content contentapi.ContentClient, digest string, max int64) ([]byte, error) {
	stream, err := content.Read(ctx, &contentapi.ReadContentRequest{Digest: digest})
	if err != nil {
		return nil, fmt.Errorf("read blob %s: %w", digest, err)
	}
	var data []byte
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read blob %s: %w", digest, err)
		}
		data = append(data, resp.Data...)
		if int64(len(data)) > max {
			return nil, fmt.Errorf("blob %s is larger than %d bytes: %w", digest, max, errdefs.ErrInvalidArgument)
		}
	}
	sum := sha256.Sum256(data)
	if "sha256:"+hex.EncodeToString(sum[:]) != digest {
		return nil, fmt.Errorf("blob %s does not match its digest", digest)
	}
	return data, nil
}
