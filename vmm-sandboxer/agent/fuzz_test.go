package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"go.uber.org/zap"
	"google.golang.org/protobuf/proto"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/shared/task"
)

func frame(b []byte) []byte {
	var buf bytes.Buffer
	_ = writeFrame(&buf, b)
	return buf.Bytes()
}

// FuzzReadHeader decodes the header that opens every IO stream from the
// host. It reads exactly its frame (what follows is the stream's data),
// refuses frames over 64 KiB before allocating them, and a header it
// decodes re-encodes to one that decodes equal.
func FuzzReadHeader(f *testing.F) {
	h, _ := proto.Marshal(&vmmtask.IOStreamHeader{ContainerId: "c1", ExecId: "e1", Kind: vmmtask.IOStreamHeader_STDERR})
	f.Add(append(frame(h), "stream data"...))
	f.Add(frame(nil))
	f.Add([]byte{0, 0, 0, 9, 0x0a, 0x02, 'c'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(frame([]byte{0x18, 0x63}))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		got := &vmmtask.IOStreamHeader{}
		if err := readHeader(r, got); err != nil {
			if len(data) >= 4 {
				if n := binary.BigEndian.Uint32(data); n > 64<<10 && r.Len() != len(data)-4 {
					t.Fatalf("read into an oversized frame of %d bytes", n)
				}
			}
			return
		}
		l := int(binary.BigEndian.Uint32(data))
		if l > 64<<10 {
			t.Fatalf("accepted a frame of %d bytes", l)
		}
		if r.Len() != len(data)-4-l {
			t.Fatalf("read %d bytes of a %d-byte frame", len(data)-r.Len(), 4+l)
		}
		b, err := proto.Marshal(got)
		if err != nil {
			t.Fatalf("re-encode %v: %v", got, err)
		}
		again := &vmmtask.IOStreamHeader{}
		if err := readHeader(bytes.NewReader(frame(b)), again); err != nil {
			t.Fatalf("re-encoded header: %v", err)
		}
		if !proto.Equal(got, again) {
			t.Fatalf("header %v re-decoded as %v", got, again)
		}
	})
}

func tree(t *testing.T, dir string) []string {
	var out []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		out = append(out, p)
		return nil
	})
	return out
}

// FuzzExecRequest: an exec for a container the agent does not run, or
// named by an ID that is no path element, is refused and leaves nothing
// behind, in the bundles' directory or beside it.
func FuzzExecRequest(f *testing.F) {
	f.Add("c1", "e1", true, true, false)
	f.Add("..", "e1", false, false, false)
	f.Add("", "e1", true, false, false)
	f.Add("../../tmp", "exec-2", false, true, true)
	f.Add("c1", "../e", true, true, true)
	base := f.TempDir()
	root := filepath.Join(base, "containers", "root")
	c := &Containers{Root: root, Log: zap.NewNop(), streams: map[streamKey]*ioSlot{}, subs: map[chan *vmmtask.Event]struct{}{},
		ctx: namespaces.WithNamespace(context.Background(), namespace)}
	svc, err := task.New(c, func(string) task.Publisher { return c }, nil, zap.NewNop())
	if err != nil {
		f.Fatal(err)
	}
	c.svc = svc
	f.Fuzz(func(t *testing.T, id, execID string, stdin, stdout, stderr bool) {
		if err := mkdirAll(root); err != nil {
			t.Fatal(err)
		}
		before := tree(t, base)
		_, err := c.Exec(context.Background(), &vmmtask.ExecProcessRequest{ContainerId: id, ExecId: execID,
			Stdin: stdin, Stdout: stdout, Stderr: stderr, Process: []byte(`{"args":["sh"],"cwd":"/"}`)})
		if err == nil {
			t.Fatalf("exec %q in unknown container %q accepted", execID, id)
		}
		if after := tree(t, base); !slices.Equal(before, after) {
			t.Fatalf("refused exec %q in %q left files:\nbefore %q\nafter  %q", execID, id, before, after)
		}
		if len(c.streams) != 0 {
			t.Fatalf("refused exec left streams %v", c.streams)
		}
	})
}

func mkdirAll(p string) error { return os.MkdirAll(p, 0o711) }
