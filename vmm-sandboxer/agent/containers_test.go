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
