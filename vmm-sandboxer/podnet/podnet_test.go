package podnet

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kuasar-go/kuasar-go/shared/testenv"
)

// vnetHdrLen is the virtio_net_hdr that IFF_VNET_HDR puts before each frame.
const vnetHdrLen = 10

// podEnv is a pod netns whose veth eth0 (MTU 1400) is paired with host0 in
// a second, "host", netns, addressed and routed as a CNI plugin would.
type podEnv struct {
	podPath, hostPath string
	pod, host         *netlink.Handle
	eth0, host0       netlink.Link
}

func handleAt(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// addVeth makes name (MTU mtu) in the pod netns, its peer in the host one.
func (e *podEnv) addVeth(t *testing.T, name, peer string, mtu int) (netlink.Link, netlink.Link) {
	t.Helper()
	hostNs, err := netns.GetFromPath(e.hostPath)
	if err != nil {
		t.Fatal(err)
	}
	defer hostNs.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}, PeerName: peer, PeerNamespace: netlink.NsFd(hostNs)}
	if err := e.pod.LinkAdd(veth); err != nil {
		t.Fatalf("veth %s/%s: %v", name, peer, err)
	}
	l, err := e.pod.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	p, err := e.host.LinkByName(peer)
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		h *netlink.Handle
		l netlink.Link
	}{{e.pod, l}, {e.host, p}} {
		if err := x.h.LinkSetUp(x.l); err != nil {
			t.Fatal(err)
		}
	}
	return l, p
}

func addAddr(t *testing.T, h *netlink.Handle, l netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD // no tentative phase: routes via it at once
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("address %s: %v", cidr, err)
	}
}

func addRoute(t *testing.T, h *netlink.Handle, r *netlink.Route) {
	t.Helper()
	if err := h.RouteAdd(r); err != nil {
		t.Fatalf("route %v: %v", r, err)
	}
}

func cidr(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

func newPodEnv(t *testing.T) *podEnv {
	t.Helper()
	testenv.RequireRoot(t)
	e := &podEnv{podPath: testenv.NewNetns(t), hostPath: testenv.NewNetns(t)}
	e.pod, e.host = handleAt(t, e.podPath), handleAt(t, e.hostPath)
	e.eth0, e.host0 = e.addVeth(t, "eth0", "host0", 1400)
	for _, a := range []string{"10.77.1.2/24", "10.77.2.2/24", "fd00:77::2/64"} {
		addAddr(t, e.pod, e.eth0, a)
	}
	for _, a := range []string{"10.77.1.1/24", "fd00:77::1/64"} {
		addAddr(t, e.host, e.host0, a)
	}
	idx := e.eth0.Attrs().Index
	addRoute(t, e.pod, &netlink.Route{LinkIndex: idx, Gw: net.ParseIP("10.77.1.1")})
	addRoute(t, e.pod, &netlink.Route{LinkIndex: idx, Dst: cidr("192.168.77.0/24"), Gw: net.ParseIP("10.77.1.1"), Priority: 100})
	addRoute(t, e.pod, &netlink.Route{LinkIndex: idx, Dst: cidr("169.254.1.1/32"), Scope: netlink.SCOPE_LINK})
	addRoute(t, e.pod, &netlink.Route{LinkIndex: idx, Dst: cidr("::/0"), Gw: net.ParseIP("fd00:77::1")})
	return e
}

func setup(t *testing.T, path string) *Network {
	t.Helper()
	n, err := Setup(context.Background(), path)
	if err != nil {
		t.Fatalf("Setup: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := Teardown(context.Background(), path); err != nil {
			t.Errorf("Teardown: %v", err)
		}
	})
	return n
}

// redirectOf is where link's ingress redirect filter of ours sends frames
// (0: none), and whether link has an ingress qdisc.
func redirectOf(t *testing.T, h *netlink.Handle, l netlink.Link) (to int, ingress bool) {
	t.Helper()
	qs, err := h.QdiscList(l)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qs {
		ingress = ingress || q.Type() == "ingress"
	}
	if !ingress {
		return 0, false
	}
	fs, err := h.FilterList(l, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fs {
		u, ok := f.(*netlink.U32)
		if !ok || u.Priority != filterPriority {
			continue
		}
		for _, a := range u.Actions {
			if m, ok := a.(*netlink.MirredAction); ok && m.MirredAction == netlink.TCA_EGRESS_REDIR {
				to = m.Ifindex
			}
		}
	}
	return to, true
}

func TestSetup(t *testing.T) {
	e := newPodEnv(t)
	n := setup(t, e.podPath)

	if len(n.Interfaces) != 1 {
		t.Fatalf("interfaces: %+v, want eth0 only", n.Interfaces)
	}
	i := n.Interfaces[0]
	if i.Name != "eth0" || i.TapName != "tap0_kg" || i.MTU != 1400 || i.MAC.String() != e.eth0.Attrs().HardwareAddr.String() {
		t.Errorf("interface = %s tap %s MTU %d MAC %s, want eth0 tap0_kg 1400 %s", i.Name, i.TapName, i.MTU, i.MAC, e.eth0.Attrs().HardwareAddr)
	}
	var addrs []string
	for _, a := range i.Addrs {
		addrs = append(addrs, a.String())
	}
	slices.Sort(addrs)
	if want := []string{"10.77.1.2/24", "10.77.2.2/24", "fd00:77::2/64"}; !slices.Equal(addrs, want) {
		t.Errorf("addresses = %v, want %v (no link-local)", addrs, want)
	}
	wantRoutes := []Route{
		{Dst: "", Gateway: "10.77.1.1", Device: "eth0"},
		{Dst: "", Gateway: "fd00:77::1", Device: "eth0", Metric: 1024},
		{Dst: "169.254.1.1/32", Device: "eth0", Scope: unix.RT_SCOPE_LINK},
		{Dst: "192.168.77.0/24", Gateway: "10.77.1.1", Device: "eth0", Metric: 100},
	}
	byDst := func(a, b Route) int { return strings.Compare(a.Dst+" "+a.Gateway, b.Dst+" "+b.Gateway) }
	got := slices.Clone(n.Routes)
	slices.SortFunc(got, byDst)
	slices.SortFunc(wantRoutes, byDst)
	if !slices.Equal(got, wantRoutes) {
		t.Errorf("routes = %+v\nwant (no kernel prefix routes) %+v", got, wantRoutes)
	}

	tap, err := e.pod.LinkByName("tap0_kg")
	if err != nil {
		t.Fatalf("tap: %v", err)
	}
	if tap.Type() != "tuntap" || tap.Attrs().MTU != 1400 || tap.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("tap type %s MTU %d flags %v, want an up tuntap of MTU 1400", tap.Type(), tap.Attrs().MTU, tap.Attrs().Flags)
	}
	ifr, err := unix.NewIfreq("")
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(int(i.Tap.Fd()), unix.TUNGETIFF, ifr); err != nil {
		t.Fatalf("TUNGETIFF: %v", err)
	}
	const want = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_PERSIST
	if flags := ifr.Uint16(); flags&^unix.IFF_TUN_EXCL != want {
		t.Errorf("tap flags %#x, want %#x (tap, no PI, vnet_hdr, persistent, one queue)", flags, want)
	}
	if to, ok := redirectOf(t, e.pod, e.eth0); !ok || to != tap.Attrs().Index {
		t.Errorf("eth0: ingress %v, redirect to ifindex %d, want tap %d", ok, to, tap.Attrs().Index)
	}
	if to, ok := redirectOf(t, e.pod, tap); !ok || to != e.eth0.Attrs().Index {
		t.Errorf("tap: ingress %v, redirect to ifindex %d, want eth0 %d", ok, to, e.eth0.Attrs().Index)
	}

	// The taps outlive the files.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.pod.LinkByName("tap0_kg"); err != nil {
		t.Errorf("tap gone after Close: %v", err)
	}
}

// inNetns runs fn on a thread in the netns at path; the thread is never
// given back to the scheduler.
func inNetns(t *testing.T, path string, fn func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// readFrame reads frames from the tap until one passes match, and returns
// it without its virtio-net header.
func readFrame(t *testing.T, tap *os.File, what string, match func(f []byte) bool) []byte {
	t.Helper()
	if err := tap.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65536)
	for {
		n, err := tap.Read(buf)
		if err != nil {
			t.Fatalf("waiting on the tap for %s: %v", what, err)
		}
		if f := buf[vnetHdrLen:n]; n > vnetHdrLen+14 && match(f) {
			return slices.Clone(f)
		}
	}
}

func writeFrame(t *testing.T, tap *os.File, f []byte) {
	t.Helper()
	if _, err := tap.Write(append(make([]byte, vnetHdrLen), f...)); err != nil {
		t.Fatalf("write to tap: %v", err)
	}
}

// TestRedirect plays the guest on the tap: the host netns pings the pod IP;
// its ARP request and echo request must come out of the tap (eth0 -> tap),
// and the ARP and echo replies written to the tap must reach the host's
// stack (tap -> eth0), which the pod netns' own stack never sees.
func TestRedirect(t *testing.T) {
	e := newPodEnv(t)
	n := setup(t, e.podPath)
	tap := n.Interfaces[0].Tap
	podMAC, hostMAC := e.eth0.Attrs().HardwareAddr, e.host0.Attrs().HardwareAddr
	podIP, hostIP := net.IPv4(10, 77, 1, 2).To4(), net.IPv4(10, 77, 1, 1).To4()

	var icmp net.PacketConn
	inNetns(t, e.hostPath, func() (err error) {
		icmp, err = net.ListenPacket("ip4:icmp", hostIP.String())
		return err
	})
	t.Cleanup(func() { icmp.Close() })
	echo := []byte{8, 0, 0, 0, 0x70, 0x6e, 0, 1, 'p', 'o', 'd', 'n', 'e', 't'}
	binary.BigEndian.PutUint16(echo[2:], checksum(echo))
	if _, err := icmp.WriteTo(echo, &net.IPAddr{IP: podIP}); err != nil {
		t.Fatalf("send echo request: %v", err)
	}

	arp := readFrame(t, tap, "the host's ARP request", func(f []byte) bool {
		return binary.BigEndian.Uint16(f[12:]) == unix.ETH_P_ARP && bytes.Equal(f[14+24:14+28], podIP)
	})
	if op := binary.BigEndian.Uint16(arp[14+6:]); op != 1 || !bytes.Equal(arp[6:12], hostMAC) || !bytes.Equal(arp[14+14:14+18], hostIP) {
		t.Fatalf("ARP frame %x: want a request from %s (%s)", arp, hostIP, hostMAC)
	}
	reply := slices.Clone(arp[:14+28])
	copy(reply[0:6], hostMAC)
	copy(reply[6:12], podMAC)
	binary.BigEndian.PutUint16(reply[14+6:], 2)
	copy(reply[14+8:], podMAC)
	copy(reply[14+14:], podIP)
	copy(reply[14+18:], hostMAC)
	copy(reply[14+24:], hostIP)
	writeFrame(t, tap, reply)

	req := readFrame(t, tap, "the echo request", func(f []byte) bool {
		return binary.BigEndian.Uint16(f[12:]) == unix.ETH_P_IP && f[14+9] == unix.IPPROTO_ICMP && bytes.Equal(f[14+16:14+20], podIP)
	})
	if !bytes.Equal(req[0:6], podMAC) || !bytes.Equal(req[14+12:14+16], hostIP) {
		t.Fatalf("echo frame %x: want one to %s from %s", req, podMAC, hostIP)
	}
	ihl := int(req[14]&0xf) * 4
	ip := req[14:]
	if tot := int(binary.BigEndian.Uint16(ip[2:])); tot <= len(ip) {
		ip = ip[:tot] // drop the Ethernet padding
	}
	if got := ip[ihl:]; got[0] != 8 || !bytes.Equal(got[4:], echo[4:]) {
		t.Fatalf("ICMP %x, want our echo request %x", got, echo)
	}
	out := make([]byte, 14+len(ip))
	copy(out[0:6], hostMAC)
	copy(out[6:12], podMAC)
	binary.BigEndian.PutUint16(out[12:], unix.ETH_P_IP)
	oip := out[14:]
	copy(oip, ip)
	copy(oip[12:16], podIP)
	copy(oip[16:20], hostIP)
	oip[10], oip[11] = 0, 0
	binary.BigEndian.PutUint16(oip[10:], checksum(oip[:ihl]))
	icmpOut := oip[ihl:]
	icmpOut[0], icmpOut[2], icmpOut[3] = 0, 0, 0
	binary.BigEndian.PutUint16(icmpOut[2:], checksum(icmpOut))
	writeFrame(t, tap, out)

	if err := icmp.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	for {
		k, from, err := icmp.ReadFrom(buf)
		if err != nil {
			t.Fatalf("no echo reply in the host netns: %v", err)
		}
		if from.String() == podIP.String() && k >= 8 && buf[0] == 0 && bytes.Equal(buf[4:k], echo[4:]) {
			return
		}
	}
}

// snapshot is what a netns holds that Setup touches: links, each with its
// qdisc kinds and ingress filter count.
func snapshot(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		qs, err := h.QdiscList(l)
		if err != nil {
			t.Fatal(err)
		}
		s := fmt.Sprintf("%s mtu %d:", l.Attrs().Name, l.Attrs().MTU)
		for _, q := range qs {
			s += " " + q.Type()
			if q.Type() == "ingress" {
				fs, err := h.FilterList(l, netlink.HANDLE_MIN_INGRESS)
				if err != nil {
					t.Fatal(err)
				}
				s += fmt.Sprintf("(%d filters)", len(fs))
			}
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

func TestTeardown(t *testing.T) {
	for _, tc := range []struct {
		name string
		// closeFirst: the daemon closed its tap files, as after a restart;
		// otherwise they are open, as a VMM would hold them.
		closeFirst bool
	}{
		{"files closed", true},
		{"files open", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newPodEnv(t)
			before := snapshot(t, e.pod)
			n, err := Setup(context.Background(), e.podPath)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { n.Close() })
			if tc.closeFirst {
				if err := n.Close(); err != nil {
					t.Fatal(err)
				}
			}
			// Teardown gets only the path: nothing from Setup's memory.
			for i := range 2 {
				if err := Teardown(context.Background(), e.podPath); err != nil {
					t.Fatalf("Teardown #%d: %v", i+1, err)
				}
				if after := snapshot(t, e.pod); !slices.Equal(after, before) {
					t.Fatalf("after Teardown #%d: %q, want as before Setup %q", i+1, after, before)
				}
			}
		})
	}
}

// TestTeardownKeepsForeignTC: an ingress qdisc already on eth0 with a
// filter of someone else's is reused by Setup and left by Teardown.
func TestTeardownKeepsForeignTC(t *testing.T) {
	e := newPodEnv(t)
	if err := e.pod.QdiscAdd(ingressQdisc(e.eth0.Attrs().Index)); err != nil {
		t.Fatal(err)
	}
	foreign := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: e.eth0.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS, Priority: 1, Protocol: unix.ETH_P_IP},
		ClassId:     netlink.MakeHandle(1, 1), // no action: gact may be a module this kernel lacks
	}
	if err := e.pod.FilterAdd(foreign); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, e.pod)
	setup(t, e.podPath)
	if err := Teardown(context.Background(), e.podPath); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(t, e.pod); !slices.Equal(after, before) {
		t.Fatalf("after Teardown: %q, want %q", after, before)
	}
}

func TestTeardownGoneNetns(t *testing.T) {
	testenv.RequireRoot(t)
	t.Run("never existed", func(t *testing.T) {
		if err := Teardown(context.Background(), filepath.Join(t.TempDir(), "nope")); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("deleted after Setup", func(t *testing.T) {
		e := newPodEnv(t)
		n, err := Setup(context.Background(), e.podPath)
		if err != nil {
			t.Fatal(err)
		}
		n.Close()
		// As CRI deletes a netns: unmount, then remove the file; Teardown
		// may come between the two.
		if err := unix.Unmount(e.podPath, unix.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
		if err := Teardown(context.Background(), e.podPath); err != nil {
			t.Fatalf("Teardown of an unmounted netns file: %v", err)
		}
		if err := os.Remove(e.podPath); err != nil {
			t.Fatal(err)
		}
		if err := Teardown(context.Background(), e.podPath); err != nil {
			t.Fatalf("Teardown of a removed netns: %v", err)
		}
	})
}

func TestSetupBadPath(t *testing.T) {
	testenv.RequireRoot(t)
	regular := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(regular, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path string
		is         error  // errors.Is the error, when set
		says       string // in the error's text
	}{
		{"missing", filepath.Join(t.TempDir(), "nope"), fs.ErrNotExist, "nope"},
		{"regular file", regular, errNoNamespace, regular},
		{"mount namespace", "/proc/self/ns/mnt", nil, "not a network namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := Setup(context.Background(), tc.path)
			if err == nil {
				n.Close()
				t.Fatal("Setup succeeded")
			}
			if (tc.is != nil && !errors.Is(err, tc.is)) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("error %q, want one that is %v and says %q", err, tc.is, tc.says)
			}
		})
	}
}

// TestSetupFailsMidway: a second interface whose MTU (65535) no tap can
// take makes Setup fail after eth0 is wired; eth0's tap, qdisc and filter
// must go too.
func TestSetupFailsMidway(t *testing.T) {
	e := newPodEnv(t)
	e.addVeth(t, "eth1", "host1", 65535)
	before := snapshot(t, e.pod)
	n, err := Setup(context.Background(), e.podPath)
	if err == nil {
		n.Close()
		Teardown(context.Background(), e.podPath)
		t.Fatal("Setup succeeded with a tap MTU of 65535")
	}
	if !strings.Contains(err.Error(), "eth1") || !strings.Contains(err.Error(), e.podPath) {
		t.Errorf("error %q does not name eth1 and the netns", err)
	}
	if after := snapshot(t, e.pod); !slices.Equal(after, before) {
		t.Fatalf("after the failed Setup: %q, want %q", after, before)
	}
}

// TestSetupTwice: a netns already wired is refused untouched.
func TestSetupTwice(t *testing.T) {
	e := newPodEnv(t)
	setup(t, e.podPath)
	before := snapshot(t, e.pod)
	n, err := Setup(context.Background(), e.podPath)
	if err == nil {
		n.Close()
		t.Fatal("second Setup succeeded")
	}
	if !strings.Contains(err.Error(), "tap0_kg") {
		t.Errorf("error %q does not name the tap", err)
	}
	if after := snapshot(t, e.pod); !slices.Equal(after, before) {
		t.Fatalf("after the refused Setup: %q, want %q", after, before)
	}
}

// TestSetupTwoInterfaces: each interface gets its own tap, in ifindex order.
func TestSetupTwoInterfaces(t *testing.T) {
	e := newPodEnv(t)
	eth1, _ := e.addVeth(t, "eth1", "host1", 9000)
	n := setup(t, e.podPath)
	var got []string
	for _, i := range n.Interfaces {
		got = append(got, fmt.Sprintf("%s>%s/%d", i.Name, i.TapName, i.MTU))
	}
	if want := []string{"eth0>tap0_kg/1400", "eth1>tap1_kg/9000"}; !slices.Equal(got, want) {
		t.Fatalf("interfaces %v, want %v", got, want)
	}
	tap1, err := e.pod.LinkByName("tap1_kg")
	if err != nil {
		t.Fatal(err)
	}
	if to, _ := redirectOf(t, e.pod, eth1); to != tap1.Attrs().Index {
		t.Errorf("eth1 redirects to %d, want tap1_kg %d", to, tap1.Attrs().Index)
	}
}
