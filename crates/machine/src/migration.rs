//! Where `migrate` writes and `-incoming` / `migrate-incoming` read a machine's snapshot
//! stream: QEMU's URI forms `file:PATH` (QEMU 8.2's), `exec:COMMAND` (a shell command
//! whose standard input takes the stream, or whose standard output gives it) and `fd:NAME`
//! (a descriptor the client passed with `getfd`, as libvirt's `virsh save` does; for
//! `-incoming`, also the number of a descriptor the VMM inherited, as `virsh restore`
//! passes it), on any [`Board`] that can save and restore itself.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use keel_snapshot::Snapshot;

use crate::backends::Backends;
use crate::board::{Board, BoardError};

pub mod live;

/// Errors of a migration; the text is what `query-migrate` and the command's error show.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The URI has a form Keel does not serve.
    #[error(
        "Invalid migration URI '{0}': Keel migrates to 'unix:PATH', 'tcp:HOST:PORT', \
         'file:PATH', 'exec:COMMAND' and 'fd:NAME'"
    )]
    Uri(String),
    /// `fd:NAME` names no descriptor kept by `getfd` (nor, incoming, an open inherited one).
    #[error("File descriptor named '{0}' has not been found")]
    FdNotFound(String),
    /// The accelerator's dirty log failed, or RAM could not be read for it.
    #[error("dirty page tracking failed: {0}")]
    Dirty(String),
    /// The VMM could not do its part (stop, resume, restore the run state).
    #[error("{0}")]
    Vmm(String),
    /// `migrate_cancel` stopped it before the switchover.
    #[error("the migration was cancelled")]
    Cancelled,
    /// Opening, writing or reading the target failed.
    #[error("{what} '{target}' failed: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// The file or command.
        target: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `exec:` under the sandbox, whose filters a started program would inherit.
    #[error(
        "'exec:{0}' needs to run a shell, and no program can run under Keel's sandbox (its \
         filters would apply to the program too); use 'file:PATH', or run with '-sandbox off'"
    )]
    SpawnDenied(String),
    /// The exec command failed.
    #[error("the migration command '{command}' exited with {status}")]
    Command {
        /// The command.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The machine could not save, or refused the stream.
    #[error(transparent)]
    Board(#[from] BoardError),
    /// The stream is unreadable.
    #[error(transparent)]
    Stream(#[from] keel_snapshot::SnapshotError),
}

impl MigrationError {
    /// Whether reading or checking an incoming stream failed (QEMU's "load of migration
    /// failed", which ends the VMM), rather than the request itself: a URI of another
    /// form, a descriptor name nobody passed, `exec:` under the sandbox, a file that cannot
    /// be opened, a socket that cannot listen.
    pub fn is_stream_failure(&self) -> bool {
        !matches!(
            self,
            Self::Uri(_)
                | Self::FdNotFound(_)
                | Self::SpawnDenied(_)
                | Self::Io {
                    what: "opening" | "listening on" | "starting",
                    ..
                }
        )
    }

    /// Whether writing the stream to its target failed once the save had begun (QEMU
    /// reports that through `query-migrate` and the event, not as the command's error).
    pub fn is_write_failure(&self) -> bool {
        use keel_snapshot::SnapshotError;
        matches!(
            self,
            Self::Io {
                what: "writing" | "writing to",
                ..
            } | Self::Command { .. }
                | Self::Board(BoardError::Snapshot(SnapshotError::Write(_)))
        )
    }
}

/// An error and its sources, joined with ": " (how a migration's error is reported).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A migration target or source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `file:PATH`.
    File(PathBuf),
    /// `exec:COMMAND`, run with `/bin/sh -c`.
    Exec(String),
    /// `fd:NAME`: a descriptor kept by `getfd` (or, incoming, an inherited one by number).
    Fd(String),
}

impl MigrationUri {
    /// Reads QEMU's URI syntax.
    pub fn parse(uri: &str) -> Result<Self, MigrationError> {
        if let Some(p) = uri.strip_prefix("file:").filter(|p| !p.is_empty()) {
            return Ok(Self::File(PathBuf::from(p)));
        }
        if let Some(c) = uri.strip_prefix("exec:").filter(|c| !c.is_empty()) {
            return Ok(Self::Exec(c.to_string()));
        }
        if let Some(n) = uri.strip_prefix("fd:").filter(|n| !n.is_empty()) {
            return Ok(Self::Fd(n.to_string()));
        }
        Err(MigrationError::Uri(uri.to_string()))
    }
}

/// What a completed save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveReport {
    /// RAM pages written (the rest were zero).
    pub pages_written: u64,
    /// RAM pages of the machine.
    pub pages_total: u64,
    /// Bytes of the stream.
    pub bytes: u64,
    /// Milliseconds the save took (the guest was stopped all along).
    pub millis: u64,
}

impl SaveReport {
    /// `(pages written, pages of RAM, bytes, milliseconds)`, as `query-migrate` reports.
    pub fn stats(&self) -> Option<(u64, u64, u64, u64)> {
        Some((
            self.pages_written,
            self.pages_total,
            self.bytes,
            self.millis,
        ))
    }
}

struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn io(
    what: &'static str,
    target: &str,
) -> impl FnOnce(std::io::Error) -> MigrationError {
    let target = target.to_string();
    move |source| MigrationError::Io {
        what,
        target,
        source,
    }
}

/// Saves `board` (its vCPUs paused) to `uri`; `running` is the run state to record.
/// `fd:NAME` takes the descriptor `getfd` kept in `backends` (QEMU closes it after use).
pub fn save(
    board: &mut dyn Board,
    uri: &str,
    running: bool,
    backends: &Backends,
) -> Result<SaveReport, MigrationError> {
    let start = Instant::now();
    let target = MigrationUri::parse(uri)?;
    let (stats, bytes) = match &target {
        MigrationUri::Fd(name) => {
            let fd = take_fd(uri, backends)
                .unwrap_or_else(|| Err(MigrationError::FdNotFound(name.clone())))?;
            return save_fd(board, fd, name, running);
        }
        MigrationUri::File(p) => {
            let shown = p.display().to_string();
            let f = std::fs::File::create(p).map_err(io("creating", &shown))?;
            let mut w = Counting {
                inner: std::io::BufWriter::with_capacity(1 << 20, f),
                n: 0,
            };
            let stats = board.save_snapshot(&mut w, running)?;
            w.flush().map_err(io("writing", &shown))?;
            (stats, w.n)
        }
        MigrationUri::Exec(cmd) => {
            if !keel_sandbox::programs_allowed() {
                return Err(MigrationError::SpawnDenied(cmd.clone()));
            }
            let mut child = Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .stdin(Stdio::piped())
                .spawn()
                .map_err(io("starting", cmd))?;
            let stdin = child.stdin.take();
            let result = match stdin {
                Some(stdin) => {
                    let mut w = Counting {
                        inner: std::io::BufWriter::with_capacity(1 << 20, stdin),
                        n: 0,
                    };
                    board
                        .save_snapshot(&mut w, running)
                        .map_err(MigrationError::from)
                        .and_then(|s| {
                            w.flush().map_err(io("writing to", cmd))?;
                            Ok((s, w.n))
                        })
                }
                None => Err(MigrationError::Uri(uri.to_string())),
            };
            let status = child.wait().map_err(io("waiting for", cmd))?;
            let r = result?;
            if !status.success() {
                return Err(MigrationError::Command {
                    command: cmd.clone(),
                    status,
                });
            }
            r
        }
    };
    Ok(SaveReport {
        pages_written: stats.pages_written,
        pages_total: stats.pages_total,
        bytes,
        millis: start.elapsed().as_millis() as u64,
    })
}

/// Saves `board` (its vCPUs paused) to `fd`, the descriptor `getfd` kept as `name`
/// (QEMU closes it after use, and so does this).
pub fn save_fd(
    board: &mut dyn Board,
    fd: std::fs::File,
    name: &str,
    running: bool,
) -> Result<SaveReport, MigrationError> {
    let start = Instant::now();
    let mut w = Counting {
        inner: std::io::BufWriter::with_capacity(1 << 20, fd),
        n: 0,
    };
    let stats = board.save_snapshot(&mut w, running)?;
    w.flush().map_err(io("writing to", &format!("fd:{name}")))?;
    Ok(SaveReport {
        pages_written: stats.pages_written,
        pages_total: stats.pages_total,
        bytes: w.n,
        millis: start.elapsed().as_millis() as u64,
    })
}

/// The descriptor `-incoming fd:NAME` reads: one `getfd` kept under that name, or, for a
/// number, a duplicate of that inherited descriptor (the original is left alone: the VMM
/// does not know what else uses it).
fn incoming_fd(name: &str, backends: &Backends) -> Result<std::fs::File, MigrationError> {
    if let Some(fd) = backends.take_named_fd(name) {
        return Ok(std::fs::File::from(fd));
    }
    let not_found = || MigrationError::FdNotFound(name.to_owned());
    let n: i32 = name.parse().map_err(|_| not_found())?;
    if n < 3 {
        return Err(not_found());
    }
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor (or fails for a closed one); the new
    // one is owned by nothing else, so the File below is its only owner.
    let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(not_found());
    }
    // SAFETY: `dup` was just created above and is owned by nobody else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(dup) })
}

/// The descriptor of `migrate`'s `fd:NAME`: the one `getfd` kept, taken from `backends`
/// (taken first, so that a name nobody passed fails before the guest stops); `None` for a
/// URI of another form.
pub fn take_fd(uri: &str, backends: &Backends) -> Option<Result<std::fs::File, MigrationError>> {
    let name = uri.strip_prefix("fd:").filter(|n| !n.is_empty())?;
    Some(
        backends
            .take_named_fd(name)
            .map(std::fs::File::from)
            .ok_or_else(|| MigrationError::FdNotFound(name.to_owned())),
    )
}

/// What an incoming URI gives: a snapshot stream (read whole and checked), or a live
/// migration's stream for [`live::start_incoming`]: a socket to listen on (`unix:`,
/// `tcp:`) or a stream from its first byte (`migrate` to `fd:` while the guest ran).
pub enum Incoming {
    /// A checked snapshot stream.
    Snapshot(Snapshot),
    /// A live stream, unread.
    Live(live::Listener),
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Snapshot(_) => "Incoming::Snapshot",
            Self::Live(_) => "Incoming::Live",
        })
    }
}

/// Opens the stream at `uri` (listens, for `unix:`/`tcp:`) and tells its kind by its
/// first bytes (see [`Incoming`]); `exec:` streams are snapshot streams.
pub fn open(uri: &str, backends: &Backends) -> Result<Incoming, MigrationError> {
    if let Some(socket) = live::SocketUri::parse(uri) {
        return live::Listener::bind(&socket).map(Incoming::Live);
    }
    let (mut f, shown) = match MigrationUri::parse(uri)? {
        MigrationUri::Fd(name) => (incoming_fd(&name, backends)?, format!("fd:{name}")),
        MigrationUri::File(p) => {
            let shown = p.display().to_string();
            (
                std::fs::File::open(&p).map_err(io("opening", &shown))?,
                shown,
            )
        }
        MigrationUri::Exec(_) => return read(uri, backends).map(Incoming::Snapshot),
    };
    let mut data = Vec::new();
    (&mut f)
        .take(live::MAGIC.len() as u64)
        .read_to_end(&mut data)
        .map_err(io("reading from", &shown))?;
    if data == live::MAGIC {
        let stream = Box::new(std::io::Cursor::new(data).chain(f));
        return Ok(Incoming::Live(live::Listener::Stream(stream)));
    }
    f.read_to_end(&mut data)
        .map_err(io("reading from", &shown))?;
    Ok(Incoming::Snapshot(Snapshot::parse(data)?))
}

/// Reads the whole stream at `uri` and checks it (nothing is restored yet); `fd:` names
/// a descriptor of `backends` or an inherited one.
pub fn read(uri: &str, backends: &Backends) -> Result<Snapshot, MigrationError> {
    let data = match MigrationUri::parse(uri)? {
        MigrationUri::Fd(name) => {
            let mut data = Vec::new();
            incoming_fd(&name, backends)?
                .read_to_end(&mut data)
                .map_err(io("reading from", &format!("fd:{name}")))?;
            data
        }
        MigrationUri::File(p) => {
            std::fs::read(&p).map_err(io("reading", &p.display().to_string()))?
        }
        MigrationUri::Exec(cmd) => {
            if !keel_sandbox::programs_allowed() {
                return Err(MigrationError::SpawnDenied(cmd));
            }
            let mut child = Command::new("/bin/sh")
                .arg("-c")
                .arg(&cmd)
                .stdout(Stdio::piped())
                .spawn()
                .map_err(io("starting", &cmd))?;
            let mut data = Vec::new();
            if let Some(mut out) = child.stdout.take() {
                out.read_to_end(&mut data)
                    .map_err(io("reading from", &cmd))?;
            }
            let status = child.wait().map_err(io("waiting for", &cmd))?;
            if !status.success() {
                return Err(MigrationError::Command {
                    command: cmd,
                    status,
                });
            }
            data
        }
    };
    Ok(Snapshot::parse(data)?)
}

/// Restores the stream at `uri` into `board` (same shape, vCPUs not running): the stream
/// is read and checked whole, then the board checks every section before changing
/// anything. Returns whether the guest was running when saved.
pub fn load(board: &mut dyn Board, uri: &str, backends: &Backends) -> Result<bool, MigrationError> {
    let snap = read(uri, backends)?;
    Ok(board.restore_snapshot(&snap)?)
}
