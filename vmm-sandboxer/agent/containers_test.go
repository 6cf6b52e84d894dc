package agent

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"

	"go.uber.org/zap/zaptest"
	"google.golang.org/protobuf/proto"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
)

// TestIOStreamRefused: a stream for a process that asked for none is
// answered with the reason and closed; a header too large is refused.
func TestIOStreamRefused(t *testing.T) {
	c := &Containers{Log: zaptest.NewLogger(t), streams: map[streamKey]*ioSlot{}}
	host, guest := net.Pipe()
	go c.attach(guest)
	h, _ := proto.Marshal(&vmmtask.IOStreamHeader{ContainerId: "c1", ExecId: "e1", Kind: vmmtask.IOStreamHeader_STDERR})
	if err := writeFrame(host, h); err != nil {
		t.Fatal(err)
	}
	var n [4]byte
	if _, err := io.ReadFull(host, n[:]); err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, binary.BigEndian.Uint32(n[:]))
	io.ReadFull(host, msg)
	if !strings.Contains(string(msg), `no STDERR stream was asked for process "e1" of container "c1"`) {
		t.Errorf("answer %q", msg)
	}
	if _, err := host.Read(n[:]); err != io.EOF {
		t.Errorf("stream not closed after refusal: %v", err)
	}

	// A second stream for the same process stream is refused.
	c.streams[streamKey{"c1", "", vmmtask.IOStreamHeader_STDOUT}] = &ioSlot{conn: make(chan net.Conn, 1)}
	for i, want := range []string{"", "already attached"} {
		host, guest := net.Pipe()
		go c.attach(guest)
		h, _ := proto.Marshal(&vmmtask.IOStreamHeader{ContainerId: "c1", Kind: vmmtask.IOStreamHeader_STDOUT})
		writeFrame(host, h)
		io.ReadFull(host, n[:])
		msg := make([]byte, binary.BigEndian.Uint32(n[:]))
		io.ReadFull(host, msg)
		if (want == "" && len(msg) != 0) || !strings.Contains(string(msg), want) {
			t.Errorf("stream %d: answer %q, want %q", i, msg, want)
		}
	}

	var big bytes.Buffer
	binary.Write(&big, binary.BigEndian, uint32(1<<20))
	if err := readHeader(&big, &vmmtask.IOStreamHeader{}); err == nil || !strings.Contains(err.Error(), "1048576 bytes") {
		t.Errorf("oversized header: %v", err)
	}
}

func TestFifoNames(t *testing.T) {
	if got := fifoName("", vmmtask.IOStreamHeader_STDOUT); got != "init.STDOUT" {
		t.Errorf("init stdout fifo %q", got)
	}
	if got := fifoName("ex1", vmmtask.IOStreamHeader_STDIN); got != "exec-ex1.STDIN" {
		t.Errorf("exec stdin fifo %q", got)
	}
}
