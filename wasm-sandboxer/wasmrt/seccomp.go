package wasmrt

import (
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// defaultSeccomp is the seccomp filter of a wasm container whose spec has
// none (a pod that asked for none, or Unconfined): its process is always
// a runner, which needs none of the system calls it refuses (EPERM): no
// mounts, namespaces, tracing, kernel keyrings or modules, BPF, perf,
// io_uring (whose operations seccomp does not see), clock or host
// settings. clone3 is ENOSYS (its flags are in memory, out of seccomp's
// reach; the C library then uses clone, whose namespace flags are refused).
// A spec's own profile (RuntimeDefault, Localhost) is used as it is.
func defaultSeccomp() *specs.LinuxSeccomp {
	eperm, enosys := uint(unix.EPERM), uint(unix.ENOSYS)
	sc := &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow,
		Syscalls: []specs.LinuxSyscall{
			{Names: []string{
				"mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
				"fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
				"open_by_handle_at", "name_to_handle_at",
				"ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
				"bpf", "perf_event_open", "userfaultfd", "lookup_dcookie",
				"keyctl", "add_key", "request_key",
				"init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms", "query_module",
				"kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "syslog", "acct",
				"settimeofday", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "adjtimex", "stime",
				"sethostname", "setdomainname", "quotactl", "quotactl_fd", "iopl", "ioperm", "vhangup",
				"nfsservctl", "uselib", "_sysctl", "sysfs", "ustat", "mknod", "mknodat",
				"io_uring_setup", "io_uring_enter", "io_uring_register",
			}, Action: specs.ActErrno, ErrnoRet: &eperm},
			{Names: []string{"clone3"}, Action: specs.ActErrno, ErrnoRet: &enosys},
		},
	}
	for _, flag := range []uint64{unix.CLONE_NEWNS, unix.CLONE_NEWCGROUP, unix.CLONE_NEWUTS, unix.CLONE_NEWIPC,
		unix.CLONE_NEWUSER, unix.CLONE_NEWPID, unix.CLONE_NEWNET} {
		sc.Syscalls = append(sc.Syscalls, specs.LinuxSyscall{
			Names: []string{"clone"}, Action: specs.ActErrno, ErrnoRet: &eperm,
			// clone's flags are its first argument on amd64 and arm64.
			Args: []specs.LinuxSeccompArg{{Index: 0, Value: flag, ValueTwo: flag, Op: specs.OpMaskedEqual}},
		})
	}
	return sc
}
