//! Kicking a vCPU out of `KVM_RUN` from another thread, without a lost-wakeup race.
//!
//! Three pieces, in this order on the kicking side:
//! 1. `kicked` is set: the truth that a kick is pending;
//! 2. `kvm_run.immediate_exit` is set: a `KVM_RUN` entered from now on returns `EINTR` at once
//!    (after completing a pending `in`/MMIO load, so the register state is consistent);
//! 3. the vCPU thread gets [`kick_signal`], whose handler does nothing: a `KVM_RUN` already in
//!    the guest returns `EINTR`.
//!
//! The vCPU thread, on `EINTR`, clears `immediate_exit` and then takes `kicked`. All accesses
//! are `SeqCst`, so either it sees the flag, or the kicker's store to `immediate_exit` comes
//! after the clear and the next `KVM_RUN` returns at once. A kick is never lost; two kicks
//! close together may be reported as one.

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use keel_accel::Kick;

/// Offset from `SIGRTMIN` of the signal used to kick vCPU threads. The signal's handler is
/// replaced by a no-op when the first [`crate::KvmAccel`] is opened; an embedding VMM must not
/// use this signal for anything else.
pub const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The real-time signal that kicks vCPU threads (`SIGRTMIN + KICK_SIGNAL_OFFSET`).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler once per process (without `SA_RESTART`, so `KVM_RUN` sees `EINTR`).
pub(crate) fn install_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    });
    r.map_err(std::io::Error::from_raw_os_error)
}

/// Unblocks [`kick_signal`] on the calling thread (a VMM may start threads with signals blocked).
pub(crate) fn unblock_on_this_thread() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; pthread_sigmask only reads it.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

thread_local! {
    static TID: Cell<libc::pid_t> = const { Cell::new(0) };
}

/// The kernel thread id of the calling thread, cached per thread (no syscall after the first).
pub(crate) fn current_tid() -> libc::pid_t {
    TID.with(|t| {
        let mut v = t.get();
        if v == 0 {
            // SAFETY: gettid has no arguments and cannot fail.
            v = unsafe { libc::gettid() };
            t.set(v);
        }
        v
    })
}

/// Where a kick goes: the `immediate_exit` byte of the vCPU's `kvm_run` page and its thread.
struct Target {
    immediate_exit: Option<NonNull<AtomicU8>>,
    tid: libc::pid_t,
}

// SAFETY: the pointer is into the vCPU's `kvm_run` mapping; it is only dereferenced with the
// `Shared::target` lock held, and the vCPU clears it (under the same lock) before unmapping.
unsafe impl Send for Target {}

/// State shared between a vCPU and its kickers.
pub(crate) struct Shared {
    kicked: AtomicBool,
    target: Mutex<Target>,
    signal: libc::c_int,
}

impl Shared {
    /// `immediate_exit` must stay mapped until [`Shared::detach`] is called.
    pub(crate) fn new(immediate_exit: NonNull<AtomicU8>) -> Self {
        Self {
            kicked: AtomicBool::new(false),
            target: Mutex::new(Target {
                immediate_exit: Some(immediate_exit),
                tid: 0,
            }),
            signal: kick_signal(),
        }
    }

    /// Consumes a pending kick.
    pub(crate) fn take(&self) -> bool {
        self.kicked.swap(false, Ordering::SeqCst)
    }

    /// Records the thread that runs the vCPU from now on.
    pub(crate) fn set_thread(&self, tid: libc::pid_t) {
        self.target.lock().unwrap_or_else(|p| p.into_inner()).tid = tid;
    }

    /// The thread that last ran the vCPU, if any.
    pub(crate) fn thread(&self) -> Option<libc::pid_t> {
        let tid = self.target.lock().unwrap_or_else(|p| p.into_inner()).tid;
        (tid != 0).then_some(tid)
    }

    /// Forgets the `kvm_run` page and the thread; later kicks only set the flag.
    pub(crate) fn detach(&self) {
        let mut t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        t.immediate_exit = None;
        t.tid = 0;
    }
}

impl Kick for Shared {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        let t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ie) = t.immediate_exit {
            // SAFETY: the page is mapped while the pointer is in the target (see `Target`).
            unsafe { ie.as_ref() }.store(1, Ordering::SeqCst);
        }
        if t.tid != 0 {
            // SAFETY: tgkill only sends a signal; its handler is a no-op. If the thread has
            // exited the call fails with ESRCH, which needs no handling.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    libc::c_long::from(t.tid),
                    libc::c_long::from(self.signal),
                );
            }
        }
    }
}
