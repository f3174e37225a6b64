//! virtio-blk (`virtio-blk-device`) over a raw image file.

use keel_qdev::{BusType, DeviceType, PropSpec, Props};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use keel_accel::GuestMemory;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use crate::block_error::{
    ErrorAction, ErrorPolicy, IoErrorReport, IoErrorSink, IoOperation, LogOnly, OnError, Sink,
};
use crate::chain::{self, ParsedChain};
use crate::device::{Activation, Active, VirtioDevice, read_config_bytes};
use crate::{Error, features};

/// Sector size of the virtio-blk protocol (always 512, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
const CONFIG_LEN: usize = 60;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most sectors one discard or write-zeroes segment may cover (2 GiB).
const MAX_RANGE_SECTORS: u32 = 0x40_0000;
/// Most segments in one discard or write-zeroes request.
const MAX_RANGE_SEGMENTS: u32 = 32;
const RANGE_SEGMENT_LEN: u64 = 16;

/// How to build a [`Block`] device: QEMU's `-blockdev driver=file,filename=PATH` plus the
/// `-device virtio-blk-device` properties that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image (`filename=`).
    pub path: PathBuf,
    /// Open read-only and offer `VIRTIO_BLK_F_RO` (`read-only=on`).
    pub read_only: bool,
    /// Serial number the guest reads with `VIRTIO_BLK_T_GET_ID` (`serial=`), at most 20 bytes.
    pub serial: Option<String>,
    /// Queue size (`queue-size=`), a power of two; 256 by default as in QEMU.
    pub queue_size: u16,
    /// Offer discard, served by punching holes in the image (`discard=unmap`).
    /// Write-zeroes is offered on every writable disk.
    pub discard: bool,
    /// What a failed host read or write does (`rerror=`, `werror=`).
    pub on_error: ErrorPolicy,
}

impl BlockConfig {
    /// A writable disk backed by `path`, no serial, queue size 256.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            serial: None,
            queue_size: 256,
            discard: false,
            on_error: ErrorPolicy::default(),
        }
    }
}

/// What became of one request.
enum Step {
    /// Completed: return the chain with this many bytes written.
    Done(u32),
    /// A host error under `stop`: keep the chain for [`Block::retry_held`].
    Hold,
    /// The driver broke the protocol.
    Broken(String),
}

/// What [`Block::execute`] made of a request: a status for the guest, or a host error for
/// the error policy to decide.
enum Exec {
    /// The status byte and how many data bytes went to the guest.
    Status(u8, u64),
    /// The host failed the I/O with this `errno`.
    Host(IoOperation, i32),
}

/// A host I/O error as [`Exec`], or the status `other` if the error did not come from the
/// host (bad guest buffers, end of file).
fn host_or(op: IoOperation, e: &std::io::Error, other: u8) -> Exec {
    match e.raw_os_error() {
        Some(errno) => Exec::Host(op, errno),
        None => Exec::Status(other, 0),
    }
}

/// A virtio block device backed by a raw file.
///
/// Requests: read, write (refused on a read-only disk), flush (`fdatasync`), get-ID.
/// Reads and writes must be whole sectors inside the disk; anything else is answered
/// with `VIRTIO_BLK_S_IOERR`, unknown request types with `VIRTIO_BLK_S_UNSUPP`.
#[derive(Debug)]
pub struct Block {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    features: u64,
    queue_sizes: [u16; 1],
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
    on_error: ErrorPolicy,
    sink: Sink,
    /// Requests held by a host error under `stop`, oldest first, with every request that
    /// arrived after them: none runs before the held ones succeed, so a later flush never
    /// completes ahead of a write that has not reached the image.
    held: VecDeque<(u16, ParsedChain)>,
}

impl Block {
    /// QEMU's driver name for this device on virtio-mmio.
    pub const DRIVER: &'static str = "virtio-blk-device";

    /// Opens the image described by `config`.
    pub fn new(config: &BlockConfig) -> Result<Self, Error> {
        let path = config.path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| Error::OpenImage {
                path: path.clone(),
                source,
            })?;
        let mut block = Self::from_file(
            file,
            &path,
            config.read_only,
            config.serial.as_deref(),
            config.queue_size,
        )?;
        if config.discard && !config.read_only {
            block.enable_discard();
        }
        block.on_error = config.on_error;
        Ok(block)
    }

    /// Offers `VIRTIO_BLK_F_DISCARD` (a writable disk only).
    pub fn enable_discard(&mut self) {
        if self.read_only {
            return;
        }
        self.features |= 1 << VIRTIO_BLK_F_DISCARD;
        self.config[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        self.config[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        self.config[44..48].copy_from_slice(&1u32.to_le_bytes());
    }

    /// Wraps an already open image (`path` is only used in messages).
    pub fn from_file(
        mut file: File,
        path: &str,
        read_only: bool,
        serial: Option<&str>,
        queue_size: u16,
    ) -> Result<Self, Error> {
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| Error::ImageSize {
                path: path.to_string(),
                source,
            })?;
        if !queue_size.is_power_of_two() || queue_size > 32768 {
            return Err(Error::QueueSize(queue_size));
        }
        let mut id = [0u8; ID_LEN];
        if let Some(serial) = serial {
            if serial.len() > ID_LEN {
                return Err(Error::SerialTooLong(serial.to_string()));
            }
            id[..serial.len()].copy_from_slice(serial.as_bytes());
        }
        let capacity = size / SECTOR_SIZE;
        let seg_max = u32::from(queue_size.saturating_sub(2).max(1));
        let mut features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        let mut config = [0u8; CONFIG_LEN];
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            config[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
            config[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
            config[56] = 1; // write_zeroes_may_unmap
        }
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Self {
            file,
            capacity,
            read_only,
            id,
            features,
            queue_sizes: [queue_size],
            config,
            active: None,
            on_error: ErrorPolicy::default(),
            sink: Sink(Arc::new(LogOnly)),
            held: VecDeque::new(),
        })
    }

    /// Sets what failed host reads and writes do (`rerror=`, `werror=`).
    pub fn set_error_policy(&mut self, policy: ErrorPolicy) {
        self.on_error = policy;
    }

    /// Sends this disk's host I/O errors to `sink` (the machine's `BLOCK_IO_ERROR` and,
    /// for `stop`, its stop request); without one they are only logged.
    pub fn set_error_sink(&mut self, sink: Arc<dyn IoErrorSink>) {
        self.sink = Sink(sink);
    }

    /// How many requests a host error under `stop` holds (with those queued behind them).
    pub fn held_requests(&self) -> usize {
        self.held.len()
    }

    /// Runs the held requests again, oldest first (the machine continued after an
    /// `io-error` stop), then any request that arrived meanwhile. A request that fails
    /// again under `stop` is held again, with everything after it, and reported again.
    pub fn retry_held(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let memory = Arc::clone(&active.memory);
        let mut used = false;
        while let Some((head, req)) = self.held.pop_front() {
            match self.run(&memory, &req) {
                Step::Done(len) => {
                    if !active.put_used(0, head, len) {
                        self.held.clear();
                        break;
                    }
                    used = true;
                }
                Step::Hold => {
                    self.held.push_front((head, req));
                    break;
                }
                Step::Broken(msg) => {
                    active.fail(&msg);
                    self.held.clear();
                    break;
                }
            }
        }
        if used {
            active.signal_used(0);
        }
        self.serve(&mut active, 0);
        self.active = Some(active);
    }

    /// Serves the chains available on queue `index`: each runs in order, unless requests
    /// are held, in which case it joins them.
    fn serve(&mut self, active: &mut Active, index: usize) {
        let memory = Arc::clone(&active.memory);
        let mut used = false;
        // Bounded by the queue size: a driver adding more buffers notifies again.
        for _ in 0..self.queue_sizes[0] {
            let Some((head, req)) = active.pop(index) else {
                break;
            };
            if !self.held.is_empty() {
                self.held.push_back((head, req));
                continue;
            }
            match self.run(&memory, &req) {
                Step::Done(len) => {
                    if !active.put_used(index, head, len) {
                        return;
                    }
                    used = true;
                }
                Step::Hold => self.held.push_back((head, req)),
                Step::Broken(msg) => {
                    if used {
                        active.signal_used(index);
                    }
                    active.fail(&msg);
                    return;
                }
            }
        }
        if used {
            active.signal_used(index);
        }
    }

    /// Disk size in 512-byte sectors (a trailing partial sector is not visible).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Runs one request and writes its status, applying the error policy to host errors.
    fn run(&mut self, mem: &GuestMemory, req: &ParsedChain) -> Step {
        let writable = req.writable_len();
        if writable == 0 {
            return Step::Broken("block request without a status byte".into());
        }
        let status_at = writable - 1;
        let (status, data_written) = match self.execute(mem, req, status_at) {
            Exec::Status(status, n) => (status, n),
            Exec::Host(operation, errno) => {
                let on_error = match operation {
                    IoOperation::Read => self.on_error.read,
                    IoOperation::Write => self.on_error.write,
                };
                let action = on_error.action(errno);
                self.sink.0.io_error(IoErrorReport {
                    operation,
                    action,
                    errno,
                    io_status: self.on_error.can_stop(),
                });
                match (action, operation) {
                    (ErrorAction::Stop, _) => return Step::Hold,
                    (ErrorAction::Report, _) => (VIRTIO_BLK_S_IOERR as u8, 0),
                    (ErrorAction::Ignore, IoOperation::Read) => (VIRTIO_BLK_S_OK as u8, status_at),
                    (ErrorAction::Ignore, IoOperation::Write) => (VIRTIO_BLK_S_OK as u8, 0),
                }
            }
        };
        if chain::write_bytes(mem, &req.writable, status_at, &[status]) != 1 {
            return Step::Broken("block status byte not writable".into());
        }
        // data_written <= status_at < u32::MAX, as chain lengths are bounded by u32.
        Step::Done(u32::try_from(data_written + 1).unwrap_or(u32::MAX))
    }

    /// Runs one request; returns the status and how many data bytes went to the guest, or
    /// the host error that failed it.
    fn execute(&mut self, mem: &GuestMemory, req: &ParsedChain, data_in_len: u64) -> Exec {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let mut header = [0u8; HEADER_LEN as usize];
        if chain::read_bytes(mem, &req.readable, 0, &mut header) != header.len() {
            log::warn!("virtio-blk: request header shorter than 16 bytes");
            return Exec::Status(ioerr, 0);
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let kind = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let data_out_len = req.readable_len() - HEADER_LEN;
        match kind {
            VIRTIO_BLK_T_IN => match self.check_range(sector, data_in_len) {
                Some(offset) => match self.read_into(mem, &req.writable, offset, data_in_len) {
                    Ok(()) => Exec::Status(VIRTIO_BLK_S_OK as u8, data_in_len),
                    Err(e) => {
                        log::warn!("virtio-blk: read at sector {sector} failed: {e}");
                        host_or(IoOperation::Read, &e, ioerr)
                    }
                },
                None => Exec::Status(ioerr, 0),
            },
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    log::debug!("virtio-blk: write to a read-only disk refused");
                    return Exec::Status(ioerr, 0);
                }
                let Some(offset) = self.check_range(sector, data_out_len) else {
                    return Exec::Status(ioerr, 0);
                };
                match self.write_from(mem, &req.readable, HEADER_LEN, offset, data_out_len) {
                    Ok(()) => Exec::Status(VIRTIO_BLK_S_OK as u8, 0),
                    Err(e) => {
                        log::warn!("virtio-blk: write at sector {sector} failed: {e}");
                        host_or(IoOperation::Write, &e, ioerr)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => Exec::Status(VIRTIO_BLK_S_OK as u8, 0),
                Err(e) => {
                    log::warn!("virtio-blk: flush failed: {e}");
                    host_or(IoOperation::Write, &e, ioerr)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = (ID_LEN as u64).min(data_in_len) as usize;
                let written = chain::write_bytes(mem, &req.writable, 0, &self.id[..n]);
                Exec::Status(VIRTIO_BLK_S_OK as u8, written as u64)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let feature = if kind == VIRTIO_BLK_T_DISCARD {
                    VIRTIO_BLK_F_DISCARD
                } else {
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if self.features & 1 << feature == 0 {
                    return Exec::Status(VIRTIO_BLK_S_UNSUPP as u8, 0);
                }
                Exec::Status(self.ranges(mem, req, kind, data_out_len), 0)
            }
            _ => Exec::Status(VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }

    /// Discard or write-zeroes: checks every segment first, then applies them.
    fn ranges(&mut self, mem: &GuestMemory, req: &ParsedChain, kind: u32, len: u64) -> u8 {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        if len == 0 || !len.is_multiple_of(RANGE_SEGMENT_LEN) {
            return ioerr;
        }
        let count = len / RANGE_SEGMENT_LEN;
        if count > u64::from(MAX_RANGE_SEGMENTS) {
            return VIRTIO_BLK_S_UNSUPP as u8;
        }
        let mut segs = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut raw = [0u8; RANGE_SEGMENT_LEN as usize];
            let at = HEADER_LEN + i * RANGE_SEGMENT_LEN;
            if chain::read_bytes(mem, &req.readable, at, &mut raw) != raw.len() {
                return ioerr;
            }
            let [
                s0,
                s1,
                s2,
                s3,
                s4,
                s5,
                s6,
                s7,
                n0,
                n1,
                n2,
                n3,
                f0,
                f1,
                f2,
                f3,
            ] = raw;
            let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            // Bit 0 is "unmap", meaningful for write-zeroes only; the rest are reserved.
            let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
                1
            } else {
                0
            };
            if flags & !allowed != 0 {
                return VIRTIO_BLK_S_UNSUPP as u8;
            }
            if sectors > MAX_RANGE_SECTORS {
                return ioerr;
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = self.check_range(sector, bytes) else {
                return ioerr;
            };
            segs.push((offset, bytes));
        }
        for (offset, bytes) in segs {
            let result = if kind == VIRTIO_BLK_T_DISCARD {
                // Discard is advisory: a file system without hole punching still succeeds.
                match fallocate(&self.file, PUNCH_HOLE, offset, bytes) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                    r => r,
                }
            } else {
                self.zero_range(offset, bytes)
            };
            if let Err(e) = result {
                log::warn!("virtio-blk: range operation at byte {offset} failed: {e}");
                return ioerr;
            }
        }
        VIRTIO_BLK_S_OK as u8
    }

    /// Makes `[offset, offset + len)` read as zeroes, in place if the file system can.
    fn zero_range(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        if fallocate(&self.file, ZERO_RANGE, offset, len).is_ok() {
            return Ok(());
        }
        if fallocate(&self.file, PUNCH_HOLE, offset, len).is_ok() {
            return Ok(());
        }
        use std::os::unix::fs::FileExt;
        let zeroes = [0u8; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Byte offset of a whole-sector transfer that fits the disk, or `None`.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            log::debug!("virtio-blk: transfer of {len} bytes is not whole sectors");
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        if end > self.capacity {
            log::debug!(
                "virtio-blk: sectors {sector}..{end} beyond the disk ({} sectors)",
                self.capacity
            );
            return None;
        }
        sector.checked_mul(SECTOR_SIZE)
    }

    fn read_into(
        &mut self,
        mem: &GuestMemory,
        segs: &[chain::Segment],
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        let r = vectored_io(
            &self.file,
            mem,
            segs,
            0,
            offset,
            len,
            Direction::FileToGuest,
        );
        // Guest RAM the host wrote (even partly, on an error) for a live migration.
        for (addr, n) in chain::ranges(segs, 0, len) {
            keel_accel::dirty::mark(mem, addr.0, n as u64);
        }
        r
    }

    fn write_from(
        &mut self,
        mem: &GuestMemory,
        segs: &[chain::Segment],
        start: u64,
        offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        vectored_io(
            &self.file,
            mem,
            segs,
            start,
            offset,
            len,
            Direction::GuestToFile,
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FileToGuest,
    GuestToFile,
}

/// Most iovecs passed to one `preadv`/`pwritev` (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Moves bytes `[start, start + len)` of the guest segments from or to the file at `offset`
/// with one `preadv`/`pwritev` per [`IOV_MAX`] buffers (a 1 MiB request of 4 KiB guest pages
/// is one system call, so the host file system sees one 1 MiB write, not 256 small ones).
fn vectored_io(
    file: &File,
    mem: &GuestMemory,
    segs: &[chain::Segment],
    start: u64,
    offset: u64,
    len: u64,
    dir: Direction,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use vm_memory::GuestMemoryBackend;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(segs.len());
    let mut total = 0u64;
    for (addr, n) in chain::ranges(segs, start, len) {
        for slice in mem.get_slices(addr, n) {
            let slice = slice.map_err(std::io::Error::other)?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            total += slice.len() as u64;
        }
    }
    if total != len {
        return Err(std::io::Error::other(
            "request buffers shorter than its data",
        ));
    }
    let mut pos = offset;
    let mut first = 0usize;
    while first < iov.len() {
        let batch = &iov[first..iov.len().min(first + IOV_MAX)];
        let off = libc::off_t::try_from(pos)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // `batch.len() <= IOV_MAX` fits a c_int.
        let count = batch.len() as libc::c_int;
        // SAFETY: every iovec points into a guest memory region that `mem` keeps mapped for
        // the duration of the call, with the length get_slices checked; the kernel only reads
        // (pwritev) or writes (preadv) those bytes. The descriptor is owned by `file`.
        let rc = unsafe {
            match dir {
                Direction::FileToGuest => {
                    libc::preadv(file.as_raw_fd(), batch.as_ptr(), count, off)
                }
                Direction::GuestToFile => {
                    libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count, off)
                }
            }
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Err(std::io::Error::from(match dir {
                Direction::FileToGuest => std::io::ErrorKind::UnexpectedEof,
                Direction::GuestToFile => std::io::ErrorKind::WriteZero,
            }));
        }
        // Advance past what was transferred (a short transfer resumes mid-buffer).
        let mut done = rc as usize;
        pos += done as u64;
        while done > 0 && first < iov.len() {
            let cur = &mut iov[first];
            if done >= cur.iov_len {
                done -= cur.iov_len;
                first += 1;
            } else {
                // SAFETY: `done < iov_len`, so the new base stays inside the same buffer.
                cur.iov_base = unsafe { cur.iov_base.cast::<u8>().add(done).cast() };
                cur.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        self.active = Some(Active::new(activation, &[0])?);
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        self.serve(&mut active, usize::from(index));
        self.active = Some(active);
    }

    fn resume(&mut self) {
        self.retry_held();
    }

    fn reset(&mut self) {
        // A reset forgets held requests, as QEMU's: the driver starts over.
        self.held.clear();
        self.active = None;
    }
}

/// The validated `-device virtio-blk-device` properties ([`Block::qdev_type`]). The image
/// comes from the block backend `drive` names, which the caller looks up:
///
/// ```ignore
/// let p = BlockProps::from_props(dev.props)?;
/// let backend = backends.block(&p.drive)?;
/// let block = Block::new(&p.config(&backend.filename, backend.read_only))?;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockProps {
    /// Block backend node name (`drive=`).
    pub drive: String,
    /// Serial number the guest reads (`serial=`; empty means none), at most 20 bytes.
    pub serial: Option<String>,
    /// `read-only=on`.
    pub read_only: bool,
    /// `queue-size=`, a power of two.
    pub queue_size: u16,
    /// `share-rw=on`: other devices may write the same image (QEMU's property; without it a
    /// writer excludes every other user of the drive).
    pub share_rw: bool,
    /// `rerror=` and `werror=` (QEMU's device properties; `auto` is the default).
    pub on_error: ErrorPolicy,
    /// Which of `rerror`/`werror` the device set itself (not `auto`).
    pub explicit_on_error: (Option<OnError>, Option<OnError>),
}

impl BlockProps {
    /// From the properties [`Block::qdev_type`] validated. Checks what the type's ranges
    /// cannot: the serial's length and that the queue size is a power of two.
    pub fn from_props(props: &Props) -> Result<Self, Error> {
        let missing = |property| Error::Property {
            driver: Block::QDEV_TYPE,
            property,
        };
        let drive = props.str("drive").ok_or_else(|| missing("drive"))?;
        let serial = props.str("serial").filter(|s| !s.is_empty());
        if let Some(s) = serial
            && s.len() > ID_LEN
        {
            return Err(Error::SerialTooLong(s.to_owned()));
        }
        let queue_size = props
            .u64("queue-size")
            .map_or(Ok(256), u16::try_from)
            .map_err(|_| missing("queue-size"))?;
        if !queue_size.is_power_of_two() || queue_size > 32768 {
            return Err(Error::QueueSize(queue_size));
        }
        let explicit = |property: &'static str| match props.str(property) {
            None | Some("auto") => Ok(None),
            Some(v) => OnError::parse(v, OnError::Report)
                .map(Some)
                .ok_or_else(|| Error::OnError {
                    property,
                    value: v.to_owned(),
                }),
        };
        let explicit = (explicit("rerror")?, explicit("werror")?);
        let defaults = ErrorPolicy::default();
        let on_error = ErrorPolicy {
            read: explicit.0.unwrap_or(defaults.read),
            write: explicit.1.unwrap_or(defaults.write),
        };
        Ok(Self {
            drive: drive.to_owned(),
            serial: serial.map(str::to_owned),
            read_only: props.bool("read-only").unwrap_or(false),
            queue_size,
            share_rw: props.bool("share-rw").unwrap_or(false),
            on_error,
            explicit_on_error: explicit,
        })
    }

    /// Takes the drive's error policy (`-drive ...,rerror=,werror=`, QAPI spellings) where
    /// the device's own property is absent or `auto`, as QEMU's disks take their block
    /// backend's. A value that is not QAPI's is refused.
    pub fn inherit_on_error(
        mut self,
        read: Option<&str>,
        write: Option<&str>,
    ) -> Result<Self, Error> {
        let parse = |property: &'static str, v: Option<&str>| {
            v.map(|v| {
                OnError::parse(v, OnError::Report).ok_or_else(|| Error::OnError {
                    property,
                    value: v.to_owned(),
                })
            })
            .transpose()
        };
        if self.explicit_on_error.0.is_none()
            && let Some(r) = parse("rerror", read)?
        {
            self.on_error.read = r;
        }
        if self.explicit_on_error.1.is_none()
            && let Some(w) = parse("werror", write)?
        {
            self.on_error.write = w;
        }
        Ok(self)
    }

    /// The device configuration for the image at `path`; the disk is read-only if either
    /// the device (`read-only=on`) or the backend says so.
    pub fn config(&self, path: impl Into<PathBuf>, backend_read_only: bool) -> BlockConfig {
        BlockConfig {
            read_only: self.read_only || backend_read_only,
            serial: self.serial.clone(),
            queue_size: self.queue_size,
            on_error: self.on_error,
            ..BlockConfig::new(path)
        }
    }
}

/// The values of `rerror`/`werror` (QAPI's `BlockdevOnError`).
const ON_ERROR_VALUES: [&str; 5] = ["report", "ignore", "enospc", "stop", "auto"];

impl Block {
    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "virtio-blk-device";

    /// The qdev type: `virtio-blk-device` on a virtio-mmio bus, properties `drive`
    /// (required), `serial`, `read-only`, `queue-size`. See [`BlockProps`].
    pub fn qdev_type() -> DeviceType {
        DeviceType::new(Self::QDEV_TYPE, BusType::VirtioMmio)
            .category(keel_qdev::Category::Storage)
            .description("virtio block device (raw image)")
            .prop(PropSpec::string("drive").description("block backend node name (blockdev-add)"))
            .prop(
                PropSpec::string("serial")
                    .default_str("")
                    .description("serial number the guest reads (at most 20 bytes)"),
            )
            .prop(
                PropSpec::bool("read-only")
                    .default_bool(false)
                    .description("expose the disk read-only"),
            )
            .prop(
                PropSpec::uint16("queue-size")
                    .default_u64(256)
                    .range(2, 1024)
                    .description("virtqueue size (a power of two)"),
            )
            .prop(
                PropSpec::int32("bootindex")
                    .default_i64(-1)
                    .range(-1, i32::MAX.into())
                    .description("boot order (Keel boots -kernel directly: kept for introspection and uniqueness)"),
            )
            .prop(
                PropSpec::bool("share-rw")
                    .default_bool(false)
                    .description("let other devices write the same drive"),
            )
            .prop(
                PropSpec::enumeration("rerror", ON_ERROR_VALUES)
                    .default_str("auto")
                    .description("what a failed host read does (report, ignore, stop)"),
            )
            .prop(
                PropSpec::enumeration("werror", ON_ERROR_VALUES)
                    .default_str("auto")
                    .description("what a failed host write does (enospc, report, ignore, stop)"),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MmioTransport;
    use crate::testutil::*;
    use keel_accel::BusDevice;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A scratch image of `sectors` sectors; sector n is filled with byte n.
    fn image(sectors: u64) -> std::path::PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("keel-virtio-blk-{}-{n}.img", std::process::id()));
        let mut f = File::create(&path).unwrap();
        for s in 0..sectors {
            f.write_all(&[s as u8; 512]).unwrap();
        }
        path
    }

    fn contents(path: &std::path::Path) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(path).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    const HDR: u64 = DATA;
    const BUF: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x10_0000;

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        fill(mem, HDR, &h);
        fill(mem, STATUS, &[0xee]);
    }

    fn status(mem: &GuestMemory) -> u8 {
        fetch(mem, STATUS, 1)[0]
    }

    struct Rig {
        mem: Arc<GuestMemory>,
        t: MmioTransport,
        path: std::path::PathBuf,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn rig(config: impl FnOnce(&mut BlockConfig)) -> Rig {
        let path = image(16);
        let mut c = BlockConfig::new(&path);
        c.queue_size = 16;
        config(&mut c);
        let mem = memory();
        let (_, t, _) = transport(Block::new(&c).unwrap(), &mem);
        Rig { mem, t, path }
    }

    use std::sync::Arc;

    #[test]
    fn config_space_reports_capacity_and_features() {
        let r = rig(|_| {});
        let mut cap = [0u8; 8];
        r.t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        assert_eq!(rd(&r.t, 0x114), 512, "blk_size");
        assert_eq!(rd(&r.t, 0x10c), 14, "seg_max");
        wr(&r.t, 0x14, 0);
        let f = rd(&r.t, 0x10);
        assert_ne!(f & 1 << VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        let ro = rig(|c| c.read_only = true);
        wr(&ro.t, 0x14, 0);
        assert_ne!(rd(&ro.t, 0x10) & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(rd(&ro.t, 0x8), 2);
    }

    #[test]
    fn read_sectors() {
        let r = rig(|_| {});
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        header(&r.mem, VIRTIO_BLK_T_IN, 3);
        // Data split over two descriptors.
        let head = q.add(&[
            (HDR, 16, false),
            (BUF, 512, true),
            (BUF + 0x800, 512, true),
            (STATUS, 1, true),
        ]);
        notify(&r.t, 0);
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used(0), (u32::from(head), 1025));
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(fetch(&r.mem, BUF, 512), vec![3u8; 512]);
        assert_eq!(fetch(&r.mem, BUF + 0x800, 512), vec![4u8; 512]);
        assert_eq!(rd(&r.t, 0x60), 1, "used-buffer interrupt");
        let _ = std::fs::remove_file(&r.path);
    }

    #[test]
    fn write_then_read_back() {
        let r = rig(|_| {});
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        header(&r.mem, VIRTIO_BLK_T_OUT, 15);
        fill(&r.mem, BUF, &[0x5a; 512]);
        q.add(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(q.used(0).1, 1);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        let data = contents(&r.path);
        assert_eq!(&data[15 * 512..], &[0x5a; 512][..]);
        assert_eq!(&data[14 * 512..15 * 512], &[14u8; 512][..]);
        // Header and data in one descriptor works too.
        let mut one = [0u8; 16 + 512];
        one[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        one[8..16].copy_from_slice(&2u64.to_le_bytes());
        one[16..].fill(0x77);
        fill(&r.mem, BUF, &one);
        q.add(&[(BUF, 16 + 512, false), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(&contents(&r.path)[2 * 512..3 * 512], &[0x77; 512][..]);
        let _ = std::fs::remove_file(&r.path);
    }

    /// Odd buffer splits (as a guest with scattered pages produces) go through one
    /// vectored call each way and land at the right bytes.
    #[test]
    fn scattered_buffers_write_and_read_back() {
        let r = rig(|_| {});
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        let pattern: Vec<u8> = (0..3 * 512).map(|i| (i * 7 % 251) as u8).collect();
        let sizes = [100u32, 412, 1, 511, 300, 212];
        let mut chain = vec![(HDR, 16, false)];
        let mut at = 0usize;
        for (i, &n) in sizes.iter().enumerate() {
            let addr = BUF + 0x1000 * i as u64 + 3;
            fill(&r.mem, addr, &pattern[at..at + n as usize]);
            chain.push((addr, n, false));
            at += n as usize;
        }
        chain.push((STATUS, 1, true));
        header(&r.mem, VIRTIO_BLK_T_OUT, 5);
        q.add(&chain);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(&contents(&r.path)[5 * 512..8 * 512], &pattern[..]);
        // Read it back into two other buffers.
        header(&r.mem, VIRTIO_BLK_T_IN, 5);
        let back = BUF + 0x8_0000;
        q.add(&[
            (HDR, 16, false),
            (back, 1000, true),
            (back + 0x2001, 536, true),
            (STATUS, 1, true),
        ]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(q.used(1).1, 3 * 512 + 1);
        let mut got = fetch(&r.mem, back, 1000);
        got.extend(fetch(&r.mem, back + 0x2001, 536));
        assert_eq!(got, pattern);
    }

    #[test]
    fn flush_and_get_id() {
        let r = rig(|c| c.serial = Some("keel-disk-0".into()));
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        header(&r.mem, VIRTIO_BLK_T_FLUSH, 0);
        q.add(&[(HDR, 16, false), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        header(&r.mem, VIRTIO_BLK_T_GET_ID, 0);
        fill(&r.mem, BUF, &[0xff; 20]);
        q.add(&[(HDR, 16, false), (BUF, 20, true), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(q.used(1).1, 21);
        let mut want = b"keel-disk-0".to_vec();
        want.resize(20, 0);
        assert_eq!(fetch(&r.mem, BUF, 20), want);
        let _ = std::fs::remove_file(&r.path);
    }

    #[test]
    fn out_of_range_and_partial_sectors_are_ioerr() {
        let r = rig(|_| {});
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        for (sector, len) in [
            (16u64, 512u32),
            (15, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512 + 1, 512),
            (0, 100),
        ] {
            header(&r.mem, VIRTIO_BLK_T_IN, sector);
            q.add(&[(HDR, 16, false), (BUF, len, true), (STATUS, 1, true)]);
            notify(&r.t, 0);
            assert_eq!(
                status(&r.mem),
                VIRTIO_BLK_S_IOERR as u8,
                "sector {sector} len {len}"
            );
            header(&r.mem, VIRTIO_BLK_T_OUT, sector);
            q.add(&[(HDR, 16, false), (BUF, len, false), (STATUS, 1, true)]);
            notify(&r.t, 0);
            assert_eq!(
                status(&r.mem),
                VIRTIO_BLK_S_IOERR as u8,
                "write sector {sector} len {len}"
            );
        }
        assert!(!needs_reset(&r.t));
        let untouched: Vec<u8> = (0..16u8).flat_map(|s| [s; 512]).collect();
        assert_eq!(contents(&r.path), untouched);
        let _ = std::fs::remove_file(&r.path);
    }

    #[test]
    fn read_only_refuses_writes_but_reads() {
        let r = rig(|c| c.read_only = true);
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        header(&r.mem, VIRTIO_BLK_T_OUT, 0);
        fill(&r.mem, BUF, &[0x11; 512]);
        q.add(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(&contents(&r.path)[..512], &[0u8; 512][..]);
        header(&r.mem, VIRTIO_BLK_T_IN, 1);
        q.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(fetch(&r.mem, BUF, 512), vec![1u8; 512]);
        let _ = std::fs::remove_file(&r.path);
    }

    #[test]
    fn unknown_request_is_unsupp_and_short_header_ioerr() {
        let r = rig(|_| {});
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        header(&r.mem, 99, 0);
        q.add(&[(HDR, 16, false), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_UNSUPP as u8);
        header(&r.mem, VIRTIO_BLK_T_IN, 0);
        q.add(&[(HDR, 8, false), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_IOERR as u8);
        assert!(!needs_reset(&r.t));
        let _ = std::fs::remove_file(&r.path);
    }

    #[test]
    fn indirect_chain_is_served() {
        let r = rig(|_| {});
        let q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        header(&r.mem, VIRTIO_BLK_T_IN, 7);
        let table = DATA + 0x8000;
        let d = |i: u64, addr: u64, len: u32, flags: u32, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
            b[14..].copy_from_slice(&next.to_le_bytes());
            fill(&r.mem, table + i * 16, &b);
        };
        d(0, HDR, 16, VRING_DESC_F_NEXT, 1);
        d(1, BUF, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
        d(2, STATUS, 1, VRING_DESC_F_WRITE, 0);
        q.store(0, table, 48, VRING_DESC_F_INDIRECT as u16, 0);
        q.publish(0);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(fetch(&r.mem, BUF, 512), vec![7u8; 512]);
        assert_eq!(q.used(0), (0, 513));
        let _ = std::fs::remove_file(&r.path);
    }

    /// Each hostile ring below must put the device in NEEDS_RESET, return promptly, and
    /// leave the device usable again after a driver reset.
    fn hostile(setup: impl FnOnce(&mut TestQueue<'_>, &GuestMemory)) {
        let r = rig(|_| {});
        let mut q = TestQueue::new(&r.mem, 0, 16);
        bring_up(&r.t, &[&q]);
        setup(&mut q, &r.mem);
        notify(&r.t, 0);
        assert!(needs_reset(&r.t), "device must flag the broken ring");
        assert_ne!(rd(&r.t, 0x60) & 2, 0, "config-change interrupt");
        notify(&r.t, 0); // ignored in the error state
        // Recovery: reset, fresh rings, a good request.
        let mem2 = Arc::clone(&r.mem);
        let mut q2 = TestQueue::new(&mem2, 0x8000, 16);
        wr(&r.t, 0x70, 0);
        assert!(!needs_reset(&r.t));
        bring_up(&r.t, &[&q2]);
        header(&r.mem, VIRTIO_BLK_T_IN, 1);
        q2.add(&[(HDR, 16, false), (BUF, 512, true), (STATUS, 1, true)]);
        notify(&r.t, 0);
        assert_eq!(status(&r.mem), VIRTIO_BLK_S_OK as u8);
        let _ = std::fs::remove_file(&r.path);
    }

    #[test]
    fn looping_chain() {
        hostile(|q, mem| {
            header(mem, VIRTIO_BLK_T_IN, 0);
            q.store(0, HDR, 16, VRING_DESC_F_NEXT as u16, 1);
            q.store(
                1,
                BUF,
                512,
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                0,
            );
            q.publish(0);
        });
    }

    #[test]
    fn self_loop() {
        hostile(|q, _| {
            q.store(3, HDR, 16, VRING_DESC_F_NEXT as u16, 3);
            q.publish(3);
        });
    }

    #[test]
    fn next_out_of_range() {
        hostile(|q, _| {
            q.store(0, HDR, 16, VRING_DESC_F_NEXT as u16, 200);
            q.publish(0);
        });
    }

    #[test]
    fn head_out_of_range() {
        hostile(|q, _| q.publish(999));
    }

    #[test]
    fn buffer_outside_memory() {
        hostile(|q, mem| {
            header(mem, VIRTIO_BLK_T_IN, 0);
            q.add(&[
                (HDR, 16, false),
                (MEM_SIZE as u64 - 256, 512, true),
                (STATUS, 1, true),
            ]);
        });
    }

    #[test]
    fn buffer_wrapping_address_space() {
        hostile(|q, mem| {
            header(mem, VIRTIO_BLK_T_IN, 0);
            q.add(&[
                (HDR, 16, false),
                (u64::MAX - 10, 512, true),
                (STATUS, 1, true),
            ]);
        });
    }

    #[test]
    fn no_status_byte() {
        hostile(|q, mem| {
            header(mem, VIRTIO_BLK_T_IN, 0);
            q.add(&[(HDR, 16, false), (BUF, 512, false)]);
        });
    }

    #[test]
    fn readable_after_writable() {
        hostile(|q, mem| {
            header(mem, VIRTIO_BLK_T_OUT, 0);
            q.add(&[(HDR, 16, false), (STATUS, 1, true), (BUF, 512, false)]);
        });
    }

    #[test]
    fn avail_index_jumps_past_queue_size() {
        hostile(|q, _| {
            q.vq.avail().idx().store(100);
        });
    }

    #[test]
    fn nested_indirect_table() {
        hostile(|q, mem| {
            let table = DATA + 0x8000;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&table.to_le_bytes());
            b[8..12].copy_from_slice(&16u32.to_le_bytes());
            b[12..14].copy_from_slice(&(VRING_DESC_F_INDIRECT as u16).to_le_bytes());
            fill(mem, table, &b);
            q.store(0, table, 16, VRING_DESC_F_INDIRECT as u16, 0);
            q.publish(0);
        });
    }

    #[test]
    fn indirect_table_outside_memory() {
        hostile(|q, _| {
            q.store(0, 1 << 40, 64, VRING_DESC_F_INDIRECT as u16, 0);
            q.publish(0);
        });
    }

    #[test]
    fn serial_too_long_is_refused() {
        let path = image(1);
        let mut c = BlockConfig::new(&path);
        c.serial = Some("x".repeat(21));
        assert!(matches!(Block::new(&c), Err(Error::SerialTooLong(_))));
        c.serial = None;
        c.queue_size = 100;
        assert!(matches!(Block::new(&c), Err(Error::QueueSize(100))));
        c.path = "/nonexistent/keel.img".into();
        assert!(matches!(Block::new(&c), Err(Error::OpenImage { .. })));
        let _ = std::fs::remove_file(&path);
    }

    /// A tmpfs of `size` bytes mounted for one test, unmounted when dropped.
    struct SmallFs {
        dir: std::path::PathBuf,
    }

    impl SmallFs {
        /// `None` (the test is skipped, and says why) unless running as root.
        fn mount(size: &str) -> Option<SmallFs> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipped: mounting a size-limited tmpfs needs root");
                return None;
            }
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let dir =
                std::env::temp_dir().join(format!("keel-blk-full-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "mount -t tmpfs failed");
            Some(SmallFs { dir })
        }

        /// Fills the file system: writes `filler` until the host says ENOSPC.
        fn fill_up(&self) -> std::path::PathBuf {
            let path = self.dir.join("filler");
            let mut f = File::create(&path).unwrap();
            let chunk = [0xffu8; 4096];
            loop {
                match f.write(&chunk) {
                    Ok(n) if n > 0 => {}
                    Ok(_) => break,
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                        break;
                    }
                }
            }
            path
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<IoErrorReport>>);

    impl IoErrorSink for Recorder {
        fn io_error(&self, report: IoErrorReport) {
            self.0.lock().unwrap().push(report);
        }
    }

    /// A sparse 64-sector image on a full tmpfs: writing a sector needs a page the host
    /// does not have.
    fn full_disk(
        fs: &SmallFs,
        write: OnError,
    ) -> (
        Arc<std::sync::Mutex<Block>>,
        MmioTransport,
        Arc<GuestMemory>,
        Arc<Recorder>,
        std::path::PathBuf,
    ) {
        let path = fs.dir.join("disk.img");
        File::create(&path).unwrap().set_len(64 * 512).unwrap();
        let mut c = BlockConfig::new(&path);
        c.queue_size = 16;
        c.on_error.write = write;
        let mut block = Block::new(&c).unwrap();
        let recorder = Arc::new(Recorder::default());
        block.set_error_sink(recorder.clone());
        let mem = memory();
        let (dev, t, _) = transport(block, &mem);
        (dev, t, mem, recorder, path)
    }

    const FLUSH_STATUS: u64 = STATUS + 0x100;

    #[test]
    fn werror_stop_holds_the_write_and_its_flush_until_resumed() {
        let Some(fs) = SmallFs::mount("64k") else {
            return;
        };
        let (dev, t, mem, recorder, path) = full_disk(&fs, OnError::Stop);
        let filler = fs.fill_up();
        let mut q = TestQueue::new(&mem, 0, 16);
        bring_up(&t, &[&q]);
        header(&mem, VIRTIO_BLK_T_OUT, 5);
        fill(&mem, BUF, &[0x5a; 4096]);
        q.add(&[(HDR, 16, false), (BUF, 4096, false), (STATUS, 1, true)]);
        notify(&t, 0);
        // The write is held: not returned to the driver, reported as a stop on ENOSPC.
        assert_eq!(q.used_idx(), 0);
        let reports = recorder.0.lock().unwrap().clone();
        assert_eq!(
            reports,
            [IoErrorReport {
                operation: IoOperation::Write,
                action: ErrorAction::Stop,
                errno: libc::ENOSPC,
                io_status: true,
            }]
        );
        assert!(reports[0].nospace());
        // A flush behind it waits too: it must not succeed before the write is in the image.
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        fill(&mem, HDR + 0x100, &h);
        fill(&mem, FLUSH_STATUS, &[0xee]);
        q.add(&[(HDR + 0x100, 16, false), (FLUSH_STATUS, 1, true)]);
        notify(&t, 0);
        assert_eq!(q.used_idx(), 0);
        assert_eq!(dev.lock().unwrap().held_requests(), 2);
        // Still full: resuming holds them again and reports again.
        dev.lock().unwrap().resume();
        assert_eq!(q.used_idx(), 0);
        assert_eq!(recorder.0.lock().unwrap().len(), 2);
        // Space freed: resuming completes both, in order, and the data is in the image.
        // Truncated rather than removed: a child another test thread forks at this moment
        // would keep a removed file's pages until it execs.
        File::options()
            .write(true)
            .open(&filler)
            .unwrap()
            .set_len(0)
            .unwrap();
        dev.lock().unwrap().resume();
        assert_eq!(q.used_idx(), 2);
        assert_eq!(q.used(0).0, 0);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(fetch(&mem, FLUSH_STATUS, 1)[0], VIRTIO_BLK_S_OK as u8);
        assert_eq!(dev.lock().unwrap().held_requests(), 0);
        assert_eq!(&contents(&path)[5 * 512..5 * 512 + 4096], &[0x5a; 4096][..]);
        assert!(!needs_reset(&t));
    }

    #[test]
    fn werror_report_and_ignore_complete_the_write() {
        for (on_error, action, expect) in [
            (OnError::Report, ErrorAction::Report, VIRTIO_BLK_S_IOERR),
            (OnError::Ignore, ErrorAction::Ignore, VIRTIO_BLK_S_OK),
        ] {
            let Some(fs) = SmallFs::mount("64k") else {
                return;
            };
            let (dev, t, mem, recorder, _) = full_disk(&fs, on_error);
            fs.fill_up();
            let mut q = TestQueue::new(&mem, 0, 16);
            bring_up(&t, &[&q]);
            header(&mem, VIRTIO_BLK_T_OUT, 5);
            q.add(&[(HDR, 16, false), (BUF, 4096, false), (STATUS, 1, true)]);
            notify(&t, 0);
            assert_eq!(q.used_idx(), 1);
            assert_eq!(status(&mem), expect as u8);
            assert_eq!(recorder.0.lock().unwrap()[0].action, action);
            assert_eq!(dev.lock().unwrap().held_requests(), 0);
        }
    }

    #[test]
    fn werror_enospc_reports_other_errors_and_stops_on_a_full_disk() {
        let Some(fs) = SmallFs::mount("64k") else {
            return;
        };
        let (dev, t, mem, recorder, _) = full_disk(&fs, OnError::Enospc);
        fs.fill_up();
        let mut q = TestQueue::new(&mem, 0, 16);
        bring_up(&t, &[&q]);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        q.add(&[(HDR, 16, false), (BUF, 512, false), (STATUS, 1, true)]);
        notify(&t, 0);
        assert_eq!(q.used_idx(), 0);
        assert_eq!(recorder.0.lock().unwrap()[0].action, ErrorAction::Stop);
        // A reset forgets the held request, as QEMU's.
        dev.lock().unwrap().reset();
        assert_eq!(dev.lock().unwrap().held_requests(), 0);
    }

    #[test]
    fn rerror_and_werror_properties() {
        let t = Block::qdev_type();
        let props = |kv: &[(&str, &str)]| {
            let mut raw = vec![("drive".to_string(), "d0".to_string())];
            raw.extend(kv.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let raw: Vec<_> = raw
                .into_iter()
                .map(|(k, v)| (k, keel_qdev::RawValue::Str(v)))
                .collect();
            t.validate(&raw)
        };
        let p = BlockProps::from_props(&props(&[]).unwrap()).unwrap();
        assert_eq!(p.on_error, ErrorPolicy::default());
        let p =
            BlockProps::from_props(&props(&[("werror", "stop"), ("rerror", "ignore")]).unwrap())
                .unwrap();
        assert_eq!(p.on_error.write, OnError::Stop);
        assert_eq!(p.on_error.read, OnError::Ignore);
        assert_eq!(p.config("x", false).on_error, p.on_error);
        assert!(props(&[("werror", "halt")]).is_err());
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;
    use crate::testutil::*;
    use std::sync::Arc;

    const HDR: u64 = DATA;
    const STATUS: u64 = DATA + 0x10_0000;

    fn run(block: Block, kind: u32, segs: &[(u64, u32, u32)]) -> (u8, Arc<GuestMemory>) {
        let mem = memory();
        let (_, t, _) = transport(block, &mem);
        let mut q = TestQueue::new(&mem, 0, 16);
        bring_up(&t, &[&q]);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        fill(&mem, HDR, &h);
        let mut body = Vec::new();
        for &(sector, n, flags) in segs {
            body.extend_from_slice(&sector.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&flags.to_le_bytes());
        }
        fill(&mem, HDR + 16, &body);
        q.add(&[(HDR, 16 + body.len() as u32, false), (STATUS, 1, true)]);
        notify(&t, 0);
        assert!(!needs_reset(&t));
        let status = fetch(&mem, STATUS, 1)[0];
        (status, mem)
    }

    fn disk(sectors: u64) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "keel-virtio-range-{}-{sectors}-{:?}.img",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, vec![0xaa; (sectors * 512) as usize]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (f, path)
    }

    #[test]
    fn write_zeroes_and_discard_zero_the_ranges() {
        let (f, path) = disk(16);
        let b = Block::from_file(f.try_clone().unwrap(), "t", false, None, 16).unwrap();
        assert_ne!(b.features() & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(b.features() & 1 << VIRTIO_BLK_F_DISCARD, 0);
        let (st, _) = run(b, VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 2, 0), (8, 1, 1)]);
        assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 16 * 512, "size kept");
        assert!(data[..512].iter().all(|&b| b == 0xaa));
        assert!(data[512..3 * 512].iter().all(|&b| b == 0));
        assert!(data[3 * 512..8 * 512].iter().all(|&b| b == 0xaa));
        assert!(data[8 * 512..9 * 512].iter().all(|&b| b == 0));

        let mut b = Block::from_file(f.try_clone().unwrap(), "t", false, None, 16).unwrap();
        b.enable_discard();
        let (st, _) = run(b, VIRTIO_BLK_T_DISCARD, &[(12, 4, 0)]);
        assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        let data = std::fs::read(&path).unwrap();
        assert!(data[12 * 512..].iter().all(|&b| b == 0));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let (f, path) = disk(16);
        let mk = || {
            let mut b = Block::from_file(f.try_clone().unwrap(), "t", false, None, 16).unwrap();
            b.enable_discard();
            b
        };
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        assert_eq!(run(mk(), VIRTIO_BLK_T_DISCARD, &[(15, 2, 0)]).0, ioerr);
        assert_eq!(
            run(mk(), VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)]).0,
            ioerr
        );
        assert_eq!(
            run(mk(), VIRTIO_BLK_T_DISCARD, &[(0, 1, 1)]).0,
            unsupp,
            "unmap on discard"
        );
        assert_eq!(run(mk(), VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]).0, unsupp);
        assert_eq!(run(mk(), VIRTIO_BLK_T_DISCARD, &[]).0, ioerr);
        let many = vec![(0u64, 1u32, 0u32); 33];
        assert_eq!(run(mk(), VIRTIO_BLK_T_DISCARD, &many).0, unsupp);
        // One bad segment means nothing is touched.
        assert_eq!(
            run(mk(), VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0), (16, 1, 0)]).0,
            ioerr
        );
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0xaa));
        // Not offered: read-only disks, discard without the option.
        let ro = Block::from_file(f.try_clone().unwrap(), "t", true, None, 16).unwrap();
        assert_eq!(run(ro, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]).0, unsupp);
        let plain = Block::from_file(f.try_clone().unwrap(), "t", false, None, 16).unwrap();
        assert_eq!(run(plain, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]).0, unsupp);
        let _ = std::fs::remove_file(&path);
    }
}
