package stratovirt

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The fake stratovirt is this test binary run again by a script named
// stratovirt; the variable tells it so and how to behave.
const fakeModeEnv = "KUASAR_FAKE_STRATOVIRT_MODE"

const (
	modeOK         = "ok"
	modeNoSocket   = "no-socket"   // never listens
	modeExitEarly  = "exit-early"  // complains and exits 1
	modeIgnoreQuit = "ignore-quit" // answers quit, does not exit
	modeNotRunning = "not-running" // query-status says paused
)

const (
	msgNoKVM = "Error: Failed to open /dev/kvm: No such file or directory (os error 2)"
	// msgAddFailed is the fake's answer to a device_add of an ID that
	// starts with "bad".
	msgAddFailed = "Failed to add device: no such backend"
	journalName  = "fake-stratovirt.journal"
	fakeTimeout  = time.Minute // how long a forgotten fake lives
)

// command is one line of the fake's journal: the first has the argv and
// what fd 3 is; the others a QMP command and the fds it came with.
type command struct {
	Argv      []string       `json:"argv,omitempty"`
	FD3       string         `json:"fd3,omitempty"`
	Execute   string         `json:"execute,omitempty"`
	Arguments map[string]any `json:"arguments,omitempty"`
	FDs       []string       `json:"fds,omitempty"`
}

// fakeStratoVirt serves QMP on the socket of -qmp unix:PATH,server,nowait
// the way StratoVirt's QMP does and journals what it is asked.
func fakeStratoVirt(mode string, argv []string) int {
	var sock string
	for i, a := range argv {
		if a == "-qmp" && i+1 < len(argv) {
			sock, _, _ = strings.Cut(strings.TrimPrefix(argv[i+1], "unix:"), ",")
		}
	}
	if sock == "" {
		fmt.Fprintf(os.Stderr, "fake stratovirt: no -qmp unix:PATH in %q\n", argv)
		return 2
	}
	switch mode {
	case modeExitEarly:
		fmt.Fprintln(os.Stderr, msgNoKVM)
		return 1
	case modeNoSocket:
		time.Sleep(fakeTimeout)
		return 3
	}
	jf, err := os.OpenFile(filepath.Join(filepath.Dir(sock), journalName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake stratovirt:", err)
		return 2
	}
	fd3, _ := os.Readlink("/proc/self/fd/3")
	j := &journal{f: jf}
	j.add(command{Argv: argv, FD3: fd3})
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake stratovirt:", err)
		return 2
	}
	quit := make(chan struct{})
	var once sync.Once
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			go func() {
				if serveQMP(c, mode, j) {
					once.Do(func() { close(quit) })
				}
			}()
		}
	}()
	select {
	case <-quit:
		return 0
	case <-time.After(fakeTimeout):
		return 3
	}
}

type journal struct {
	mu sync.Mutex
	f  *os.File
}

func (j *journal) add(c command) {
	b, _ := json.Marshal(c)
	j.mu.Lock()
	defer j.mu.Unlock()
	_, _ = j.f.Write(append(b, '\n'))
}

// rightsReader reads a unix connection and keeps the fds that come along.
type rightsReader struct {
	c     *net.UnixConn
	files []*os.File
}

func (r *rightsReader) Read(b []byte) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := r.c.ReadMsgUnix(b, oob)
	msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
	for _, m := range msgs {
		fds, _ := unix.ParseUnixRights(&m)
		for _, fd := range fds {
			r.files = append(r.files, os.NewFile(uintptr(fd), "passed"))
		}
	}
	return n, err
}

// take names, and closes, the fds received so far.
func (r *rightsReader) take() []string {
	var names []string
	for _, f := range r.files {
		t, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
		if err != nil {
			t = err.Error()
		}
		names = append(names, t)
		f.Close()
	}
	r.files = nil
	return names
}

// serveQMP answers one client; it reports whether the client said quit
// (and the fake should exit).
func serveQMP(c *net.UnixConn, mode string, j *journal) bool {
	defer c.Close()
	var wmu sync.Mutex
	send := func(v any) {
		b, _ := json.Marshal(v)
		wmu.Lock()
		defer wmu.Unlock()
		_, _ = c.Write(append(b, '\r', '\n'))
	}
	event := func(name string, data any) {
		now := time.Now()
		send(map[string]any{"event": name, "data": data,
			"timestamp": map[string]int64{"seconds": now.Unix(), "microseconds": int64(now.Nanosecond() / 1000)}})
	}
	send(map[string]any{"QMP": map[string]any{"version": map[string]any{
		"StratoVirt": map[string]int{"major": 2, "minor": 4, "micro": 0}, "package": ""}, "capabilities": []any{}}})
	r := &rightsReader{c: c}
	dec := json.NewDecoder(r)
	negotiated := false
	for {
		var req struct {
			Execute   string         `json:"execute"`
			Arguments map[string]any `json:"arguments"`
			ID        any            `json:"id"`
		}
		if err := dec.Decode(&req); err != nil {
			return false
		}
		j.add(command{Execute: req.Execute, Arguments: req.Arguments, FDs: r.take()})
		reply := func(ret any, err error) {
			if err != nil {
				send(map[string]any{"error": map[string]string{"class": "GenericError", "desc": err.Error()}, "id": req.ID})
				return
			}
			send(map[string]any{"return": ret, "id": req.ID})
		}
		empty := map[string]any{}
		if !negotiated && req.Execute != "qmp_capabilities" {
			reply(nil, errors.New("Expecting capabilities negotiation with 'qmp_capabilities'"))
			continue
		}
		switch req.Execute {
		case "qmp_capabilities":
			negotiated = true
			reply(empty, nil)
		case "query-status":
			if mode == modeNotRunning {
				reply(map[string]any{"running": false, "singlestep": false, "status": "paused"}, nil)
			} else {
				reply(map[string]any{"running": true, "singlestep": false, "status": "running"}, nil)
			}
		case "device_add":
			if id, _ := req.Arguments["id"].(string); strings.HasPrefix(id, "bad") {
				reply(nil, errors.New(msgAddFailed))
			} else {
				reply(empty, nil)
			}
		case "device_del":
			// As StratoVirt does: the event, then the answer.
			event("DEVICE_DELETED", map[string]any{"device": req.Arguments["id"], "path": req.Arguments["id"]})
			reply(empty, nil)
		case "blockdev-add", "blockdev-del", "netdev_add", "netdev_del", "getfd":
			reply(empty, nil)
		case "quit":
			reply(empty, nil)
			if mode != modeIgnoreQuit {
				event("SHUTDOWN", map[string]any{"guest": false, "reason": "host-qmp-quit"})
				return true
			}
		default:
			reply(nil, fmt.Errorf("The command %s has not been found", req.Execute))
		}
	}
}

// readJournal is what the fake in dir has been asked so far.
func readJournal(dir string) ([]command, error) {
	b, err := os.ReadFile(filepath.Join(dir, journalName))
	if err != nil {
		return nil, err
	}
	var cs []command
	for l := range bytes.Lines(b) {
		var c command
		if err := json.Unmarshal(l, &c); err != nil {
			return nil, fmt.Errorf("journal line %q: %w", l, err)
		}
		cs = append(cs, c)
	}
	return cs, nil
}
