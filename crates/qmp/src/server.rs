//! Transports: unix and TCP sockets (listening or connecting), and stdio.
//!
//! Every connection gets its own thread and its own [`Session`]; a listening socket
//! accepts any number of clients at once (QEMU serves one at a time). A client's thread
//! waits with `poll(2)` on its input and on its event wake-up socket, so events reach it
//! while it is idle, and a client that does not read only ever blocks its own thread.
//!
//! Out-of-band execution: every monitor (unix, TCP, [`serve_stream`], stdio) offers the
//! `oob` capability. QEMU offers it when the monitor's chardev can move to the monitor
//! I/O thread, which is any chardev class with `chr_update_read_handler`: sockets, and
//! on POSIX also the fd-based ones behind `stdio` and `pipe`. Once a client enables it,
//! the client's thread keeps reading: in-band requests go to a queue of
//! [`REQ_QUEUE_LEN_MAX`] that a worker thread runs in order (reading pauses while the
//! queue is full), and `exec-oob` requests run at once on the reading thread, so their
//! replies can overtake in-band ones. Writes of both threads are serialised per reply.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread;

/// Clients served at once per listening socket; more are refused (closed at once), so a
/// local client cannot make the server spawn threads without bound.
pub const MAX_CLIENTS_PER_LISTENER: usize = 64;

use crate::events::{EventBus, Outbox};
use crate::session::{Dispatcher, Message, REQ_QUEUE_LEN_MAX, Session, respond_command};

/// Errors setting up a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The endpoint text could not be understood.
    #[error("{0}")]
    Syntax(String),
    /// A socket or file operation failed.
    #[error("{what} '{target}'")]
    Io {
        /// Operation, e.g. "cannot listen on".
        what: &'static str,
        /// Path or address.
        target: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Where a monitor talks to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix stream socket.
    Unix {
        /// Socket path.
        path: PathBuf,
        /// Listen (`server=on`) or connect.
        server: bool,
        /// With `server`: block until the first client connects (`wait=on`, QEMU's default).
        wait: bool,
    },
    /// A TCP socket.
    Tcp {
        /// Host name or address (`127.0.0.1`).
        host: String,
        /// Port.
        port: u16,
        /// Listen or connect.
        server: bool,
        /// With `server`: block until the first client connects.
        wait: bool,
    },
    /// Standard input and output.
    Stdio,
    /// A socket the process inherited as file descriptor `fd` (`-chardev socket,fd=N`):
    /// a listening socket with `server` (libvirt's monitor), else a connected one (the other
    /// end of a `socketpair`, as QEMU's Python `QEMUMachine` passes it).
    Fd {
        /// The descriptor number.
        fd: i32,
        /// Listening (`server=on`) or connected.
        server: bool,
    },
}

fn on_off(key: &str, v: Option<&str>) -> Result<bool, ServerError> {
    match v {
        None | Some("on") | Some("yes") | Some("true") => Ok(true),
        Some("off") | Some("no") | Some("false") => Ok(false),
        Some(other) => Err(ServerError::Syntax(format!(
            "Parameter '{key}' expects 'on' or 'off', not '{other}'"
        ))),
    }
}

impl Endpoint {
    /// Parses QEMU's `-qmp` spelling: `unix:PATH[,server=on][,wait=off]`,
    /// `tcp:HOST:PORT[,...]`, `stdio`. Bare `server` and `nowait` are accepted too.
    pub fn parse(spec: &str) -> Result<Endpoint, ServerError> {
        if spec == "stdio" {
            return Ok(Endpoint::Stdio);
        }
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let mut server = false;
        let mut wait = true;
        for p in parts {
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (p, None),
            };
            match k {
                "server" => server = on_off(k, v)?,
                "wait" => wait = on_off(k, v)?,
                "nowait" if v.is_none() => wait = false,
                _ => {
                    return Err(ServerError::Syntax(format!(
                        "Invalid parameter '{k}' in '{spec}'"
                    )));
                }
            }
        }
        if let Some(path) = head.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ServerError::Syntax("unix socket path is empty".into()));
            }
            Ok(Endpoint::Unix {
                path: PathBuf::from(path),
                server,
                wait,
            })
        } else if let Some(addr) = head.strip_prefix("tcp:") {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| ServerError::Syntax(format!("'{addr}' is not HOST:PORT")))?;
            let port = port
                .parse()
                .map_err(|_| ServerError::Syntax(format!("'{port}' is not a TCP port")))?;
            let host = if host.is_empty() { "0.0.0.0" } else { host };
            Ok(Endpoint::Tcp {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
                port,
                server,
                wait,
            })
        } else {
            Err(ServerError::Syntax(format!(
                "'{head}' is not a supported monitor backend (use unix:PATH, tcp:HOST:PORT or stdio)"
            )))
        }
    }
}

/// A running monitor transport. Dropping it does not stop clients; a listening unix
/// socket's path is removed by [`Monitor::cleanup`].
#[derive(Debug)]
pub struct Monitor {
    socket_path: Option<PathBuf>,
}

impl Monitor {
    /// Removes the socket file this monitor created, if any.
    pub fn cleanup(&self) {
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Creates a unix socket at `path` that only the owner can use: it is bound under a
/// temporary name in the same directory, restricted to mode 0600, then renamed into
/// place, so it is never reachable with wider permissions.
pub fn bind_unix_0600(path: &Path) -> std::io::Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let file = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = match dir {
        Some(d) => d.join(&tmp_name),
        None => PathBuf::from(&tmp_name),
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

fn io_err(
    what: &'static str,
    target: impl Into<String>,
) -> impl FnOnce(std::io::Error) -> ServerError {
    let target = target.into();
    move |source| ServerError::Io {
        what,
        target,
        source,
    }
}

/// Takes ownership of inherited descriptor `fd`, after checking that it is an open socket
/// that nothing in this process owns yet (each number may be taken once).
fn take_socket_fd(fd: i32) -> Result<OwnedFd, ServerError> {
    static TAKEN: Mutex<Vec<i32>> = Mutex::new(Vec::new());
    let bad = |reason: &str| ServerError::Syntax(format!("fd={fd}: {reason}"));
    if fd <= 2 {
        return Err(bad("not a socket this process inherited (0-2 are stdio)"));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    if taken.contains(&fd) {
        return Err(bad("already in use by another monitor"));
    }
    // SAFETY: fstat only writes the zero-initialised stat buffer we own; an invalid fd makes
    // it fail with EBADF, which is reported.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(ServerError::Io {
            what: "cannot use inherited descriptor",
            target: fd.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket"));
    }
    // Not inherited further by programs this process might run.
    // SAFETY: F_SETFD on a descriptor just checked to be open; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    taken.push(fd);
    // SAFETY: the descriptor is open (fstat succeeded), is a socket, and no other owner in
    // this process exists: numbers are handed out once (TAKEN), and the process was given it
    // by its parent for this purpose.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Starts a monitor on `endpoint`. Listening sockets accept clients on a thread of their
/// own; with `wait`, the first client is accepted before this returns (QEMU's `wait=on`).
pub fn serve(
    endpoint: &Endpoint,
    dispatcher: Arc<dyn Dispatcher>,
    bus: Arc<EventBus>,
) -> Result<Monitor, ServerError> {
    match endpoint {
        Endpoint::Stdio => {
            let input = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("cannot use", "stdin"))?;
            let output = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err("cannot use", "stdout"))?;
            spawn_connection(input, output, dispatcher, bus, None, true);
            Ok(Monitor { socket_path: None })
        }
        Endpoint::Unix {
            path,
            server: true,
            wait,
        } => {
            let shown = path.display().to_string();
            let listener =
                bind_unix_0600(path).map_err(io_err("cannot listen on unix socket", &*shown))?;
            let count = Arc::new(AtomicUsize::new(0));
            if *wait {
                let (s, _) = listener
                    .accept()
                    .map_err(io_err("cannot accept on", &*shown))?;
                start_counted(OwnedFd::from(s), &dispatcher, &bus, &count);
            }
            thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || {
                    for s in listener.incoming().flatten() {
                        start_counted(OwnedFd::from(s), &dispatcher, &bus, &count);
                    }
                })
                .map_err(io_err("cannot start a thread for", &*shown))?;
            Ok(Monitor {
                socket_path: Some(path.clone()),
            })
        }
        Endpoint::Unix {
            path,
            server: false,
            ..
        } => {
            let s = UnixStream::connect(path).map_err(io_err(
                "cannot connect to unix socket",
                path.display().to_string(),
            ))?;
            start_stream(OwnedFd::from(s), &dispatcher, &bus);
            Ok(Monitor { socket_path: None })
        }
        Endpoint::Tcp {
            host,
            port,
            server: true,
            wait,
        } => {
            let addr = format!("{host}:{port}");
            let listener =
                TcpListener::bind(&addr).map_err(io_err("cannot listen on tcp", &*addr))?;
            if *wait {
                let (s, _) = listener
                    .accept()
                    .map_err(io_err("cannot accept on", &*addr))?;
                let _ = s.set_nodelay(true);
                start_stream(OwnedFd::from(s), &dispatcher, &bus);
            }
            thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || {
                    for s in listener.incoming().flatten() {
                        let _ = s.set_nodelay(true);
                        start_stream(OwnedFd::from(s), &dispatcher, &bus);
                    }
                })
                .map_err(io_err("cannot start a thread for", &*addr))?;
            Ok(Monitor { socket_path: None })
        }
        Endpoint::Fd { fd, server: true } => {
            let listener = UnixListener::from(take_socket_fd(*fd)?);
            let count = Arc::new(AtomicUsize::new(0));
            thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || {
                    for s in listener.incoming().flatten() {
                        start_counted(OwnedFd::from(s), &dispatcher, &bus, &count);
                    }
                })
                .map_err(io_err("cannot start a thread for", format!("fd={fd}")))?;
            Ok(Monitor { socket_path: None })
        }
        Endpoint::Fd { fd, server: false } => {
            start_stream(take_socket_fd(*fd)?, &dispatcher, &bus);
            Ok(Monitor { socket_path: None })
        }
        Endpoint::Tcp {
            host,
            port,
            server: false,
            ..
        } => {
            let addr = format!("{host}:{port}");
            let s = TcpStream::connect(&addr).map_err(io_err("cannot connect to", &*addr))?;
            let _ = s.set_nodelay(true);
            start_stream(OwnedFd::from(s), &dispatcher, &bus);
            Ok(Monitor { socket_path: None })
        }
    }
}

/// Serves an already connected socket (e.g. one end of a `socketpair`) as a monitor.
pub fn serve_stream(stream: UnixStream, dispatcher: Arc<dyn Dispatcher>, bus: Arc<EventBus>) {
    start_stream(OwnedFd::from(stream), &dispatcher, &bus);
}

fn start_stream(fd: OwnedFd, dispatcher: &Arc<dyn Dispatcher>, bus: &Arc<EventBus>) {
    match fd.try_clone() {
        Ok(out) => spawn_connection(fd, out, dispatcher.clone(), bus.clone(), None, true),
        Err(e) => log::warn!("cannot serve a client: {e}"),
    }
}

/// Like [`start_stream`] for a listener's client, counted against its limit.
fn start_counted(
    fd: OwnedFd,
    dispatcher: &Arc<dyn Dispatcher>,
    bus: &Arc<EventBus>,
    count: &Arc<AtomicUsize>,
) {
    if count.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS_PER_LISTENER {
        count.fetch_sub(1, Ordering::SeqCst);
        log::warn!("refusing a client: {MAX_CLIENTS_PER_LISTENER} are connected already");
        return;
    }
    match fd.try_clone() {
        Ok(out) => {
            // Greet from the accepting thread: the client gets its first line without
            // waiting for a new thread to be scheduled.
            let mut f = File::from(out);
            if f.write_all(&Session::greeting(&**dispatcher, true))
                .is_err()
            {
                count.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            spawn_connection(
                fd,
                OwnedFd::from(f),
                dispatcher.clone(),
                bus.clone(),
                Some(count.clone()),
                true,
            )
        }
        Err(e) => {
            count.fetch_sub(1, Ordering::SeqCst);
            log::warn!("cannot serve a client: {e}");
        }
    }
}

fn spawn_connection(
    input: OwnedFd,
    output: OwnedFd,
    dispatcher: Arc<dyn Dispatcher>,
    bus: Arc<EventBus>,
    count: Option<Arc<AtomicUsize>>,
    offer_oob: bool,
) {
    let release = count.clone();
    // Listener clients were greeted by the accepting thread already.
    let greeted = count.is_some();
    let spawned = thread::Builder::new()
        .name("qmp-client".into())
        .spawn(move || {
            let (input, output) = (File::from(input), File::from(output));
            serve_connection(input, output, &*dispatcher, &bus, greeted, offer_oob);
            if let Some(c) = count {
                c.fetch_sub(1, Ordering::SeqCst);
            }
        });
    if let Err(e) = spawned {
        if let Some(c) = release {
            c.fetch_sub(1, Ordering::SeqCst);
        }
        log::warn!("cannot start a client thread: {e}");
    }
}

/// Waits until `input` or `wake` is readable; returns (input ready, wake ready).
fn wait_readable(input: &File, wake: &UnixStream) -> std::io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call, and
        // both descriptors are owned by live objects borrowed for the duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let ready = |f: &libc::pollfd| f.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}

fn serve_connection(
    mut input: File,
    mut output: File,
    dispatcher: &dyn Dispatcher,
    bus: &EventBus,
    greeted: bool,
    offer_oob: bool,
) {
    let outbox = match bus.attach() {
        Ok(o) => o,
        Err(e) => {
            log::warn!("cannot serve a client: {e}");
            return;
        }
    };
    let mut session = Session::with_oob(Some(outbox.clone()), offer_oob);
    let mut buf = vec![0u8; 64 << 10];
    let mut out = if greeted {
        Vec::new()
    } else {
        Session::greeting(dispatcher, offer_oob)
    };
    let _ = run_loop(
        &mut input,
        &mut output,
        dispatcher,
        &outbox,
        &mut session,
        &mut buf,
        &mut out,
    );
    bus.detach(&outbox);
}

fn run_loop(
    input: &mut File,
    output: &mut File,
    dispatcher: &dyn Dispatcher,
    outbox: &Outbox,
    session: &mut Session,
    buf: &mut [u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    // Writes what is pending, then tells the dispatcher which replies went out (even if
    // the client is gone: a `quit` must still end the process).
    let flush = |output: &mut File, session: &mut Session, out: &mut Vec<u8>| {
        let r = if out.is_empty() {
            Ok(())
        } else {
            output.write_all(out)
        };
        out.clear();
        for name in session.take_answered() {
            dispatcher.after_reply(&name);
        }
        r
    };
    loop {
        flush(output, session, out)?;
        if outbox.closing() {
            outbox.drain_into(out);
            return flush(output, session, out);
        }
        let (in_ready, wake_ready) = wait_readable(input, outbox.wake_fd())?;
        if wake_ready {
            outbox.drain_into(out);
        }
        if in_ready {
            let n = match input.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let mut msgs = Vec::new();
            if n == 0 {
                session.parse_end(&mut msgs);
            } else {
                session.parse(&buf[..n], &mut msgs);
            }
            let mut msgs = msgs.into_iter();
            // One request at a time until the client enables OOB (QEMU: without OOB one
            // command is queued and reading waits for it).
            while !session.oob_enabled() {
                let Some(m) = msgs.next() else { break };
                let reply = session.respond(m, dispatcher);
                outbox.drain_into(out);
                out.extend_from_slice(reply.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if session.oob_enabled() {
                flush(output, session, out)?;
                let oob = OobConnection {
                    dispatcher,
                    outbox,
                    output: Mutex::new(output),
                };
                return oob.run(input, session, buf, msgs.collect(), n == 0);
            }
            if n == 0 {
                return flush(output, session, out);
            }
        }
    }
}

/// A connection with OOB enabled: the reading thread answers `exec-oob` requests itself
/// and hands in-band ones to a worker through a bounded queue.
struct OobConnection<'a> {
    dispatcher: &'a dyn Dispatcher,
    outbox: &'a Outbox,
    output: Mutex<&'a mut File>,
}

impl OobConnection<'_> {
    /// Writes the queued events and then `reply` (if any) as one piece, so replies and
    /// events of the two threads never interleave within a line.
    fn send(&self, reply: Option<&str>) -> std::io::Result<()> {
        let mut out = self.output.lock().unwrap_or_else(|p| p.into_inner());
        let mut bytes = Vec::new();
        self.outbox.drain_into(&mut bytes);
        if let Some(r) = reply {
            bytes.extend_from_slice(r.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        if bytes.is_empty() {
            return Ok(());
        }
        out.write_all(&bytes)
    }

    /// Runs one request on the calling thread and writes its reply.
    fn answer(&self, m: Message) -> std::io::Result<()> {
        let (reply, name) = respond_command(m, true, self.dispatcher);
        let r = self.send(Some(&reply));
        if let Some(name) = name {
            self.dispatcher.after_reply(&name);
        }
        r
    }

    fn run(
        &self,
        input: &mut File,
        session: &mut Session,
        buf: &mut [u8],
        pending: Vec<Message>,
        eof: bool,
    ) -> std::io::Result<()> {
        thread::scope(|scope| {
            let (queue, requests) = sync_channel::<Message>(REQ_QUEUE_LEN_MAX);
            let worker = thread::Builder::new()
                .name("qmp-worker".into())
                .spawn_scoped(scope, move || {
                    for m in requests {
                        // A closing monitor drops what is still queued, as QEMU does.
                        if self.outbox.closing() || self.answer(m).is_err() {
                            break;
                        }
                    }
                })?;
            // Out-of-band requests now; in-band ones wait for the worker (blocking
            // here, and so pausing reading, while the queue is full).
            let handle = |m: Message| -> std::io::Result<bool> {
                if Session::is_out_of_band(&m) {
                    self.answer(m)?;
                    Ok(true)
                } else {
                    Ok(queue.send(m).is_ok())
                }
            };
            let result = (|| {
                for m in pending {
                    if !handle(m)? {
                        return Ok(());
                    }
                }
                if eof {
                    return Ok(());
                }
                loop {
                    if self.outbox.closing() {
                        return self.send(None);
                    }
                    let (in_ready, wake_ready) = wait_readable(input, self.outbox.wake_fd())?;
                    if wake_ready {
                        self.send(None)?;
                    }
                    if !in_ready {
                        continue;
                    }
                    let n = match input.read(buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    let mut msgs = Vec::new();
                    if n == 0 {
                        session.parse_end(&mut msgs);
                    } else {
                        session.parse(&buf[..n], &mut msgs);
                    }
                    for m in msgs {
                        if !handle(m)? {
                            return Ok(());
                        }
                    }
                    if n == 0 {
                        return Ok(());
                    }
                }
            })();
            // The worker finishes what is queued, then the connection ends.
            drop(queue);
            let _ = worker.join();
            result
        })
    }
}
