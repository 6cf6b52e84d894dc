// Package frames follows a byte stream made of frames, each a fixed-size
// header that gives the length of the payload after it, without buffering
// the stream: a connection's reader or writer feeds it what passes through
// and it checks every header as soon as it is complete. The host uses it to
// hold a guest to a protocol that another library decodes.
package frames

import "fmt"

// Scanner follows one direction of a stream.
type Scanner struct {
	hdr   []byte
	n     int    // bytes of hdr filled so far
	skip  uint64 // payload bytes of the current frame still to come
	check func(hdr []byte) (payload uint32, err error)
	err   error
}

// NewScanner returns a scanner of frames whose headers are size bytes
// long. check sees each complete header (valid only during the call) and
// returns the length of the payload that follows it, or an error that ends
// the scan.
func NewScanner(size int, check func(hdr []byte) (payload uint32, err error)) *Scanner {
	if size <= 0 {
		panic(fmt.Sprintf("frames: header size %d", size))
	}
	return &Scanner{hdr: make([]byte, size), check: check}
}

// Scan takes the stream's next bytes, in pieces of any size. After an
// error it returns that error for ever.
func (s *Scanner) Scan(p []byte) error {
	for len(p) > 0 && s.err == nil {
		if s.skip > 0 {
			k := min(uint64(len(p)), s.skip)
			s.skip -= k
			p = p[k:]
			continue
		}
		k := copy(s.hdr[s.n:], p)
		s.n += k
		p = p[k:]
		if s.n < len(s.hdr) {
			break
		}
		s.n = 0
		var l uint32
		l, s.err = s.check(s.hdr)
		s.skip = uint64(l)
	}
	return s.err
}
