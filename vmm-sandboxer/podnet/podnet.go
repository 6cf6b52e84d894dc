// Package podnet wires a pod VM into the network namespace that CRI and CNI
// prepared for the pod.
//
// For every Ethernet interface CNI put in the namespace (a veth eth0, maybe
// more), Setup creates a tap device beside it in the same namespace and
// joins the two with tc: an ingress qdisc on each and a match-all u32
// filter whose mirred action redirects every frame that arrives on one to
// the egress of the other (what Kata Containers calls "tcfilter"). The VMM
// gets the open tap as the backend of a virtio-net NIC that has the
// interface's MAC, and the guest agent gives that NIC the interface's name,
// MTU, addresses and routes, which Setup records. The pod's interface keeps
// its addresses, but the redirect steals every frame it receives before the
// namespace's own stack sees it, so the guest answers for the pod IP.
//
// Everything Setup makes is found again by name (taps "tap<N>_kg") and by a
// filter priority of our own, so Teardown needs no state and works after a
// daemon restart.
package podnet

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Network is what Setup wired: the pod's interfaces, each with its tap, and
// the routes the guest needs to reach what the pod reaches.
type Network struct {
	Interfaces []Interface
	Routes     []Route
}

// Interface is one pod interface and the tap that carries its traffic.
type Interface struct {
	// Name is the interface's name in the netns (e.g. eth0); the guest
	// gives its NIC the same name.
	Name string
	// MAC is the interface's address. Give it to the guest's NIC: the peer
	// (and anything CNI configured by MAC) already knows it, and the agent
	// finds the NIC by it. The tap's own MAC never appears on the wire.
	MAC net.HardwareAddr
	// MTU is the interface's MTU; the tap has the same.
	MTU int
	// Addrs are the interface's global-scope IPv4 and IPv6 addresses, each
	// with its prefix length (IP is the address, not the network).
	Addrs []*net.IPNet
	// TapName is the tap's name in the netns, e.g. tap0_kg.
	TapName string
	// Tap is the open tap queue, for the VMM (QEMU: -netdev tap,fd=N).
	// See Setup for how it is opened.
	Tap *os.File
}

// Route is a route of the pod's main table through one of the pod's
// interfaces, in the guest agent's terms.
type Route struct {
	// Dst is the destination CIDR, "" for a default route with a gateway
	// (the gateway gives the family). A default route without a gateway
	// is written 0.0.0.0/0 or ::/0, since "" would lose its family.
	Dst     string
	Gateway string // "" for a route on the link
	Device  string // interface name, as in Interface.Name
	Source  string // preferred source address, "" for none
	Scope   uint8  // RT_SCOPE_* as in the netns (253 = link)
	Metric  int
}

// tapSuffix ends the name of every tap Setup makes, so Teardown finds them.
const tapSuffix = "_kg"

// filterPriority is the tc priority of the redirect filters, a value of our
// own so Teardown can tell them from filters someone else put on the pod's
// interface.
const filterPriority = 0x6b67

// tapName is the name of the tap for the n-th interface (in ifindex order);
// "tap%d_kg" stays well within IFNAMSIZ (15 bytes).
func tapName(n int) string { return fmt.Sprintf("tap%d%s", n, tapSuffix) }

func isOurTap(l netlink.Link) bool {
	name := l.Attrs().Name
	return l.Type() == "tuntap" && strings.HasPrefix(name, "tap") && strings.HasSuffix(name, tapSuffix)
}

// errNoNamespace marks a path with no namespace bound to it, like the file
// CRI leaves for an instant between unmounting a netns and removing it.
var errNoNamespace = errors.New("no namespace is bound there")

// openNetns opens the network namespace bound at path, checking that it is
// one: a handle for anything else would fail later with a vaguer error.
func openNetns(path string) (netns.NsHandle, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &fs.PathError{Op: "open netns", Path: path, Err: err}
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		unix.Close(fd)
		return -1, &fs.PathError{Op: "statfs netns", Path: path, Err: err}
	}
	if st.Type != unix.NSFS_MAGIC {
		unix.Close(fd)
		return -1, fmt.Errorf("netns %s: %w", path, errNoNamespace)
	}
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil || typ != unix.CLONE_NEWNET {
		unix.Close(fd)
		return -1, fmt.Errorf("netns %s: not a network namespace", path)
	}
	return netns.NsHandle(fd), nil
}

// Setup wires the netns at netnsPath (a file like /var/run/netns/cni-...)
// for a pod VM: for each Ethernet interface in it other than loopback, in
// ifindex order, it creates a persistent tap "tap<N>_kg" with the
// interface's MTU, up, and redirects with tc every frame received on the
// interface to the tap and every frame received on the tap (written by the
// VMM) to the interface. Interfaces that carry no Ethernet (the fallback
// tunnels sit0, tunl0... that some kernels put in every netns) are left
// alone. The ingress qdisc of a pod interface is reused if it has one.
//
// Each tap is opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, one queue,
// close-on-exec and non-blocking (so the file has deadlines and Close
// interrupts a read; QEMU sets O_NONBLOCK itself anyway). The virtio-net
// header lets the VMM pass checksum and segmentation offloads through the
// tap: QEMU (-netdev tap,fd=) probes the fd with TUNGETIFF and uses the
// header when present, working without it too; Cloud Hypervisor and
// Firecracker require it. A reader of the file (a test) sees a 10-byte
// virtio_net_hdr before each frame unless the VMM changes the size with
// TUNSETVNETHDRSZ. The taps persist when the files are closed; only
// Teardown or the netns' end removes them.
//
// It records each interface's MAC, MTU and global addresses, and the main
// table's routes through the interfaces that the guest must be given (see
// Route). It fails, having made nothing, when the netns already holds taps
// of ours (Teardown first). On any error it removes what it made.
func Setup(ctx context.Context, netnsPath string) (_ *Network, err error) {
	ns, err := openNetns(netnsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in netns %s: %w", netnsPath, err)
	}
	defer h.Close()

	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links in netns %s: %w", netnsPath, err)
	}
	slices.SortFunc(links, func(a, b netlink.Link) int { return a.Attrs().Index - b.Attrs().Index })
	var pod []netlink.Link
	for _, l := range links {
		if isOurTap(l) {
			return nil, fmt.Errorf("netns %s already has tap %s: tear it down first", netnsPath, l.Attrs().Name)
		}
		if l.Attrs().EncapType == "ether" && l.Attrs().Flags&net.FlagLoopback == 0 {
			pod = append(pod, l)
		}
	}

	n := &Network{}
	var undo []func()
	defer func() {
		if err != nil {
			for _, u := range slices.Backward(undo) {
				u()
			}
		}
	}()
	byIndex := map[int]string{}
	for i, l := range pod {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("netns %s: %w", netnsPath, err)
		}
		iface, err := wire(h, ns, l, tapName(i), &undo)
		if err != nil {
			return nil, fmt.Errorf("netns %s: interface %s: %w", netnsPath, l.Attrs().Name, err)
		}
		n.Interfaces = append(n.Interfaces, iface)
		byIndex[l.Attrs().Index] = l.Attrs().Name
	}
	if n.Routes, err = routes(h, byIndex); err != nil {
		return nil, fmt.Errorf("netns %s: %w", netnsPath, err)
	}
	return n, nil
}

// wire makes the tap for link and the redirects between them, pushing on
// undo what removes each thing made, and returns what the guest needs.
func wire(h *netlink.Handle, ns netns.NsHandle, link netlink.Link, tap string, undo *[]func()) (Interface, error) {
	a := link.Attrs()
	iface := Interface{Name: a.Name, MAC: a.HardwareAddr, MTU: a.MTU, TapName: tap}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return iface, fmt.Errorf("list addresses: %w", err)
	}
	for _, ad := range addrs {
		// Link-local addresses the guest's kernel makes itself (from the
		// same MAC); host-scope ones mean nothing outside this netns.
		if ad.Scope == unix.RT_SCOPE_UNIVERSE {
			iface.Addrs = append(iface.Addrs, ad.IPNet)
		}
	}

	f, err := createTap(ns, tap)
	if err != nil {
		return iface, err
	}
	iface.Tap = f
	// Undone in reverse: the file closed, then the tap deleted, which also
	// removes its qdisc and filter.
	*undo = append(*undo, func() {
		if l, err := h.LinkByName(tap); err == nil {
			_ = h.LinkDel(l)
		}
	}, func() { f.Close() })
	tl, err := h.LinkByName(tap)
	if err != nil {
		return iface, fmt.Errorf("find tap %s: %w", tap, err)
	}
	if err := h.LinkSetMTU(tl, a.MTU); err != nil {
		return iface, fmt.Errorf("tap %s: MTU %d: %w", tap, a.MTU, err)
	}
	if err := h.LinkSetUp(tl); err != nil {
		return iface, fmt.Errorf("tap %s: up: %w", tap, err)
	}

	added, err := ensureIngress(h, link)
	if err != nil {
		return iface, err
	}
	if added {
		*undo = append(*undo, func() { _ = h.QdiscDel(ingressQdisc(a.Index)) })
	}
	if err := h.FilterAdd(redirect(a.Index, tl.Attrs().Index)); err != nil {
		return iface, fmt.Errorf("redirect filter %s -> %s: %w", a.Name, tap, err)
	}
	*undo = append(*undo, func() { _ = h.FilterDel(redirect(a.Index, tl.Attrs().Index)) })
	if _, err := ensureIngress(h, tl); err != nil {
		return iface, err
	}
	if err := h.FilterAdd(redirect(tl.Attrs().Index, a.Index)); err != nil {
		return iface, fmt.Errorf("redirect filter %s -> %s: %w", tap, a.Name, err)
	}
	return iface, nil
}

// createTap creates the persistent tap name in ns and returns it open.
// Only opening /dev/net/tun needs a thread in ns: a tun file belongs to the
// netns of its opener, and so does the device TUNSETIFF makes with it.
func createTap(ns netns.NsHandle, name string) (*os.File, error) {
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread never leaves the locked state: it ends with this
		// goroutine instead of going back to the scheduler in ns.
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			ch <- result{-1, fmt.Errorf("enter netns: %w", err)}
			return
		}
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			err = fmt.Errorf("open /dev/net/tun: %w", err)
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	if r.err != nil {
		return nil, r.err
	}
	fd := r.fd
	// Closing fd removes a tap that is not yet persistent.
	fail := func(err error) (*os.File, error) { unix.Close(fd); return nil, err }
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fail(fmt.Errorf("tap name %q: %w", name, err))
	}
	// IFF_TUN_EXCL: fail rather than attach to a tap of that name that
	// appeared since the links were listed.
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_TUN_EXCL)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fail(fmt.Errorf("create tap %s (TUNSETIFF): %w", name, err))
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fail(fmt.Errorf("tap %s: TUNSETPERSIST: %w", name, err))
	}
	// Only now: the poller takes a tun file once it is attached to a tap.
	return os.NewFile(uintptr(fd), name), nil
}

func ingressQdisc(index int) *netlink.Ingress {
	return &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: index,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_INGRESS,
	}}
}

// ensureIngress adds an ingress qdisc to link unless it has one (ingress or
// clsact, which both hold ingress filters at ffff:fff2); added says which.
func ensureIngress(h *netlink.Handle, link netlink.Link) (added bool, err error) {
	qs, err := h.QdiscList(link)
	if err != nil {
		return false, fmt.Errorf("list qdiscs of %s: %w", link.Attrs().Name, err)
	}
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_INGRESS {
			return false, nil
		}
	}
	if err := h.QdiscAdd(ingressQdisc(link.Attrs().Index)); err != nil {
		return false, fmt.Errorf("ingress qdisc on %s: %w", link.Attrs().Name, err)
	}
	return true, nil
}

// redirect is the match-all u32 filter that sends every frame received on
// link from to the egress of link to.
func redirect(from, to int) *netlink.U32 {
	return &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from,
			Parent:    netlink.HANDLE_MIN_INGRESS,
			Priority:  filterPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		// A nil selector is netlink's match-all: one zero key, terminal.
		Actions: []netlink.Action{netlink.NewMirredAction(to)},
	}
}

// routes lists the main table's routes through the interfaces in byIndex
// (ifindex to name), leaving out what the guest cannot or need not apply:
//   - routes the kernel made (proto kernel): the prefix route of each
//     address and IPv6's fe80::/64, which the guest's kernel makes itself
//     when the agent adds the addresses;
//   - routes that are not unicast (blackhole, unreachable...), and
//     multipath routes, which name no single device and which the agent's
//     Route cannot express.
func routes(h *netlink.Handle, byIndex map[int]string) ([]Route, error) {
	rs, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	var out []Route
	for _, r := range rs {
		dev, ok := byIndex[r.LinkIndex]
		if !ok || r.Protocol == unix.RTPROT_KERNEL || r.Type != unix.RTN_UNICAST || len(r.MultiPath) != 0 {
			continue
		}
		rt := Route{Device: dev, Scope: uint8(r.Scope), Metric: r.Priority}
		if r.Gw != nil {
			rt.Gateway = r.Gw.String()
		}
		if r.Src != nil {
			rt.Source = r.Src.String()
		}
		// netlink gives a default route a zero-length Dst of its family.
		if ones, _ := r.Dst.Mask.Size(); ones != 0 || r.Gw == nil {
			rt.Dst = r.Dst.String()
		}
		out = append(out, rt)
	}
	return out, nil
}

// Close closes the tap files. The taps stay, and the VMM's copies of the
// files keep working, until Teardown.
func (n *Network) Close() error {
	var errs []error
	for i := range n.Interfaces {
		if f := n.Interfaces[i].Tap; f != nil {
			if err := f.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
				errs = append(errs, fmt.Errorf("close tap %s: %w", n.Interfaces[i].TapName, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Teardown removes from the netns at netnsPath what Setup made: the
// redirect filters on the pod's interfaces (found by their priority), the
// ingress qdiscs left empty by that, and the taps (found by name), with
// their own qdiscs and filters. It needs nothing from Setup, so it works
// after a restart; it is idempotent, and a netns that no longer exists (or
// is no longer bound at the path) is not an error: the kernel removed the
// taps with it. It tries everything and reports every failure.
//
// Stop the VMM first: a tap deleted under it only stops carrying frames,
// but the VMM's copy of a tap file keeps the netns alive until it exits.
func Teardown(ctx context.Context, netnsPath string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	ns, err := openNetns(netnsPath)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, errNoNamespace) {
		return nil
	}
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink handle in netns %s: %w", netnsPath, err)
	}
	defer h.Close()
	links, err := h.LinkList()
	if err != nil {
		return fmt.Errorf("list links in netns %s: %w", netnsPath, err)
	}
	var errs []error
	// Filters first, so nothing is redirected to a tap while it goes.
	for _, l := range links {
		if !isOurTap(l) {
			if err := removeRedirect(h, l); err != nil {
				errs = append(errs, fmt.Errorf("netns %s: interface %s: %w", netnsPath, l.Attrs().Name, err))
			}
		}
	}
	for _, l := range links {
		if isOurTap(l) {
			if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
				errs = append(errs, fmt.Errorf("netns %s: delete tap %s: %w", netnsPath, l.Attrs().Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeRedirect deletes our redirect filter from link's ingress, and the
// ingress qdisc if it is a plain one that no filter uses any more (Setup
// may have reused one that was there; an empty one costs nothing to lose).
func removeRedirect(h *netlink.Handle, link netlink.Link) error {
	qs, err := h.QdiscList(link)
	if err != nil {
		return fmt.Errorf("list qdiscs: %w", err)
	}
	var ingress netlink.Qdisc
	for _, q := range qs {
		if q.Attrs().Parent == netlink.HANDLE_INGRESS {
			ingress = q
		}
	}
	if ingress == nil {
		return nil
	}
	filters, err := h.FilterList(link, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return fmt.Errorf("list ingress filters: %w", err)
	}
	left := 0
	for _, f := range filters {
		fa := f.Attrs()
		if fa.Priority != filterPriority || f.Type() != "u32" {
			left++
			continue
		}
		// Handle 0 deletes the filter's whole priority: the u32 hash table
		// and the match-all entry in it.
		del := &netlink.U32{FilterAttrs: netlink.FilterAttrs{
			LinkIndex: fa.LinkIndex, Parent: netlink.HANDLE_MIN_INGRESS, Priority: fa.Priority, Protocol: fa.Protocol,
		}}
		if err := h.FilterDel(del); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete redirect filter: %w", err)
		}
	}
	if left == 0 && ingress.Type() == "ingress" {
		if err := h.QdiscDel(ingress); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete ingress qdisc: %w", err)
		}
	}
	return nil
}
