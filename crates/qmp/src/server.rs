//! Transports: unix and TCP sockets (listening or connecting), inherited sockets, stdio.
//!
//! # Threads
//!
//! Every QMP connection of the process is served by **one event-loop thread**,
//! `qmp-loop` (epoll, level-triggered): it accepts clients on every listening socket,
//! greets them, reads at most 16 KiB from each ready client per turn, parses, queues the
//! requests, and writes replies and events without ever blocking. It never runs a command.
//! Commands run on two executor threads per [`EventBus`] (per VMM), shared by every
//! monitor ([`serve`], [`serve_stream`]) served with that bus:
//!
//! * `qmp-exec` runs in-band requests (capabilities negotiation included, since it waits
//!   for [`Dispatcher::before_request`]) one at a time, **round robin over clients**: one
//!   request of each client with work per turn, so a client that pipelines cannot starve
//!   the others. A VMM serialises its commands behind one lock anyway; one thread per
//!   client only made clients fight over that lock and over the CPU with the vCPUs.
//! * `qmp-oob` runs `exec-oob` requests of every client in arrival order. They never wait
//!   for in-band work (OOB commands are quick by contract), and the loop is never held by
//!   either kind of command.
//!
//! A reply is written by the executor that produced it when the client's output queue is
//! empty (a nonblocking `send`), else queued for the loop. [`Dispatcher::after_reply`]
//! runs once the reply is queued or written. Events reach the loop through the client's
//! [`Outbox`](crate::events::Outbox) waker and an eventfd.
//!
//! With `stdio`, two small relay threads copy standard input and output to a socket that
//! the loop serves like any other (a terminal or file cannot be made nonblocking without
//! affecting the processes sharing it).
//!
//! All three run at nice [`QMP_THREAD_NICE`] (+19): when QMP work and a vCPU want the
//! same CPU, the vCPU gets nearly all of it, so a flood of requests slows the guest
//! little and is itself slowed instead; on an idle CPU QMP runs at full speed.
//!
//! So a VMM with any number of monitors and clients has three QMP threads (plus the stdio
//! relays if it serves stdio), where it had one or two per connection.
//!
//! # Ordering and OOB
//!
//! QEMU's rules are kept: without `oob` a client's next request is read only once the
//! previous one is answered; with `oob` up to [`REQ_QUEUE_LEN_MAX`] in-band requests wait
//! in order (reading pauses while the queue is full), `exec-oob` requests go to `qmp-oob`
//! at once and their replies may overtake in-band ones; the client's next message is
//! parsed once the `exec-oob` reply is out, so it precedes the replies of all later
//! requests. Malformed input is answered in-band, in order.
//!
//! # Budgets
//!
//! Nothing a client does makes the server allocate without bound; a client over a budget
//! is disconnected with a `warn` log line that names it (monitor, client number, peer pid)
//! and says why:
//!
//! | what | budget | over it |
//! |---|---|---|
//! | one message | 1 MiB of tokens, 128 Ki tokens, depth 1024 ([`crate::json::Limits`]) | size/count: one error reply (QEMU's text), disconnect; depth: error reply only, as QEMU |
//! | requests queued per client | 8 in-band + 1 `exec-oob`, [`CLIENT_QUEUE_BUDGET`] bytes | reading that client pauses |
//! | unread replies and events per client | [`CLIENT_OUTPUT_BUDGET`] | disconnect ("not reading") |
//! | events queued per client | [`MAX_QUEUED_EVENTS`](crate::events::MAX_QUEUED_EVENTS) | disconnect, with the count of events lost |
//! | error replies per client | [`ERROR_REPLY_ALLOWANCE`] + [`ERROR_REPLY_FACTOR`] × input bytes | disconnect |
//! | all clients of a monitor | [`MONITOR_OUTPUT_BUDGET`] unread, [`MONITOR_INPUT_BUDGET`] buffered | the client holding most is disconnected |
//! | clients per listening socket | [`MAX_CLIENTS_PER_LISTENER`] | refused (closed at once) |
//!
//! Every descriptor the server opens is close-on-exec: listening and connected sockets
//! (std creates them with `SOCK_CLOEXEC`), accepted ones (`accept4(SOCK_CLOEXEC)`), the
//! epoll and eventfd descriptors, and inherited `fd=N` sockets (`FD_CLOEXEC` is set).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// Clients served at once per listening socket; more are refused (closed at once).
pub const MAX_CLIENTS_PER_LISTENER: usize = 64;

use crate::events::EventBus;
pub use crate::evloop::{
    CLIENT_OUTPUT_BUDGET, CLIENT_QUEUE_BUDGET, ERROR_REPLY_ALLOWANCE, ERROR_REPLY_FACTOR,
    MONITOR_INPUT_BUDGET, MONITOR_OUTPUT_BUDGET, QMP_THREAD_NICE,
};
use crate::evloop::{Item, MonitorCtx, register};
use crate::session::Dispatcher;
#[cfg(doc)]
use crate::session::REQ_QUEUE_LEN_MAX;

/// Errors setting up a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The endpoint text could not be understood.
    #[error("{0}")]
    Syntax(String),
    /// A socket or file operation failed.
    #[error("{what} '{target}': {source}")]
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
    /// `-qmp stdio`: disconnected when the relay has copied everything to standard output.
    stdout_drained: Option<std::sync::mpsc::Receiver<()>>,
}

impl Monitor {
    fn new(socket_path: Option<PathBuf>) -> Self {
        Self {
            socket_path,
            stdout_drained: None,
        }
    }

    /// Removes the socket file this monitor created, if any. On stdio, waits (a second at
    /// most) until the replies already sent are on standard output, so that a process
    /// exiting right after `quit` does not lose them (`echo ... | vmm -qmp stdio`).
    pub fn cleanup(&self) {
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
        if let Some(rx) = &self.stdout_drained {
            let _ = rx.recv_timeout(Duration::from_secs(1));
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

/// Starts a monitor on `endpoint`: its clients are served by the process's QMP event
/// loop (see the module documentation). With `wait`, the first client is accepted before
/// this returns (QEMU's `wait=on`).
pub fn serve(
    endpoint: &Endpoint,
    dispatcher: Arc<dyn Dispatcher>,
    bus: Arc<EventBus>,
) -> Result<Monitor, ServerError> {
    match endpoint {
        Endpoint::Stdio => {
            let mon = monitor("stdio".into(), dispatcher, bus)?;
            let (ours, theirs) = UnixStream::pair().map_err(io_err("cannot relay", "stdio"))?;
            let drained = relay_stdio(theirs).map_err(io_err("cannot relay", "stdio"))?;
            client(OwnedFd::from(ours), &mon)?;
            Ok(Monitor {
                socket_path: None,
                stdout_drained: Some(drained),
            })
        }
        Endpoint::Unix {
            path,
            server: true,
            wait,
        } => {
            let shown = path.display().to_string();
            let listener =
                bind_unix_0600(path).map_err(io_err("cannot listen on unix socket", &*shown))?;
            let mon = monitor(format!("unix:{shown}"), dispatcher, bus)?;
            if *wait {
                let (s, _) = listener
                    .accept()
                    .map_err(io_err("cannot accept on", &*shown))?;
                client(OwnedFd::from(s), &mon)?;
            }
            listener
                .set_nonblocking(true)
                .map_err(io_err("cannot listen on unix socket", &*shown))?;
            listen(OwnedFd::from(listener), mon, false, &shown)?;
            Ok(Monitor::new(Some(path.clone())))
        }
        Endpoint::Unix {
            path,
            server: false,
            ..
        } => {
            let shown = path.display().to_string();
            let s = UnixStream::connect(path)
                .map_err(io_err("cannot connect to unix socket", &*shown))?;
            let mon = monitor(format!("unix:{shown}"), dispatcher, bus)?;
            client(OwnedFd::from(s), &mon)?;
            Ok(Monitor::new(None))
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
            let mon = monitor(format!("tcp:{addr}"), dispatcher, bus)?;
            if *wait {
                let (s, _) = listener
                    .accept()
                    .map_err(io_err("cannot accept on", &*addr))?;
                let _ = s.set_nodelay(true);
                client(OwnedFd::from(s), &mon)?;
            }
            listener
                .set_nonblocking(true)
                .map_err(io_err("cannot listen on tcp", &*addr))?;
            listen(OwnedFd::from(listener), mon, true, &addr)?;
            Ok(Monitor::new(None))
        }
        Endpoint::Fd { fd, server: true } => {
            let listener = UnixListener::from(take_socket_fd(*fd)?);
            let shown = format!("fd={fd}");
            listener
                .set_nonblocking(true)
                .map_err(io_err("cannot listen on", &*shown))?;
            let mon = monitor(shown.clone(), dispatcher, bus)?;
            listen(OwnedFd::from(listener), mon, false, &shown)?;
            Ok(Monitor::new(None))
        }
        Endpoint::Fd { fd, server: false } => {
            let owned = take_socket_fd(*fd)?;
            let mon = monitor(format!("fd={fd}"), dispatcher, bus)?;
            client(owned, &mon)?;
            Ok(Monitor::new(None))
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
            let mon = monitor(format!("tcp:{addr}"), dispatcher, bus)?;
            client(OwnedFd::from(s), &mon)?;
            Ok(Monitor::new(None))
        }
    }
}

/// Serves an already connected socket (e.g. one end of a `socketpair`) as a monitor of
/// its own. Failures (no thread could be started) are logged.
pub fn serve_stream(stream: UnixStream, dispatcher: Arc<dyn Dispatcher>, bus: Arc<EventBus>) {
    let served = monitor("stream".into(), dispatcher, bus)
        .and_then(|mon| client(OwnedFd::from(stream), &mon));
    if let Err(e) = served {
        log::warn!("cannot serve a QMP stream: {e}");
    }
}

fn monitor(
    name: String,
    dispatcher: Arc<dyn Dispatcher>,
    bus: Arc<EventBus>,
) -> Result<Arc<MonitorCtx>, ServerError> {
    let shown = name.clone();
    MonitorCtx::start(name, dispatcher, bus).map_err(io_err("cannot start the executors of", shown))
}

fn client(fd: OwnedFd, mon: &Arc<MonitorCtx>) -> Result<(), ServerError> {
    register(Item::Client {
        fd,
        mon: mon.clone(),
    })
    .map_err(io_err("cannot serve", mon.name.clone()))
}

fn listen(fd: OwnedFd, mon: Arc<MonitorCtx>, tcp: bool, shown: &str) -> Result<(), ServerError> {
    register(Item::Listener {
        fd,
        mon,
        tcp,
        max_clients: MAX_CLIENTS_PER_LISTENER,
    })
    .map_err(io_err("cannot serve", shown))
}

/// Copies standard input to `sock` and `sock` to standard output on two threads; the
/// receiver is disconnected once the second has seen the end of `sock`.
fn relay_stdio(sock: UnixStream) -> std::io::Result<std::sync::mpsc::Receiver<()>> {
    let (drained, drained_rx) = std::sync::mpsc::channel::<()>();
    let mut to_out = sock.try_clone()?;
    let mut from_in = sock;
    thread::Builder::new()
        .name("qmp-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 16 << 10];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if from_in.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = from_in.shutdown(std::net::Shutdown::Write);
        })?;
    thread::Builder::new()
        .name("qmp-stdout".into())
        .spawn(move || {
            let _drained = drained;
            let mut buf = [0u8; 16 << 10];
            loop {
                match to_out.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let mut out = std::io::stdout().lock();
                        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })?;
    Ok(drained_rx)
}
