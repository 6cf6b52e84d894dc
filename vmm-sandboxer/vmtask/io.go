package vmtask

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"

	"github.com/containerd/fifo"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agentclient"
)

// hostIO is a process's end of the FIFOs containerd made on the host.
type hostIO struct {
	stdin   io.ReadCloser
	closers []io.Closer
}

// openIO opens the FIFOs named in a create or exec request, as a shim does:
// the output FIFOs for writing plus a reader of our own on each, which
// keeps writes from failing while containerd restarts (they block
// instead), and stdin for reading.
func openIO(ctx context.Context, stdin, stdout, stderr string) (*hostIO, agentclient.Stdio, error) {
	h := &hostIO{}
	var stdio agentclient.Stdio
	fail := func(err error) (*hostIO, agentclient.Stdio, error) {
		h.Close()
		return nil, agentclient.Stdio{}, err
	}
	for _, o := range []struct {
		path string
		w    *io.Writer
	}{{stdout, &stdio.Stdout}, {stderr, &stdio.Stderr}} {
		if o.path == "" {
			continue
		}
		keep, err := fifo.OpenFifo(ctx, o.path, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fail(fmt.Errorf("open %s: %w", o.path, err))
		}
		h.closers = append(h.closers, keep)
		w, err := fifo.OpenFifo(ctx, o.path, syscall.O_WRONLY, 0)
		if err != nil {
			return fail(fmt.Errorf("open %s: %w", o.path, err))
		}
		h.closers = append(h.closers, w)
		*o.w = w
	}
	if stdin != "" {
		r, err := fifo.OpenFifo(context.Background(), stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return fail(fmt.Errorf("open %s: %w", stdin, err))
		}
		h.stdin = r
		h.closers = append(h.closers, r)
		stdio.Stdin = r
	}
	return h, stdio, nil
}

// CloseStdin ends the process's stdin: the copy to the guest sees EOF.
func (h *hostIO) CloseStdin() error {
	if h == nil || h.stdin == nil {
		return nil
	}
	return h.stdin.Close()
}

// Close closes every FIFO end.
func (h *hostIO) Close() error {
	if h == nil {
		return nil
	}
	var errs []error
	for _, c := range h.closers {
		errs = append(errs, c.Close())
	}
	h.closers = nil
	return errors.Join(errs...)
}
