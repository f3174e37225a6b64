//! The one event loop that serves every QMP connection of the process, and the two
//! executor threads of each monitor. See [`crate::server`] for the design.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Instant;

use crate::events::{EventBus, Outbox};
use crate::json::{Limits, StreamParser};
use crate::pace::{MAX_PACING_WAIT, MONITOR_CPU_BURST, Pacer, configured_share, thread_cpu_ns};
use crate::session::{Dispatcher, Message, REQ_QUEUE_LEN_MAX, Session, respond_command};

/// Bytes of replies and events one client may leave unread (beyond what the kernel's
/// socket buffer took). A client over it has stopped reading: it is disconnected.
pub const CLIENT_OUTPUT_BUDGET: usize = 4 << 20;
/// Estimated memory of the requests one client may have queued (8 in-band and one
/// `exec-oob` at most); one request is always admitted. Over it, the server stops reading
/// that client until its queue drains (the server is behind, not the client).
pub const CLIENT_QUEUE_BUDGET: usize = 2 << 20;
/// Unread output of all clients of one monitor; over it, the client with the largest
/// backlog is disconnected.
pub const MONITOR_OUTPUT_BUDGET: usize = 32 << 20;
/// Input held for all clients of one monitor (unfinished messages in the parsers, queued
/// requests); over it, the client holding most is disconnected.
pub const MONITOR_INPUT_BUDGET: usize = 32 << 20;
/// Error replies a client may receive before its input pays for them.
pub const ERROR_REPLY_ALLOWANCE: usize = 64 << 10;
/// Each byte of input buys this many bytes of error replies; a client whose error
/// replies outgrow `ERROR_REPLY_ALLOWANCE + ERROR_REPLY_FACTOR * input` is disconnected.
pub const ERROR_REPLY_FACTOR: usize = 16;
/// Bytes read from one client per turn of the loop.
const READ_CHUNK: usize = 16 << 10;
/// The nice value of the QMP threads (loop and executors). Linux schedules threads on
/// their own, so this weighs QMP work at 15/1024 of a nice-0 thread (CFS weights) when
/// both want the same CPU: a guest's vCPU threads come first, and a busy monitor takes
/// what they leave (measured on a 2-core host: 8 clients flooding `query-status` slowed a
/// TCG boot by +35% at nice 10, +20% at nice 19, and +350% with the former thread per
/// client, while throughput stayed about three times QEMU's). Alone on a CPU, QMP runs
/// at full speed. Niceness alone does not bound the CPU the clients themselves spend on
/// fast replies: while the guest runs, [`crate::pace`] budgets the monitor too.
pub const QMP_THREAD_NICE: i32 = 19;

/// Lowers the calling thread's priority to [`QMP_THREAD_NICE`] (best effort: a process
/// already nicer than that keeps its value).
fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: getpriority/setpriority on this thread's own id; no memory is involved.
    unsafe {
        let cur = libc::getpriority(libc::PRIO_PROCESS, tid);
        if cur < QMP_THREAD_NICE {
            libc::setpriority(libc::PRIO_PROCESS, tid, QMP_THREAD_NICE);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A blocking FIFO served by one thread; it ends when stopped and empty.
struct WorkQueue<T> {
    state: Mutex<(VecDeque<T>, bool)>,
    cv: Condvar,
}

impl<T> WorkQueue<T> {
    fn new() -> Self {
        WorkQueue {
            state: Mutex::new((VecDeque::new(), false)),
            cv: Condvar::new(),
        }
    }
    fn push(&self, item: T) {
        lock(&self.state).0.push_back(item);
        self.cv.notify_one();
    }
    fn pop(&self) -> Option<T> {
        let mut st = lock(&self.state);
        loop {
            if let Some(x) = st.0.pop_front() {
                return Some(x);
            }
            if st.1 {
                return None;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
    fn stop(&self) {
        lock(&self.state).1 = true;
        self.cv.notify_all();
    }
}

/// The executor threads of one [`EventBus`] (one VMM): shared by all its monitors.
struct Executors {
    /// Clients with in-band requests, served round robin one request per turn.
    inband: WorkQueue<Arc<Client>>,
    /// `exec-oob` requests of all clients, in arrival order.
    oob: WorkQueue<(Arc<Client>, Message)>,
    /// Live monitors using them; the threads end when it drops to zero.
    monitors: AtomicUsize,
}

type ExecTable = Vec<(std::sync::Weak<EventBus>, Arc<Executors>)>;
static EXECUTORS: Mutex<ExecTable> = Mutex::new(Vec::new());

impl Executors {
    /// The executors of `bus`, started on first use.
    fn of(bus: &Arc<EventBus>) -> std::io::Result<Arc<Executors>> {
        let mut table = lock(&EXECUTORS);
        table.retain(|(b, e)| b.strong_count() > 0 && e.monitors.load(Ordering::SeqCst) > 0);
        if let Some((_, e)) = table
            .iter()
            .find(|(b, _)| std::ptr::eq(b.as_ptr(), Arc::as_ptr(bus)))
        {
            e.monitors.fetch_add(1, Ordering::SeqCst);
            return Ok(e.clone());
        }
        let e = Arc::new(Executors {
            inband: WorkQueue::new(),
            oob: WorkQueue::new(),
            monitors: AtomicUsize::new(1),
        });
        let x = e.clone();
        thread::Builder::new()
            .name("qmp-exec".into())
            .spawn(move || {
                lower_priority();
                run_in_band(&x)
            })?;
        let x = e.clone();
        let spawned = thread::Builder::new()
            .name("qmp-oob".into())
            .spawn(move || {
                lower_priority();
                run_oob(&x)
            });
        if let Err(err) = spawned {
            e.inband.stop();
            return Err(err);
        }
        table.push((Arc::downgrade(bus), e.clone()));
        Ok(e)
    }

    fn release(&self) {
        let _table = lock(&EXECUTORS);
        if self.monitors.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inband.stop();
            self.oob.stop();
        }
    }
}

/// One monitor: a listening socket and its clients, or one connected stream.
pub(crate) struct MonitorCtx {
    /// How logs name it, e.g. `unix:/run/vm.qmp`.
    pub name: String,
    pub dispatcher: Arc<dyn Dispatcher>,
    pub bus: Arc<EventBus>,
    exec: Arc<Executors>,
    output_bytes: AtomicUsize,
    input_bytes: AtomicUsize,
    /// Connected clients (for [`crate::server::MAX_CLIENTS_PER_LISTENER`]).
    clients: AtomicUsize,
    next_client: AtomicU64,
}

impl Drop for MonitorCtx {
    fn drop(&mut self) {
        self.exec.release();
    }
}

impl MonitorCtx {
    /// A monitor, served by the executors of its event bus.
    pub fn start(
        name: String,
        dispatcher: Arc<dyn Dispatcher>,
        bus: Arc<EventBus>,
    ) -> std::io::Result<Arc<MonitorCtx>> {
        let exec = Executors::of(&bus)?;
        Ok(Arc::new(MonitorCtx {
            name,
            dispatcher,
            bus,
            exec,
            output_bytes: AtomicUsize::new(0),
            input_bytes: AtomicUsize::new(0),
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
        }))
    }
}

/// A queued request and its estimated memory.
struct Queued {
    msg: Message,
    cost: usize,
}

struct ClientState {
    /// `None` while the in-band executor runs one of this client's requests.
    session: Option<Session>,
    oob: bool,
    inband: VecDeque<Queued>,
    queued_cost: usize,
    executing: bool,
    /// In the in-band executor's queue, or running there.
    scheduled: bool,
    oob_pending: usize,
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes of error replies still allowed.
    error_credit: usize,
    /// Why the client is being disconnected, once it is.
    doomed: Option<String>,
    /// The loop waits for the executors' progress on this client (its input is paused
    /// on a full queue, or it ended and the connection closes once all is answered).
    loop_waits: bool,
    /// The socket; `None` once the loop closed the connection.
    fd: Option<OwnedFd>,
}

impl ClientState {
    fn backlog(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Whether the loop may parse another request of this client now (QEMU's rule:
    /// without OOB one request at a time; with OOB up to [`REQ_QUEUE_LEN_MAX`] queued).
    fn can_accept(&self) -> bool {
        if self.doomed.is_some() {
            return false;
        }
        if !self.oob {
            return self.inband.is_empty() && !self.executing;
        }
        // While an `exec-oob` request runs, nothing after it is parsed: its reply then
        // precedes those of every later request, as when the reader ran it itself.
        self.inband.len() < REQ_QUEUE_LEN_MAX
            && self.oob_pending == 0
            && (self.inband.is_empty() || self.queued_cost < CLIENT_QUEUE_BUDGET)
    }

    fn doom(&mut self, reason: String) {
        if self.doomed.is_none() {
            self.doomed = Some(reason);
        }
    }
}

/// One connection, shared by the loop and the executors.
pub(crate) struct Client {
    id: u64,
    label: String,
    raw: RawFd,
    mon: Arc<MonitorCtx>,
    outbox: Arc<Outbox>,
    st: Mutex<ClientState>,
    /// Descriptors the client passed (`SCM_RIGHTS`) for its next `getfd`/`add-fd`.
    passed: crate::passfd::Held,
}

fn send_nb(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable slice for its length; `fd` is an open socket
        // owned by the caller's client state for the duration of the call.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Client {
    /// Moves queued events to the output queue (they precede the next reply, as in QEMU),
    /// then checks the event and output budgets.
    fn take_events(&self, st: &mut ClientState) {
        if self.outbox.has_events() {
            let before = st.out.len();
            self.outbox.drain_into(&mut st.out);
            self.mon
                .output_bytes
                .fetch_add(st.out.len() - before, Ordering::SeqCst);
        }
        let dropped = self.outbox.dropped();
        if dropped > 0 {
            st.doom(format!(
                "{dropped} events could not be queued ({} were waiting)",
                crate::events::MAX_QUEUED_EVENTS
            ));
        }
        if st.backlog() > CLIENT_OUTPUT_BUDGET {
            st.doom(format!(
                "not reading: {} bytes of replies and events unread (budget {CLIENT_OUTPUT_BUDGET})",
                st.backlog()
            ));
        }
    }

    /// Queues one reply (after pending events) and sends what the socket takes now.
    /// Returns whether the loop must look at this client.
    fn deliver(&self, st: &mut ClientState, reply: &str) -> bool {
        if st.fd.is_none() {
            return false;
        }
        if reply.starts_with("{\"error\"") {
            let cost = reply.len() + 2;
            if cost > st.error_credit {
                st.error_credit = 0;
                st.doom(format!(
                    "malformed input: error replies would exceed {ERROR_REPLY_FACTOR} times \
                     the input (plus {ERROR_REPLY_ALLOWANCE} bytes)"
                ));
            } else {
                st.error_credit -= cost;
            }
        }
        self.take_events(st);
        let before = st.out.len();
        st.out.extend_from_slice(reply.as_bytes());
        st.out.extend_from_slice(b"\r\n");
        self.mon
            .output_bytes
            .fetch_add(st.out.len() - before, Ordering::SeqCst);
        if st.backlog() > CLIENT_OUTPUT_BUDGET {
            st.doom(format!(
                "not reading: {} bytes of replies and events unread (budget {CLIENT_OUTPUT_BUDGET})",
                st.backlog()
            ));
        }
        self.flush(st).is_err() || st.backlog() > 0 || st.doomed.is_some() || st.loop_waits
    }

    /// Sends as much of the output queue as the socket takes without blocking.
    fn flush(&self, st: &mut ClientState) -> std::io::Result<()> {
        while st.backlog() > 0 {
            let Some(fd) = &st.fd else { return Ok(()) };
            match send_nb(fd.as_raw_fd(), &st.out[st.out_pos..]) {
                Ok(n) => {
                    st.out_pos += n;
                    self.mon.output_bytes.fetch_sub(n, Ordering::SeqCst);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    st.doom(format!("write failed: {e}"));
                    // Nothing more will be written: release the output.
                    self.mon
                        .output_bytes
                        .fetch_sub(st.backlog(), Ordering::SeqCst);
                    st.out_pos = st.out.len();
                    return Err(e);
                }
            }
        }
        if st.out_pos == st.out.len() {
            st.out.clear();
            st.out_pos = 0;
            if st.out.capacity() > 64 << 10 {
                st.out = Vec::new();
            }
        } else if st.out_pos > 64 << 10 {
            st.out.drain(..st.out_pos);
            st.out_pos = 0;
        }
        Ok(())
    }
}

/// CPU time of the event-loop thread so far (ns), published after each of its turns for
/// the executors' budget.
static LOOP_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// Waits, while the guest runs, until the monitor is back within its CPU budget.
fn pace(pacer: &mut Pacer, t0: Instant, dispatcher: &dyn Dispatcher) {
    loop {
        let now = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let cpu = thread_cpu_ns().saturating_add(LOOP_CPU_NS.load(Ordering::Relaxed));
        let wait = pacer.delay(now, cpu, dispatcher.guest_running());
        if wait.is_zero() {
            return;
        }
        crate::pace::count_wait();
        thread::sleep(wait.min(MAX_PACING_WAIT));
    }
}

/// The in-band executor: one request per client per turn, round robin, paced while the
/// guest runs ([`crate::pace`]).
fn run_in_band(exec: &Arc<Executors>) {
    let mut pacer = Pacer::new(configured_share(), MONITOR_CPU_BURST);
    let t0 = Instant::now();
    while let Some(c) = exec.inband.pop() {
        let mon = c.mon.clone();
        pace(&mut pacer, t0, &*mon.dispatcher);
        let taken = {
            let mut st = lock(&c.st);
            if st.fd.is_none() || st.doomed.is_some() || st.session.is_none() {
                None
            } else {
                st.inband.pop_front().map(|q| {
                    st.queued_cost -= q.cost;
                    mon.input_bytes.fetch_sub(q.cost, Ordering::SeqCst);
                    st.executing = true;
                    (q.msg, st.session.take())
                })
            }
        };
        let taken = taken.and_then(|(m, s)| Some((m, s?)));
        let Some((m, mut session)) = taken else {
            lock(&c.st).scheduled = false;
            loop_wake(c.id);
            continue;
        };
        let reply = crate::passfd::with_held(&c.passed, || session.respond(m, &*mon.dispatcher));
        let answered = session.take_answered();
        let (more, wake) = {
            let mut st = lock(&c.st);
            st.oob = session.oob_enabled();
            st.session = Some(session);
            st.executing = false;
            let wake = c.deliver(&mut st, &reply);
            let more = !st.inband.is_empty() && st.fd.is_some() && st.doomed.is_none();
            if !more {
                st.scheduled = false;
            }
            (more, wake)
        };
        // The reply is queued (normally written): `quit` may end the process now.
        for name in answered {
            mon.dispatcher.after_reply(&name);
        }
        if more {
            exec.inband.push(c.clone());
        }
        if wake {
            loop_wake(c.id);
        }
    }
}

/// The out-of-band executor: `exec-oob` requests of every client of the monitor, at once
/// and in arrival order, never behind in-band work.
fn run_oob(exec: &Arc<Executors>) {
    while let Some((c, m)) = exec.oob.pop() {
        let mon = c.mon.clone();
        let live = lock(&c.st).fd.is_some();
        let (reply, name) = if live {
            respond_command(m, true, &*mon.dispatcher)
        } else {
            (String::new(), None)
        };
        let wake = {
            let mut st = lock(&c.st);
            st.oob_pending -= 1;
            (live && c.deliver(&mut st, &reply)) || st.loop_waits
        };
        if let Some(name) = name {
            mon.dispatcher.after_reply(&name);
        }
        if wake {
            loop_wake(c.id);
        }
    }
}

/// Something handed to the loop thread.
pub(crate) enum Item {
    /// A nonblocking listening socket (`tcp`: set TCP_NODELAY on its clients).
    Listener {
        fd: OwnedFd,
        mon: Arc<MonitorCtx>,
        tcp: bool,
        max_clients: usize,
    },
    /// A connected socket.
    Client { fd: OwnedFd, mon: Arc<MonitorCtx> },
}

struct LoopShared {
    epfd: OwnedFd,
    wake: OwnedFd,
    dirty: Mutex<Vec<u64>>,
    incoming: Mutex<Vec<Item>>,
}

static LOOP: OnceLock<Result<Arc<LoopShared>, String>> = OnceLock::new();

fn shared() -> Result<&'static Arc<LoopShared>, std::io::Error> {
    LOOP.get_or_init(|| start_loop().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| std::io::Error::other(format!("cannot start the QMP event loop: {e}")))
}

fn start_loop() -> std::io::Result<Arc<LoopShared>> {
    // SAFETY: plain syscalls creating new descriptors; failures are checked.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: epfd is a new descriptor owned by nobody else.
    let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
    // SAFETY: as above.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if wake < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let wake = unsafe { OwnedFd::from_raw_fd(wake) };
    epoll_ctl(
        epfd.as_raw_fd(),
        libc::EPOLL_CTL_ADD,
        wake.as_raw_fd(),
        libc::EPOLLIN as u32,
        0,
    )?;
    let shared = Arc::new(LoopShared {
        epfd,
        wake,
        dirty: Mutex::new(Vec::new()),
        incoming: Mutex::new(Vec::new()),
    });
    let s = shared.clone();
    thread::Builder::new()
        .name("qmp-loop".into())
        .spawn(move || {
            lower_priority();
            keel_sandbox::enter(keel_sandbox::ThreadClass::Monitor);
            EventLoop::new(s).run()
        })?;
    Ok(shared)
}

fn epoll_ctl(
    epfd: RawFd,
    op: libc::c_int,
    fd: RawFd,
    events: u32,
    token: u64,
) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call; the descriptors
    // are open (owned by the loop).
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd; EAGAIN (counter full) still
    // leaves it readable, which is all a wake-up needs.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Asks the loop to look at client `id` (events queued, queue space freed, output left).
fn loop_wake(id: u64) {
    if let Some(Ok(s)) = LOOP.get() {
        lock(&s.dirty).push(id);
        signal(s.wake.as_raw_fd());
    }
}

/// Hands a listener or a connection to the loop.
pub(crate) fn register(item: Item) -> std::io::Result<()> {
    let s = shared()?;
    lock(&s.incoming).push(item);
    signal(s.wake.as_raw_fd());
    Ok(())
}

struct Conn {
    client: Arc<Client>,
    parser: StreamParser,
    /// Input read but not parsed yet (the client's queue was full).
    pending: Vec<u8>,
    pending_pos: usize,
    eof: bool,
    /// What `parser.buffered()` was last accounted as in the monitor's input bytes.
    parser_held: usize,
    /// The epoll interest; `None` while the socket is out of the epoll set (nothing is
    /// wanted from it, and a hung-up socket would otherwise be reported without end).
    interest: Option<u32>,
}

struct Listen {
    fd: OwnedFd,
    mon: Arc<MonitorCtx>,
    tcp: bool,
    max_clients: usize,
}

struct EventLoop {
    shared: Arc<LoopShared>,
    conns: HashMap<u64, Conn>,
    listeners: HashMap<u64, Listen>,
    next_token: u64,
    buf: Vec<u8>,
}

/// Listener tokens have the top bit set; client tokens are their ids.
const LISTENER_BIT: u64 = 1 << 63;

static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

fn peer_pid(fd: RawFd) -> Option<i32> {
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed ucred we own.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above; `fd` is an open socket.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

impl EventLoop {
    fn new(shared: Arc<LoopShared>) -> Self {
        EventLoop {
            shared,
            conns: HashMap::new(),
            listeners: HashMap::new(),
            next_token: 1,
            buf: vec![0; READ_CHUNK],
        }
    }

    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            // SAFETY: `events` is a valid buffer of 64 entries owned by this frame.
            let n = unsafe {
                libc::epoll_wait(self.shared.epfd.as_raw_fd(), events.as_mut_ptr(), 64, -1)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("QMP event loop: epoll_wait failed: {e}");
                    thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            for ev in &events[..n as usize] {
                let (token, bits) = (ev.u64, ev.events);
                if token == 0 {
                    self.wakeup();
                } else if token & LISTENER_BIT != 0 {
                    self.accept(token);
                } else {
                    let readable =
                        bits & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                    self.service(token, readable);
                }
            }
            LOOP_CPU_NS.store(thread_cpu_ns(), Ordering::Relaxed);
        }
    }

    fn wakeup(&mut self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from the loop's nonblocking eventfd.
        let _ = unsafe { libc::read(self.shared.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        let items = std::mem::take(&mut *lock(&self.shared.incoming));
        for item in items {
            self.add(item);
        }
        let mut dirty = std::mem::take(&mut *lock(&self.shared.dirty));
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty {
            self.service(id, false);
        }
    }

    fn add(&mut self, item: Item) {
        match item {
            Item::Listener {
                fd,
                mon,
                tcp,
                max_clients,
            } => {
                let token = LISTENER_BIT | self.next_token;
                self.next_token += 1;
                let epfd = self.shared.epfd.as_raw_fd();
                if let Err(e) = epoll_ctl(
                    epfd,
                    libc::EPOLL_CTL_ADD,
                    fd.as_raw_fd(),
                    libc::EPOLLIN as u32,
                    token,
                ) {
                    log::error!("QMP {}: cannot wait for clients: {e}", mon.name);
                    return;
                }
                self.listeners.insert(
                    token,
                    Listen {
                        fd,
                        mon,
                        tcp,
                        max_clients,
                    },
                );
            }
            Item::Client { fd, mon } => {
                mon.clients.fetch_add(1, Ordering::SeqCst);
                self.add_client(fd, mon);
            }
        }
    }

    fn accept(&mut self, token: u64) {
        let Some(l) = self.listeners.get(&token) else {
            return;
        };
        let (lfd, mon, tcp, max) = (l.fd.as_raw_fd(), l.mon.clone(), l.tcp, l.max_clients);
        // A few per turn, so a connection storm does not starve served clients.
        for _ in 0..16 {
            // SAFETY: accept4 on an open listening socket; null address pointers are
            // allowed. The new descriptor is close-on-exec and nonblocking from the start.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock => return,
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted => continue,
                    _ => {
                        log::warn!("QMP {}: accept failed: {e}", mon.name);
                        return;
                    }
                }
            }
            // SAFETY: accept4 returned a new descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if mon.clients.fetch_add(1, Ordering::SeqCst) >= max {
                mon.clients.fetch_sub(1, Ordering::SeqCst);
                log::warn!(
                    "QMP {}: refusing a client: {max} are connected already",
                    mon.name
                );
                continue;
            }
            if tcp {
                let one: libc::c_int = 1;
                // SAFETY: sets an int option from a valid pointer on an open socket.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_NODELAY,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
            }
            self.add_client(fd, mon.clone());
        }
    }

    fn add_client(&mut self, fd: OwnedFd, mon: Arc<MonitorCtx>) {
        let raw = fd.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on an open descriptor; no memory is involved.
        unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let id = NEXT_CLIENT_ID.fetch_add(1, Ordering::SeqCst);
        let n = mon.next_client.fetch_add(1, Ordering::SeqCst);
        let label = match peer_pid(raw) {
            Some(pid) if !mon.name.starts_with("tcp:") => {
                format!("client {n} of {} (pid {pid})", mon.name)
            }
            _ => format!("client {n} of {}", mon.name),
        };
        let shared = self.shared.clone();
        let outbox = mon.bus.attach_with(Box::new(move || {
            lock(&shared.dirty).push(id);
            signal(shared.wake.as_raw_fd());
        }));
        let greeting = Session::greeting(&*mon.dispatcher, true);
        mon.output_bytes.fetch_add(greeting.len(), Ordering::SeqCst);
        let client = Arc::new(Client {
            id,
            label,
            raw,
            mon: mon.clone(),
            outbox: outbox.clone(),
            passed: Default::default(),
            st: Mutex::new(ClientState {
                session: Some(Session::with_oob(Some(outbox), true)),
                oob: false,
                inband: VecDeque::new(),
                queued_cost: 0,
                executing: false,
                scheduled: false,
                oob_pending: 0,
                out: greeting,
                out_pos: 0,
                error_credit: ERROR_REPLY_ALLOWANCE,
                doomed: None,
                loop_waits: false,
                fd: Some(fd),
            }),
        });
        if let Err(e) = epoll_ctl(
            self.shared.epfd.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            raw,
            libc::EPOLLIN as u32,
            id,
        ) {
            log::warn!("QMP {}: cannot serve a client: {e}", mon.name);
            mon.bus.detach(&client.outbox);
            mon.output_bytes
                .fetch_sub(lock(&client.st).backlog(), Ordering::SeqCst);
            mon.clients.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        self.conns.insert(
            id,
            Conn {
                client,
                parser: StreamParser::new(Limits::default()),
                pending: Vec::new(),
                pending_pos: 0,
                eof: false,
                parser_held: 0,
                interest: Some(libc::EPOLLIN as u32),
            },
        );
        self.service(id, false);
    }

    /// Everything the loop does for one client: events, input, output, budgets, close.
    fn service(&mut self, id: u64, readable: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let client = conn.client.clone();
        let mon = client.mon.clone();
        let mut st = lock(&client.st);
        let closing = client.outbox.closing();
        if closing && st.doomed.is_none() {
            // The monitor is closing: what is queued is dropped (as QEMU does), what is
            // written stays, then the connection ends.
            let dropped: usize = st.inband.drain(..).map(|q| q.cost).sum();
            st.queued_cost -= dropped;
            mon.input_bytes.fetch_sub(dropped, Ordering::SeqCst);
            conn.eof = true;
            conn.pending.clear();
            conn.pending_pos = 0;
        }
        client.take_events(&mut st);

        // Input: one read per turn, and only once what was read before is parsed.
        if readable && !conn.eof && conn.pending_pos == conn.pending.len() && st.doomed.is_none() {
            let (r, fds) = crate::passfd::recv_with_fds(client.raw, &mut self.buf);
            if !fds.is_empty() {
                // As QEMU: descriptors that come with new bytes replace those still held.
                *client.passed.lock().unwrap_or_else(|e| e.into_inner()) = fds;
            }
            if r > 0 {
                let n = r as usize;
                conn.pending.clear();
                conn.pending.extend_from_slice(&self.buf[..n]);
                conn.pending_pos = 0;
                st.error_credit = st
                    .error_credit
                    .saturating_add(n * ERROR_REPLY_FACTOR)
                    .min(ERROR_REPLY_ALLOWANCE + READ_CHUNK * ERROR_REPLY_FACTOR);
            } else if r == 0 {
                conn.eof = true;
            } else {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::Interrupted => {}
                    _ => {
                        conn.eof = true;
                        st.doom(format!("read failed: {e}"));
                    }
                }
            }
        }

        // Parse as far as the client's queue allows.
        let mut flushed = false;
        loop {
            if closing || !st.can_accept() {
                break;
            }
            let mut msgs: Vec<Message> = Vec::new();
            if conn.pending_pos < conn.pending.len() {
                let used = conn
                    .parser
                    .feed_some(&conn.pending[conn.pending_pos..], &mut |m| msgs.push(m));
                conn.pending_pos += used;
            } else if conn.eof && !flushed {
                conn.parser.flush(&mut |m| msgs.push(m));
                flushed = true;
            } else {
                break;
            }
            let cost = conn.parser.last_cost();
            for m in msgs {
                route(&client, &mut st, m, cost);
            }
        }
        let paused = conn.pending_pos < conn.pending.len();
        if conn.pending_pos == conn.pending.len() && !conn.pending.is_empty() {
            conn.pending.clear();
            conn.pending_pos = 0;
            if conn.pending.capacity() > READ_CHUNK {
                conn.pending = Vec::new();
            }
        }
        let held = conn.parser.buffered();
        if held >= conn.parser_held {
            mon.input_bytes
                .fetch_add(held - conn.parser_held, Ordering::SeqCst);
        } else {
            mon.input_bytes
                .fetch_sub(conn.parser_held - held, Ordering::SeqCst);
        }
        conn.parser_held = held;

        let _ = client.flush(&mut st);

        // Close: doomed (after a last attempt to write), or at the end of the input once
        // everything queued is answered and written.
        let idle = st.inband.is_empty() && !st.executing && st.oob_pending == 0;
        let finished = conn.eof && conn.pending_pos == conn.pending.len() && idle;
        if st.doomed.is_some() || (finished && st.backlog() == 0) {
            if let Some(reason) = &st.doomed {
                log::warn!("QMP {}: disconnected: {reason}", client.label);
            }
            drop(st);
            self.close(id);
            self.check_monitor(&mon);
            return;
        }
        st.loop_waits = paused || conn.eof || closing;
        let mut want = 0u32;
        if !conn.eof && !paused {
            want |= libc::EPOLLIN as u32;
        }
        if st.backlog() > 0 {
            want |= libc::EPOLLOUT as u32;
        }
        drop(st);
        let want = (want != 0).then_some(want);
        if want != conn.interest {
            let epfd = self.shared.epfd.as_raw_fd();
            let r = match (conn.interest, want) {
                (Some(_), Some(w)) => epoll_ctl(epfd, libc::EPOLL_CTL_MOD, client.raw, w, id),
                (None, Some(w)) => epoll_ctl(epfd, libc::EPOLL_CTL_ADD, client.raw, w, id),
                (_, None) => epoll_ctl(epfd, libc::EPOLL_CTL_DEL, client.raw, 0, id),
            };
            if r.is_ok() {
                conn.interest = want;
            }
        }
        self.check_monitor(&mon);
    }

    /// Enforces the monitor-wide budgets: the client holding most goes first.
    fn check_monitor(&mut self, mon: &Arc<MonitorCtx>) {
        loop {
            let out = mon.output_bytes.load(Ordering::SeqCst);
            let inp = mon.input_bytes.load(Ordering::SeqCst);
            let (what, budget, total) = if out > MONITOR_OUTPUT_BUDGET {
                ("unread output", MONITOR_OUTPUT_BUDGET, out)
            } else if inp > MONITOR_INPUT_BUDGET {
                ("buffered input", MONITOR_INPUT_BUDGET, inp)
            } else {
                return;
            };
            let worst = self
                .conns
                .iter()
                .filter(|(_, c)| Arc::ptr_eq(&c.client.mon, mon))
                .max_by_key(|(_, c)| {
                    let st = lock(&c.client.st);
                    if budget == MONITOR_OUTPUT_BUDGET {
                        st.backlog()
                    } else {
                        st.queued_cost + c.parser_held
                    }
                })
                .map(|(id, _)| *id);
            let Some(id) = worst else { return };
            if let Some(c) = self.conns.get(&id) {
                log::warn!(
                    "QMP {}: disconnected: the monitor's {what} ({total} bytes) is over its \
                     budget of {budget}, and this client holds the most",
                    c.client.label
                );
            }
            self.close(id);
        }
    }

    fn close(&mut self, id: u64) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        let client = conn.client;
        let mon = &client.mon;
        if conn.interest.is_some() {
            let _ = epoll_ctl(
                self.shared.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                client.raw,
                0,
                id,
            );
        }
        {
            let mut st = lock(&client.st);
            let queued: usize = st.inband.drain(..).map(|q| q.cost).sum();
            st.queued_cost -= queued;
            mon.input_bytes
                .fetch_sub(queued + conn.parser_held, Ordering::SeqCst);
            mon.output_bytes.fetch_sub(st.backlog(), Ordering::SeqCst);
            st.out = Vec::new();
            st.out_pos = 0;
            // Closes the socket now, even if an executor still holds the client.
            st.fd = None;
        }
        mon.bus.detach(&client.outbox);
        mon.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hands one parsed message to the executor that runs it.
fn route(client: &Arc<Client>, st: &mut ClientState, m: Message, cost: usize) {
    let mon = &client.mon;
    if let Err(e) = &m
        && e.is_over_budget()
    {
        // One error in QEMU's words, then the client goes: it sent more than any
        // request needs, and the rest of that message would only be skipped.
        let reply = crate::session::reply_error(&crate::CommandError::generic(e.0.clone()), None);
        client.deliver(st, &reply);
        st.doom(format!(
            "{}: a message over the input budget ({} bytes, {} tokens)",
            e.0,
            Limits::default().max_message_bytes,
            Limits::default().max_tokens
        ));
        return;
    }
    if st.oob && Session::is_out_of_band(&m) {
        st.oob_pending += 1;
        mon.exec.oob.push((client.clone(), m));
        return;
    }
    st.inband.push_back(Queued { msg: m, cost });
    st.queued_cost += cost;
    mon.input_bytes.fetch_add(cost, Ordering::SeqCst);
    if !st.scheduled {
        st.scheduled = true;
        mon.exec.inband.push(client.clone());
    }
}
