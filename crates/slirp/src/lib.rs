//! QEMU's user-mode networking (`-netdev user`) on libslirp.
//!
//! libslirp is a TCP/IP stack in user space: the guest's Ethernet frames go in, and it
//! answers ARP, DHCP (10.0.2.15 onwards), DNS (10.0.2.3, forwarded to the host's resolver)
//! and turns the guest's TCP and UDP flows into ordinary host sockets; `hostfwd` rules
//! listen on host ports and connect into the guest. No privilege, no host interface.
//!
//! # Shape
//!
//! * The library is loaded with `dlopen` when the first [`UserNet`] is created
//!   (`libslirp.so.0`, Debian's `libslirp0`, already installed with QEMU): a VMM that never
//!   uses `-netdev user` does not need it, and one that does gets [`Error::Library`] naming
//!   the package.
//! * Each [`UserNet`] owns one `Slirp` instance and one thread (`slirp`, sandbox class
//!   [`keel_sandbox::ThreadClass::Net`]) that alone calls into it: it polls the stack's
//!   sockets with `poll(2)`, runs its timers, feeds it the guest's frames and carries out
//!   `hostfwd` changes. So every socket call libslirp makes happens on that thread, never on
//!   a vCPU or a device worker, whose seccomp filters have no `socket` or `connect`.
//! * The device side is a [`UserPort`] ([`UserNet::attach`]): frames to the guest wait in
//!   a bounded queue whose eventfd becomes readable, frames from the guest go into another
//!   bounded queue and wake the thread. A full queue drops the frame, as a busy NIC would;
//!   TCP retransmits.
//! * libslirp's callbacks run on the thread, inside a call into the library; none of them
//!   can unwind into C (each body runs under `catch_unwind`).

mod config;
mod ffi;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{HostFwd, UserConfig, UserOptions};

/// Frames waiting for the guest; more are dropped.
const RX_QUEUE_FRAMES: usize = 1024;
/// Frames from the guest waiting for the stack; more are dropped.
const TX_QUEUE_FRAMES: usize = 1024;
/// How long a `hostfwd` change waits for the thread.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong with a user network. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libslirp could not be loaded.
    #[error(
        "user-mode networking needs libslirp ({0}): install the libslirp0 package (QEMU's \
         own dependency), or use -netdev tap"
    )]
    Library(String),
    /// An option is malformed or inconsistent (QEMU's message).
    #[error("{0}")]
    Invalid(String),
    /// libslirp refused the configuration.
    #[error("libslirp could not create the user network (slirp_new failed)")]
    Create,
    /// A `hostfwd` rule could not be set up (the host port is taken, or not allowed).
    #[error("Could not set up host forwarding rule '{rule}': {source}")]
    HostFwd {
        /// The rule as written.
        rule: String,
        /// Why, as the host said.
        #[source]
        source: io::Error,
    },
    /// A device already uses this network (each user network has one NIC).
    #[error("the user network is already in use by another device")]
    InUse,
    /// The network's thread has stopped.
    #[error("the user network's thread is not running")]
    Stopped,
    /// The thread or its descriptors could not be created.
    #[error("cannot start the user network: {0}")]
    Io(#[from] io::Error),
}

/// The libslirp version string, loading the library: a way to ask whether `-netdev user`
/// can work on this host.
pub fn library_version() -> Result<String, Error> {
    ffi::version()
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd creation; a non-negative result is a descriptor we now own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A full counter
    // (EAGAIN) already means "signalled".
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

fn drain(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd we own.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// A change asked of the thread, with where to answer.
enum Request {
    AddHostFwd(HostFwd, mpsc::Sender<Result<(), Error>>),
    RemoveHostFwd(bool, Ipv4Addr, u16, mpsc::Sender<bool>),
}

#[derive(Default)]
struct RxQueue {
    frames: VecDeque<Vec<u8>>,
    attached: bool,
}

/// What the thread and the other threads share.
struct Shared {
    rx: Mutex<RxQueue>,
    /// Readable while frames wait for the guest.
    rx_event: OwnedFd,
    tx: Mutex<VecDeque<Vec<u8>>>,
    requests: Mutex<VecDeque<Request>>,
    /// Wakes the thread: guest frames, requests, stop.
    wake: OwnedFd,
    stop: AtomicBool,
    running: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn to_guest(&self, frame: &[u8]) {
        let mut rx = lock(&self.rx);
        if !rx.attached {
            return;
        }
        if rx.frames.len() >= RX_QUEUE_FRAMES {
            log::debug!("slirp: receive queue full, frame to the guest dropped");
            return;
        }
        rx.frames.push_back(frame.to_vec());
        signal(&self.rx_event);
    }
}

/// A running user network: one libslirp instance and its thread. Dropping it stops the
/// thread and frees the instance (its sockets and `hostfwd` listeners close).
pub struct UserNet {
    shared: Arc<Shared>,
    config: UserConfig,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UserNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNet")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl UserNet {
    /// Loads libslirp if needed, creates the stack for `config` with its `hostfwd` rules
    /// and starts its thread. Fails (and leaves nothing running) if a rule's host port
    /// cannot be bound.
    pub fn start(config: UserConfig) -> Result<Self, Error> {
        let lib = ffi::lib()?;
        let shared = Arc::new(Shared {
            rx: Mutex::new(RxQueue::default()),
            rx_event: eventfd()?,
            tx: Mutex::new(VecDeque::new()),
            requests: Mutex::new(VecDeque::new()),
            wake: eventfd()?,
            stop: AtomicBool::new(false),
            running: AtomicBool::new(true),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        let thread_config = config.clone();
        let thread = std::thread::Builder::new()
            .name("slirp".into())
            .spawn(move || {
                keel_sandbox::enter(keel_sandbox::ThreadClass::Net);
                run(lib, &thread_config, &thread_shared, &ready_tx);
                thread_shared.running.store(false, Ordering::Release);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                shared,
                config,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::Stopped)
            }
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &UserConfig {
        &self.config
    }

    /// The device end: frames to and from the guest. One device at a time.
    pub fn attach(&self) -> Result<UserPort, Error> {
        let mut rx = lock(&self.shared.rx);
        if rx.attached {
            return Err(Error::InUse);
        }
        rx.attached = true;
        rx.frames.clear();
        Ok(UserPort {
            shared: Arc::clone(&self.shared),
        })
    }

    fn request(&self, r: Request) -> Result<(), Error> {
        if !self.shared.running.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        lock(&self.shared.requests).push_back(r);
        signal(&self.shared.wake);
        Ok(())
    }

    /// Adds a forward (HMP `hostfwd_add`): `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
    pub fn hostfwd_add(&self, rule: &str) -> Result<(), Error> {
        let fwd = HostFwd::parse(rule)?;
        let (tx, rx) = mpsc::channel();
        self.request(Request::AddHostFwd(fwd, tx))?;
        rx.recv_timeout(REQUEST_TIMEOUT)
            .map_err(|_| Error::Stopped)?
    }

    /// Removes a forward (HMP `hostfwd_remove`): `[tcp|udp]:[HOSTADDR]:HOSTPORT`. Whether
    /// one was found.
    pub fn hostfwd_remove(&self, rule: &str) -> Result<bool, Error> {
        let (udp, addr, port) = HostFwd::parse_host(rule)?;
        let (tx, rx) = mpsc::channel();
        self.request(Request::RemoveHostFwd(udp, addr, port, tx))?;
        rx.recv_timeout(REQUEST_TIMEOUT).map_err(|_| Error::Stopped)
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        signal(&self.shared.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The device's end of a [`UserNet`]: Ethernet frames without any header.
pub struct UserPort {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UserPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPort").finish_non_exhaustive()
    }
}

impl UserPort {
    /// Takes the next frame for the guest into `buf` (a longer frame is cut to fit);
    /// `ErrorKind::WouldBlock` when none waits.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&self.shared.rx);
        match rx.frames.pop_front() {
            Some(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
            None => {
                // Under the queue's lock, so a frame queued later signals again.
                drain(&self.shared.rx_event);
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
    }

    /// Hands a frame from the guest to the stack (dropped if the queue is full).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        if !self.shared.running.load(Ordering::Acquire) {
            return Err(io::Error::other("the user network has stopped"));
        }
        let mut tx = lock(&self.shared.tx);
        if tx.len() >= TX_QUEUE_FRAMES {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "user network transmit queue full",
            ));
        }
        tx.push_back(frame.to_vec());
        drop(tx);
        signal(&self.shared.wake);
        Ok(())
    }

    /// Readable (an eventfd) while frames wait for the guest.
    pub fn fd(&self) -> RawFd {
        self.shared.rx_event.as_raw_fd()
    }
}

impl Drop for UserPort {
    fn drop(&mut self) {
        let mut rx = lock(&self.shared.rx);
        rx.attached = false;
        rx.frames.clear();
        drain(&self.shared.rx_event);
    }
}

// ---- the thread --------------------------------------------------------------------

#[derive(Clone, Copy)]
enum TimerKind {
    /// `timer_new_opaque`: fired with `slirp_handle_timer(id, cb_opaque)`.
    Opaque(c_int, *mut c_void),
    /// `timer_new`: fired by calling `cb(cb_opaque)`.
    Callback(ffi::TimerCb, *mut c_void),
}

struct Timer {
    kind: TimerKind,
    expire_ms: Option<i64>,
}

/// The callbacks' state, owned by the thread; libslirp holds a pointer to it as `opaque`.
/// Only shared references are made from that pointer, hence the `RefCell`.
struct Ctx {
    shared: Arc<Shared>,
    start: Instant,
    timers: RefCell<Vec<Option<Timer>>>,
}

impl Ctx {
    fn now_ns(&self) -> i64 {
        i64::try_from(self.start.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    fn add_timer(&self, kind: TimerKind) -> *mut c_void {
        let mut timers = self.timers.borrow_mut();
        let t = Some(Timer {
            kind,
            expire_ms: None,
        });
        let index = match timers.iter().position(Option::is_none) {
            Some(i) => {
                timers[i] = t;
                i
            }
            None => {
                timers.push(t);
                timers.len() - 1
            }
        };
        // The handle is the index plus one (never null); libslirp only hands it back.
        (index + 1) as *mut c_void
    }

    fn timer(&self, handle: *mut c_void) -> Option<usize> {
        (handle as usize).checked_sub(1)
    }

    /// Milliseconds until the next timer, if any is armed.
    fn next_timer_ms(&self) -> Option<i64> {
        let now = self.now_ns() / 1_000_000;
        self.timers
            .borrow()
            .iter()
            .flatten()
            .filter_map(|t| t.expire_ms)
            .min()
            .map(|e| (e - now).max(0))
    }

    /// Disarms and returns the timers that are due.
    fn due(&self) -> Vec<TimerKind> {
        let now = self.now_ns() / 1_000_000;
        let mut out = Vec::new();
        for t in self.timers.borrow_mut().iter_mut().flatten() {
            if t.expire_ms.is_some_and(|e| e <= now) {
                t.expire_ms = None;
                out.push(t.kind);
            }
        }
        out
    }
}

/// Runs `f` without letting a panic cross into C; `default` if it panicked.
fn guard<T>(default: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(default)
}

/// # Safety
/// `opaque` is the `Ctx` pointer given to `slirp_new`, alive while the instance is.
unsafe fn ctx<'a>(opaque: *mut c_void) -> &'a Ctx {
    // SAFETY: per this function's contract.
    unsafe { &*(opaque as *const Ctx) }
}

unsafe extern "C" fn cb_send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    guard(-1, || {
        if buf.is_null() {
            return -1;
        }
        // SAFETY: libslirp passes a frame of `len` readable bytes and our `opaque`.
        let (frame, ctx) = unsafe {
            (
                std::slice::from_raw_parts(buf.cast::<u8>(), len),
                ctx(opaque),
            )
        };
        ctx.shared.to_guest(frame);
        isize::try_from(len).unwrap_or(isize::MAX)
    })
}

unsafe extern "C" fn cb_guest_error(msg: *const c_char, _opaque: *mut c_void) {
    guard((), || {
        if !msg.is_null() {
            // SAFETY: libslirp passes a NUL-terminated message.
            let text = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
            log::debug!("slirp: guest error: {text}");
        }
    })
}

unsafe extern "C" fn cb_clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: `opaque` is our context (callback contract).
    guard(0, || unsafe { ctx(opaque) }.now_ns())
}

unsafe extern "C" fn cb_timer_new(
    cb: Option<ffi::TimerCb>,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    guard(std::ptr::null_mut(), || match cb {
        // SAFETY: `opaque` is our context (callback contract).
        Some(cb) => unsafe { ctx(opaque) }.add_timer(TimerKind::Callback(cb, cb_opaque)),
        None => std::ptr::null_mut(),
    })
}

unsafe extern "C" fn cb_timer_new_opaque(
    id: c_int,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        // SAFETY: `opaque` is our context (callback contract).
        unsafe { ctx(opaque) }.add_timer(TimerKind::Opaque(id, cb_opaque))
    })
}

unsafe extern "C" fn cb_timer_free(timer: *mut c_void, opaque: *mut c_void) {
    guard((), || {
        // SAFETY: `opaque` is our context (callback contract).
        let ctx = unsafe { ctx(opaque) };
        if let Some(i) = ctx.timer(timer)
            && let Some(slot) = ctx.timers.borrow_mut().get_mut(i)
        {
            *slot = None;
        }
    })
}

unsafe extern "C" fn cb_timer_mod(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void) {
    guard((), || {
        // SAFETY: `opaque` is our context (callback contract).
        let ctx = unsafe { ctx(opaque) };
        if let Some(i) = ctx.timer(timer)
            && let Some(Some(t)) = ctx.timers.borrow_mut().get_mut(i)
        {
            t.expire_ms = Some(expire_ms);
        }
    })
}

/// Sockets are polled afresh each turn (`slirp_pollfds_fill`), so there is nothing to
/// register (QEMU does the same outside Windows).
unsafe extern "C" fn cb_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn cb_notify(opaque: *mut c_void) {
    // SAFETY: `opaque` is our context (callback contract).
    guard((), || signal(&unsafe { ctx(opaque) }.shared.wake))
}

unsafe extern "C" fn cb_init_completed(_slirp: *mut ffi::Slirp, _opaque: *mut c_void) {}

static CALLBACKS: ffi::Callbacks = ffi::Callbacks {
    send_packet: Some(cb_send_packet),
    guest_error: Some(cb_guest_error),
    clock_get_ns: Some(cb_clock_get_ns),
    timer_new: Some(cb_timer_new),
    timer_free: Some(cb_timer_free),
    timer_mod: Some(cb_timer_mod),
    register_poll_fd: Some(cb_poll_fd),
    unregister_poll_fd: Some(cb_poll_fd),
    notify: Some(cb_notify),
    init_completed: Some(cb_init_completed),
    timer_new_opaque: Some(cb_timer_new_opaque),
};

fn to_poll(events: c_int) -> i16 {
    let mut e = 0;
    for (s, p) in [
        (ffi::POLL_IN, libc::POLLIN),
        (ffi::POLL_OUT, libc::POLLOUT),
        (ffi::POLL_PRI, libc::POLLPRI),
        (ffi::POLL_ERR, libc::POLLERR),
        (ffi::POLL_HUP, libc::POLLHUP),
    ] {
        if events & s != 0 {
            e |= p;
        }
    }
    e
}

fn from_poll(revents: i16) -> c_int {
    let mut e = 0;
    for (s, p) in [
        (ffi::POLL_IN, libc::POLLIN),
        (ffi::POLL_OUT, libc::POLLOUT),
        (ffi::POLL_PRI, libc::POLLPRI),
        (ffi::POLL_ERR, libc::POLLERR),
        (ffi::POLL_HUP, libc::POLLHUP | libc::POLLNVAL),
    ] {
        if revents & p != 0 {
            e |= s;
        }
    }
    e
}

unsafe extern "C" fn cb_add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    guard(-1, || {
        // SAFETY: `opaque` is the `Vec<pollfd>` the loop passed to slirp_pollfds_fill and
        // does not touch during the call.
        let fds = unsafe { &mut *(opaque as *mut Vec<libc::pollfd>) };
        fds.push(libc::pollfd {
            fd,
            events: to_poll(events),
            revents: 0,
        });
        c_int::try_from(fds.len() - 1).unwrap_or(-1)
    })
}

unsafe extern "C" fn cb_get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    guard(0, || {
        // SAFETY: as in `cb_add_poll`, now passed to slirp_pollfds_poll.
        let fds = unsafe { &*(opaque as *const Vec<libc::pollfd>) };
        usize::try_from(idx)
            .ok()
            .and_then(|i| fds.get(i))
            .map_or(0, |p| from_poll(p.revents))
    })
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(a).to_be(),
    }
}

fn in6_addr(last: u8) -> libc::in6_addr {
    // fec0::/64, QEMU's default IPv6 prefix; the host is ::2 and DNS ::3.
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0xc0;
    a[15] = last;
    libc::in6_addr { s6_addr: a }
}

fn cstring(s: &Option<String>) -> Option<CString> {
    s.as_deref().and_then(|s| CString::new(s).ok())
}

fn add_hostfwd(lib: &ffi::Lib, slirp: *mut ffi::Slirp, f: &HostFwd) -> Result<(), Error> {
    // SAFETY: `slirp` is the live instance of this thread; the addresses are plain values.
    let rc = unsafe {
        (lib.add_hostfwd)(
            slirp,
            c_int::from(f.udp),
            in_addr(f.host_addr),
            c_int::from(f.host_port),
            in_addr(f.guest_addr),
            c_int::from(f.guest_port),
        )
    };
    if rc < 0 {
        let source = io::Error::last_os_error();
        return Err(Error::HostFwd {
            rule: f.rule.clone(),
            source,
        });
    }
    Ok(())
}

/// The thread: creates the instance, reports, then polls until told to stop.
fn run(
    lib: &'static ffi::Lib,
    config: &UserConfig,
    shared: &Arc<Shared>,
    ready: &mpsc::Sender<Result<(), Error>>,
) {
    let hostname = cstring(&config.hostname);
    let domainname = cstring(&config.domainname);
    let cfg = ffi::Config {
        version: ffi::CONFIG_VERSION,
        restricted: c_int::from(config.restrict),
        in_enabled: config.ipv4,
        vnetwork: in_addr(config.net),
        vnetmask: in_addr(config.mask),
        vhost: in_addr(config.host),
        in6_enabled: config.ipv6,
        vprefix_addr6: in6_addr(0),
        vprefix_len: 64,
        vhost6: in6_addr(2),
        vhostname: hostname.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
        tftp_server_name: std::ptr::null(),
        tftp_path: std::ptr::null(),
        bootfile: std::ptr::null(),
        vdhcp_start: in_addr(config.dhcp_start),
        vnameserver: in_addr(config.dns),
        vnameserver6: in6_addr(3),
        vdnssearch: std::ptr::null(),
        vdomainname: domainname.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
        if_mtu: 0,
        if_mru: 0,
        disable_host_loopback: false,
        enable_emu: false,
        outbound_addr: std::ptr::null(),
        outbound_addr6: std::ptr::null(),
        disable_dns: false,
        disable_dhcp: false,
    };
    let ctx = Box::new(Ctx {
        shared: Arc::clone(shared),
        start: Instant::now(),
        timers: RefCell::new(Vec::new()),
    });
    let opaque = &*ctx as *const Ctx as *mut c_void;
    // SAFETY: `cfg` and its strings are valid for the call (libslirp copies what it keeps);
    // CALLBACKS is static; `opaque` points to `ctx`, which outlives the instance (it is
    // dropped after slirp_cleanup below).
    let slirp = unsafe { (lib.new)(&cfg, &CALLBACKS, opaque) };
    if slirp.is_null() {
        let _ = ready.send(Err(Error::Create));
        return;
    }
    for f in &config.hostfwd {
        if let Err(e) = add_hostfwd(lib, slirp, f) {
            // SAFETY: the instance is live and used by no one else.
            unsafe { (lib.cleanup)(slirp) };
            let _ = ready.send(Err(e));
            return;
        }
    }
    let _ = ready.send(Ok(()));
    poll_loop(lib, slirp, &ctx, shared);
    // SAFETY: the instance is live; after this call libslirp no longer uses `opaque`.
    unsafe { (lib.cleanup)(slirp) };
    drop(ctx);
}

fn poll_loop(lib: &ffi::Lib, slirp: *mut ffi::Slirp, ctx: &Ctx, shared: &Shared) {
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !shared.stop.load(Ordering::Acquire) {
        let requests: Vec<Request> = lock(&shared.requests).drain(..).collect();
        for r in requests {
            match r {
                Request::AddHostFwd(f, reply) => {
                    let _ = reply.send(add_hostfwd(lib, slirp, &f));
                }
                Request::RemoveHostFwd(udp, addr, port, reply) => {
                    // SAFETY: the live instance; plain values.
                    let rc = unsafe {
                        (lib.remove_hostfwd)(
                            slirp,
                            c_int::from(udp),
                            in_addr(addr),
                            c_int::from(port),
                        )
                    };
                    let _ = reply.send(rc == 0);
                }
            }
        }
        loop {
            let Some(frame) = lock(&shared.tx).pop_front() else {
                break;
            };
            let Ok(len) = c_int::try_from(frame.len()) else {
                continue;
            };
            // SAFETY: the live instance and a frame of `len` bytes; libslirp copies it.
            unsafe { (lib.input)(slirp, frame.as_ptr(), len) };
        }
        fds.clear();
        fds.push(libc::pollfd {
            fd: shared.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout: u32 = u32::MAX;
        let fds_ptr = &mut fds as *mut Vec<libc::pollfd> as *mut c_void;
        // SAFETY: the live instance; `timeout` is a valid u32; cb_add_poll receives `fds`,
        // which nothing else touches during the call.
        unsafe { (lib.pollfds_fill)(slirp, &mut timeout, cb_add_poll, fds_ptr) };
        let mut wait = if timeout == u32::MAX {
            -1
        } else {
            i64::from(timeout)
        };
        if let Some(t) = ctx.next_timer_ms() {
            wait = if wait < 0 { t } else { wait.min(t) };
        }
        let wait = c_int::try_from(wait).unwrap_or(c_int::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        let failed = n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted;
        if fds[0].revents & libc::POLLIN != 0 {
            drain(&shared.wake);
        }
        if n < 0 {
            for p in &mut fds {
                p.revents = 0;
            }
        }
        // SAFETY: the live instance; `fds` holds the indices slirp_pollfds_fill returned.
        unsafe { (lib.pollfds_poll)(slirp, c_int::from(failed), cb_get_revents, fds_ptr) };
        for kind in ctx.due() {
            match kind {
                // SAFETY: the live instance with the id and opaque it gave timer_new_opaque.
                TimerKind::Opaque(id, o) => unsafe { (lib.handle_timer)(slirp, id, o) },
                // SAFETY: the callback and opaque libslirp gave timer_new.
                TimerKind::Callback(cb, o) => unsafe { cb(o) },
            }
        }
    }
}

#[cfg(test)]
mod tests;
