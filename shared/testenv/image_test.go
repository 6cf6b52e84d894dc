package testenv

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func readTar(t *testing.T, b []byte) (map[string]*tar.Header, map[string][]byte, []string) {
	t.Helper()
	hdrs := map[string]*tar.Header{}
	data := map[string][]byte{}
	var order []string
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		d, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		hdrs[h.Name] = h
		data[h.Name] = d
		order = append(order, h.Name)
	}
	return hdrs, data, order
}

func TestBuildBusyboxImage(t *testing.T) {
	if _, err := os.Stat(BusyboxPath); err != nil {
		t.Skipf("%s missing (apt-get install busybox-static)", BusyboxPath)
	}
	dir := t.TempDir()
	p1, p2 := filepath.Join(dir, "a.tar"), filepath.Join(dir, "b.tar")
	if err := BuildBusyboxImage(p1); err != nil {
		t.Fatal(err)
	}
	if err := BuildBusyboxImage(p2); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(p1)
	b, _ := os.ReadFile(p2)
	if !bytes.Equal(a, b) {
		t.Fatal("two builds differ")
	}

	hdrs, data, order := readTar(t, a)
	for i := 1; i < len(order); i++ {
		if order[i-1] >= order[i] {
			t.Errorf("entries not sorted: %q before %q", order[i-1], order[i])
		}
	}
	if string(data["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %q", data["oci-layout"])
	}
	var idx struct {
		Manifests []struct {
			MediaType   string            `json:"mediaType"`
			Digest      string            `json:"digest"`
			Size        int               `json:"size"`
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(data["index.json"], &idx); err != nil {
		t.Fatal(err)
	}
	if len(idx.Manifests) != 1 {
		t.Fatalf("index has %d manifests", len(idx.Manifests))
	}
	m := idx.Manifests[0]
	if m.Annotations["io.containerd.image.name"] != BusyboxImage || m.Annotations["org.opencontainers.image.ref.name"] != "latest" {
		t.Errorf("annotations = %v", m.Annotations)
	}
	blob := func(d string) []byte {
		t.Helper()
		name := "blobs/sha256/" + strings.TrimPrefix(d, "sha256:")
		bb, ok := data[name]
		if !ok {
			t.Fatalf("blob %s missing", name)
		}
		s := sha256.Sum256(bb)
		if "sha256:"+hex.EncodeToString(s[:]) != d {
			t.Fatalf("blob %s has wrong digest", d)
		}
		return bb
	}
	var man struct {
		Config struct{ Digest string } `json:"config"`
		Layers []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(blob(m.Digest), &man); err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Architecture string `json:"architecture"`
		OS           string `json:"os"`
		Config       struct {
			Env []string
			Cmd []string
		} `json:"config"`
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(man.Config.Digest), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" || len(cfg.Config.Cmd) != 1 || cfg.Config.Cmd[0] != "sh" ||
		len(cfg.Config.Env) != 1 || !strings.HasPrefix(cfg.Config.Env[0], "PATH=") {
		t.Errorf("config = %+v", cfg)
	}
	if len(man.Layers) != 1 || man.Layers[0].MediaType != mediaTypeLayerGz {
		t.Fatalf("layers = %+v", man.Layers)
	}
	gz := blob(man.Layers[0].Digest)
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	if !zr.ModTime.IsZero() || zr.Name != "" {
		t.Errorf("gzip header has mtime %v name %q", zr.ModTime, zr.Name)
	}
	layer, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if d := digestOf(layer); len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != d {
		t.Errorf("diff_ids %v, layer %s", cfg.RootFS.DiffIDs, d)
	}
	lh, ld, _ := readTar(t, layer)
	bb, _ := os.ReadFile(BusyboxPath)
	if !bytes.Equal(ld["bin/busybox"], bb) || lh["bin/busybox"].Mode&0o111 == 0 {
		t.Error("bin/busybox missing or not executable")
	}
	for _, a := range []string{"sh", "echo", "sleep", "ip", "wget", "nc", "mount"} {
		h := lh["bin/"+a]
		if h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "busybox" {
			t.Errorf("bin/%s: %+v", a, h)
		}
	}
	for _, f := range []string{"etc/passwd", "etc/group"} {
		if len(ld[f]) == 0 {
			t.Errorf("%s missing", f)
		}
	}
	if h := lh["tmp/"]; h == nil || h.Typeflag != tar.TypeDir || h.Mode != 0o1777 {
		t.Errorf("tmp/: %+v", h)
	}
	for name, h := range lh {
		if !h.ModTime.Equal(epoch) || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: mtime %v uid %d gid %d", name, h.ModTime, h.Uid, h.Gid)
		}
	}
	for name, h := range hdrs {
		if !h.ModTime.Equal(epoch) {
			t.Errorf("outer %s: mtime %v", name, h.ModTime)
		}
	}
	d, err := ImageDigest(a)
	if err != nil || d != m.Digest {
		t.Errorf("ImageDigest = %s, %v", d, err)
	}
	t.Logf("busybox image %s, %d bytes", d, len(a))
}

func TestPauseImageReproducible(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a Go program")
	}
	a, err := PauseImageTar()
	if err != nil {
		t.Fatal(err)
	}
	b, err := PauseImageTar()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("two pause builds differ")
	}
	_, data, _ := readTar(t, a)
	if !strings.Contains(string(data["index.json"]), PauseImage) {
		t.Errorf("index.json = %s", data["index.json"])
	}
}
