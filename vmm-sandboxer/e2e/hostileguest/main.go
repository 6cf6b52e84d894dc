// Command hostileguest is the guest agent as an attacker who owns the
// guest plays it, for the end-to-end tests (TestHostileGuest): it is the
// real vmm-task, except in a pod whose hostname is "hostile-<mode>", where
// it misbehaves as mode says:
//
//   - links: plants symlinks to host paths in the share, in the share's
//     container directories before and after each mount, swaps those
//     directories for links, and writes into read-only volumes, all the
//     time, from the pod's setup on; then reports on the console, as
//     "hostile: links: N tries, M took", how many of its writes the share
//     let through (it must let none);
//   - events: floods the host with OOM events;
//   - silent: answers nothing after the pod's setup;
//   - pings, streams, garbage: once the pod is set up, writes on the
//     serial link, between the multiplexer's own frames, a flood of pings,
//     streams it opens and fills and never reads, or garbage and a frame
//     of 4 GiB.
//
// It is built by the tests into their own guest image; it is never shipped.
package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/agent"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// link is the serial link of the multiplexer's current session.
var link atomic.Pointer[serialLink]

// serialLink lets floodLink write whole frames between the multiplexer's
// writes.
type serialLink struct {
	io.ReadWriteCloser
	mu sync.Mutex
}

func (l *serialLink) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ReadWriteCloser.Write(b)
}

// frame is a multiplexer (yamux, version 0) frame header.
func frame(typ byte, flags uint16, stream, length uint32) []byte {
	h := make([]byte, 12)
	h[1] = typ
	binary.BigEndian.PutUint16(h[2:], flags)
	binary.BigEndian.PutUint32(h[4:], stream)
	binary.BigEndian.PutUint32(h[8:], length)
	return h
}

const (
	typeData, typeWindowUpdate, typePing = 0, 1, 2
	flagSYN                              = 1
)

// floodLink misbehaves on the link once the pod's setup has been answered,
// until the host cuts it.
func floodLink(mode string) {
	time.Sleep(time.Second)
	l := link.Load()
	if l == nil {
		say("%s: no serial link", mode)
		return
	}
	n := 0
	var err error
	switch mode {
	case "pings":
		for ; err == nil && n < 1_000_000; n++ {
			_, err = l.Write(frame(typePing, flagSYN, 0, uint32(n)))
		}
	case "streams":
		// Streams the guest opens (even IDs), each filled with data
		// nobody reads.
		data := make([]byte, 64<<10)
		for ; err == nil && n < 100_000; n++ {
			id := uint32(2 * (n + 1))
			if _, err = l.Write(frame(typeWindowUpdate, flagSYN, id, 0)); err == nil {
				_, err = l.Write(append(frame(typeData, 0, id, uint32(len(data))), data...))
			}
		}
	case "garbage":
		junk := make([]byte, 4096)
		rand.Read(junk)
		if _, err = l.Write(junk); err == nil {
			_, err = l.Write(frame(typeData, 0, 1, 1<<32-1))
		}
		n = 1
	}
	say("%s: wrote %d, then %v", mode, n, err)
}

func main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "hostileguest: runs only as PID 1 of a test VM")
		os.Exit(2)
	}
	err := agent.Main(
		agent.WrapService(func(s *agent.Service) vmmtask.AgentService { return &hostile{Service: s} }),
		agent.WithLink(transport.WrapSerialLink(func(rwc io.ReadWriteCloser) io.ReadWriteCloser {
			l := &serialLink{ReadWriteCloser: rwc}
			link.Store(l)
			return l
		})),
	)
	fmt.Fprintf(os.Stderr, "hostileguest: fatal: %v; powering off\n", err)
	_ = agent.PowerOff()
	select {}
}

// HostnamePrefix marks a pod whose guest misbehaves.
const HostnamePrefix = "hostile-"

type hostile struct {
	*agent.Service
	mode  atomic.Value // string, once SetupSandbox ran
	share atomic.Value // string: where the guest mounted the share
	links linkStats
}

func (h *hostile) modeIs(m string) bool {
	v, _ := h.mode.Load().(string)
	return v == m
}

func (h *hostile) SetupSandbox(ctx context.Context, r *vmmtask.SetupSandboxRequest) (*vmmtask.Empty, error) {
	resp, err := h.Service.SetupSandbox(ctx, r)
	if err != nil {
		return resp, err
	}
	mode, ok := strings.CutPrefix(r.Hostname, HostnamePrefix)
	if !ok {
		return resp, nil
	}
	h.mode.Store(mode)
	for _, m := range r.Mounts {
		if m.Type == "virtiofs" {
			h.share.Store(m.Target)
		}
	}
	say("mode %s", mode)
	switch mode {
	case "links":
		go h.plantForever()
	case "pings", "streams", "garbage":
		go floodLink(mode)
	}
	return resp, nil
}

// silence blocks a call of a silent guest until the host gives up on it.
func (h *hostile) silence(ctx context.Context) error {
	<-ctx.Done()
	return ctx.Err()
}

func (h *hostile) Ping(ctx context.Context, r *vmmtask.PingRequest) (*vmmtask.PingResponse, error) {
	if h.modeIs("silent") {
		return nil, h.silence(ctx)
	}
	return h.Service.Ping(ctx, r)
}

func (h *hostile) Shutdown(ctx context.Context, r *vmmtask.ShutdownRequest) (*vmmtask.Empty, error) {
	if h.modeIs("silent") {
		return nil, h.silence(ctx)
	}
	return h.Service.Shutdown(ctx, r)
}

func (h *hostile) CreateContainer(ctx context.Context, r *vmmtask.CreateContainerRequest) (*vmmtask.CreateContainerResponse, error) {
	switch {
	case h.modeIs("silent"):
		return nil, h.silence(ctx)
	case h.modeIs("links"):
		// Before and after the guest's own mounts: the host's are done.
		h.plantIn(r.ContainerId)
		defer h.plantIn(r.ContainerId)
	}
	return h.Service.CreateContainer(ctx, r)
}

func (h *hostile) StartProcess(ctx context.Context, r *vmmtask.StartProcessRequest) (*vmmtask.StartProcessResponse, error) {
	if h.modeIs("silent") {
		return nil, h.silence(ctx)
	}
	if h.modeIs("links") {
		h.plantIn(r.ContainerId)
	}
	return h.Service.StartProcess(ctx, r)
}

// Events floods in the events mode: the host opens the stream after the
// pod's setup, so the mode is known by then.
func (h *hostile) Events(ctx context.Context, r *vmmtask.EventsRequest, srv vmmtask.Agent_EventsServer) error {
	if h.modeIs("events") {
		return h.floodEvents(ctx, srv)
	}
	return h.Service.Events(ctx, r, srv)
}

// floodEvents sends OOM events as fast as the link takes them, for every
// container name it can think of, until the host closes the stream.
func (h *hostile) floodEvents(ctx context.Context, srv vmmtask.Agent_EventsServer) error {
	say("events: flooding")
	n := 0
	defer func() { say("events: sent %d", n) }()
	for ctx.Err() == nil {
		ev := &vmmtask.Event{ContainerId: fmt.Sprintf("c%d", n%64), Kind: &vmmtask.Event_Oom{Oom: &vmmtask.OOMEvent{}}}
		if err := srv.Send(ev); err != nil {
			return err
		}
		n++
	}
	return ctx.Err()
}

type linkStats struct {
	mu          sync.Mutex
	tries, took int
	first       []string
}

func (s *linkStats) record(what string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tries++
	if err == nil {
		s.took++
		if len(s.first) < 8 {
			s.first = append(s.first, what)
		}
	}
}

func (s *linkStats) report() {
	s.mu.Lock()
	defer s.mu.Unlock()
	say("links: %d tries, %d took %v", s.tries, s.took, s.first)
}

// hostTargets are host paths a link in the share would aim a host mount
// or write at.
var hostTargets = []string{"/etc/cron.d", "/etc", "/", "../../../../../../etc"}

// plantForever plants links in the share as fast as it can, and reports
// every second.
func (h *hostile) plantForever() {
	share, _ := h.share.Load().(string)
	last := time.Now()
	for {
		for i, target := range hostTargets {
			link := filepath.Join(share, fmt.Sprintf("planted-%d", i))
			h.links.record("share/"+filepath.Base(link), os.Symlink(target, link))
		}
		ents, _ := os.ReadDir(share)
		for _, e := range ents {
			if e.IsDir() {
				h.plantIn(e.Name())
			}
		}
		if time.Since(last) > time.Second {
			h.links.report()
			last = time.Now()
		}
		time.Sleep(time.Millisecond)
	}
}

// plantIn attacks one container's directory in the share: links where the
// host mounts (the rootfs, the n-th exposed path), writes into what is
// there, and a swap of the directory itself for a link.
func (h *hostile) plantIn(id string) {
	share, _ := h.share.Load().(string)
	if share == "" || id == "" || strings.Contains(id, "/") {
		return
	}
	dir := filepath.Join(share, id)
	for n := 0; n < 6; n++ {
		for _, name := range []string{fmt.Sprintf("m%d-data", n), fmt.Sprintf("m%d-ro", n), fmt.Sprintf("m%d-hosts", n)} {
			h.links.record(id+"/"+name, os.Symlink(hostTargets[0], filepath.Join(dir, name)))
		}
	}
	h.links.record(id+"/rootfs.new", os.Symlink("/", filepath.Join(dir, "rootfs.new")))
	h.links.record(id+"/file", os.WriteFile(filepath.Join(dir, "planted"), []byte("x"), 0o644))
	h.links.record(id+" renamed", os.Rename(dir, dir+".moved"))
	h.links.record(id+" swapped", os.Symlink(hostTargets[0], dir+".swap"))
	// A read-only volume the pod mounted: exposed names end in "-ro" in
	// the tests.
	vols, _ := filepath.Glob(filepath.Join(dir, "m*-ro"))
	for _, v := range vols {
		h.links.record(id+"/"+filepath.Base(v)+" write", os.WriteFile(filepath.Join(v, "planted"), []byte("x"), 0o644))
	}
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hostile: "+format+"\n", args...)
}
