package guest

import (
	"fmt"
	"io"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks an initramfs
// from. Every field that could vary between builds (inode numbers, owners,
// times) is fixed by the caller, so the same entries give the same bytes.
type cpioWriter struct {
	w   io.Writer
	n   int64 // bytes written, for padding
	ino uint32
	err error
}

// cpio mode bits.
const (
	modeDir  = 0o040000
	modeFile = 0o100000
	modeChr  = 0o020000
	modeLink = 0o120000
)

type cpioEntry struct {
	name         string // without a leading slash
	mode         uint32 // type and permission bits
	mtime        int64
	data         []byte // file content or symlink target
	rmaj, rminor uint32 // device numbers for device nodes
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	var n int
	n, c.err = c.w.Write(b)
	c.n += int64(n)
}

func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) entry(e cpioEntry) error {
	c.ino++
	nlink := 1
	if e.mode&modeDir != 0 && e.mode&modeFile == 0 {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, e.mode, 0, 0, nlink, uint32(e.mtime), len(e.data), 0, 0, e.rmaj, e.rminor, len(e.name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(e.name))
	c.write([]byte{0})
	c.pad()
	c.write(e.data)
	c.pad()
	return c.err
}

// close writes the trailer entry.
func (c *cpioWriter) close() error {
	c.ino = 0
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len("TRAILER!!!")+1, 0)
	c.write([]byte(hdr))
	c.write([]byte("TRAILER!!!\x00"))
	c.pad()
	return c.err
}
