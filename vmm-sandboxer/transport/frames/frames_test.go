package frames

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

// frame is a 3-byte header (tag, length) and its payload.
func frame(tag byte, payload string) []byte {
	return append([]byte{tag, 0, byte(len(payload))}, payload...)
}

func TestScanner(t *testing.T) {
	errBad := errors.New("bad tag")
	stream := slices.Concat(frame('a', "xyz"), frame('b', ""), frame('c', string(bytes.Repeat([]byte{'c'}, 200))), frame('d', "!"))
	tests := []struct {
		name    string
		stream  []byte
		bad     byte // a header with this tag is refused
		want    string
		wantErr bool
	}{
		{name: "whole frames", stream: stream, want: "abcd"},
		{name: "cut in a header", stream: stream[:7], want: "a"},
		{name: "cut in a payload", stream: stream[:4], want: "a"},
		{name: "refused header", stream: stream, bad: 'c', want: "abc", wantErr: true},
		// A payload byte that looks like a refused tag is only payload.
		{name: "payload not read as header", stream: stream, bad: 'x', want: "abcd"},
	}
	for _, tc := range tests {
		for _, piece := range []int{1, 2, 3, 7, len(tc.stream)} {
			var got []byte
			s := NewScanner(3, func(h []byte) (uint32, error) {
				got = append(got, h[0])
				if h[0] == tc.bad {
					return 0, errBad
				}
				return uint32(h[1])<<8 | uint32(h[2]), nil
			})
			var err error
			for p := tc.stream; len(p) > 0; p = p[min(piece, len(p)):] {
				if err = s.Scan(p[:min(piece, len(p))]); err != nil {
					break
				}
			}
			if string(got) != tc.want || (err != nil) != tc.wantErr || (err != nil && !errors.Is(err, errBad)) {
				t.Errorf("%s, pieces of %d: headers %q, error %v; want %q, error %v", tc.name, piece, got, err, tc.want, tc.wantErr)
			}
			if err != nil {
				if again := s.Scan(frame('a', "")); !errors.Is(again, errBad) {
					t.Errorf("%s: Scan after an error returned %v", tc.name, again)
				}
			}
		}
	}
}
