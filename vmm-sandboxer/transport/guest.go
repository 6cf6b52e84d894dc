package transport

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mdlayher/vsock"
)

// GuestListener makes the guest's listeners on whichever transport the VM
// was given: vsock when the guest has a vsock device with a CID, else the
// named virtio-serial port with the multiplexer.
type GuestListener struct {
	// Kind is "vsock" or "serial".
	Kind string
	// Device is the serial port's device path (serial only).
	Device string
	mux    *MuxServer
	wrap   func(io.ReadWriteCloser) io.ReadWriteCloser
	cancel context.CancelFunc
	done   chan struct{}
}

// A GuestOption changes OpenGuest.
type GuestOption func(*GuestListener)

// WrapSerialLink has each multiplexer session run over what wrap makes of
// the serial port: the tests' hostile guest (vmm-sandboxer/e2e/hostileguest)
// floods, garbles and stalls the link that way.
func WrapSerialLink(wrap func(io.ReadWriteCloser) io.ReadWriteCloser) GuestOption {
	return func(g *GuestListener) { g.wrap = wrap }
}

// vmaddrCIDAny is what the vsock device reports without a transport.
const vmaddrCIDAny = 0xFFFFFFFF

// OpenGuest picks the transport. It waits until ctx ends for the serial
// port named portName to appear (its driver may still be probing). logf
// reports serial sessions that end with an error.
func OpenGuest(ctx context.Context, portName string, logf func(format string, args ...any), opts ...GuestOption) (*GuestListener, error) {
	if cid, err := vsock.ContextID(); err == nil && cid >= 3 && cid != vmaddrCIDAny {
		return &GuestListener{Kind: "vsock"}, nil
	}
	var dev string
	for {
		var err error
		dev, err = FindSerialPort("/sys/class/virtio-ports", portName)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("transport: no vsock device and %w", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	sctx, cancel := context.WithCancel(context.Background())
	g := &GuestListener{Kind: "serial", Device: dev, mux: NewMuxServer(), cancel: cancel, done: make(chan struct{})}
	for _, o := range opts {
		o(g)
	}
	go g.serveSerial(sctx, logf)
	return g, nil
}

// FindSerialPort returns /dev/<port> for the virtio-serial port whose
// sysfs name (under dir, /sys/class/virtio-ports) is name.
func FindSerialPort(dir, name string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("virtio-serial port %q: %w", name, err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + e.Name(), nil
		}
	}
	return "", fmt.Errorf("virtio-serial port %q not found in %s", name, dir)
}

// serveSerial runs multiplexer sessions over the port, one after the other:
// a session ends when the host closes its socket (reads see EOF), and the
// next one starts when it connects again. While the host is away, reads
// return at once; the loop then waits a little between tries.
func (g *GuestListener) serveSerial(ctx context.Context, logf func(string, ...any)) {
	defer close(g.done)
	for ctx.Err() == nil {
		f, err := os.OpenFile(g.Device, os.O_RDWR, 0)
		if err != nil {
			logf("transport: open %s: %v", g.Device, err)
		} else {
			stop := context.AfterFunc(ctx, func() { f.Close() })
			t0 := time.Now()
			var link io.ReadWriteCloser = f
			if g.wrap != nil {
				link = g.wrap(f)
			}
			if err := g.mux.ServeConn(link); err != nil && ctx.Err() == nil {
				logf("transport: session on %s: %v", g.Device, err)
			}
			stop()
			f.Close()
			if time.Since(t0) > time.Second {
				continue // a real session ended: the host may be back at once
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Listen listens on port.
func (g *GuestListener) Listen(port uint32) (net.Listener, error) {
	if g.Kind == "vsock" {
		return vsock.Listen(port, nil)
	}
	return g.mux.Listen(port)
}

// Close stops serving; listeners made by Listen close too (serial) or must
// be closed by their owners (vsock).
func (g *GuestListener) Close() error {
	if g.cancel != nil {
		g.cancel()
		g.mux.Close()
		<-g.done
	}
	return nil
}
