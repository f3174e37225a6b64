//! The allow-lists of each thread class (see the crate documentation for how they were
//! derived). x86-64 only: the numbers are libc's `SYS_*` for this target.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::ThreadClass;
use crate::options::{Onoff, Privileges, SandboxOptions};

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// The KVM ioctls a vCPU thread makes: run, register state, interrupts raised by devices it
/// emulates, ioeventfd/irqfd and memory slots when the guest moves a PCI BAR, the clock, the
/// lazily created PIT. Not: creating VMs or vCPUs, `KVM_GET_DIRTY_LOG`, `KVM_ENABLE_CAP`.
/// (Numbers from `linux/kvm.h` for x86-64.)
const VCPU_KVM_IOCTLS: &[u64] = &[
    // keel-kvm creates the in-kernel PIT when a vCPU first touches its ports.
    0x4040ae77, // KVM_CREATE_PIT2
    0xae03,     // KVM_CHECK_EXTENSION
    0xae80,     // KVM_RUN
    0x8090ae81, // KVM_GET_REGS
    0x4090ae82, // KVM_SET_REGS
    0x8138ae83, // KVM_GET_SREGS
    0x4138ae84, // KVM_SET_SREGS
    0x81a0ae8c, // KVM_GET_FPU
    0x41a0ae8d, // KVM_SET_FPU
    0x8400ae8e, // KVM_GET_LAPIC
    0x4400ae8f, // KVM_SET_LAPIC
    0xc008ae88, // KVM_GET_MSRS
    0x4008ae89, // KVM_SET_MSRS
    0x8040ae9f, // KVM_GET_VCPU_EVENTS
    0x4040aea0, // KVM_SET_VCPU_EVENTS
    0x8004ae98, // KVM_GET_MP_STATE
    0x4004ae99, // KVM_SET_MP_STATE
    0x9000aea4, // KVM_GET_XSAVE
    0x5000aea5, // KVM_SET_XSAVE
    0x8188aea6, // KVM_GET_XCRS
    0x4188aea7, // KVM_SET_XCRS
    0x8080aea1, // KVM_GET_DEBUGREGS
    0x4080aea2, // KVM_SET_DEBUGREGS
    0x4008ae90, // KVM_SET_CPUID2
    0xc008ae91, // KVM_GET_CPUID2
    0xc018ae85, // KVM_TRANSLATE
    0x4048ae9b, // KVM_SET_GUEST_DEBUG
    0xaead,     // KVM_KVMCLOCK_CTRL
    0xaea3,     // KVM_GET_TSC_KHZ
    0xaea2,     // KVM_SET_TSC_KHZ
    0x4004ae8b, // KVM_SET_SIGNAL_MASK
    0xae9a,     // KVM_NMI
    0x4004ae86, // KVM_INTERRUPT
    0x4008ae61, // KVM_IRQ_LINE
    0xc008ae67, // KVM_IRQ_LINE_STATUS
    0x4020aea5, // KVM_SIGNAL_MSI
    0x4040ae79, // KVM_IOEVENTFD
    0x4020ae76, // KVM_IRQFD
    0x4008ae6a, // KVM_SET_GSI_ROUTING
    0x4020ae46, // KVM_SET_USER_MEMORY_REGION
    0xc208ae62, // KVM_GET_IRQCHIP
    0x8208ae63, // KVM_SET_IRQCHIP
    0x8070ae9f, // KVM_GET_PIT2
    0x4070aea0, // KVM_SET_PIT2
    0x8030ae7c, // KVM_GET_CLOCK
    0x4030ae7b, // KVM_SET_CLOCK
];

/// Every thread: memory, futexes, time, signals (the vCPU kick, glibc's set-id broadcast),
/// starting and ending threads, reading and writing descriptors it was handed.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    // Allowed by every filter; the ENOSYS filter answers it so that glibc uses clone.
    libc::SYS_clone3,
    // A thread adds its class's filter; a filter can only narrow.
    libc::SYS_seccomp,
];

/// Block I/O on images that are already open (virtio-blk requests, flushes, discards).
const BLOCK_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
];

/// The QMP event loop: sockets it was handed and the clients it accepts.
const MONITOR: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    // TCP_NODELAY on an accepted TCP client.
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fcntl,
    libc::SYS_poll,
];

/// A user network's thread: the sockets libslirp opens for the guest's flows and for
/// `hostfwd` listeners, polled with `poll(2)`; `/etc/resolv.conf` read for the DNS proxy.
const NET: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_stat,
    libc::SYS_lseek,
];

/// What only the main class does: open files, sockets and /dev/kvm, build the machine,
/// serve the monitors' commands (device_add, blockdev-add, netdev_add...). The live
/// migration threads (`migrate-send`, `migrate-recv`) are started by a command and stay in
/// this class: `socket`/`connect` or `bind`/`listen`/`accept4`, sends and receives
/// ([`MONITOR`]), `KVM_SET_USER_MEMORY_REGION` and `KVM_GET_DIRTY_LOG` (KVM's ioctl type).
const MAIN: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_ftruncate,
    libc::SYS_flock,
    libc::SYS_statx,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_uname,
    libc::SYS_sysinfo,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_membarrier,
    // -overcommit mem-lock=on.
    libc::SYS_mlockall,
    libc::SYS_munlockall,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
];

/// QEMU's `elevateprivileges` set.
const SETID: &[i64] = &[
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setpgid,
    libc::SYS_setsid,
];

/// What glibc makes every thread call when the process changes its user.
const SETID_BROADCAST: &[i64] = &[
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
];

/// QEMU's `spawn` set.
const SPAWN: &[i64] = &[
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
];

/// QEMU's `resourcecontrol` set.
const RESOURCE_CONTROL: &[i64] = &[
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setattr,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getattr,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    libc::SYS_mbind,
    libc::SYS_set_mempolicy,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
];

/// QEMU's `obsolete` set, as far as x86-64 still numbers it.
const OBSOLETE: &[i64] = &[
    libc::SYS__sysctl,
    174, // create_module
    177, // get_kernel_syms
    178, // query_module
    libc::SYS_sysfs,
    libc::SYS_uselib,
    libc::SYS_ustat,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Only argument indices 0..=5 are invalid inputs here, and ours are constants below 6.
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .unwrap_or_else(|_| unreachable!("argument index {arg} is below 6"))
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).unwrap_or_else(|_| unreachable!("conditions are not empty"))
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for nr in calls {
        rules.insert(*nr, Vec::new());
    }
}

/// `ioctl` whose request has one of these `_IOC_TYPE`s.
fn ioctl_types(types: &[u64]) -> Vec<SeccompRule> {
    types
        .iter()
        .map(|t| rule(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), t << 8)]))
        .collect()
}

/// `openat` for reading only (the C library reads /sys and /proc when it sizes its heap).
fn openat_read_only() -> Vec<SeccompRule> {
    let write = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(write), 0)])]
}

/// `clone` for threads only, unless processes may be spawned.
fn clone_threads() -> Vec<SeccompRule> {
    let t = libc::CLONE_THREAD as u64;
    vec![rule(vec![cond(0, SeccompCmpOp::MaskedEq(t), t)])]
}

/// `prctl` to name a thread or read its name, and to set no-new-privs before a thread adds
/// its own filter (filters only ever narrow what is allowed).
fn prctl_names() -> Vec<SeccompRule> {
    [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ]
    .iter()
    .map(|op| rule(vec![cond(0, SeccompCmpOp::Eq, *op as u64)]))
    .collect()
}

/// The allow-list of `class` under `options`.
pub(crate) fn for_class(class: ThreadClass, options: &SandboxOptions, drop_pending: bool) -> Rules {
    let mut rules = Rules::new();
    allow(&mut rules, COMMON);
    rules.insert(libc::SYS_clone, clone_threads());
    rules.insert(libc::SYS_prctl, prctl_names());
    // Whether a descriptor is open (Rust's debug builds ask before closing one).
    rules.insert(
        libc::SYS_fcntl,
        vec![rule(vec![cond(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)])],
    );
    if drop_pending {
        allow(&mut rules, SETID_BROADCAST);
    }
    match class {
        ThreadClass::Vcpu => {
            allow(&mut rules, BLOCK_IO);
            rules.insert(libc::SYS_openat, openat_read_only());
            rules.insert(
                libc::SYS_ioctl,
                VCPU_KVM_IOCTLS
                    .iter()
                    .map(|n| rule(vec![cond(1, SeccompCmpOp::Eq, *n)]))
                    .collect(),
            );
        }
        ThreadClass::Worker => {
            allow(&mut rules, BLOCK_IO);
            allow(
                &mut rules,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                ],
            );
            rules.insert(libc::SYS_openat, openat_read_only());
        }
        ThreadClass::Monitor => {
            allow(&mut rules, MONITOR);
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![cond(1, SeccompCmpOp::Eq, libc::FIONBIO)])],
            );
        }
        ThreadClass::Net => {
            allow(&mut rules, NET);
            rules.insert(libc::SYS_openat, openat_read_only());
            rules.insert(
                libc::SYS_ioctl,
                [libc::FIONBIO, libc::FIONREAD]
                    .iter()
                    .map(|op| rule(vec![cond(1, SeccompCmpOp::Eq, *op)]))
                    .collect(),
            );
        }
        ThreadClass::Main => {
            allow(&mut rules, BLOCK_IO);
            allow(&mut rules, MONITOR);
            allow(&mut rules, MAIN);
            allow(&mut rules, &[libc::SYS_ppoll]);
            // KVM ('\xae'), terminals and tap ('T'), block devices (0x12).
            rules.insert(libc::SYS_ioctl, ioctl_types(&[0xae, 0x54, 0x12]));
            if options.elevate_privileges == Privileges::Allow {
                allow(&mut rules, SETID);
            }
            if options.spawn == Onoff::Allow {
                allow(&mut rules, SPAWN);
                rules.insert(libc::SYS_clone, Vec::new());
            }
            if options.resource_control == Onoff::Allow {
                allow(&mut rules, RESOURCE_CONTROL);
            }
            if options.obsolete == Onoff::Allow {
                allow(&mut rules, OBSOLETE);
            }
            if drop_pending {
                allow(&mut rules, &[libc::SYS_chroot, libc::SYS_chdir]);
            }
        }
    }
    rules
}
