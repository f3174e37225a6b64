//! Live migration over a socket (`migrate uri=unix:PATH|tcp:HOST:PORT`, received by
//! `-incoming unix:PATH|tcp:HOST:PORT`): pre-copy, as QEMU's.
//!
//! The source starts the accelerator's dirty log and the device-write tracker
//! (`keel_accel::dirty`), sends every RAM page while the guest runs, then in rounds the
//! pages written since the previous round, until what is left would take no longer than the
//! downtime limit at the bandwidth the last round reached. It then stops the guest
//! ([`LiveHost::switchover`]), takes the devices' state (virtio devices complete their
//! requests first, which may write RAM), sends the last dirty pages and the state, and the
//! destination restores the state and runs. A [`LiveHost`] (the VMM) does what needs its
//! locks: stopping, recording progress for `query-migrate`, restoring.
//!
//! # The stream (`docs/SNAPSHOT.md`, "Live migration")
//!
//! * preamble: `KEELLIVE`, `u32` version 1, `u32` length and body of the snapshot
//!   header (the machine's shape), `u32` CRC-32 of all of it;
//! * `P` packets: `u32` count (1..=256), that many `u64` page addresses (bit 0 set for a
//!   page of zeros, which carries no data), the data of the other pages, `u32` CRC-32 of the
//!   packet from its kind byte on;
//! * one `S` packet: `u64` length, then a snapshot stream (`KEELSNAP`, with no RAM section;
//!   checked as any snapshot);
//! * `E`: the end.
//!
//! The destination writes nothing to RAM before a packet's checksum is verified, refuses
//! pages outside its RAM, and restores the state only once the whole stream was read.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_accel::GuestMemory;
use keel_accel::dirty::{DIRTY_PAGE, DirtyBitmap, DirtyLog};
use keel_snapshot::Header;
pub use keel_snapshot::Snapshot;
use keel_snapshot::crc::Crc32;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::MigrationError;
use crate::board::Board;

/// The first bytes of a live migration stream.
pub const MAGIC: [u8; 8] = *b"KEELLIVE";
const VERSION: u32 = 1;
/// Pages per `P` packet.
const BATCH: usize = 256;
/// Largest device state accepted (`S`).
const MAX_STATE: u64 = 64 << 20;
/// Largest header body accepted in the preamble.
const MAX_HEADER: u32 = 4096;
const PAGE: usize = DIRTY_PAGE as usize;
/// How often `query-migrate`'s numbers are refreshed while pages are sent.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// What a live migration copies: the RAM, the header of the machine's stream (its shape),
/// and on the source the accelerator's dirty log (started).
pub struct LiveRam {
    /// Guest RAM.
    pub memory: Arc<GuestMemory>,
    /// The snapshot header of this machine.
    pub header: Header,
    /// The guest's writes since the log started (source side only).
    pub log: Option<Arc<dyn DirtyLog>>,
}

impl std::fmt::Debug for LiveRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRam")
            .field("header", &self.header)
            .field("log", &self.log.is_some())
            .finish_non_exhaustive()
    }
}

/// `migrate-set-parameters` values a live migration follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveParams {
    /// Longest the guest may stay stopped for the last copy, in milliseconds (QEMU's
    /// `downtime-limit`, 300 by default).
    pub downtime_limit_ms: u64,
    /// Most bytes per second sent while the guest runs (QEMU's `max-bandwidth`, 128 MiB/s
    /// by default); the last copy is not limited.
    pub max_bandwidth: u64,
}

impl Default for LiveParams {
    fn default() -> Self {
        Self {
            downtime_limit_ms: 300,
            max_bandwidth: 128 << 20,
        }
    }
}

/// How far a live migration got (`query-migrate`'s numbers, QEMU's meanings).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveProgress {
    /// Bytes sent.
    pub transferred: u64,
    /// Bytes of dirty pages still to send (as of the last round).
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Pages sent as zero pages (no data).
    pub duplicate: u64,
    /// Pages sent with their data.
    pub normal: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_pages_rate: u64,
    /// Dirty-log synchronisations (one after each round, one at the stop).
    pub dirty_sync_count: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Milliseconds from `migrate` to now (or to the end).
    pub total_ms: u64,
    /// Milliseconds before the first page was sent.
    pub setup_ms: u64,
    /// Milliseconds the guest was stopped (once completed).
    pub downtime_ms: Option<u64>,
    /// The downtime the last round predicts, in milliseconds.
    pub expected_downtime_ms: u64,
    /// Throughput of the last round, in Mbit/s.
    pub mbps: f64,
    /// Pages sent per second in the last round.
    pub pages_per_second: u64,
}

/// What a live migration needs from the VMM that runs it (its locks and run state).
pub trait LiveHost: Send + 'static {
    /// New numbers for `query-migrate`.
    fn progress(&self, p: &LiveProgress);
    /// Stops the guest and runs `f` with the board and whether the guest was running; on
    /// success the machine stays stopped (`postmigrate`), on failure it runs again if it
    /// ran. Returns `f`'s result.
    fn switchover(
        &self,
        f: &mut dyn FnMut(&mut dyn Board, bool) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError>;
    /// Destination: the whole stream arrived; restore `snap` (no RAM section) and run as
    /// the source did.
    fn restore(&self, snap: &Snapshot) -> Result<(), MigrationError>;
    /// The migration ended: completed, failed (or was cancelled: [`MigrationError::Cancelled`]),
    /// with the final numbers.
    fn finished(&self, result: Result<(), MigrationError>, p: &LiveProgress);
}

/// A `unix:` or `tcp:` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketUri {
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (`[v6]:PORT` too), as `HOST:PORT`.
    Tcp(String),
}

impl SocketUri {
    /// Reads `unix:PATH` or `tcp:HOST:PORT`; `None` for any other form.
    pub fn parse(uri: &str) -> Option<Self> {
        if let Some(p) = uri.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Some(Self::Unix(PathBuf::from(p)));
        }
        let a = uri.strip_prefix("tcp:")?;
        let (host, port) = a.rsplit_once(':')?;
        let port = port.split(',').next()?;
        port.parse::<u16>().ok()?;
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        Some(Self::Tcp(format!("{host}:{port}")))
    }
}

/// A connected migration stream.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

fn io(what: &'static str, target: &str) -> impl FnOnce(std::io::Error) -> MigrationError {
    super::io(what, target)
}

fn connect(uri: &SocketUri) -> Result<Box<dyn Conn>, MigrationError> {
    Ok(match uri {
        SocketUri::Unix(p) => {
            let shown = p.display().to_string();
            Box::new(UnixStream::connect(p).map_err(io("connecting to", &shown))?)
        }
        SocketUri::Tcp(a) => {
            let s = TcpStream::connect(a).map_err(io("connecting to", a))?;
            // Small packets (the end marker) go out at once.
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

/// Where an incoming migration's stream comes from.
pub enum Listener {
    /// `unix:PATH` (the path is removed again once a connection came).
    Unix(UnixListener, PathBuf),
    /// `tcp:HOST:PORT`.
    Tcp(TcpListener),
    /// A stream already open (`fd:`, or a `file:` that holds a live stream), read from
    /// its first byte.
    Stream(Box<dyn Read + Send>),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(_, p) => write!(f, "Listener::Unix({})", p.display()),
            Self::Tcp(l) => write!(f, "Listener::Tcp({:?})", l.local_addr().ok()),
            Self::Stream(_) => f.write_str("Listener::Stream"),
        }
    }
}

/// Where a live migration sends its stream.
#[derive(Debug)]
pub enum Target {
    /// `unix:PATH` or `tcp:HOST:PORT`, connected to by [`start_source`].
    Socket(SocketUri),
    /// A descriptor passed with `getfd` (`fd:NAME`): a socket, a pipe or a file.
    Stream(std::fs::File),
}

impl Listener {
    /// Listens at `uri` (a stale socket file at a `unix:` path is replaced, as QEMU does).
    pub fn bind(uri: &SocketUri) -> Result<Self, MigrationError> {
        Ok(match uri {
            SocketUri::Unix(p) => {
                let shown = p.display().to_string();
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                let l = UnixListener::bind(p).map_err(io("listening on", &shown))?;
                Self::Unix(l, p.clone())
            }
            SocketUri::Tcp(a) => Self::Tcp(TcpListener::bind(a).map_err(io("listening on", a))?),
        })
    }

    fn accept(self) -> Result<Box<dyn Read + Send>, MigrationError> {
        Ok(match self {
            Self::Stream(r) => r,
            Self::Unix(l, p) => {
                let (s, _) = l
                    .accept()
                    .map_err(io("accepting on", &p.display().to_string()))?;
                let _ = std::fs::remove_file(&p);
                Box::new(s)
            }
            Self::Tcp(l) => {
                let (s, _) = l.accept().map_err(io("accepting a migration", "tcp"))?;
                Box::new(s)
            }
        })
    }
}

/// Starts sending the machine live to `target` on a thread of its own (`migrate-send`):
/// connects first (an unreachable destination is the command's error), then returns.
/// `cancel` set makes the thread stop before the switchover, the guest still running.
pub fn start_source(
    target: Target,
    ram: LiveRam,
    params: LiveParams,
    host: Box<dyn LiveHost>,
    cancel: Arc<AtomicBool>,
) -> Result<(), MigrationError> {
    let conn: Box<dyn Conn> = match target {
        Target::Socket(uri) => connect(&uri)?,
        Target::Stream(f) => Box::new(f),
    };
    let spawned = std::thread::Builder::new()
        .name("migrate-send".into())
        .spawn(move || {
            let mut src = Source {
                out: BufWriter::with_capacity(1 << 20, conn),
                ram,
                params,
                host: &*host,
                cancel,
                p: LiveProgress::default(),
                start: Instant::now(),
                last_progress: Instant::now(),
            };
            let r = src.run();
            if let Some(log) = &src.ram.log {
                log.stop();
            }
            src.p.total_ms = src.start.elapsed().as_millis() as u64;
            if r.is_ok() {
                src.p.remaining = 0;
            }
            host.finished(r, &src.p);
        });
    spawned.map_err(io("starting the migration thread", "migrate-send"))?;
    Ok(())
}

struct Source<'a> {
    out: BufWriter<Box<dyn Conn>>,
    ram: LiveRam,
    params: LiveParams,
    host: &'a dyn LiveHost,
    cancel: Arc<AtomicBool>,
    p: LiveProgress,
    start: Instant,
    last_progress: Instant,
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl Source<'_> {
    fn send_err(e: std::io::Error) -> MigrationError {
        MigrationError::Io {
            what: "sending",
            target: "the migration stream".to_string(),
            source: e,
        }
    }

    fn run(&mut self) -> Result<(), MigrationError> {
        let layout = DirtyBitmap::new(&self.ram.memory);
        let pages = layout.pages();
        self.p.total = pages * DIRTY_PAGE;
        let dma = keel_accel::dirty::track_dma(&self.ram.memory);
        let Some(log) = self.ram.log.clone() else {
            return Err(MigrationError::Uri("no dirty log".into()));
        };
        let body = self.ram.header.body();
        let mut pre = Vec::with_capacity(20 + body.len());
        pre.extend_from_slice(&MAGIC);
        pre.extend_from_slice(&VERSION.to_le_bytes());
        pre.extend_from_slice(&(body.len() as u32).to_le_bytes());
        pre.extend_from_slice(&body);
        let crc = keel_snapshot::crc::crc32(&pre);
        pre.extend_from_slice(&crc.to_le_bytes());
        self.p.setup_ms = self.start.elapsed().as_millis() as u64;
        self.host.progress(&self.p); // `active`: the setup is done
        self.last_progress = Instant::now();
        // Flushed at once: a destination that is gone fails here, the guest still running.
        self.out.write_all(&pre).map_err(Self::send_err)?;
        self.out.flush().map_err(Self::send_err)?;
        self.p.transferred += pre.len() as u64;
        // Round 1 sends every page; each later one what was written meanwhile.
        let words = pages.div_ceil(64) as usize;
        let mut bits = vec![u64::MAX; words];
        if !pages.is_multiple_of(64)
            && let Some(last) = bits.last_mut()
        {
            *last = (1u64 << (pages % 64)) - 1;
        }
        loop {
            let round = Instant::now();
            let sent = self.send_pages(&layout, &bits, true)?;
            let secs = round.elapsed().as_secs_f64().max(1e-6);
            bits = vec![0u64; words];
            log.collect(&mut bits)
                .map_err(|e| MigrationError::Dirty(e.to_string()))?;
            dma.bitmap().take_into(&mut bits);
            self.p.dirty_sync_count += 1;
            let dirty = count(&bits);
            self.p.remaining = dirty * DIRTY_PAGE;
            self.p.dirty_pages_rate = (dirty as f64 / secs) as u64;
            let bandwidth = sent as f64 / secs; // bytes per second
            self.p.mbps = bandwidth * 8.0 / 1e6;
            let expected_ms = if dirty == 0 {
                0.0
            } else if bandwidth > 0.0 {
                self.p.remaining as f64 * 1000.0 / bandwidth
            } else {
                f64::INFINITY
            };
            self.p.expected_downtime_ms = expected_ms.min(u64::MAX as f64) as u64;
            self.report(true);
            if expected_ms <= self.params.downtime_limit_ms as f64 {
                break;
            }
            if self.cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Cancelled);
            }
        }
        // Switchover: the guest stops; devices settle (and may write RAM); the rest goes.
        let host = self.host;
        let mut result = Ok(());
        // Downtime counts from here: waiting for the VMM's lock and stopping the vCPUs too.
        let stopping = Instant::now();
        let mut f = |board: &mut dyn Board, running: bool| -> Result<(), MigrationError> {
            let mut state = Vec::new();
            board.save_state(&mut state, running)?;
            log.collect(&mut bits)
                .map_err(|e| MigrationError::Dirty(e.to_string()))?;
            dma.bitmap().take_into(&mut bits);
            self.p.dirty_sync_count += 1;
            let before = self.p.transferred;
            self.send_pages(&layout, &bits, false)?;
            let mut s = Vec::with_capacity(9 + state.len());
            s.push(b'S');
            s.extend_from_slice(&(state.len() as u64).to_le_bytes());
            s.extend_from_slice(&state);
            s.push(b'E');
            self.out.write_all(&s).map_err(Self::send_err)?;
            self.out.flush().map_err(Self::send_err)?;
            self.p.transferred += s.len() as u64;
            self.p.downtime_bytes = self.p.transferred - before;
            self.p.downtime_ms = Some(stopping.elapsed().as_millis() as u64);
            Ok(())
        };
        if let Err(e) = host.switchover(&mut f) {
            result = Err(e);
        }
        result
    }

    fn report(&mut self, force: bool) {
        if force || self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            self.p.total_ms = self.start.elapsed().as_millis() as u64;
            self.host.progress(&self.p);
        }
    }

    /// Sends the pages set in `bits`; `live` applies the bandwidth limit and cancellation.
    /// Returns the bytes sent.
    fn send_pages(
        &mut self,
        layout: &DirtyBitmap,
        bits: &[u64],
        live: bool,
    ) -> Result<u64, MigrationError> {
        let started = Instant::now();
        let mut sent = 0u64;
        let mut batch: Vec<u64> = Vec::with_capacity(BATCH);
        let mut flush = |this: &mut Self, batch: &mut Vec<u64>| -> Result<(), MigrationError> {
            if batch.is_empty() {
                return Ok(());
            }
            let n = this.send_batch(batch)?;
            batch.clear();
            sent += n;
            if live {
                this.p.precopy_bytes += n;
                let max = this.params.max_bandwidth.max(1) as f64;
                let due = Duration::from_secs_f64(sent as f64 / max);
                let spent = started.elapsed();
                if due > spent {
                    std::thread::sleep(due - spent);
                }
                this.report(false);
                if this.cancel.load(Ordering::Acquire) {
                    return Err(MigrationError::Cancelled);
                }
            }
            Ok(())
        };
        for (w, word) in bits.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let b = u64::from(word.trailing_zeros());
                word &= word - 1;
                if let Some(gpa) = layout.page_address(w as u64 * 64 + b) {
                    batch.push(gpa);
                    if batch.len() == BATCH {
                        flush(self, &mut batch)?;
                    }
                }
            }
        }
        flush(self, &mut batch)?;
        Ok(sent)
    }

    fn send_batch(&mut self, gpas: &[u64]) -> Result<u64, MigrationError> {
        let mut head = Vec::with_capacity(5 + 8 * gpas.len());
        head.push(b'P');
        head.extend_from_slice(&(gpas.len() as u32).to_le_bytes());
        let mut data = Vec::with_capacity(gpas.len() * PAGE);
        let mut page = vec![0u8; PAGE];
        for &gpa in gpas {
            self.ram
                .memory
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| MigrationError::Dirty(format!("reading RAM at {gpa:#x}: {e}")))?;
            if page.iter().all(|&b| b == 0) {
                head.extend_from_slice(&(gpa | 1).to_le_bytes());
                self.p.duplicate += 1;
            } else {
                head.extend_from_slice(&gpa.to_le_bytes());
                data.extend_from_slice(&page);
                self.p.normal += 1;
            }
        }
        let mut crc = Crc32::new();
        crc.update(&head);
        crc.update(&data);
        self.out.write_all(&head).map_err(Self::send_err)?;
        self.out.write_all(&data).map_err(Self::send_err)?;
        self.out
            .write_all(&crc.finish().to_le_bytes())
            .map_err(Self::send_err)?;
        let n = (head.len() + data.len() + 4) as u64;
        self.p.transferred += n;
        Ok(n)
    }
}

/// Waits on `listener` on a thread of its own (`migrate-recv`) for one source, writes the
/// pages it sends into `ram`, then has `host` restore the state.
pub fn start_incoming(
    listener: Listener,
    ram: LiveRam,
    host: Box<dyn LiveHost>,
) -> Result<(), MigrationError> {
    let spawned = std::thread::Builder::new()
        .name("migrate-recv".into())
        .spawn(move || {
            let start = Instant::now();
            let mut p = LiveProgress {
                total: ram
                    .memory
                    .iter()
                    .map(vm_memory::GuestMemoryRegion::len)
                    .sum(),
                ..LiveProgress::default()
            };
            let r = listener.accept().and_then(|conn| {
                host.progress(&p); // `active` once the source is connected
                let mut input = BufReader::with_capacity(1 << 20, conn);
                let snap = receive(&mut input, &ram, &mut p)?;
                host.restore(&snap)
            });
            p.total_ms = start.elapsed().as_millis() as u64;
            host.finished(r, &p);
        });
    spawned.map_err(io("starting the migration thread", "migrate-recv"))?;
    Ok(())
}

fn bad(reason: impl Into<String>) -> MigrationError {
    MigrationError::Stream(keel_snapshot::SnapshotError::Corrupt {
        what: "the live migration stream".to_string(),
        reason: reason.into(),
    })
}

fn read_exact(r: &mut dyn Read, buf: &mut [u8]) -> Result<(), MigrationError> {
    r.read_exact(buf).map_err(|e| MigrationError::Io {
        what: "receiving",
        target: "the migration stream".to_string(),
        source: e,
    })
}

fn read_u32(r: &mut dyn Read) -> Result<u32, MigrationError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut dyn Read) -> Result<u64, MigrationError> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a whole live stream from `r` into `ram.memory`; returns the state to restore.
pub fn receive(
    r: &mut dyn Read,
    ram: &LiveRam,
    p: &mut LiveProgress,
) -> Result<Snapshot, MigrationError> {
    let mut magic = [0u8; 8];
    read_exact(r, &mut magic)?;
    if magic != MAGIC {
        return Err(bad(
            "it does not start with KEELLIVE (not a Keel live migration)",
        ));
    }
    let version = read_u32(r)?;
    if version != VERSION {
        return Err(bad(format!(
            "version {version}; this Keel reads version {VERSION}"
        )));
    }
    let len = read_u32(r)?;
    if len > MAX_HEADER {
        return Err(bad(format!("header length {len} is implausible")));
    }
    let mut body = vec![0u8; len as usize];
    read_exact(r, &mut body)?;
    let mut crc = Crc32::new();
    crc.update(&magic);
    crc.update(&version.to_le_bytes());
    crc.update(&len.to_le_bytes());
    crc.update(&body);
    if read_u32(r)? != crc.finish() {
        return Err(bad("the preamble's checksum does not match"));
    }
    let header = Header::from_body(&body).map_err(|e| bad(e.to_string()))?;
    header.shape.check(&ram.header.shape)?;
    p.transferred += 20 + u64::from(len);
    let mut state: Option<Snapshot> = None;
    let mut gpas: Vec<u64> = Vec::with_capacity(BATCH);
    let mut data: Vec<u8> = Vec::with_capacity(BATCH * PAGE);
    let zero = vec![0u8; PAGE];
    loop {
        let mut kind = [0u8; 1];
        read_exact(r, &mut kind)?;
        match kind[0] {
            b'P' if state.is_none() => {
                let n = read_u32(r)?;
                if n == 0 || n as usize > BATCH {
                    return Err(bad(format!("a page packet of {n} pages")));
                }
                let mut crc = Crc32::new();
                crc.update(&kind);
                crc.update(&n.to_le_bytes());
                gpas.clear();
                let mut full = 0usize;
                for _ in 0..n {
                    let e = read_u64(r)?;
                    crc.update(&e.to_le_bytes());
                    let gpa = e & !1;
                    let end = gpa.checked_add(DIRTY_PAGE - 1);
                    if !gpa.is_multiple_of(DIRTY_PAGE)
                        || !end.is_some_and(|end| {
                            ram.memory.address_in_range(GuestAddress(gpa))
                                && ram.memory.address_in_range(GuestAddress(end))
                        })
                    {
                        return Err(bad(format!(
                            "page {gpa:#x} is not a page of this machine's RAM"
                        )));
                    }
                    if e & 1 == 0 {
                        full += 1;
                    }
                    gpas.push(e);
                }
                data.resize(full * PAGE, 0);
                read_exact(r, &mut data)?;
                crc.update(&data);
                if read_u32(r)? != crc.finish() {
                    return Err(bad("a page packet's checksum does not match"));
                }
                let mut at = 0usize;
                for &e in &gpas {
                    let gpa = GuestAddress(e & !1);
                    let src = if e & 1 == 0 {
                        at += PAGE;
                        p.normal += 1;
                        &data[at - PAGE..at]
                    } else {
                        p.duplicate += 1;
                        &zero[..]
                    };
                    ram.memory
                        .write_slice(src, gpa)
                        .map_err(|e| bad(format!("writing RAM at {:#x}: {e}", gpa.0)))?;
                }
                p.transferred += 9 + 8 * u64::from(n) + data.len() as u64;
            }
            b'S' if state.is_none() => {
                let len = read_u64(r)?;
                if len > MAX_STATE {
                    return Err(bad(format!("a device state of {len} bytes")));
                }
                let mut s = vec![0u8; len as usize];
                read_exact(r, &mut s)?;
                p.transferred += 9 + len;
                state = Some(Snapshot::parse(s)?);
            }
            b'E' => {
                return state.ok_or_else(|| bad("it ended before the device state"));
            }
            other => {
                return Err(bad(format!("unexpected packet kind {other:#04x}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_uris() {
        assert_eq!(
            SocketUri::parse("unix:/tmp/m.sock"),
            Some(SocketUri::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            SocketUri::parse("tcp:127.0.0.1:4444"),
            Some(SocketUri::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            SocketUri::parse("tcp:[::1]:4444"),
            Some(SocketUri::Tcp("[::1]:4444".into()))
        );
        assert_eq!(
            SocketUri::parse("tcp::4444"),
            Some(SocketUri::Tcp("0.0.0.0:4444".into()))
        );
        assert_eq!(SocketUri::parse("tcp:host"), None);
        assert_eq!(SocketUri::parse("tcp:host:99999"), None);
        assert_eq!(SocketUri::parse("unix:"), None);
        assert_eq!(SocketUri::parse("file:/x"), None);
    }

    fn ram() -> LiveRam {
        let memory = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap());
        LiveRam {
            memory,
            header: Header {
                keel_version: "t".into(),
                shape: keel_snapshot::Shape {
                    machine: "microvm".into(),
                    vcpus: 1,
                    memory: 0x4000,
                },
                accel: "tcg".into(),
            },
            log: None,
        }
    }

    fn preamble(h: &Header) -> Vec<u8> {
        let body = h.body();
        let mut v = Vec::new();
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(&body);
        let c = keel_snapshot::crc::crc32(&v);
        v.extend_from_slice(&c.to_le_bytes());
        v
    }

    fn packet(entries: &[u64], data: &[u8]) -> Vec<u8> {
        let mut v = vec![b'P'];
        v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            v.extend_from_slice(&e.to_le_bytes());
        }
        v.extend_from_slice(data);
        let c = keel_snapshot::crc::crc32(&v);
        v.extend_from_slice(&c.to_le_bytes());
        v
    }

    #[test]
    fn pages_are_written_only_from_checked_packets_inside_ram() {
        let r = ram();
        let mut p = LiveProgress::default();
        let mut s = preamble(&r.header);
        s.extend(packet(&[0x1000], &[7u8; PAGE]));
        s.push(b'E');
        let e = receive(&mut &s[..], &r, &mut p).unwrap_err();
        assert!(e.to_string().contains("before the device state"), "{e}");
        let mut b = [0u8; 1];
        r.memory.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b[0], 7);
        assert_eq!((p.normal, p.duplicate), (1, 0));

        // A corrupted packet changes nothing.
        let mut s = preamble(&r.header);
        let mut pk = packet(&[0x2000], &[9u8; PAGE]);
        pk[20] ^= 1;
        s.extend(pk);
        let e = receive(&mut &s[..], &r, &mut p).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        r.memory.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b[0], 0);

        // Pages outside RAM, and other shapes, are refused.
        let mut s = preamble(&r.header);
        s.extend(packet(&[0x4000 | 1], &[]));
        let e = receive(&mut &s[..], &r, &mut p).unwrap_err();
        assert!(e.to_string().contains("not a page of"), "{e}");
        let mut other = r.header.clone();
        other.shape.memory = 0x8000;
        let e = receive(&mut &preamble(&other)[..], &r, &mut p).unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
        let e = receive(&mut &b"KEELSNAP"[..], &r, &mut p).unwrap_err();
        assert!(e.to_string().contains("KEELLIVE"), "{e}");
    }
}
