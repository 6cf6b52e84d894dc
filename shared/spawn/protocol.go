// Package spawn lets a sandboxer daemon run its OCI runtime commands as
// children of a small long-lived "keeper" process instead of its own.
//
// A container process outlives the `runc create` that made it and is
// re-parented to the nearest child subreaper. When that subreaper is the
// daemon, exits of containers that end while the daemon is down (killed,
// restarting) are lost. The keeper (Server) is the subreaper instead: the
// daemon asks it to spawn runtime commands (Client implements go-runc's
// ProcessMonitor, so `runc.Monitor = client` is enough), it reaps every
// child and orphan, and it keeps a ring of recent exits (orphans', and its
// spawned children's, marked so) that a restarted daemon reads back with
// Client.Recorded and follows with Client.Subscribe. It also holds file
// descriptors for the daemon ("hold", "release").
//
// Protocol, over a unix stream socket: every message is a 4-byte big-endian
// length followed by that many bytes of JSON. The first message of a
// connection selects the operation ("op"):
//
//   - "spawn": the process to start, with its files attached to the same
//     message as SCM_RIGHTS. The server answers {pid} or {error}, then
//     {status, exited_at} once that child has exited, and closes.
//   - "subscribe": {since}. The server answers {last_seq}, then streams
//     every recorded exit with seq > since: first those still in its ring,
//     then new ones as they happen, until either side closes.
//   - "recorded": the server answers {last_seq, exits} with its ring.
//   - "hold": {key} with descriptors attached: the server keeps them under
//     key (replacing what it held there) and answers {}; "release": {key}
//     closes what key and the keys below it ("key/...") hold.
package spawn

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

const (
	opSpawn     = "spawn"
	opSubscribe = "subscribe"
	opRecorded  = "recorded"
	opHold      = "hold"
	opRelease   = "release"

	// maxMessage bounds what a peer can make the other side allocate; an
	// environment plus arguments is far below it.
	maxMessage = 16 << 20
	// maxFDs is the kernel's limit of descriptors per SCM_RIGHTS message
	// (SCM_MAX_FD).
	maxFDs = 253
	// maxChildFiles bounds a child's descriptors: stdio and what came with
	// the request.
	maxChildFiles = 3 + maxFDs
)

// request is the first message of a connection.
type request struct {
	Op string `json:"op"`

	// spawn
	Path      string   `json:"path,omitempty"`
	Args      []string `json:"args,omitempty"`
	Env       []string `json:"env,omitempty"`
	Dir       string   `json:"dir,omitempty"`
	Setpgid   bool     `json:"setpgid,omitempty"`
	Setsid    bool     `json:"setsid,omitempty"`
	Pdeathsig int      `json:"pdeathsig,omitempty"`
	// Cloneflags are the namespaces the child gets new (CLONE_NEW*).
	Cloneflags uintptr `json:"cloneflags,omitempty"`
	// Join are namespaces the child is born in: CLONE_NEW* flag (as a
	// decimal string, JSON keys being strings) -> namespace file (package
	// nsenter).
	Join map[int]string `json:"join,omitempty"`
	// NFDs is how many descriptors travel with this message, so that the
	// server can tell a truncated transfer from an intended one.
	NFDs int `json:"nfds,omitempty"`
	// Files maps the child's descriptor i (0, 1, 2: stdio, then extra
	// files) to the index of a received descriptor; -1 means none: /dev/null
	// for stdio, closed for an extra file (as a nil exec.Cmd.ExtraFiles
	// entry).
	Files []int `json:"files,omitempty"`

	// subscribe
	Since uint64 `json:"since,omitempty"`

	// hold, release
	Key string `json:"key,omitempty"`
}

// holdReply answers hold and release.
type holdReply struct {
	Error string `json:"error,omitempty"`
}

// spawnReply answers a spawn request once the process is started or has
// failed to start.
type spawnReply struct {
	Pid   int    `json:"pid,omitempty"`
	Error string `json:"error,omitempty"`
}

// exitReply is the last message on a spawn connection.
type exitReply struct {
	Status   int       `json:"status"`
	ExitedAt time.Time `json:"exited_at"`
}

// subscribeReply acknowledges a subscription before the exits follow.
type subscribeReply struct {
	LastSeq uint64 `json:"last_seq"`
	Error   string `json:"error,omitempty"`
}

// recordedReply lists the recorded exits: what happened while no daemon
// was subscribed.
type recordedReply struct {
	LastSeq uint64       `json:"last_seq"`
	Exits   []exitRecord `json:"exits"`
}

// exitRecord is an exit on a subscription.
type exitRecord struct {
	Seq       uint64    `json:"seq"`
	Pid       int       `json:"pid"`
	StartTime uint64    `json:"start_time"`
	Status    int       `json:"status"`
	ExitedAt  time.Time `json:"exited_at"`
	// Spawned: a process a client had the server start, whose exit also
	// went to that client if it was still there.
	Spawned bool `json:"spawned,omitempty"`
}

// encode frames v as length + JSON.
func encode(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode message: %w", err)
	}
	if len(b) > maxMessage {
		return nil, fmt.Errorf("message of %d bytes exceeds %d", len(b), maxMessage)
	}
	out := make([]byte, 4, 4+len(b))
	binary.BigEndian.PutUint32(out, uint32(len(b)))
	return append(out, b...), nil
}

// writeMsg sends v, with fds (if any) attached to the message's first byte.
func writeMsg(c *net.UnixConn, v any, fds []int) error {
	b, err := encode(v)
	if err != nil {
		return err
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return fmt.Errorf("write message: %w", err)
	}
	// A stream socket may take a large message in parts; the descriptors
	// went with the first.
	if n < len(b) {
		if _, err := c.Write(b[n:]); err != nil {
			return fmt.Errorf("write message: %w", err)
		}
	}
	return nil
}

// readMsg reads one message into v. Descriptors are not expected; any that
// arrive are dropped by the kernel since no control buffer is offered.
func readMsg(r io.Reader, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return fmt.Errorf("read message: %w", err)
	}
	return readBody(r, binary.BigEndian.Uint32(hdr[:]), v)
}

func readBody(r io.Reader, n uint32, v any) error {
	if n > maxMessage {
		return fmt.Errorf("message of %d bytes exceeds %d", n, maxMessage)
	}
	// Allocate as the bytes arrive, not as the header claims: a peer that
	// announces the largest message and sends nothing costs nothing.
	b, err := io.ReadAll(io.LimitReader(r, int64(n)))
	if err != nil {
		return fmt.Errorf("read message: %w", err)
	}
	if len(b) < int(n) {
		return fmt.Errorf("read message: %w", io.ErrUnexpectedEOF)
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode message: %w", err)
	}
	return nil
}

// readMsgFDs reads one message into v together with the descriptors sent
// with it, each marked close-on-exec so that no other child inherits it.
// On error every received descriptor is closed.
func readMsgFDs(c *net.UnixConn, v any) (fds []int, err error) {
	defer func() {
		if err != nil {
			closeFDs(fds)
			fds = nil
		}
	}()
	var hdr [4]byte
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	for got := 0; got < len(hdr); {
		// The descriptors arrive with the first byte of the message, so
		// reading the header with ReadMsgUnix is enough to collect them.
		n, oobn, flags, _, err := c.ReadMsgUnix(hdr[got:], oob)
		if oobn > 0 {
			more, perr := parseRights(oob[:oobn])
			fds = append(fds, more...)
			if perr != nil {
				return fds, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return fds, errors.New("read message: descriptors truncated")
		}
		if err != nil {
			return fds, fmt.Errorf("read message: %w", err)
		}
		if n == 0 {
			return fds, fmt.Errorf("read message: %w", io.ErrUnexpectedEOF)
		}
		got += n
	}
	return fds, readBody(c, binary.BigEndian.Uint32(hdr[:]), v)
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	var errs []error
	for i := range msgs {
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			errs = append(errs, fmt.Errorf("parse rights: %w", err))
			continue
		}
		for _, fd := range got {
			// Go already asks for MSG_CMSG_CLOEXEC on Linux; this keeps
			// the guarantee should that ever change.
			unix.CloseOnExec(fd)
		}
		fds = append(fds, got...)
	}
	return fds, errors.Join(errs...)
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}

// devNull opens /dev/null for a missing stdio descriptor.
func devNull() (*os.File, error) {
	f, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", os.DevNull, err)
	}
	return f, nil
}
