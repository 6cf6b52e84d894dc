package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"syscall"

	"github.com/containerd/errdefs"
	"go.uber.org/zap"

	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/cloudhypervisor"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/qemu"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/hypervisor/stratovirt"
	"github.com/kuasar-go/kuasar-go/vmm-sandboxer/transport"
)

// agentPortName is the virtio-serial port vmm-task listens on when the VM
// has no vsock (kuasar.port on the guest's command line).
const agentPortName = "kuasar.agent"

// defaultSize is the configured size of a VM whose pod sets no limits,
// from the selected hypervisor's section.
func (c *Config) defaultSize() (cpus, memMiB int) {
	switch c.Hypervisor {
	case HypervisorCloudHypervisor:
		return c.CloudHypervisor.CPUs, c.CloudHypervisor.MemoryMiB
	case HypervisorStratoVirt:
		return c.StratoVirt.CPUs, c.StratoVirt.MemoryMiB
	}
	return c.QEMU.CPUs, c.QEMU.MemoryMiB
}

// agentDevice is how the host reaches the guest's agent: vsock where the
// host has vhost-vsock (and always for Cloud Hypervisor, whose hybrid
// vsock needs no host module), else a virtio-serial port on agentSock.
func (f *Family) agentDevice(id, agentSock string) hypervisor.Device {
	if f.cfg.Hypervisor == HypervisorCloudHypervisor || transport.HostHasVsock() {
		return &hypervisor.Vsock{ID: "vsock", GuestCID: guestCID(id)}
	}
	return &hypervisor.SerialPort{ID: "agent", Name: agentPortName, SocketPath: agentSock}
}

// guestCID derives a pod VM's vsock context ID from its ID: 3 and up
// (0-2 are reserved), below 2^31, and the same after a restart.
func guestCID(id string) uint32 {
	h := sha256.Sum256([]byte(id))
	return 3 + binary.BigEndian.Uint32(h[:4])%(1<<31-3)
}

// newVM makes the configured hypervisor's VM and the dialer its agent is
// reached through.
func (f *Family) newVM(ctx context.Context, cfg hypervisor.Config, log *zap.Logger) (hypervisor.Hypervisor, transport.Dialer, error) {
	var (
		vm     hypervisor.Hypervisor
		dialer transport.Dialer
		err    error
	)
	switch f.cfg.Hypervisor {
	case HypervisorCloudHypervisor:
		var ch *cloudhypervisor.CloudHypervisor
		if ch, err = cloudhypervisor.New(cfg, f.cfg.CloudHypervisor, log); err == nil {
			vm = ch
			dialer, err = ch.AgentDialer()
		}
	case HypervisorStratoVirt:
		var sv *stratovirt.StratoVirt
		if sv, err = stratovirt.New(cfg, f.cfg.StratoVirt, log); err == nil {
			vm = sv
			dialer, err = sv.AgentDialer()
		}
	default:
		if cfg.Accel, err = f.resolveAccel(ctx); err != nil {
			return nil, nil, err
		}
		cfg.Binary, cfg.TCGCacheMiB, cfg.Unconfined = f.cfg.QEMU.Binary, f.cfg.QEMU.TCGCacheMiB, !f.cfg.QEMU.Sandbox
		if cfg.RunAs != nil && cfg.Accel == hypervisor.AccelKVM {
			runAs := *cfg.RunAs
			if runAs.Groups, err = qemu.KVMGroups(qemu.KVMDevice); err != nil {
				return nil, nil, fmt.Errorf("qemu.unprivileged: %w: %w", err, errdefs.ErrFailedPrecondition)
			}
			cfg.RunAs = &runAs
		}
		var q *qemu.QEMU
		if q, err = qemu.New(cfg, log); err == nil {
			vm = q
			dialer = dialerFor(cfg)
		}
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w: %w", f.cfg.Hypervisor, err, errdefs.ErrInvalidArgument)
	}
	return vm, dialer, nil
}

// runAs gives the pod's QEMU a user of its own, recorded in the pod's
// state, when QEMU runs unprivileged; nil runs it as root.
func (f *Family) runAs(id string, st *state) (*syscall.Credential, error) {
	if f.cfg.Hypervisor != HypervisorQEMU || !f.cfg.QEMU.Unprivileged {
		return nil, nil
	}
	uid, err := f.uids.Allocate(id)
	if err != nil {
		return nil, fmt.Errorf("a user for the VM's QEMU: %w", err)
	}
	st.VMMUid = uid
	return &syscall.Credential{Uid: uid, Gid: uid}, nil
}

// releaseUID frees the pod's QEMU user once QEMU is gone.
func (f *Family) releaseUID(id string, st state) {
	if st.VMMUid != 0 {
		f.uids.Release(st.VMMUid, id)
	}
}

// dialerFor reaches the agent through the VM's vsock or serial device.
func dialerFor(cfg hypervisor.Config) transport.Dialer {
	for _, d := range cfg.Devices {
		switch d := d.(type) {
		case *hypervisor.Vsock:
			return &transport.VsockDialer{CID: d.GuestCID}
		case *hypervisor.SerialPort:
			if d.Name == agentPortName {
				return transport.NewSerialDialer(d.SocketPath)
			}
		}
	}
	return nil
}
