package spawn

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// allocBound is the most reading n bytes of messages may allocate: JSON
// decoding multiplies what arrives by a small factor, never by what a
// header claims.
func allocBound(n int) uint64 { return 64<<10 + 128*uint64(n) }

// FuzzSpawnReply reads what a daemon reads from its keeper: every kind of
// reply, from the same bytes. Nothing panics, what is allocated follows
// what arrived, and a message that is read takes exactly its frame from
// the stream (a subscription reads one message after another).
func FuzzSpawnReply(f *testing.F) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	for _, v := range []any{
		spawnReply{Pid: 42},
		spawnReply{Error: "start /nonexistent: no such file or directory"},
		exitReply{Status: 137, ExitedAt: at},
		subscribeReply{LastSeq: 1 << 62},
		exitRecord{Seq: 9, Pid: 42, StartTime: 7, Status: 1, ExitedAt: at, Spawned: true},
		recordedReply{LastSeq: 9, Exits: []exitRecord{{Seq: 8, Pid: 41, StartTime: 6, ExitedAt: at}, {Seq: 9, Pid: 42, Status: 255, ExitedAt: at}}},
		holdReply{Error: "hold: empty key"},
	} {
		b, err := encode(v)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add(frame(maxMessage, ""))
	f.Add(frame(1<<32-1, "{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, v := range []any{&spawnReply{}, &exitReply{}, &subscribeReply{}, &exitRecord{}, &recordedReply{}, &holdReply{}} {
			r := bytes.NewReader(data)
			var err error
			if n := allocated(func() { err = readMsg(r, v) }); n > allocBound(len(data)) {
				t.Fatalf("reading %d bytes into %T allocated %d", len(data), v, n)
			}
			if err != nil {
				continue
			}
			size := 4 + int(binary.BigEndian.Uint32(data))
			if rest := r.Len(); rest != len(data)-size {
				t.Fatalf("a message of %d bytes left %d of %d bytes", size, rest, len(data))
			}
		}
	})
}

// FuzzSpawnRequest reads what the keeper reads from a daemon, with up to
// three descriptors attached, and serves it as the keeper would, except
// that a spawn is only checked (the fuzzer would run whatever it names)
// and a subscription not followed. Nothing panics, what is allocated
// follows what arrived, a request that is served is answered with a
// message, and no descriptor is left open: the received ones are closed
// or held, and what is held is closed when released.
func FuzzSpawnRequest(f *testing.F) {
	for _, tc := range []struct {
		req  request
		nfds uint8
	}{
		{request{Op: opSpawn, Path: "/bin/true", Args: []string{"true"}, Env: []string{"A=b"}, Dir: "/", NFDs: 2, Files: []int{-1, 0, 1, 0}}, 2},
		{request{Op: opSpawn, Path: "/bin/sh", Setsid: true, Pdeathsig: 9, Cloneflags: unix.CLONE_NEWUTS, Join: map[int]string{unix.CLONE_NEWNET: "/proc/1/ns/net"}}, 0},
		{request{Op: opHold, Key: "pod/c1", NFDs: 2}, 2},
		{request{Op: opHold, NFDs: 1}, 1},
		{request{Op: opRelease, Key: "pod"}, 0},
		{request{Op: opRecorded}, 0},
		{request{Op: opSubscribe, Since: 7}, 0},
		{request{Op: "bogus"}, 1},
	} {
		b, err := encode(tc.req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, tc.nfds)
	}
	f.Add(frame(maxMessage, `{"op":"hold","key":"k"`), uint8(3))
	f.Fuzz(func(t *testing.T, data []byte, nfds uint8) {
		nfds %= 4
		if len(data) == 0 {
			nfds = 0 // descriptors travel with a byte
		}
		before := openFDs(t)
		serveRequest(t, data, int(nfds))
		if after := openFDs(t); after != before {
			t.Fatalf("%d descriptors open before, %d after", before, after)
		}
	})
}

func serveRequest(t *testing.T, data []byte, nfds int) {
	s := &Server{
		log: zap.NewNop(), requestTimeout: time.Minute,
		ring: make([]exitRecord, 0, 4), changed: make(chan struct{}), done: make(chan struct{}),
	}
	defer func() {
		for _, fds := range s.held {
			closeFDs(fds)
		}
	}()
	server, client := socketPair(t)
	defer server.Close()
	defer client.Close()
	var sent []int
	for range nfds {
		fd, err := unix.Open(os.DevNull, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		sent = append(sent, fd)
	}
	var oob []byte
	if len(sent) > 0 {
		oob = unix.UnixRights(sent...)
	}
	if _, _, err := client.WriteMsgUnix(data, oob, nil); err != nil {
		t.Fatal(err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	var (
		req request
		fds []int
		err error
	)
	if n := allocated(func() { req, fds, err = s.readRequest(server) }); n > allocBound(len(data)) {
		t.Fatalf("reading a request of %d bytes allocated %d", len(data), n)
	}
	if err != nil {
		return
	}
	switch req.Op {
	case opSpawn:
		if req.check(len(fds)) == nil {
			if !filepath.IsAbs(req.Path) || len(req.Files) > maxChildFiles {
				t.Fatalf("spawn of %q with %d child descriptors passed the check", req.Path, len(req.Files))
			}
			for _, idx := range req.Files {
				if idx < -1 || idx >= len(fds) {
					t.Fatalf("child descriptor %d of %d received passed the check", idx, len(fds))
				}
			}
		}
		closeFDs(fds)
		return
	case opSubscribe:
		closeFDs(fds)
		return
	}
	s.dispatch(server, &req, fds)
	var reply json.RawMessage
	if err := readMsg(client, &reply); err != nil {
		t.Fatalf("%s: no reply: %v", req.Op, err)
	}
	s.release(req.Key)
	if len(s.held[req.Key]) > 0 {
		t.Fatalf("key %q still holds descriptors after its release", req.Key)
	}
}

// openFDs counts the process's open descriptors.
func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
