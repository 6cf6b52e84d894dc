package podnet

import (
	vmmtask "github.com/kuasar-go/kuasar-go/proto/vmmtask/v1"
)

// ProtoInterfaces gives the interfaces in the guest agent's terms, for
// UpdateInterfaces: each up, with the pod interface's name, MAC (the agent
// finds the guest NIC by it, so give the NIC that MAC), MTU and addresses.
func (n *Network) ProtoInterfaces() []*vmmtask.Interface {
	out := make([]*vmmtask.Interface, 0, len(n.Interfaces))
	for _, i := range n.Interfaces {
		pi := &vmmtask.Interface{Name: i.Name, Mac: i.MAC.String(), Mtu: uint32(i.MTU), Up: true}
		for _, a := range i.Addrs {
			pi.Addresses = append(pi.Addresses, &vmmtask.IPAddress{Address: a.String()})
		}
		out = append(out, pi)
	}
	return out
}

// ProtoRoutes gives the routes in the guest agent's terms, for
// UpdateRoutes, to send after UpdateInterfaces (a route needs its device
// and, through the addresses, its gateway's subnet).
func (n *Network) ProtoRoutes() []*vmmtask.Route {
	out := make([]*vmmtask.Route, 0, len(n.Routes))
	for _, r := range n.Routes {
		out = append(out, &vmmtask.Route{
			Destination: r.Dst,
			Gateway:     r.Gateway,
			Device:      r.Device,
			Source:      r.Source,
			Scope:       uint32(r.Scope),
			Metric:      uint32(r.Metric),
		})
	}
	return out
}
