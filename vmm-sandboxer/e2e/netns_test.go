package e2e

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"runtime"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// podNet is what a pod's network namespace gives the VM: a tap device
// opened inside a namespace of its own (as the pod's netns would hold it),
// its file for QEMU, and an ICMP socket in that namespace to reach the
// guest from the host side.
type podNet struct {
	tap  *os.File
	icmp net.PacketConn
}

// newPodNet makes the namespace with tap0 addressed hostCIDR, up. The
// namespace lives as long as the tap file and the socket do.
func newPodNet(hostCIDR string) (*podNet, error) {
	type result struct {
		p   *podNet
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// This thread enters the namespace and is never given back: it
		// ends with the goroutine.
		runtime.LockOSThread()
		p, err := func() (*podNet, error) {
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return nil, fmt.Errorf("unshare netns: %w", err)
			}
			fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return nil, fmt.Errorf("open /dev/net/tun: %w", err)
			}
			tap := os.NewFile(uintptr(fd), "tap0")
			ifr, _ := unix.NewIfreq("tap0")
			ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
			if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
				tap.Close()
				return nil, fmt.Errorf("TUNSETIFF tap0: %w", err)
			}
			fail := func(err error) (*podNet, error) { tap.Close(); return nil, err }
			link, err := netlink.LinkByName("tap0")
			if err != nil {
				return fail(err)
			}
			addr, err := netlink.ParseAddr(hostCIDR)
			if err != nil {
				return fail(err)
			}
			if err := netlink.AddrAdd(link, addr); err != nil {
				return fail(err)
			}
			if err := netlink.LinkSetUp(link); err != nil {
				return fail(err)
			}
			icmp, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
			if err != nil {
				return fail(fmt.Errorf("icmp socket: %w", err))
			}
			return &podNet{tap: tap, icmp: icmp}, nil
		}()
		ch <- result{p, err}
	}()
	r := <-ch
	return r.p, r.err
}

func (p *podNet) Close() {
	p.icmp.Close()
	p.tap.Close()
}

// ping sends one ICMP echo request to ip from the namespace and waits for
// the reply.
func (p *podNet) ping(ip string, timeout time.Duration) error { return icmpPing(p.icmp, ip, timeout) }

// icmpPing sends one ICMP echo request to ip on conn (an ip4:icmp socket)
// and waits for the reply.
func icmpPing(conn net.PacketConn, ip string, timeout time.Duration) error {
	dst := &net.IPAddr{IP: net.ParseIP(ip)}
	msg := []byte{8, 0, 0, 0, 0x4b, 0x67, 0, 1, 'k', 'u', 'a', 's', 'a', 'r'}
	binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
	deadline := time.Now().Add(timeout)
	_ = conn.SetReadDeadline(deadline)
	if _, err := conn.WriteTo(msg, dst); err != nil {
		return fmt.Errorf("send echo to %s: %w", ip, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return fmt.Errorf("no echo reply from %s: %w", ip, err)
		}
		if from.String() == ip && n >= 8 && buf[0] == 0 && buf[4] == 0x4b && buf[5] == 0x67 {
			return nil
		}
	}
}

func icmpChecksum(b []byte) uint16 {
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
