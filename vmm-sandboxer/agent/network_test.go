package agent

import (
	"context"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
)

// inNewNetns runs f on a thread of its own in a new network namespace,
// which the thread takes with it when it ends (it is never unlocked).
func inNewNetns(t *testing.T, f func()) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare netns: %v", err)
			return
		}
		f()
	}()
	<-done
}

func addrsOf(t *testing.T, name string) []string {
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	as, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
	var out []string
	for _, a := range as {
		if !a.IP.IsLinkLocalUnicast() {
			out = append(out, a.IPNet.String())
		}
	}
	slices.Sort(out)
	return out
}

func TestUpdateInterfacesAndRoutes(t *testing.T) {
	inNewNetns(t, func() {
		mac, _ := net.ParseMAC("02:42:0a:01:02:03")
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "veth0", HardwareAddr: mac}, PeerName: "veth1"}
		if err := netlink.LinkAdd(veth); err != nil {
			t.Errorf("add veth: %v", err)
			return
		}
		s := &Service{Log: zaptest.NewLogger(t)}
		ctx := context.Background()
		_, err := s.UpdateInterfaces(ctx, &vmmtask.UpdateInterfacesRequest{Interfaces: []*vmmtask.Interface{{
			Name: "eth0", Mac: mac.String(), Mtu: 1400, Up: true,
			Addresses: []*vmmtask.IPAddress{{Address: "10.1.2.3/24"}, {Address: "fd00::3/64"}},
		}}})
		if err != nil {
			t.Error(err)
			return
		}
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			t.Errorf("renamed link: %v", err)
			return
		}
		if l.Attrs().MTU != 1400 || l.Attrs().Flags&net.FlagUp == 0 {
			t.Errorf("eth0: mtu %d flags %v", l.Attrs().MTU, l.Attrs().Flags)
		}
		if got := addrsOf(t, "eth0"); !slices.Equal(got, []string{"10.1.2.3/24", "fd00::3/64"}) {
			t.Errorf("addresses %q", got)
		}
		// Again with one address: the others go.
		_, err = s.UpdateInterfaces(ctx, &vmmtask.UpdateInterfacesRequest{Interfaces: []*vmmtask.Interface{{
			Mac: mac.String(), Addresses: []*vmmtask.IPAddress{{Address: "10.1.2.4/24"}}, Up: true,
		}}})
		if err != nil {
			t.Error(err)
		}
		if got := addrsOf(t, "eth0"); !slices.Equal(got, []string{"10.1.2.4/24"}) {
			t.Errorf("addresses after the update %q", got)
		}

		_, err = s.UpdateRoutes(ctx, &vmmtask.UpdateRoutesRequest{Routes: []*vmmtask.Route{
			{Gateway: "10.1.2.1", Device: "eth0"}, // given first, added after the link route
			{Destination: "10.9.0.0/16", Device: "eth0"},
		}})
		if err != nil {
			t.Error(err)
		}
		routes, _ := netlink.RouteList(l, netlink.FAMILY_V4)
		var got []string
		for _, r := range routes {
			got = append(got, r.String())
		}
		joined := strings.Join(got, "\n")
		if !strings.Contains(joined, "Dst: 0.0.0.0/0") || !strings.Contains(joined, "Gw: 10.1.2.1") || !strings.Contains(joined, "Dst: 10.9.0.0/16") {
			t.Errorf("routes:\n%s", joined)
		}

		tests := []struct {
			name string
			call func() error
			want string
		}{
			{"unknown MAC", func() error {
				_, err := s.UpdateInterfaces(ctx, &vmmtask.UpdateInterfacesRequest{Interfaces: []*vmmtask.Interface{{Mac: "02:00:00:00:00:99"}}})
				return err
			}, "no interface has MAC 02:00:00:00:00:99"},
			{"bad address", func() error {
				_, err := s.UpdateInterfaces(ctx, &vmmtask.UpdateInterfacesRequest{Interfaces: []*vmmtask.Interface{{Name: "eth0", Addresses: []*vmmtask.IPAddress{{Address: "10.1.2"}}}}})
				return err
			}, `address "10.1.2"`},
			{"unknown device", func() error {
				_, err := s.UpdateRoutes(ctx, &vmmtask.UpdateRoutesRequest{Routes: []*vmmtask.Route{{Destination: "10.8.0.0/16", Device: "nope"}}})
				return err
			}, "dev nope"},
			{"bad gateway", func() error {
				_, err := s.UpdateRoutes(ctx, &vmmtask.UpdateRoutesRequest{Routes: []*vmmtask.Route{{Gateway: "gw", Device: "eth0"}}})
				return err
			}, `gateway "gw" is not an IP address`},
		}
		for _, tc := range tests {
			if err := tc.call(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
			}
		}
	})
}
