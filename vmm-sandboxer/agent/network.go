package agent

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
)

// UpdateInterfaces configures each interface the host names: found by MAC
// (the host gives the guest's NIC the MAC of the pod's interface), else by
// name; renamed to the requested name, given the MTU, exactly the requested
// addresses (others are removed, link-local IPv6 kept) and brought up.
func (s *Service) UpdateInterfaces(ctx context.Context, r *vmmtask.UpdateInterfacesRequest) (*vmmtask.Empty, error) {
	for _, i := range r.Interfaces {
		if err := configureInterface(i); err != nil {
			return nil, status.Errorf(codes.Internal, "interface %s (%s): %v", i.Name, i.Mac, err)
		}
	}
	return &vmmtask.Empty{}, nil
}

func findLink(name, mac string) (netlink.Link, error) {
	if mac != "" {
		hw, err := net.ParseMAC(mac)
		if err != nil {
			return nil, fmt.Errorf("MAC %q: %w", mac, err)
		}
		links, err := netlink.LinkList()
		if err != nil {
			return nil, err
		}
		for _, l := range links {
			if l.Attrs().HardwareAddr.String() == hw.String() {
				return l, nil
			}
		}
		return nil, fmt.Errorf("no interface has MAC %s", hw)
	}
	if name == "" {
		return nil, fmt.Errorf("neither a MAC nor a name")
	}
	return netlink.LinkByName(name)
}

func configureInterface(i *vmmtask.Interface) error {
	link, err := findLink(i.Name, i.Mac)
	if err != nil {
		return err
	}
	if i.Name != "" && link.Attrs().Name != i.Name {
		if err := netlink.LinkSetDown(link); err != nil {
			return fmt.Errorf("down for rename: %w", err)
		}
		if err := netlink.LinkSetName(link, i.Name); err != nil {
			return fmt.Errorf("rename %s to %s: %w", link.Attrs().Name, i.Name, err)
		}
		if link, err = netlink.LinkByName(i.Name); err != nil {
			return err
		}
	}
	if i.Mtu != 0 && int(i.Mtu) != link.Attrs().MTU {
		if err := netlink.LinkSetMTU(link, int(i.Mtu)); err != nil {
			return fmt.Errorf("mtu %d: %w", i.Mtu, err)
		}
	}
	want := map[string]*netlink.Addr{}
	for _, a := range i.Addresses {
		addr, err := netlink.ParseAddr(a.Address)
		if err != nil {
			return fmt.Errorf("address %q: %w", a.Address, err)
		}
		want[addr.IPNet.String()] = addr
	}
	have, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	for _, a := range have {
		if _, ok := want[a.IPNet.String()]; ok || a.IP.IsLinkLocalUnicast() {
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil {
			return fmt.Errorf("remove address %s: %w", a.IPNet, err)
		}
	}
	keys := make([]string, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := netlink.AddrReplace(link, want[k]); err != nil {
			return fmt.Errorf("address %s: %w", k, err)
		}
	}
	if i.Up {
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("up: %w", err)
		}
	}
	return nil
}

// UpdateRoutes adds or replaces the given routes: routes without a gateway
// first (a gateway must be reachable when its route is added).
func (s *Service) UpdateRoutes(ctx context.Context, r *vmmtask.UpdateRoutesRequest) (*vmmtask.Empty, error) {
	routes := append([]*vmmtask.Route(nil), r.Routes...)
	sort.SliceStable(routes, func(a, b int) bool { return routes[a].Gateway == "" && routes[b].Gateway != "" })
	for _, rt := range routes {
		nr, err := toNetlinkRoute(rt)
		if err == nil {
			err = netlink.RouteReplace(nr)
		}
		if err != nil {
			return nil, status.Errorf(codes.Internal, "route %s via %q dev %s: %v", orDefault(rt.Destination), rt.Gateway, rt.Device, err)
		}
	}
	return &vmmtask.Empty{}, nil
}

func orDefault(dst string) string {
	if dst == "" {
		return "default"
	}
	return dst
}

func toNetlinkRoute(rt *vmmtask.Route) (*netlink.Route, error) {
	nr := &netlink.Route{Scope: netlink.Scope(rt.Scope), Priority: int(rt.Metric)}
	if rt.Device != "" {
		l, err := netlink.LinkByName(rt.Device)
		if err != nil {
			return nil, fmt.Errorf("device: %w", err)
		}
		nr.LinkIndex = l.Attrs().Index
	}
	if rt.Gateway != "" {
		if nr.Gw = net.ParseIP(rt.Gateway); nr.Gw == nil {
			return nil, fmt.Errorf("gateway %q is not an IP address", rt.Gateway)
		}
	}
	if rt.Source != "" {
		if nr.Src = net.ParseIP(rt.Source); nr.Src == nil {
			return nil, fmt.Errorf("source %q is not an IP address", rt.Source)
		}
	}
	if rt.Destination != "" && rt.Destination != "default" {
		_, dst, err := net.ParseCIDR(rt.Destination)
		if err != nil {
			return nil, fmt.Errorf("destination: %w", err)
		}
		nr.Dst = dst
	} else {
		// The default route of the gateway's family.
		if nr.Gw != nil && nr.Gw.To4() == nil {
			nr.Dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		} else {
			nr.Dst = &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
		}
	}
	if nr.Gw == nil && rt.Scope == 0 && !strings.Contains(rt.Destination, ":") {
		nr.Scope = netlink.Scope(unix.RT_SCOPE_LINK)
	}
	return nr, nil
}
