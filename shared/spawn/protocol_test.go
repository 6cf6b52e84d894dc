package spawn

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// allocated is how many bytes f allocates on the heap.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// frame is a message header announcing n bytes, followed by body.
func frame(n uint32, body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, n)
	return append(b, body...)
}

// A header is only a claim: what is allocated follows what arrives, so a
// peer announcing the largest message and sending a few bytes costs the
// reader little, and one announcing 4 GiB is refused.
func TestReadMsgAllocatesWhatArrives(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"largest, nothing sent", frame(maxMessage, "")},
		{"largest, a few bytes sent", frame(maxMessage, `{"pid":1`)},
		{"4 GiB", frame(1<<32-1, `{}`)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			n := allocated(func() {
				var reply spawnReply
				err = readMsg(bytes.NewReader(tc.in), &reply)
			})
			if err == nil {
				t.Fatal("a truncated message was read")
			}
			if n > 1<<20 {
				t.Errorf("reading %d bytes allocated %d", len(tc.in), n)
			}
		})
	}
}

// socketPair returns the two ends of a connected unix stream socket.
func socketPair(t *testing.T) (a, b *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close() // FileConn holds a duplicate
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	return conn(fds[0]), conn(fds[1])
}

// A client that connects and stops halfway through its request must not
// hold a handler of the server (a goroutine and a descriptor) forever.
func TestStalledRequestTimesOut(t *testing.T) {
	s := &Server{log: zap.NewNop(), requestTimeout: 10 * time.Millisecond}
	server, client := socketPair(t)
	t.Cleanup(func() { server.Close(); client.Close() })
	if _, err := client.Write(frame(100, `{"op":`)); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		s.handle(server)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("the server still waits for the rest of a request its client stopped sending")
	}
}

func TestRequestCheck(t *testing.T) {
	valid := func() request {
		return request{Op: opSpawn, Path: "/bin/true", Dir: "/tmp", NFDs: 2, Files: []int{-1, 0, 1, -1}}
	}
	for _, tc := range []struct {
		name   string
		change func(*request)
		nfds   int
		ok     bool
	}{
		{"valid", func(*request) {}, 2, true},
		{"no dir", func(r *request) { r.Dir = "" }, 2, true},
		{"fewer descriptors arrived", func(*request) {}, 1, false},
		{"no path", func(r *request) { r.Path = "" }, 2, false},
		{"relative path", func(r *request) { r.Path = "bin/true" }, 2, false},
		{"relative dir", func(r *request) { r.Dir = "tmp" }, 2, false},
		{"descriptor not received", func(r *request) { r.Files[3] = 2 }, 2, false},
		{"descriptor below -1", func(r *request) { r.Files[0] = -2 }, 2, false},
		{"most child descriptors", func(r *request) { r.Files = make([]int, maxChildFiles) }, 2, true},
		{"too many child descriptors", func(r *request) { r.Files = make([]int, maxChildFiles+1) }, 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := valid()
			tc.change(&req)
			if err := req.check(tc.nfds); (err == nil) != tc.ok {
				t.Errorf("check = %v, want ok %v", err, tc.ok)
			}
		})
	}
}
