package wasmrt

import (
	"bytes"
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
// into the modules directory (content-addressed, verified) unless already
// there.
func (h *hook) artifactModule(ctx context.Context, image string) (string, error) {
	if h.cfg.ContainerdAddress == "" {
		return "", errNotArtifact
	}
	ns, ok := namespaces.Namespace(ctx)
	if !ok {
		return "", errNotArtifact
	}
	cctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), ns), time.Minute)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+h.cfg.ContainerdAddress, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", fmt.Errorf("containerd %s: %w", h.cfg.ContainerdAddress, err)
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
				return h.fetchModule(cctx, content, l)
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

// fetchModule copies a layer blob to <modules dir>/<hex>.wasm, a chunk at
// a time: never the whole module in the daemon's memory.
func (h *hook) fetchModule(ctx context.Context, content contentapi.ContentClient, l ociDescriptor) (string, error) {
	hexDigest, ok := strings.CutPrefix(l.Digest, "sha256:")
	if !ok || len(hexDigest) != 64 || strings.ContainsAny(hexDigest, "/.") {
		return "", fmt.Errorf("wasm layer digest %q: %w", l.Digest, errdefs.ErrInvalidArgument)
	}
	max := h.cfg.Compile.MaxModuleSize
	if l.Size > max {
		return "", fmt.Errorf("wasm layer %s is %d bytes, more than the %d bytes allowed (wasm.max_module_size_mib): %w", l.Digest, l.Size, max, errdefs.ErrInvalidArgument)
	}
	path := filepath.Join(h.cfg.ModulesDir, hexDigest+".wasm")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := os.MkdirAll(h.cfg.ModulesDir, 0o700); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(h.cfg.ModulesDir, ".tmp-*")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	err = copyBlob(ctx, content, l.Digest, max, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", err
	}
	return path, os.Rename(f.Name(), path)
}

// readBlob reads a blob of at most max bytes and checks its digest.
func readBlob(ctx context.Context, content contentapi.ContentClient, digest string, max int64) ([]byte, error) {
	var b bytes.Buffer
	if err := copyBlob(ctx, content, digest, max, &b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// copyBlob writes a blob of at most max bytes to w as it arrives, and
// checks its digest.
func copyBlob(ctx context.Context, content contentapi.ContentClient, digest string, max int64, w io.Writer) error {
	stream, err := content.Read(ctx, &contentapi.ReadContentRequest{Digest: digest})
	if err != nil {
		return fmt.Errorf("read blob %s: %w", digest, err)
	}
	h := sha256.New()
	var n int64
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read blob %s: %w", digest, err)
		}
		if n += int64(len(resp.Data)); n > max {
			return fmt.Errorf("blob %s is larger than %d bytes: %w", digest, max, errdefs.ErrInvalidArgument)
		}
		h.Write(resp.Data)
		if _, err := w.Write(resp.Data); err != nil {
			return err
		}
	}
	if "sha256:"+hex.EncodeToString(h.Sum(nil)) != digest {
		return fmt.Errorf("blob %s does not match its digest", digest)
	}
	return nil
}
