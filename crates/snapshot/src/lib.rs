//! Keel's snapshot stream: what a saved machine looks like on disk or on a pipe.
//!
//! A stream is a header (magic, format version, the Keel version that wrote it, the
//! machine's shape: type, vCPU count, RAM size, and the accelerator it ran under), then
//! typed sections (four-byte id, instance, layout version, length, CRC-32 of the payload),
//! then an end marker. Guest RAM is one section of runs of non-zero pages whose data starts
//! page aligned in the stream, so a saved file can be mapped back instead of copied; pages
//! that were never touched or hold only zeros are not written. The byte layout is in
//! `docs/SNAPSHOT.md`.
//!
//! This crate knows nothing of machines or backends: [`Writer`] writes sections it is
//! given, [`Snapshot::parse`] checks a whole stream (every checksum, the end marker, the RAM
//! table) before anything is handed out, [`Shape::check`] refuses a stream for another
//! machine, and [`codec`] is the little-endian encoding that states implement
//! ([`Persist`]); devices implement [`Stateful`] next to their own code. A restore decodes
//! every section it needs first and only then changes the machine, so a bad stream changes
//! nothing.

#![deny(missing_docs)]

pub mod codec;
pub mod crc;
mod stream;

pub use codec::{Dec, DecodeError, Enc, Persist, Stateful};
pub use stream::{
    FORMAT_VERSION, FRAME_LEN, Header, MAGIC, PAGE, RamRun, RamStats, Section, SectionId, Shape,
    Snapshot, Writer,
};

/// Result of the stream functions.
pub type SnapshotResult<T> = Result<T, SnapshotError>;

/// Why a stream could not be written or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The data does not start with Keel's magic.
    #[error("not a Keel snapshot stream (the magic 'KEELSNAP' is missing)")]
    NotASnapshot,
    /// The framing is of another version.
    #[error(
        "the stream is in snapshot format version {found}; this Keel reads version {supported} only"
    )]
    FormatVersion {
        /// Version in the stream.
        found: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// A section's layout is newer than this code (or zero).
    #[error(
        "section {section} has layout version {found}; this Keel reads up to version {supported}"
    )]
    SectionVersion {
        /// The section (id and instance).
        section: String,
        /// Version in the stream.
        found: u32,
        /// Newest version read here.
        supported: u32,
    },
    /// The stream ends early.
    #[error("the stream is truncated: it ends at byte {offset}, inside {what}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Where the data ended.
        offset: u64,
    },
    /// A checksum does not match: the data was changed or damaged.
    #[error("checksum mismatch in {what} (frame at byte {offset}): the stream is corrupted")]
    Checksum {
        /// Which part.
        what: String,
        /// Where its frame starts.
        offset: u64,
    },
    /// A part of the stream cannot be what a writer produced.
    #[error("{what} is corrupt: {reason}")]
    Corrupt {
        /// Which part.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A section the machine needs is not in the stream.
    #[error("section {section} is missing from the stream")]
    Missing {
        /// The section (id and instance).
        section: String,
    },
    /// A section's payload could not be decoded.
    #[error("section {section} cannot be read")]
    Section {
        /// The section (id and instance).
        section: String,
        /// The field that failed.
        #[source]
        source: DecodeError,
    },
    /// The stream was saved from a machine of another shape.
    #[error(
        "the stream was saved from a machine with {what} {saved}, this machine has {here}: \
         start it with the same -machine, -smp and -m"
    )]
    ShapeMismatch {
        /// Which property differs.
        what: &'static str,
        /// Its value in the stream.
        saved: String,
        /// Its value here.
        here: String,
    },
    /// Reading the stream failed.
    #[error("reading the snapshot stream failed")]
    Read(#[source] std::io::Error),
    /// Writing the stream failed.
    #[error("writing the snapshot stream failed")]
    Write(#[source] std::io::Error),
    /// Guest memory could not be read or written.
    #[error("guest memory access failed: {0}")]
    Memory(String),
    /// The guest saw a CPU this machine cannot present (the text names the model, the
    /// accelerators, the features and what to do).
    #[error("{0}")]
    Cpu(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MEM: u64 = 1 << 20;

    fn header() -> Header {
        Header {
            keel_version: "0.1.0".into(),
            shape: Shape {
                machine: "microvm".into(),
                vcpus: 1,
                memory: MEM,
            },
            accel: "tcg".into(),
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn stream() -> (Vec<u8>, GuestMemoryMmap) {
        let mem = memory();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[7u8; 5000], GuestAddress(0x1_0000))
            .unwrap();
        mem.write_slice(b"last", GuestAddress(MEM - 4)).unwrap();
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.section(SectionId(*b"VCPU"), 0, 1, b"registers").unwrap();
        let stats = w.ram(&mem).unwrap();
        assert_eq!(stats.pages_total, 256);
        assert_eq!(stats.pages_written, 4);
        assert_eq!(stats.runs, 3);
        w.section(SectionId(*b"SERI"), 0, 2, b"").unwrap();
        (w.finish().unwrap(), mem)
    }

    #[test]
    fn round_trip_is_sparse_aligned_and_exact() {
        let (bytes, saved) = stream();
        // 4 data pages plus the framing, never the 256 pages of RAM.
        assert!(bytes.len() < 7 * PAGE, "{} bytes", bytes.len());
        let s = Snapshot::parse(bytes).unwrap();
        assert_eq!(s.header, header());
        for r in s.ram_runs() {
            assert_eq!(r.offset % PAGE as u64, 0, "page data is aligned");
        }
        assert_eq!(s.required(SectionId(*b"VCPU"), 0, 1).unwrap(), b"registers");
        assert!(matches!(
            s.payload(SectionId(*b"SERI"), 0, 1),
            Err(SnapshotError::SectionVersion { found: 2, .. })
        ));
        assert!(matches!(
            s.required(SectionId(*b"VCPU"), 1, 1),
            Err(SnapshotError::Missing { .. })
        ));
        // Restoring over a machine whose RAM holds other data gives exactly the saved RAM.
        let target = memory();
        target
            .write_slice(b"kernel image", GuestAddress(0x8000))
            .unwrap();
        target.write_slice(b"junk", GuestAddress(0x1_0004)).unwrap();
        s.restore_ram(&target).unwrap();
        let mut a = vec![0u8; MEM as usize];
        let mut b = vec![0u8; MEM as usize];
        saved.read_slice(&mut a, GuestAddress(0)).unwrap();
        target.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "restored RAM differs from the saved RAM");
    }

    #[test]
    fn every_truncation_is_refused() {
        let (bytes, _) = stream();
        for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
            let e = Snapshot::parse(bytes[..cut].to_vec()).unwrap_err();
            assert!(
                matches!(e, SnapshotError::Truncated { .. }),
                "cut at {cut}: {e}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let (bytes, _) = stream();
        for at in (0..bytes.len()).step_by(13) {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(Snapshot::parse(b).is_err(), "flip at {at} was accepted");
        }
        let mut b = bytes.clone();
        let last_data = bytes.len() - FRAME_LEN - 1;
        b[last_data] ^= 1;
        assert!(matches!(
            Snapshot::parse(b),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    #[test]
    fn other_versions_and_shapes_are_refused() {
        let (mut bytes, _) = stream();
        bytes[8] = 2;
        let e = Snapshot::parse(bytes).unwrap_err();
        assert!(
            matches!(e, SnapshotError::FormatVersion { found: 2, .. }),
            "{e}"
        );
        assert!(matches!(
            Snapshot::parse(b"QEVM\0\0\0\x03 some other stream".to_vec()),
            Err(SnapshotError::NotASnapshot)
        ));
        let saved = header().shape;
        let here = Shape {
            vcpus: 2,
            ..saved.clone()
        };
        let e = saved.check(&here).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the stream was saved from a machine with vCPU count 1, this machine has 2: \
             start it with the same -machine, -smp and -m"
        );
        saved.check(&saved).unwrap();
    }

    /// RAM in two ranges, as `pc` has with 3.5 GiB or more (below 4 GiB and from 4 GiB on):
    /// both ranges are saved and restored by guest-physical address, the hole between them
    /// is never written, and a run in the hole is refused.
    #[test]
    fn ram_in_two_ranges_round_trips_and_the_hole_is_refused() {
        const HIGH: u64 = 1 << 32;
        let two = || {
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), MEM as usize),
                (GuestAddress(HIGH), MEM as usize),
            ])
            .unwrap()
        };
        let saved = two();
        saved.write_slice(b"low", GuestAddress(0x2000)).unwrap();
        saved.write_slice(&[9u8; 8192], GuestAddress(HIGH)).unwrap();
        saved
            .write_slice(b"top", GuestAddress(HIGH + MEM - 3))
            .unwrap();
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        let stats = w.ram(&saved).unwrap();
        assert_eq!(stats.pages_total, 512);
        assert_eq!(stats.pages_written, 4);
        assert_eq!(stats.runs, 3);
        let s = Snapshot::parse(w.finish().unwrap()).unwrap();
        let gpas: Vec<u64> = s.ram_runs().iter().map(|r| r.gpa).collect();
        assert_eq!(gpas, [0x2000, HIGH, HIGH + MEM - PAGE as u64]);
        let target = two();
        target
            .write_slice(b"junk", GuestAddress(HIGH + 0x5000))
            .unwrap();
        s.restore_ram(&target).unwrap();
        for base in [0, HIGH] {
            let mut a = vec![0u8; MEM as usize];
            let mut b = vec![0u8; MEM as usize];
            saved.read_slice(&mut a, GuestAddress(base)).unwrap();
            target.read_slice(&mut b, GuestAddress(base)).unwrap();
            assert!(a == b, "the range at {base:#x} differs after the restore");
        }
        // The same stream into a machine with the low range only: the high runs fall in
        // what is a hole there.
        let low = memory();
        assert!(matches!(
            s.check_ram(&low),
            Err(SnapshotError::Corrupt { .. })
        ));
    }

    #[test]
    fn ram_outside_the_machine_is_refused_before_any_write() {
        let (bytes, _) = stream();
        let s = Snapshot::parse(bytes).unwrap();
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (MEM / 2) as usize)]).unwrap();
        small.write_slice(b"untouched", GuestAddress(0)).unwrap();
        assert!(matches!(
            s.restore_ram(&small),
            Err(SnapshotError::Corrupt { .. })
        ));
        let mut b = [0u8; 9];
        small.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(&b, b"untouched");
    }
}
