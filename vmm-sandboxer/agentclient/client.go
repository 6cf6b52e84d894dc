// Package agentclient is the host's side of vmm-task for containers: it
// creates containers in the guest from OCI bundles the host placed in the
// VM's virtio-fs share, streams their stdio over the transport's IO port,
// and starts, execs into, signals, waits for and deletes their processes.
package agentclient

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// Client talks to one guest's agent.
type Client struct {
	vmmtask.AgentClient
	dialer transport.Dialer
	conn   *agentConn
	tc     *ttrpc.Client
	// stall bounds the waits on the guest that need no work of it: taking
	// a request, answering an IO stream's header.
	stall  time.Duration
	done   chan struct{}
	closed atomic.Bool
}

// policed is a dialer that can give up on its guest for good
// (transport.SerialDialer): Err then says why.
type policed interface {
	Err() error
}

// ErrAgentGone means the agent connection ended while the host still used
// it (the VM stopped, the agent exited or closed it).
var ErrAgentGone = fmt.Errorf("agentclient: the agent connection ended (%w)", errdefs.ErrUnavailable)

// Dial connects to the agent port, waiting (until ctx ends) for the guest.
func Dial(ctx context.Context, d transport.Dialer) (*Client, error) {
	return dial(ctx, d, transport.StallTimeout)
}

func dial(ctx context.Context, d transport.Dialer, stall time.Duration) (*Client, error) {
	conn, err := d.Dial(ctx, transport.AgentPort)
	if err != nil {
		return nil, err
	}
	c := &Client{dialer: d, conn: newAgentConn(conn, stall), stall: stall, done: make(chan struct{})}
	c.tc = ttrpc.NewClient(c.conn, ttrpc.WithOnClose(func() { close(c.done) }))
	c.AgentClient = vmmtask.NewAgentClient(c.tc)
	return c, nil
}

// Done is closed once the agent connection has ended: Close, or see Err.
// Every call fails from then on.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the agent connection ended: nil before it did and after
// Close; an error wrapping transport.ErrMisbehaved when the host gave up
// on the guest (the pod should end); ErrAgentGone otherwise.
func (c *Client) Err() error {
	select {
	case <-c.done:
	default:
		return nil
	}
	if err := c.conn.Err(); err != nil {
		return err
	}
	if p, ok := c.dialer.(policed); ok {
		if err := p.Err(); err != nil {
			return err
		}
	}
	if c.closed.Load() {
		return nil
	}
	return ErrAgentGone
}

// Close closes the agent connection (not the dialer).
func (c *Client) Close() error {
	c.closed.Store(true)
	return c.tc.Close()
}

// Share maps the host directory that virtiofsd serves to where the guest
// mounted it.
type Share struct {
	HostDir, GuestDir string
}

// GuestPath is the guest's path of a host path inside the share.
func (s Share) GuestPath(host string) (string, error) {
	rel, err := filepath.Rel(s.HostDir, host)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("agentclient: %s is not inside the shared directory %s", host, s.HostDir)
	}
	return filepath.Join(s.GuestDir, rel), nil
}

// Stdio is a process's IO on the host; nil members are not asked for.
type Stdio struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// Process is a container's init or exec'd process in the guest.
type Process struct {
	c                   *Client
	ContainerID, ExecID string
	// Pid is the init's PID in the guest once created (execs: 0 until
	// started).
	Pid     uint32
	streams []net.Conn
	copies  sync.WaitGroup
	stdin   net.Conn
}

// CreateFromBundle creates container id from the OCI bundle at bundle
// (config.json and the rootfs it names), which must lie in the share: the
// guest bind-mounts the rootfs from the share and runs the spec's process,
// not yet started.
func (c *Client) CreateFromBundle(ctx context.Context, id, bundle string, share Share, stdio Stdio) (*Process, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("agentclient: bundle: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("agentclient: %s/config.json: %w", bundle, err)
	}
	if spec.Root == nil {
		return nil, fmt.Errorf("agentclient: %s/config.json has no root", bundle)
	}
	root := spec.Root.Path
	if !filepath.IsAbs(root) {
		root = filepath.Join(bundle, root)
	}
	guestRoot, err := share.GuestPath(root)
	if err != nil {
		return nil, err
	}
	return c.Create(ctx, id, &spec, guestRoot, stdio)
}

// Create creates container id from spec, whose rootfs is the guest
// directory guestRoot (in the share), not yet started. With a terminal,
// stdout carries the terminal's output and there is no stderr stream.
func (c *Client) Create(ctx context.Context, id string, spec *specs.Spec, guestRoot string, stdio Stdio) (*Process, error) {
	if spec.Root == nil || spec.Process == nil {
		return nil, errors.New("agentclient: the spec has no root or process")
	}
	// The agent mounts the rootfs at its own bundle's rootfs.
	guestSpec := *spec
	root := *spec.Root
	root.Path = "rootfs"
	guestSpec.Root = &root
	sb, err := json.Marshal(&guestSpec)
	if err != nil {
		return nil, err
	}
	ro := []string{"rbind"}
	if root.Readonly {
		ro = append(ro, "ro")
	}
	if spec.Process.Terminal {
		stdio.Stderr = nil
	}
	resp, err := c.CreateContainer(ctx, &vmmtask.CreateContainerRequest{
		ContainerId: id, Spec: sb, Terminal: spec.Process.Terminal,
		Rootfs: []*vmmtask.MountRequest{{Type: "bind", Source: guestRoot, Options: ro}},
		Stdin:  stdio.Stdin != nil, Stdout: stdio.Stdout != nil, Stderr: stdio.Stderr != nil,
	})
	if err != nil {
		return nil, fmt.Errorf("agentclient: create container %s: %w", id, err)
	}
	p := &Process{c: c, ContainerID: id, Pid: resp.Pid}
	if err := p.attach(ctx, stdio); err != nil {
		p.closeStreams()
		_, _ = c.DeleteProcess(context.Background(), &vmmtask.DeleteProcessRequest{ContainerId: id})
		return nil, err
	}
	return p, nil
}

// Exec adds process spec to a container as execID, not yet started.
func (c *Client) Exec(ctx context.Context, containerID, execID string, spec *specs.Process, stdio Stdio) (*Process, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	if spec.Terminal {
		stdio.Stderr = nil
	}
	_, err = c.ExecProcess(ctx, &vmmtask.ExecProcessRequest{
		ContainerId: containerID, ExecId: execID, Process: b, Terminal: spec.Terminal,
		Stdin: stdio.Stdin != nil, Stdout: stdio.Stdout != nil, Stderr: stdio.Stderr != nil,
	})
	if err != nil {
		return nil, fmt.Errorf("agentclient: exec %s in %s: %w", execID, containerID, err)
	}
	p := &Process{c: c, ContainerID: containerID, ExecID: execID}
	if err := p.attach(ctx, stdio); err != nil {
		p.closeStreams()
		return nil, err
	}
	return p, nil
}

// AttachIO returns a handle on a process the guest already has (one
// created before the host's daemon restarted) with its output streams
// attached again: the guest kept the output while no host was attached.
func (c *Client) AttachIO(ctx context.Context, containerID, execID string, stdio Stdio) (*Process, error) {
	p := c.Attach(containerID, execID)
	if err := p.attach(ctx, stdio); err != nil {
		p.closeStreams()
		return nil, err
	}
	return p, nil
}

// Attach returns a handle on a process the guest already has (one created
// before the host's daemon restarted), without IO streams.
func (c *Client) Attach(containerID, execID string) *Process {
	return &Process{c: c, ContainerID: containerID, ExecID: execID}
}

// maxRefusal bounds the error text of a refused IO stream that is kept.
const maxRefusal = 4096

// OpenStream opens one IO stream of a process on the IO port. A guest that
// does not answer within the stall timeout is not waited for.
func (c *Client) OpenStream(ctx context.Context, containerID, execID string, kind vmmtask.IOStreamHeader_Kind) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.stall)
	defer cancel()
	conn, err := c.dialer.Dial(ctx, transport.IOPort)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	h, _ := proto.Marshal(&vmmtask.IOStreamHeader{ContainerId: containerID, ExecId: execID, Kind: kind})
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(h)))
	_, err = conn.Write(append(n[:], h...))
	if err == nil {
		_, err = io.ReadFull(conn, n[:])
	}
	var refusal []byte
	if l := binary.BigEndian.Uint32(n[:]); err == nil && l > 0 {
		refusal = make([]byte, min(l, maxRefusal))
		k, _ := io.ReadFull(conn, refusal)
		refusal = refusal[:k]
	}
	if !stop() && refusal == nil {
		err = ctx.Err() // its end closed conn
	}
	switch {
	case refusal != nil:
		conn.Close()
		return nil, fmt.Errorf("agentclient: %s stream of %s/%s refused: %q", kind, containerID, execID, refusal)
	case err != nil:
		conn.Close()
		return nil, fmt.Errorf("agentclient: %s stream of %s/%s: no answer: %w", kind, containerID, execID, err)
	}
	return conn, nil
}

func (p *Process) attach(ctx context.Context, stdio Stdio) error {
	open := func(kind vmmtask.IOStreamHeader_Kind) (net.Conn, error) {
		s, err := p.c.OpenStream(ctx, p.ContainerID, p.ExecID, kind)
		if err == nil {
			p.streams = append(p.streams, s)
		}
		return s, err
	}
	for _, o := range []struct {
		w    io.Writer
		kind vmmtask.IOStreamHeader_Kind
	}{{stdio.Stdout, vmmtask.IOStreamHeader_STDOUT}, {stdio.Stderr, vmmtask.IOStreamHeader_STDERR}} {
		if o.w == nil {
			continue
		}
		s, err := open(o.kind)
		if err != nil {
			return err
		}
		p.copies.Add(1)
		go func(w io.Writer) {
			defer p.copies.Done()
			_, _ = io.Copy(w, s)
		}(o.w)
	}
	if stdio.Stdin != nil {
		s, err := open(vmmtask.IOStreamHeader_STDIN)
		if err != nil {
			return err
		}
		p.stdin = s
		go func() {
			_, _ = io.Copy(s, stdio.Stdin)
			s.Close()
		}()
	}
	return nil
}

func (p *Process) closeStreams() {
	for _, s := range p.streams {
		s.Close()
	}
}

// Start starts the process and returns its PID in the guest.
func (p *Process) Start(ctx context.Context) (uint32, error) {
	r, err := p.c.StartProcess(ctx, &vmmtask.StartProcessRequest{ContainerId: p.ContainerID, ExecId: p.ExecID})
	if err != nil {
		return 0, fmt.Errorf("agentclient: start %s/%s: %w", p.ContainerID, p.ExecID, err)
	}
	return r.Pid, nil
}

// Wait waits for the process to exit and its output streams to end, and
// returns its exit status.
func (p *Process) Wait(ctx context.Context) (uint32, error) {
	status, _, err := p.Exit(ctx)
	return status, err
}

// Exit is Wait that also reports when, by the guest's clock, the process
// exited.
func (p *Process) Exit(ctx context.Context) (uint32, time.Time, error) {
	r, err := p.c.WaitProcess(ctx, &vmmtask.WaitProcessRequest{ContainerId: p.ContainerID, ExecId: p.ExecID})
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("agentclient: wait %s/%s: %w", p.ContainerID, p.ExecID, err)
	}
	at := time.Unix(0, r.ExitedAtUnixNs)
	done := make(chan struct{})
	go func() { p.copies.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return r.ExitStatus, at, fmt.Errorf("agentclient: output of %s/%s did not end: %w", p.ContainerID, p.ExecID, ctx.Err())
	}
	return r.ExitStatus, at, nil
}

// Signal sends sig to the process (to every process of the container
// when all).
func (p *Process) Signal(ctx context.Context, sig uint32, all bool) error {
	_, err := p.c.SignalProcess(ctx, &vmmtask.SignalProcessRequest{ContainerId: p.ContainerID, ExecId: p.ExecID, Signal: sig, All: all})
	if err != nil {
		return fmt.Errorf("agentclient: signal %s/%s: %w", p.ContainerID, p.ExecID, err)
	}
	return nil
}

// State reports the process's status in the guest.
func (p *Process) State(ctx context.Context) (*vmmtask.ProcessStateResponse, error) {
	return p.c.ProcessState(ctx, &vmmtask.ProcessStateRequest{ContainerId: p.ContainerID, ExecId: p.ExecID})
}

// Delete deletes the exited process (the init: the container) and closes
// its streams.
func (p *Process) Delete(ctx context.Context) (*vmmtask.DeleteProcessResponse, error) {
	r, err := p.c.DeleteProcess(ctx, &vmmtask.DeleteProcessRequest{ContainerId: p.ContainerID, ExecId: p.ExecID})
	p.closeStreams()
	if err != nil {
		return nil, fmt.Errorf("agentclient: delete %s/%s: %w", p.ContainerID, p.ExecID, err)
	}
	return r, nil
}
