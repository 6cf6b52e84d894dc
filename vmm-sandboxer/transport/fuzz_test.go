package transport

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
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
