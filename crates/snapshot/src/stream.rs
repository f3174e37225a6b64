//! The stream: header, typed sections, sparse page-aligned RAM, end marker.
//!
//! Writing goes straight to any `Write` ([`Writer`]); reading takes the whole stream and
//! checks all of it (header checksum, every section's checksum, the end marker, the RAM
//! table against its data) before handing anything out ([`Snapshot::parse`]), so a caller
//! that validates its own sections next can restore without stopping half-way. The byte
//! layout is described in `docs/SNAPSHOT.md`.

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::codec::{Dec, DecodeError, Enc};
use crate::crc::{Crc32, crc32};
use crate::{SnapshotError, SnapshotResult};

/// First eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"KEELSNAP";
/// Version of the framing (header, section frames, RAM layout) this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Page size of the RAM sections: page data starts at a stream offset that is a multiple of
/// it, so a stream saved to a file can be mapped back page for page.
pub const PAGE: usize = 4096;
/// Bytes of a section frame before its payload.
pub const FRAME_LEN: usize = 4 + 4 + 4 + 8 + 4;
/// Largest header body accepted (the header holds a few short strings).
const MAX_HEADER: u32 = 64 * 1024;

/// A section's type: four ASCII bytes (`b"VCPU"`, `b"RAM\0"`, ...).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SectionId(pub [u8; 4]);

impl SectionId {
    /// Guest RAM (sparse, page aligned).
    pub const RAM: Self = Self(*b"RAM\0");
    /// The end marker: a stream without it is truncated.
    pub const END: Self = Self(*b"END\0");
}

impl std::fmt::Display for SectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for &b in &self.0 {
            if b.is_ascii_graphic() {
                write!(f, "{}", b as char)?;
            } else if b != 0 {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for SectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SectionId({self})")
    }
}

/// What a machine must match for a stream to restore into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Machine type name (`microvm`, `pc`, ...).
    pub machine: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
}

impl Shape {
    /// Checks that a machine of shape `here` can take a stream of shape `self`; the error
    /// names the first property that differs and both values.
    pub fn check(&self, here: &Shape) -> SnapshotResult<()> {
        let differ = |what: &'static str, saved: String, here: String| {
            Err(SnapshotError::ShapeMismatch { what, saved, here })
        };
        if self.machine != here.machine {
            return differ("machine type", self.machine.clone(), here.machine.clone());
        }
        if self.vcpus != here.vcpus {
            return differ("vCPU count", self.vcpus.to_string(), here.vcpus.to_string());
        }
        if self.memory != here.memory {
            return differ(
                "memory size",
                format!("{} MiB", self.memory >> 20),
                format!("{} MiB", here.memory >> 20),
            );
        }
        Ok(())
    }
}

/// The stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Version of the Keel that wrote the stream (informational; compatibility is decided
    /// by [`FORMAT_VERSION`] and each section's own version).
    pub keel_version: String,
    /// The machine the stream was saved from.
    pub shape: Shape,
    /// The accelerator the machine ran under when saved (informational: any accelerator
    /// that can run the machine restores it).
    pub accel: String,
}

impl Header {
    /// The header's fields as the stream carries them (also the live migration preamble's).
    pub fn body(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.str(&self.keel_version)
            .str(&self.shape.machine)
            .u32(self.shape.vcpus)
            .u64(self.shape.memory)
            .str(&self.accel);
        e.finish()
    }

    /// Reads the fields [`Header::body`] wrote.
    pub fn from_body(b: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(b);
        let h = Self {
            keel_version: d.str("keel version")?,
            shape: Shape {
                machine: d.str("machine type")?,
                vcpus: d.u32("vCPU count")?,
                memory: d.u64("memory size")?,
            },
            accel: d.str("accelerator")?,
        };
        d.end()?;
        Ok(h)
    }
}

/// One run of consecutive non-zero pages in a RAM section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u64,
    /// Stream offset of the first page's data (a multiple of [`PAGE`]).
    pub offset: u64,
}

/// Writes a stream.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
}

impl<W: Write> Writer<W> {
    /// Starts a stream: writes the magic, the format version and `header`.
    pub fn new(out: W, header: &Header) -> SnapshotResult<Self> {
        let body = header.body();
        let mut head = Vec::with_capacity(16 + body.len() + 4);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&(body.len() as u32).to_le_bytes());
        head.extend_from_slice(&body);
        let crc = crc32(&head);
        head.extend_from_slice(&crc.to_le_bytes());
        let mut w = Self { out, offset: 0 };
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> SnapshotResult<()> {
        self.out.write_all(b).map_err(SnapshotError::Write)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// The frame fields before the checksum; the checksum covers them and the payload.
    fn prefix(id: SectionId, instance: u32, version: u32, len: u64) -> [u8; 20] {
        let mut f = [0u8; 20];
        f[0..4].copy_from_slice(&id.0);
        f[4..8].copy_from_slice(&instance.to_le_bytes());
        f[8..12].copy_from_slice(&version.to_le_bytes());
        f[12..20].copy_from_slice(&len.to_le_bytes());
        f
    }

    fn frame(&mut self, prefix: [u8; 20], crc: u32) -> SnapshotResult<()> {
        let mut f = [0u8; FRAME_LEN];
        f[..20].copy_from_slice(&prefix);
        f[20..24].copy_from_slice(&crc.to_le_bytes());
        self.put(&f)
    }

    /// Appends a section: `instance` tells apart sections of one id (vCPU 0, 1, ...; the
    /// first serial port, the second ...); `version` is the payload layout's version.
    pub fn section(
        &mut self,
        id: SectionId,
        instance: u32,
        version: u32,
        payload: &[u8],
    ) -> SnapshotResult<()> {
        let prefix = Self::prefix(id, instance, version, payload.len() as u64);
        let mut crc = Crc32::new();
        crc.update(&prefix);
        crc.update(payload);
        self.frame(prefix, crc.finish())?;
        self.put(payload)
    }

    /// Appends guest RAM: only pages that hold a non-zero byte are written (a page never
    /// touched reads as zero and so is left out too), grouped in runs of consecutive pages,
    /// with the page data starting at a [`PAGE`]-aligned stream offset.
    pub fn ram(&mut self, mem: &GuestMemoryMmap) -> SnapshotResult<RamStats> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut page = vec![0u8; PAGE];
        let mut total = 0u64;
        for region in mem.iter() {
            let start = region.start_addr().0;
            let pages = region.len() / PAGE as u64;
            total += pages;
            for p in 0..pages {
                let gpa = start + p * PAGE as u64;
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                if page.iter().all(|&b| b == 0) {
                    continue;
                }
                match runs.last_mut() {
                    Some((g, n)) if *g + *n * PAGE as u64 == gpa => *n += 1,
                    _ => runs.push((gpa, 1)),
                }
            }
        }
        let mut table = Enc::new();
        table.u32(runs.len() as u32);
        for &(gpa, n) in &runs {
            table.u64(gpa).u64(n);
        }
        let table = table.finish();
        let data_start = self.offset + FRAME_LEN as u64 + table.len() as u64;
        let pad = vec![0u8; ((PAGE as u64 - data_start % PAGE as u64) % PAGE as u64) as usize];
        let written: u64 = runs.iter().map(|r| r.1).sum();
        let len = table.len() as u64 + pad.len() as u64 + written * PAGE as u64;
        // The checksum goes in the frame, before the data: one pass to compute it.
        let prefix = Self::prefix(SectionId::RAM, 0, 1, len);
        let mut crc = Crc32::new();
        crc.update(&prefix);
        crc.update(&table);
        crc.update(&pad);
        for &(gpa, n) in &runs {
            for p in 0..n {
                mem.read_slice(&mut page, GuestAddress(gpa + p * PAGE as u64))
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                crc.update(&page);
            }
        }
        self.frame(prefix, crc.finish())?;
        self.put(&table)?;
        self.put(&pad)?;
        for &(gpa, n) in &runs {
            for p in 0..n {
                mem.read_slice(&mut page, GuestAddress(gpa + p * PAGE as u64))
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                self.put(&page)?;
            }
        }
        Ok(RamStats {
            pages_total: total,
            pages_written: written,
            runs: runs.len() as u64,
        })
    }

    /// Writes the end marker and flushes; returns the output.
    pub fn finish(mut self) -> SnapshotResult<W> {
        let prefix = Self::prefix(SectionId::END, 0, 1, 0);
        self.frame(prefix, crc32(&prefix))?;
        self.out.flush().map_err(SnapshotError::Write)?;
        Ok(self.out)
    }

    /// Bytes written so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// What [`Writer::ram`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamStats {
    /// Pages of guest RAM.
    pub pages_total: u64,
    /// Pages written (the rest were zero).
    pub pages_written: u64,
    /// Runs of consecutive pages.
    pub runs: u64,
}

/// One section of a parsed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Its type.
    pub id: SectionId,
    /// Which one of that type.
    pub instance: u32,
    /// Payload layout version.
    pub version: u32,
    start: usize,
    len: usize,
}

/// A whole stream, checked: header, every section's checksum, the end marker and the RAM
/// table. Nothing in a machine has been touched when this exists.
#[derive(Clone)]
pub struct Snapshot {
    /// The header.
    pub header: Header,
    sections: Vec<Section>,
    ram: Vec<RamRun>,
    data: Vec<u8>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("header", &self.header)
            .field("sections", &self.sections)
            .field("ram_runs", &self.ram.len())
            .finish()
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Snapshot {
    /// Reads a whole stream from `r` and parses it.
    pub fn read_from(mut r: impl Read) -> SnapshotResult<Self> {
        let mut data = Vec::new();
        r.read_to_end(&mut data).map_err(SnapshotError::Read)?;
        Self::parse(data)
    }

    /// Parses and checks a stream held in memory.
    pub fn parse(data: Vec<u8>) -> SnapshotResult<Self> {
        if data.len() < 16 {
            return Err(SnapshotError::Truncated {
                what: "the header".to_string(),
                offset: data.len() as u64,
            });
        }
        if data[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let version = le32(&data, 8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::FormatVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let hlen = le32(&data, 12);
        if hlen > MAX_HEADER {
            return Err(SnapshotError::Corrupt {
                what: "the header".to_string(),
                reason: format!("header length {hlen} is implausible"),
            });
        }
        let hend = 16 + hlen as usize;
        if data.len() < hend + 4 {
            return Err(SnapshotError::Truncated {
                what: "the header".to_string(),
                offset: data.len() as u64,
            });
        }
        if crc32(&data[..hend]) != le32(&data, hend) {
            return Err(SnapshotError::Checksum {
                what: "the header".to_string(),
                offset: 0,
            });
        }
        let header = Header::from_body(&data[16..hend]).map_err(|e| SnapshotError::Corrupt {
            what: "the header".to_string(),
            reason: e.to_string(),
        })?;
        let mut sections = Vec::new();
        let mut ram = Vec::new();
        let mut at = hend + 4;
        loop {
            if data.len() - at < FRAME_LEN {
                return Err(SnapshotError::Truncated {
                    what: format!("the section frame at offset {at}"),
                    offset: data.len() as u64,
                });
            }
            let mut id = [0u8; 4];
            id.copy_from_slice(&data[at..at + 4]);
            let id = SectionId(id);
            let instance = le32(&data, at + 4);
            let version = le32(&data, at + 8);
            let len = le64(&data, at + 12);
            let crc = le32(&data, at + 20);
            let start = at + FRAME_LEN;
            let left = (data.len() - start) as u64;
            if id != SectionId::END && len > left {
                return Err(SnapshotError::Truncated {
                    what: format!("section {id} #{instance} ({len} bytes at offset {start})"),
                    offset: data.len() as u64,
                });
            }
            let end = if id == SectionId::END {
                start
            } else {
                start + len as usize
            };
            let mut sum = Crc32::new();
            sum.update(&data[at..at + 20]);
            sum.update(&data[start..end]);
            if sum.finish() != crc {
                return Err(SnapshotError::Checksum {
                    what: format!("section {id} #{instance}"),
                    offset: at as u64,
                });
            }
            if id == SectionId::END {
                if len != 0 {
                    return Err(SnapshotError::Corrupt {
                        what: "the end marker".to_string(),
                        reason: format!("length {len} instead of 0"),
                    });
                }
                if start != data.len() {
                    return Err(SnapshotError::Corrupt {
                        what: "the end marker".to_string(),
                        reason: format!("{} bytes follow it", data.len() - start),
                    });
                }
                break;
            }
            let len = len as usize;
            if sections
                .iter()
                .any(|s: &Section| s.id == id && s.instance == instance)
            {
                return Err(SnapshotError::Corrupt {
                    what: format!("section {id} #{instance}"),
                    reason: "it appears twice".to_string(),
                });
            }
            if id == SectionId::RAM {
                ram.extend(parse_ram(&data, start, len, version)?);
            }
            sections.push(Section {
                id,
                instance,
                version,
                start,
                len,
            });
            at = start + len;
        }
        Ok(Self {
            header,
            sections,
            ram,
            data,
        })
    }

    /// Every section, in stream order.
    pub fn sections(&self) -> &[Section] {
        &self.sections
    }

    /// The payload of section `id` #`instance`, checking that its layout version is one the
    /// caller reads (`max_version` and below).
    pub fn payload(
        &self,
        id: SectionId,
        instance: u32,
        max_version: u32,
    ) -> SnapshotResult<Option<(u32, &[u8])>> {
        let Some(s) = self
            .sections
            .iter()
            .find(|s| s.id == id && s.instance == instance)
        else {
            return Ok(None);
        };
        if s.version == 0 || s.version > max_version {
            return Err(SnapshotError::SectionVersion {
                section: format!("{id} #{instance}"),
                found: s.version,
                supported: max_version,
            });
        }
        Ok(Some((s.version, &self.data[s.start..s.start + s.len])))
    }

    /// Like [`Snapshot::payload`], for a section that must be there.
    pub fn required(
        &self,
        id: SectionId,
        instance: u32,
        max_version: u32,
    ) -> SnapshotResult<&[u8]> {
        self.payload(id, instance, max_version)?
            .map(|(_, p)| p)
            .ok_or_else(|| SnapshotError::Missing {
                section: format!("{id} #{instance}"),
            })
    }

    /// Decodes a required section as `T`.
    pub fn decode<T: crate::Persist>(
        &self,
        id: SectionId,
        instance: u32,
        max_version: u32,
    ) -> SnapshotResult<T> {
        let p = self.required(id, instance, max_version)?;
        T::from_payload(p).map_err(|e| SnapshotError::Section {
            section: format!("{id} #{instance}"),
            source: e,
        })
    }

    /// The RAM runs, in stream order.
    pub fn ram_runs(&self) -> &[RamRun] {
        &self.ram
    }

    /// The saved bytes of one run (`pages * PAGE` bytes).
    pub fn run_data(&self, run: &RamRun) -> &[u8] {
        let start = run.offset as usize;
        &self.data[start..start + run.pages as usize * PAGE]
    }

    /// Checks that every RAM run lies inside `mem` (call before [`Snapshot::restore_ram`]).
    pub fn check_ram(&self, mem: &GuestMemoryMmap) -> SnapshotResult<()> {
        for r in &self.ram {
            let end = r.gpa + r.pages * PAGE as u64 - 1;
            if !mem.address_in_range(GuestAddress(r.gpa))
                || !mem.address_in_range(GuestAddress(end))
            {
                return Err(SnapshotError::Corrupt {
                    what: "the RAM section".to_string(),
                    reason: format!(
                        "pages {:#x}..={end:#x} are outside this machine's RAM",
                        r.gpa
                    ),
                });
            }
        }
        Ok(())
    }

    /// Makes `mem` hold exactly the saved RAM: the saved pages are copied in, and every
    /// other page that is not already zero is cleared (a fresh machine's untouched pages
    /// stay untouched). Call [`Snapshot::check_ram`] first.
    pub fn restore_ram(&self, mem: &GuestMemoryMmap) -> SnapshotResult<()> {
        self.check_ram(mem)?;
        let mem_err = |e: vm_memory::GuestMemoryError| SnapshotError::Memory(e.to_string());
        let mut runs = self.ram.clone();
        runs.sort_by_key(|r| r.gpa);
        let zero = vec![0u8; PAGE];
        let mut page = vec![0u8; PAGE];
        let mut next = runs.iter().peekable();
        for region in mem.iter() {
            let start = region.start_addr().0;
            let pages = region.len() / PAGE as u64;
            let mut p = 0;
            while p < pages {
                let gpa = start + p * PAGE as u64;
                while next
                    .peek()
                    .is_some_and(|r| r.gpa + r.pages * PAGE as u64 <= gpa)
                {
                    next.next();
                }
                if let Some(r) = next.peek().filter(|r| r.gpa == gpa) {
                    mem.write_slice(self.run_data(r), GuestAddress(gpa))
                        .map_err(mem_err)?;
                    p += r.pages;
                    next.next();
                    continue;
                }
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(mem_err)?;
                if page.iter().any(|&b| b != 0) {
                    mem.write_slice(&zero, GuestAddress(gpa)).map_err(mem_err)?;
                }
                p += 1;
            }
        }
        Ok(())
    }

    /// The whole stream's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

fn parse_ram(data: &[u8], start: usize, len: usize, version: u32) -> SnapshotResult<Vec<RamRun>> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        what: "the RAM section".to_string(),
        reason,
    };
    if version != 1 {
        return Err(SnapshotError::SectionVersion {
            section: "RAM #0".to_string(),
            found: version,
            supported: 1,
        });
    }
    let mut d = Dec::new(&data[start..start + len]);
    let n = d
        .count("run count", 16)
        .map_err(|e| corrupt(e.to_string()))?;
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let gpa = d.u64("run address").map_err(|e| corrupt(e.to_string()))?;
        let pages = d.u64("run pages").map_err(|e| corrupt(e.to_string()))?;
        if gpa % PAGE as u64 != 0 || pages == 0 {
            return Err(corrupt(format!(
                "run {gpa:#x}+{pages} pages is not page aligned"
            )));
        }
        runs.push((gpa, pages));
    }
    let table_end = start + 4 + 16 * n;
    let mut off = table_end.next_multiple_of(PAGE) as u64;
    let end = (start + len) as u64;
    let mut out = Vec::with_capacity(n);
    for (gpa, pages) in runs {
        // Checked: the counts come from the file, and a wrapped sum would pass the bound
        // (and let `check_ram` add past u64 later).
        let bytes = pages
            .checked_mul(PAGE as u64)
            .filter(|b| gpa.checked_add(*b).is_some())
            .ok_or_else(|| corrupt(format!("run at {gpa:#x} ({pages} pages) is too long")))?;
        if off.checked_add(bytes).is_none_or(|e| e > end) {
            return Err(corrupt(format!(
                "run at {gpa:#x} ({pages} pages) goes past the end of the section"
            )));
        }
        out.push(RamRun {
            gpa,
            pages,
            offset: off,
        });
        off += bytes;
    }
    if off != end {
        return Err(corrupt(format!("{} bytes after the last run", end - off)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crafted run lengths whose byte counts wrap u64 are refused, not passed.
    #[test]
    fn ram_runs_whose_sums_wrap_are_refused() {
        for (gpa, pages) in [
            (0u64, u64::MAX / PAGE as u64),
            (0, (u64::MAX / PAGE as u64) - 1),
            (u64::MAX - PAGE as u64 + 1, 1),
        ] {
            let mut sec = Vec::new();
            sec.extend_from_slice(&1u32.to_le_bytes());
            sec.extend_from_slice(&gpa.to_le_bytes());
            sec.extend_from_slice(&pages.to_le_bytes());
            sec.resize(2 * PAGE, 0);
            let r = parse_ram(&sec, 0, sec.len(), 1);
            assert!(
                matches!(r, Err(SnapshotError::Corrupt { .. })),
                "{gpa:#x}+{pages}"
            );
        }
    }
}
