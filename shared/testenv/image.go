// Package testenv is the end-to-end test harness of the sandboxers: it builds
// small OCI images locally (no registry), runs a stock containerd in a
// temporary root next to the sandboxer daemons under test, talks CRI to it,
// and checks that nothing leaks (processes, mounts, netns, links, cgroups).
package testenv

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"
)

const (
	// BusyboxImage is the name under which BuildBusyboxImage's image is imported.
	BusyboxImage = "localhost/kuasar-go/busybox:latest"
	// PauseImage is the name of the pause image that BuildPauseImage builds; the
	// harness pins it as CRI's sandbox image, which only stock runc pods use.
	PauseImage = "localhost/kuasar-go/pause:latest"

	// BusyboxPath is where the statically linked busybox of busybox-static lives.
	BusyboxPath = "/bin/busybox"

	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayerGz  = "application/vnd.oci.image.layer.v1.tar+gzip"

	defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// BusyboxApplets are the applets the busybox image links in /bin.
var BusyboxApplets = []string{
	"sh", "echo", "cat", "sleep", "ls", "hostname", "ip", "ps", "id", "env",
	"true", "false", "wget", "nc", "mkdir", "readlink", "dd", "head", "grep",
	"uname", "dmesg", "printf", "test", "kill", "top", "ifconfig", "route",
	"mount", "umount", "tail", "wc", "rm", "touch", "cp", "mv", "ln", "sed",
	"stat", "ping", "nslookup", "seq", "tr", "cut", "sort", "tee", "yes",
	"timeout", "nproc", "df", "free", "pwd", "sync", "chmod", "whoami",
	"nsenter", "unshare", "[", "[[",
}

// epoch is the modification time of every entry in the images built here.
var epoch = time.Unix(0, 0).UTC()

// ImageFile is one entry of an image layer. Exactly one of Data (regular
// file), Link (symlink) or Dir (directory) applies.
type ImageFile struct {
	Path string // absolute path in the image, e.g. /bin/sh
	Mode fs.FileMode
	Data []byte
	Link string
	Dir  bool
}

// ImageSpec describes a single-layer image.
type ImageSpec struct {
	Name       string // full reference, e.g. localhost/kuasar-go/busybox:latest
	Files      []ImageFile
	Env        []string
	Entrypoint []string
	Cmd        []string
	WorkingDir string
}

// BuildBusyboxImage writes an OCI image layout tar to path holding
// BusyboxImage: /bin/busybox plus applet symlinks, /etc/passwd, /etc/group,
// /tmp; Cmd ["sh"]. The same busybox binary always yields the same bytes.
func BuildBusyboxImage(path string) error {
	b, err := BusyboxImageTar()
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// BusyboxImageTar returns the bytes BuildBusyboxImage writes.
func BusyboxImageTar() ([]byte, error) {
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("read busybox (install busybox-static): %w", err)
	}
	files := append(baseFiles(), ImageFile{Path: "/bin/busybox", Mode: 0o755, Data: bb})
	for _, a := range BusyboxApplets {
		files = append(files, ImageFile{Path: "/bin/" + a, Mode: 0o777, Link: "busybox"})
	}
	return ImageTar(ImageSpec{
		Name:  BusyboxImage,
		Files: files,
		Env:   []string{defaultPath},
		Cmd:   []string{"sh"},
	})
}

// baseFiles is the skeleton every image built here has.
func baseFiles() []ImageFile {
	return []ImageFile{
		{Path: "/bin", Dir: true, Mode: 0o755},
		{Path: "/dev", Dir: true, Mode: 0o755},
		{Path: "/etc", Dir: true, Mode: 0o755},
		{Path: "/proc", Dir: true, Mode: 0o555},
		{Path: "/root", Dir: true, Mode: 0o700},
		{Path: "/sys", Dir: true, Mode: 0o555},
		{Path: "/tmp", Dir: true, Mode: 0o777 | fs.ModeSticky},
		{Path: "/var", Dir: true, Mode: 0o755},
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte(
			"root:x:0:0:root:/root:/bin/sh\n" +
				"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{Path: "/etc/group", Mode: 0o644, Data: []byte("root:x:0:\nnogroup:x:65534:\n")},
	}
}

// ImageTar builds a deterministic OCI image layout tar holding one image.
func ImageTar(spec ImageSpec) ([]byte, error) {
	if spec.Name == "" {
		return nil, fmt.Errorf("image name is empty")
	}
	layerBytes, err := layerTar(spec.Files)
	if err != nil {
		return nil, err
	}
	diffID := digestOf(layerBytes)
	layer, err := gzipBytes(layerBytes)
	if err != nil {
		return nil, err
	}

	type rootfs struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	}
	type imgConfig struct {
		Env        []string `json:"Env,omitempty"`
		Entrypoint []string `json:"Entrypoint,omitempty"`
		Cmd        []string `json:"Cmd,omitempty"`
		WorkingDir string   `json:"WorkingDir,omitempty"`
	}
	type image struct {
		Created      string    `json:"created"`
		Architecture string    `json:"architecture"`
		OS           string    `json:"os"`
		Config       imgConfig `json:"config"`
		RootFS       rootfs    `json:"rootfs"`
	}
	cfg, err := json.Marshal(image{
		Created:      epoch.Format(time.RFC3339),
		Architecture: runtime.GOARCH,
		OS:           "linux",
		Config: imgConfig{
			Env: spec.Env, Entrypoint: spec.Entrypoint, Cmd: spec.Cmd,
			WorkingDir: spec.WorkingDir,
		},
		RootFS: rootfs{Type: "layers", DiffIDs: []string{diffID}},
	})
	if err != nil {
		return nil, err
	}

	type descriptor struct {
		MediaType   string            `json:"mediaType"`
		Digest      string            `json:"digest"`
		Size        int               `json:"size"`
		Annotations map[string]string `json:"annotations,omitempty"`
		Platform    map[string]string `json:"platform,omitempty"`
	}
	type manifest struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Config        descriptor   `json:"config"`
		Layers        []descriptor `json:"layers"`
	}
	man, err := json.Marshal(manifest{
		SchemaVersion: 2,
		MediaType:     mediaTypeManifest,
		Config:        descriptor{MediaType: mediaTypeConfig, Digest: digestOf(cfg), Size: len(cfg)},
		Layers:        []descriptor{{MediaType: mediaTypeLayerGz, Digest: digestOf(layer), Size: len(layer)}},
	})
	if err != nil {
		return nil, err
	}

	tag := "latest"
	if i := strings.LastIndex(spec.Name, ":"); i > strings.LastIndex(spec.Name, "/") {
		tag = spec.Name[i+1:]
	}
	index, err := json.Marshal(struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Manifests     []descriptor `json:"manifests"`
	}{
		SchemaVersion: 2,
		MediaType:     mediaTypeIndex,
		Manifests: []descriptor{{
			MediaType: mediaTypeManifest,
			Digest:    digestOf(man),
			Size:      len(man),
			Annotations: map[string]string{
				"io.containerd.image.name":          spec.Name,
				"org.opencontainers.image.ref.name": tag,
			},
			Platform: map[string]string{"architecture": runtime.GOARCH, "os": "linux"},
		}},
	})
	if err != nil {
		return nil, err
	}

	blobs := map[string][]byte{}
	for _, b := range [][]byte{cfg, man, layer} {
		blobs[strings.TrimPrefix(digestOf(b), "sha256:")] = b
	}
	out := []ImageFile{
		{Path: "/blobs", Dir: true, Mode: 0o755},
		{Path: "/blobs/sha256", Dir: true, Mode: 0o755},
		{Path: "/index.json", Mode: 0o644, Data: index},
		{Path: "/oci-layout", Mode: 0o644, Data: []byte(`{"imageLayoutVersion":"1.0.0"}`)},
	}
	for h, b := range blobs {
		out = append(out, ImageFile{Path: "/blobs/sha256/" + h, Mode: 0o644, Data: b})
	}
	return layerTar(out)
}

// layerTar writes files as a tar with sorted names, fixed times and owners,
// adding missing parent directories.
func layerTar(files []ImageFile) ([]byte, error) {
	byPath := map[string]ImageFile{}
	for _, f := range files {
		p := path.Clean("/" + f.Path)
		if p == "/" {
			continue
		}
		f.Path = p
		byPath[p] = f
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if _, ok := byPath[d]; !ok {
				byPath[d] = ImageFile{Path: d, Dir: true, Mode: 0o755}
			}
		}
	}
	paths := make([]string, 0, len(byPath))
	for p := range byPath {
		paths = append(paths, p)
	}
	sort.Strings(paths)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		f := byPath[p]
		h := &tar.Header{
			Name:    strings.TrimPrefix(p, "/"),
			Mode:    int64(f.Mode.Perm()),
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		if f.Mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		if f.Mode&fs.ModeSetuid != 0 {
			h.Mode |= 0o4000
		}
		switch {
		case f.Dir:
			h.Typeflag = tar.TypeDir
			h.Name += "/"
		case f.Link != "":
			h.Typeflag = tar.TypeSymlink
			h.Linkname = f.Link
		default:
			h.Typeflag = tar.TypeReg
			h.Size = int64(len(f.Data))
		}
		// USTAR when it fits keeps the bytes free of PAX time records.
		if len(h.Name) < 100 && len(h.Linkname) < 100 {
			h.Format = tar.FormatUSTAR
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("tar %s: %w", p, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// gzipBytes compresses with a header that carries no name and no mtime.
func gzipBytes(b []byte) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return nil, err
	}
	zw.Header = gzip.Header{OS: 255}
	if _, err := zw.Write(b); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func digestOf(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// ImageDigest returns the manifest digest named in an image layout tar's
// index.json, e.g. to compare two builds.
func ImageDigest(layout []byte) (string, error) {
	tr := tar.NewReader(bytes.NewReader(layout))
	for {
		h, err := tr.Next()
		if err != nil {
			return "", fmt.Errorf("index.json not found: %w", err)
		}
		if h.Name != "index.json" {
			continue
		}
		var idx struct {
			Manifests []struct {
				Digest string `json:"digest"`
			} `json:"manifests"`
		}
		if err := json.NewDecoder(tr).Decode(&idx); err != nil {
			return "", err
		}
		if len(idx.Manifests) == 0 {
			return "", fmt.Errorf("index.json has no manifests")
		}
		return idx.Manifests[0].Digest, nil
	}
}
