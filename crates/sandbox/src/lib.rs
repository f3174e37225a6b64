//! Keel's sandbox: a seccomp filter per thread class, QEMU's `-sandbox` options, the
//! process-wide no-new-privs bit and the privilege drop of `-run-with user=`/`-runas`.
//!
//! # Thread classes and their filters
//!
//! A VMM's threads do very different things, so each class gets its own allow-list
//! ([`ThreadClass`]):
//!
//! * **main**: the process's baseline, installed by the binary on its main thread before any
//!   other thread exists and so inherited by every later thread. It allows what the main
//!   thread, the signal thread, the board-event thread and the QMP executors do: open images,
//!   sockets and `/dev/kvm`, create VMs, eventfds and epolls, start threads.
//! * **vcpu**: the vCPU threads, installed on top of the baseline when the thread starts.
//!   KVM ioctls by number, guest RAM (mmap/mremap/madvise), block I/O on already open images
//!   (virtio-pci queues are processed by the vCPU that writes the notify register), eventfd
//!   writes, futexes, signals to other vCPUs. No `socket`, no writable `open`.
//! * **worker**: virtio `IoWorker`s and the device input threads: epoll, eventfds, block I/O
//!   on open images, tap reads and writes. No ioctl at all, no `socket`, no writable `open`.
//! * **monitor**: the QMP event loop (`qmp-loop`): epoll, accept, read and write on sockets.
//!   No `open`, no `socket`, no ioctl but `FIONBIO`.
//! * **net**: a user network's thread (`slirp`, `-netdev user`): the guest's TCP and UDP
//!   flows as host sockets (`socket`, `connect`, `bind`, `listen`, `accept`, send and
//!   receive), `poll`, read-only `open` (libslirp reads `/etc/resolv.conf`), ioctl
//!   `FIONBIO`/`FIONREAD` only. No KVM, no writable `open`, no process.
//!
//! Filters stack: a thread keeps the baseline it inherited and adds its class's filter, so a
//! class can only narrow the baseline. The lists were derived by running the VMM's suites
//! (Debian on `microvm` and `pc` under tcg with virtio-blk, -rng, -console and PCI hot plug,
//! the demo guest under kvm) under `strace -f`; `scripts/seccomp-profile.sh` repeats that and
//! prints the calls per class.
//!
//! # A denied call names itself
//!
//! A call outside the list returns `SECCOMP_RET_TRAP` with the thread class in the return
//! data; the `SIGSYS` handler (async-signal-safe: one `write`, then `exit_group`) prints
//! `vmm: seccomp: thread <class> made forbidden syscall <name>` on standard error and ends
//! the process with status [`FORBIDDEN_SYSCALL_STATUS`]. The VMM never dies silently.
//!
//! `clone3` is answered `ENOSYS` instead (its flags live in memory, where a filter cannot
//! look), so that the C library falls back to `clone`, whose flags are checked: a thread
//! may be started, a process (`spawn=deny`) may not.
//!
//! # Using it
//!
//! A library that starts a thread of a class calls [`enter`] first thing in that thread: it
//! installs the class's filter if the process chose a policy ([`set_process_policy`]) and
//! does nothing otherwise, so embedders that never set a policy are unaffected.

mod names;
mod options;
mod privileges;
mod rules;

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use options::{HELP, Onoff, Privileges, SandboxOptions, Settings, extract};
pub use privileges::{RunAs, User, drop_privileges, is_root, set_no_new_privs};

/// The exit status of a process stopped by a forbidden system call (128 + `SIGSYS`, what a
/// shell shows for a process killed by that signal).
pub const FORBIDDEN_SYSCALL_STATUS: i32 = 128 + libc::SIGSYS;

/// What can go wrong setting up the sandbox. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// An option of `-sandbox`, `-run-with`, `-runas` or `-chroot` is malformed.
    #[error("{option}: {message}")]
    Option {
        /// The option as written.
        option: String,
        /// What is wrong.
        message: String,
    },
    /// A filter could not be built (a bug in the allow-lists).
    #[error("cannot build the seccomp filter of thread class {class}: {message}")]
    Build {
        /// The class.
        class: ThreadClass,
        /// seccompiler's message.
        message: String,
    },
    /// The kernel refused a filter.
    #[error(
        "cannot install the seccomp filter of thread class {class}: {message} \
         (run with -sandbox off on a kernel without seccomp)"
    )]
    Install {
        /// The class.
        class: ThreadClass,
        /// seccompiler's message.
        message: String,
    },
    /// Dropping privileges needs root.
    #[error("{0}: changing the user needs root, and this process runs as uid {1}")]
    NotRoot(String, u32),
    /// A privilege-changing call failed.
    #[error("cannot {what}: {source}")]
    Privileges {
        /// The step (`setgid(1000)`, `chroot /var/empty`).
        what: String,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
}

/// The kinds of thread, each with its own allow-list (see the crate documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadClass {
    /// The main thread and the threads that inherit its filter only (signals, board events,
    /// the QMP executors).
    Main,
    /// A vCPU thread.
    Vcpu,
    /// A device worker (virtio `IoWorker`, device input threads).
    Worker,
    /// The QMP event loop.
    Monitor,
    /// A user network's thread (`-netdev user`): the sockets libslirp makes for the guest.
    Net,
}

impl ThreadClass {
    /// Every class, in the order of their seccomp return data (1..).
    pub const ALL: [ThreadClass; 5] = [
        ThreadClass::Main,
        ThreadClass::Vcpu,
        ThreadClass::Worker,
        ThreadClass::Monitor,
        ThreadClass::Net,
    ];

    /// The class's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Main => "main",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::Worker => "worker",
            ThreadClass::Monitor => "monitor",
            ThreadClass::Net => "net",
        }
    }

    /// The value the filter puts in `SECCOMP_RET_DATA` (and so in `si_errno`) on a trap.
    fn data(self) -> u32 {
        match self {
            ThreadClass::Main => 1,
            ThreadClass::Vcpu => 2,
            ThreadClass::Worker => 3,
            ThreadClass::Monitor => 4,
            ThreadClass::Net => 5,
        }
    }
}

impl std::fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The compiled filters of every class for one set of options; built once at start so that
/// a thread only has to hand its program to the kernel.
#[derive(Debug)]
pub struct Policy {
    /// One program per class, indexed as [`ThreadClass::ALL`].
    programs: Vec<BpfProgram>,
    /// Answers `clone3` with `ENOSYS` and allows everything else.
    clone3: BpfProgram,
}

const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const BPF_RET_K: u16 = 0x06;

impl Policy {
    /// Builds every class's filter for `options` (`options.enable` is not looked at: a
    /// disabled sandbox simply builds no policy). `drop_pending` keeps the set-id calls
    /// allowed, because the C library makes every thread call them when the process changes
    /// its user (see [`drop_privileges`]).
    pub fn new(options: &SandboxOptions, drop_pending: bool) -> Result<Policy, SandboxError> {
        let mut programs = Vec::new();
        for class in ThreadClass::ALL {
            let rules = rules::for_class(class, options, drop_pending);
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Trap,
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .map_err(|e| SandboxError::Build {
                class,
                message: e.to_string(),
            })?;
            let mut program: BpfProgram =
                filter
                    .try_into()
                    .map_err(|e: seccompiler::BackendError| SandboxError::Build {
                        class,
                        message: e.to_string(),
                    })?;
            // The trap carries the class, so that the handler can name the thread's kind.
            for insn in &mut program {
                if insn.code == BPF_RET_K && insn.k == SECCOMP_RET_TRAP {
                    insn.k = SECCOMP_RET_TRAP | class.data();
                }
            }
            programs.push(program);
        }
        let clone3 = SeccompFilter::new(
            [(libc::SYS_clone3, vec![])].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .and_then(|f| f.try_into())
        .map_err(|e| SandboxError::Build {
            class: ThreadClass::Main,
            message: e.to_string(),
        })?;
        Ok(Policy { programs, clone3 })
    }

    /// Installs `class`'s filter on the calling thread (and so on the threads it starts
    /// later). The `SIGSYS` handler must be in place ([`install_sigsys_handler`]).
    pub fn install(&self, class: ThreadClass) -> Result<(), SandboxError> {
        let index = ThreadClass::ALL
            .iter()
            .position(|c| *c == class)
            .unwrap_or_default();
        let err = |e: seccompiler::Error| SandboxError::Install {
            class,
            message: e.to_string(),
        };
        seccompiler::apply_filter(&self.clone3).map_err(err)?;
        seccompiler::apply_filter(&self.programs[index]).map_err(err)
    }
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Makes `policy` the process's: from now on [`enter`] installs its filters. Installs the
/// `SIGSYS` handler. Fails if a policy was already set.
pub fn set_process_policy(policy: Policy) -> Result<(), SandboxError> {
    install_sigsys_handler()?;
    POLICY.set(policy).map_err(|_| SandboxError::Option {
        option: "-sandbox".into(),
        message: "the process's sandbox policy is already set".into(),
    })
}

/// Called first thing in a thread of `class`: installs the class's filter if the process set
/// a policy, and does nothing otherwise. A thread that cannot be confined ends the process
/// with a message: a sandbox the user asked for is never silently missing.
pub fn enter(class: ThreadClass) {
    if let Some(policy) = POLICY.get()
        && let Err(e) = policy.install(class)
    {
        eprintln!("vmm: {e}");
        std::process::exit(1);
    }
}

/// Whether this process can run another program: only without a sandbox. A seccomp filter
/// is inherited across `execve`, so a program started under Keel's allow-lists (even with
/// `spawn=allow`, which only lets the main class fork) would be stopped by the first call
/// the lists lack. Code that would run one (`migrate exec:`) asks first and refuses with a
/// message instead.
pub fn programs_allowed() -> bool {
    POLICY.get().is_none()
}

/// Whether the process runs under a policy (for messages and tests).
pub fn active() -> bool {
    POLICY.get().is_some()
}

/// Installs the `SIGSYS` handler that reports a forbidden call and ends the process.
pub fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: sigaction is plain data; it is fully initialised below before use.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t owned by us.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler for SIGSYS with a valid sigaction; the old action is not
    // wanted (null).
    let r = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SandboxError::Privileges {
            what: "install the SIGSYS handler".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Fixed-size message buffer for the signal handler (no allocation).
struct Msg {
    buf: [u8; 160],
    len: usize,
}

impl Msg {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Offset of `si_syscall` in the x86-64 `siginfo_t` of a `SIGSYS` (after `si_signo`,
/// `si_errno`, `si_code`, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

/// The text the handler writes for a trap with `data` on call `nr` (split out for tests).
fn report(data: i32, nr: i32) -> Msg {
    let mut msg = Msg {
        buf: [0; 160],
        len: 0,
    };
    let class = ThreadClass::ALL
        .iter()
        .find(|c| c.data() as i32 == data)
        .map_or("unknown", |c| c.name());
    msg.push(b"vmm: seccomp: thread ");
    msg.push(class.as_bytes());
    msg.push(b" made forbidden syscall ");
    match usize::try_from(nr).ok().and_then(|i| names::NAMES.get(i)) {
        Some(name) if !name.is_empty() => msg.push(name.as_bytes()),
        _ => {
            msg.push(b"#");
            msg.push_number(nr as u32);
        }
    }
    msg.push(b" (the VMM stops; -sandbox off disables the filters)\n");
    msg
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for a seccomp
    // SIGSYS, si_errno holds the filter's return data and si_syscall (read at its fixed
    // x86-64 offset) the call's number.
    let (data, nr) = unsafe {
        (
            (*info).si_errno,
            std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>()),
        )
    };
    let msg = report(data, nr);
    // SAFETY: write and exit_group are async-signal-safe and allowed by every filter; the
    // buffer is valid for `len` bytes.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::syscall(libc::SYS_exit_group, FORBIDDEN_SYSCALL_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_class_and_call() {
        let m = report(2, libc::SYS_socket as i32);
        assert_eq!(
            std::str::from_utf8(&m.buf[..m.len]).unwrap(),
            "vmm: seccomp: thread vcpu made forbidden syscall socket \
             (the VMM stops; -sandbox off disables the filters)\n"
        );
        let m = report(9, 9999);
        let text = std::str::from_utf8(&m.buf[..m.len]).unwrap();
        assert!(text.starts_with("vmm: seccomp: thread unknown made forbidden syscall #9999 "));
        assert_eq!(names::NAMES[libc::SYS_mseal as usize], "mseal");
        assert_eq!(names::NAMES[libc::SYS_clone3 as usize], "clone3");
        assert_eq!(names::NAMES[libc::SYS_read as usize], "read");
    }

    #[test]
    fn every_class_is_within_the_baseline() {
        for opts in [
            SandboxOptions::default(),
            SandboxOptions::parse("on,spawn=allow").unwrap(),
        ] {
            for drop in [false, true] {
                let main = rules::for_class(ThreadClass::Main, &opts, drop);
                for class in ThreadClass::ALL {
                    for nr in rules::for_class(class, &opts, drop).keys() {
                        assert!(
                            main.contains_key(nr),
                            "{class} allows {} that main does not",
                            names::NAMES[*nr as usize]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn policies_build_for_every_option() {
        for text in [
            "on",
            "on,obsolete=allow,elevateprivileges=allow,spawn=allow,resourcecontrol=allow",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "on,elevateprivileges=children",
        ] {
            let opts = SandboxOptions::parse(text).unwrap();
            Policy::new(&opts, false).unwrap();
            Policy::new(&opts, true).unwrap();
        }
    }
}
