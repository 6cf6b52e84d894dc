package transport

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"
)

var okLine = regexp.MustCompile(`^OK [0-9]+$`)

// FuzzHybridHandshake answers the host's "CONNECT <port>\n" with any bytes.
// The handshake succeeds exactly when the first line is "OK <uint32>" of at
// most 32 bytes, refuses a complete wrong line as ErrHybridVsockProtocol,
// and leaves what follows the line to the stream, unread.
func FuzzHybridHandshake(f *testing.F) {
	f.Add([]byte("OK 1073741824\nguest data"), uint32(1024))
	f.Add([]byte("OK 4294967296\n"), uint32(1))
	f.Add([]byte("OK 00000000000000000000000000001\n"), uint32(1024))
	f.Add([]byte("ERR no listener\n"), uint32(1025))
	f.Add([]byte("OK 12"), uint32(1024))
	f.Add([]byte("OK -1\n"), uint32(0))
	f.Fuzz(func(t *testing.T, answer []byte, port uint32) {
		host, vmm := net.Pipe()
		defer host.Close()
		go func() {
			defer vmm.Close()
			line, err := bufio.NewReader(vmm).ReadString('\n')
			if err != nil || line != fmt.Sprintf("CONNECT %d\n", port) {
				return
			}
			_, _ = vmm.Write(answer)
		}()
		_ = host.SetDeadline(time.Now().Add(10 * time.Second))
		err := handshake(host, port)

		line, rest, complete := bytes.Cut(answer, []byte("\n"))
		tooLong := len(line) > maxHandshakeLine
		valid := complete && !tooLong && okLine.Match(line)
		if valid {
			_, perr := strconv.ParseUint(string(line[3:]), 10, 32)
			valid = perr == nil
		}
		switch {
		case valid && err != nil:
			t.Fatalf("answer %q refused: %v", answer, err)
		case !valid && err == nil:
			t.Fatalf("answer %q accepted", answer)
		case !valid && (complete || tooLong) != errors.Is(err, ErrHybridVsockProtocol):
			t.Fatalf("answer %q: %v (protocol error: %v)", answer, err, complete || tooLong)
		}
		if err != nil {
			return
		}
		got, _ := io.ReadAll(host)
		if !bytes.Equal(got, rest) {
			t.Fatalf("stream after the handshake is %q, want %q", got, rest)
		}
	})
}

// FuzzMuxDial opens streams to any port of a guest that listens on the
// agent's: only that port answers, and a stream carries its data both ways
// unchanged, after the port header and whatever the data looks like.
func FuzzMuxDial(f *testing.F) {
	f.Add(AgentPort, []byte("ping"))
	f.Add(IOPort, []byte{0, 0, 4, 0})
	f.Add(uint32(0), []byte{})
	f.Add(uint32(0xffffffff), []byte{0, 0, 4, 0, 1})
	hostEnd, guestEnd := net.Pipe()
	srv := NewMuxServer()
	l, err := srv.Listen(AgentPort)
	if err != nil {
		f.Fatal(err)
	}
	go srv.ServeConn(guestEnd)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	cli, err := NewMuxClient(hostEnd)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { cli.Close(); srv.Close() })
	f.Fuzz(func(t *testing.T, port uint32, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := cli.Dial(ctx, port)
		if port != AgentPort {
			if !errors.Is(err, ErrNoListener) {
				t.Fatalf("dial port %d: %v, want ErrNoListener", port, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("dial agent port: %v", err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		go func() { _, _ = c.Write(data) }()
		got := make([]byte, len(data))
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("echo: %v", err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("echo %q, sent %q", got, data)
		}
	})
}

// FuzzMuxGuestBytes sends the host's end of a link any bytes as the guest,
// then hangs up. The host never hangs, and gives up on the guest exactly
// when a complete frame header is one that a guest running MuxServer never
// sends (guestBreaks restates hostLink's rules).
func FuzzMuxGuestBytes(f *testing.F) {
	f.Add(append(yamuxFrame(yamuxData, yamuxACK, 1, 3), "abc"...))
	f.Add(slices.Concat(yamuxFrame(yamuxWindowUpdate, yamuxFIN, 3, 1), yamuxFrame(yamuxGoAway, 0, 0, 0), yamuxFrame(yamuxPing, yamuxSYN, 0, 1)))
	f.Add(slices.Concat(yamuxFrame(yamuxGoAway, 0, 0, 1), yamuxFrame(yamuxPing, yamuxSYN, 0, 1)))
	f.Add(yamuxFrame(yamuxData, yamuxSYN, 2, 0))
	f.Add(yamuxFrame(yamuxData, 0, 1, yamuxWindow+1))
	f.Add(yamuxFrame(yamuxData, 0, 1, yamuxWindow)[:7])
	f.Fuzz(func(t *testing.T, b []byte) {
		host, guest := net.Pipe()
		cli, err := newMuxClient(host, StallTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		go func() { _, _ = io.Copy(io.Discard, guest) }()
		// net.Pipe's Write returns once the host has read every byte, or
		// closed the link.
		_, _ = guest.Write(b)
		guest.Close()
		select {
		case <-cli.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("the host still holds the link after the guest sent %x and hung up", b)
		}
		breaks, known := guestBreaks(b)
		if got := errors.Is(cli.Err(), ErrMisbehaved); known && got != breaks {
			t.Fatalf("guest sent %x: the host gave up on it: %v (%v), want %v", b, got, cli.Err(), breaks)
		}
	})
}

// guestBreaks tells whether b holds a complete frame header that a guest
// running MuxServer never sends. known is false when, before any, a GoAway
// with an error code ends the session: yamux reads no further, so whether
// the host saw a bad header after it depends on how much it had read.
func guestBreaks(b []byte) (breaks, known bool) {
	for len(b) >= yamuxHeaderSize {
		h := b[:yamuxHeaderSize]
		b = b[yamuxHeaderSize:]
		typ, flags := h[1], binary.BigEndian.Uint16(h[2:4])
		id, length := binary.BigEndian.Uint32(h[4:8]), binary.BigEndian.Uint32(h[8:12])
		switch {
		case h[0] != 0 || typ == yamuxPing || typ > yamuxGoAway || flags&^(yamuxACK|yamuxFIN|yamuxRST) != 0:
			return true, true
		case typ == yamuxGoAway:
			if length != 0 {
				return false, false
			}
		case id%2 == 0 || length > yamuxWindow:
			return true, true
		case typ == yamuxData:
			b = b[min(len(b), int(length)):]
		}
	}
	return false, true
}
