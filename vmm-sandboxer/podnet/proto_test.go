package podnet

import (
	"net"
	"testing"

	"google.golang.org/protobuf/proto"

	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
)

func TestProto(t *testing.T) {
	mac, _ := net.ParseMAC("02:42:0a:4d:01:02")
	ip4, net4, _ := net.ParseCIDR("10.77.1.2/24")
	ip6, net6, _ := net.ParseCIDR("fd00:77::2/64")
	for _, tc := range []struct {
		name   string
		n      Network
		ifaces []*vmmtask.Interface
		routes []*vmmtask.Route
	}{
		{name: "empty", ifaces: []*vmmtask.Interface{}, routes: []*vmmtask.Route{}},
		{
			name: "dual stack",
			n: Network{
				Interfaces: []Interface{{
					Name: "eth0", MAC: mac, MTU: 1400, TapName: "tap0_kg",
					Addrs: []*net.IPNet{{IP: ip4, Mask: net4.Mask}, {IP: ip6, Mask: net6.Mask}},
				}},
				Routes: []Route{
					{Gateway: "10.77.1.1", Device: "eth0"},
					{Dst: "169.254.1.1/32", Device: "eth0", Scope: 253},
					{Dst: "192.168.77.0/24", Gateway: "10.77.1.1", Device: "eth0", Source: "10.77.1.2", Metric: 100},
					{Dst: "::/0", Device: "eth0", Metric: 1024},
				},
			},
			ifaces: []*vmmtask.Interface{{
				Name: "eth0", Mac: "02:42:0a:4d:01:02", Mtu: 1400, Up: true,
				Addresses: []*vmmtask.IPAddress{{Address: "10.77.1.2/24"}, {Address: "fd00:77::2/64"}},
			}},
			routes: []*vmmtask.Route{
				{Gateway: "10.77.1.1", Device: "eth0"},
				{Destination: "169.254.1.1/32", Device: "eth0", Scope: 253},
				{Destination: "192.168.77.0/24", Gateway: "10.77.1.1", Device: "eth0", Source: "10.77.1.2", Metric: 100},
				{Destination: "::/0", Device: "eth0", Metric: 1024},
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ifaces, routes := tc.n.ProtoInterfaces(), tc.n.ProtoRoutes()
			if !equal(ifaces, tc.ifaces) {
				t.Errorf("ProtoInterfaces = %v, want %v", ifaces, tc.ifaces)
			}
			if !equal(routes, tc.routes) {
				t.Errorf("ProtoRoutes = %v, want %v", routes, tc.routes)
			}
		})
	}
}

func equal[M proto.Message](a, b []M) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !proto.Equal(a[i], b[i]) {
			return false
		}
	}
	return true
}
