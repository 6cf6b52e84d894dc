package keeper

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// unterminated is a JSON message that never ends: its prefix, then a
// string of up to 64 MiB.
type unterminated struct {
	prefix string
	read   int64
}

func (u *unterminated) Read(p []byte) (int, error) {
	const total = 64 << 20
	if u.read >= total {
		return 0, io.EOF
	}
	n := 0
	for ; n < len(p) && u.read < total; n++ {
		if u.read < int64(len(u.prefix)) {
			p[n] = u.prefix[u.read]
		} else {
			p[n] = 'a'
		}
		u.read++
	}
	return n, nil
}

// Each side reads one bounded message: a peer that sends an endless one is
// refused once it exceeds the bound, not read to its end.
func TestControlMessagesAreBounded(t *testing.T) {
	for _, tc := range []struct {
		name string
		read func(io.Reader) error
	}{
		{"request", func(r io.Reader) error { _, err := readRequest(r); return err }},
		{"response", func(r io.Reader) error { _, err := readResponse(r, opHello); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &unterminated{prefix: `{"op":"hello","address":"`}
			if err := tc.read(r); err == nil {
				t.Fatal("an endless message was read")
			}
			if r.read > 2*maxMessage {
				t.Errorf("%d bytes read of an endless message; the bound is %d", r.read, maxMessage)
			}
		})
	}
}

func TestHelloResponse(t *testing.T) {
	for _, tc := range []struct {
		resp string
		ok   bool
	}{
		{`{"pid":42}`, true},
		{`{}`, false},
		{`{"pid":0}`, false},
		{`{"pid":-1}`, false},
		{`{"pid":42,"error":"broken"}`, false},
		{`{"pid":"42"}`, false},
		{``, false},
	} {
		resp, err := readResponse(strings.NewReader(tc.resp), opHello)
		if (err == nil) != tc.ok {
			t.Errorf("readResponse(%s) = %+v, %v; want ok %v", tc.resp, resp, err, tc.ok)
		}
	}
	if _, err := readResponse(strings.NewReader(`{}`), opListen); err != nil {
		t.Errorf("listen answered {}: %v", err)
	}
}

// newKeeper is a keeper of a new directory, serving no control socket.
func newKeeper(t *testing.T) *keeper {
	t.Helper()
	k := &keeper{dir: t.TempDir(), log: zap.NewNop(), proxies: map[string]*proxied{}, done: make(chan struct{})}
	t.Cleanup(k.closeAll)
	return k
}

// A listen only ever takes a socket of the daemon's directory: never a
// file of the keeper's or the daemon's state (listening replaces a stale
// file), never an address forwarded to itself, directly or through other
// addresses the keeper serves (each connection would open another), never
// the daemon's backend of another address.
func TestListenRefuses(t *testing.T) {
	k := newKeeper(t)
	at := func(name string) string { return filepath.Join(k.dir, name) }
	planted := []string{at(LogName), at("tasks/c1.json")}
	for _, p := range planted {
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("state"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := k.listen(at("a.sock"), at("b.sock")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, address, backend string }{
		{"the keeper's log", at(LogName), at("b.sock")},
		{"a record", at("tasks/c1.json"), at("b.sock")},
		{"the keeper's control socket", at(SocketName), at("b.sock")},
		{"the keeper's spawn socket", at(SpawnSocketName), at("b.sock")},
		{"forwarded to itself", at("t.sock"), at("t.sock")},
		{"a loop through another address", at("b.sock"), at("a.sock")},
		{"the backend of another address", at("b.sock"), at("c.sock")},
		{"unclean address", k.dir + "/x/../t.sock", at("b.sock")},
		{"backend not a socket", at("t.sock"), at("tasks/c1.json")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := k.listen(tc.address, tc.backend); err == nil {
				t.Errorf("listen(%q, %q) succeeded", tc.address, tc.backend)
			}
		})
	}
	for _, p := range planted {
		if b, err := os.ReadFile(p); err != nil || string(b) != "state" {
			t.Errorf("%s after the refused listens: %q, %v", p, b, err)
		}
	}
	if _, err := os.Stat(at("t.sock")); err == nil {
		t.Error("a refused listen left a socket")
	}
}
