//! Validation of guest descriptor chains before a device touches their buffers.
//!
//! virtio-queue's chain iterator bounds the walk (at most queue-size descriptors, one
//! level of indirection) but ends *silently* on a loop, a `next` index out of range, an
//! unreadable descriptor or a length overflow. A chain that ended that way still has
//! `NEXT` set on its last descriptor, which is how [`parse`] tells a truncated chain from
//! a complete one. Every buffer is then checked against guest memory, and the
//! readable-before-writable order the spec requires is enforced.

use keel_accel::GuestMemory;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Most descriptors accepted in one chain (direct or indirect). Linux uses at most
/// `seg_max + 2` for block and a few for the other devices.
pub(crate) const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    /// The head index is out of range or its descriptor (or indirect table) is unusable.
    #[error("empty or unreadable descriptor chain")]
    Empty,
    /// The walk stopped on a loop, a bad `next` index, an unreadable descriptor,
    /// a nested indirect table or a length overflow.
    #[error("descriptor chain loops or is cut short")]
    Truncated,
    /// More descriptors than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong,
    /// A buffer is not entirely inside guest RAM.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Guest-physical start.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
}

/// One guest buffer, known to lie inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
}

/// A validated chain: its head and its readable then writable buffers.
#[derive(Debug, Clone, Default)]
pub(crate) struct ParsedChain {
    pub(crate) readable: Vec<Segment>,
    pub(crate) writable: Vec<Segment>,
}

impl ParsedChain {
    /// Total bytes the device may read.
    pub(crate) fn readable_len(&self) -> u64 {
        total(&self.readable)
    }
    /// Total bytes the device may write.
    pub(crate) fn writable_len(&self) -> u64 {
        total(&self.writable)
    }
}

/// Sum of segment lengths.
pub(crate) fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Walks and validates one chain.
pub(crate) fn parse(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<ParsedChain, ChainError> {
    let mut parsed = ParsedChain::default();
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        last_has_next = desc.has_next();
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if seg.len != 0 {
            let len = usize::try_from(seg.len).map_err(|_| ChainError::OutOfMemory {
                addr: seg.addr.0,
                len: seg.len,
            })?;
            if !GuestMemoryBackend::check_range(mem, seg.addr, len) {
                return Err(ChainError::OutOfMemory {
                    addr: seg.addr.0,
                    len: seg.len,
                });
            }
        }
        if desc.is_write_only() {
            parsed.writable.push(seg);
        } else {
            if !parsed.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            }
            parsed.readable.push(seg);
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(parsed)
}

/// The guest ranges covering bytes `[start, start + len)` of a segment list, in order.
/// Stops early if the list is shorter.
pub(crate) fn ranges(
    segs: &[Segment],
    start: u64,
    len: u64,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut skip = start;
    let mut left = len;
    segs.iter().filter_map(move |s| {
        let seg_len = u64::from(s.len);
        if left == 0 {
            return None;
        }
        if skip >= seg_len {
            skip -= seg_len;
            return None;
        }
        let off = skip;
        skip = 0;
        let n = (seg_len - off).min(left);
        left -= n;
        // `off < seg_len <= u32::MAX`, and the segment was checked to lie in guest memory.
        Some((GuestAddress(s.addr.0.wrapping_add(off)), n as usize))
    })
}

/// Copies bytes `[start, start + out.len())` of the segments into `out`; returns how many.
pub(crate) fn read_bytes(mem: &GuestMemory, segs: &[Segment], start: u64, out: &mut [u8]) -> usize {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for (addr, n) in ranges(segs, start, out.len() as u64) {
        if mem.read_slice(&mut out[done..done + n], addr).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// Copies `data` into the segments starting at byte `start`; returns how many bytes fit.
pub(crate) fn write_bytes(mem: &GuestMemory, segs: &[Segment], start: u64, data: &[u8]) -> usize {
    use vm_memory::Bytes;
    let mut done = 0usize;
    for (addr, n) in ranges(segs, start, data.len() as u64) {
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            break;
        }
        keel_accel::dirty::mark(mem, addr.0, n as u64);
        done += n;
    }
    done
}
