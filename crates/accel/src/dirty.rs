//! Dirty-page tracking for live migration.
//!
//! While a machine is migrated live, its RAM is copied while the guest keeps running; the
//! pages written since the last copy are then copied again. Three writers change guest RAM
//! and each is tracked here:
//!
//! * the guest's own stores: a backend's [`DirtyLog`] ([`crate::Vm::start_dirty_log`]);
//!   KVM reads its kernel dirty log, the interpreter marks a [`DirtyBitmap`] on every store;
//! * device DMA (virtio back ends write request data and used rings into guest RAM): the
//!   device code calls [`mark`] with the memory it wrote, which reaches the bitmap that
//!   [`track_dma`] registered for that memory while a migration runs (nothing is recorded,
//!   and [`mark`] costs one atomic load, when none is registered).
//!
//! Bitmaps are indexed by page over the RAM regions in address order, the pages of each
//! region following those of the one before ([`DirtyBitmap::pages`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::{AccelError, GuestMemory};

/// Page size of the dirty log.
pub const DIRTY_PAGE: u64 = 4096;

/// One bit per guest RAM page, set concurrently by writers and taken by the migration.
#[derive(Debug)]
pub struct DirtyBitmap {
    /// `(guest-physical start, pages, index of the region's first page)`, by address.
    regions: Vec<(u64, u64, u64)>,
    words: Vec<AtomicU64>,
    active: AtomicBool,
    /// Host address of the first region, to find the bitmap of a memory ([`mark`]).
    host: usize,
}

impl DirtyBitmap {
    /// A bitmap over the RAM of `mem`, inactive (nothing is recorded until
    /// [`DirtyBitmap::set_active`]).
    pub fn new(mem: &GuestMemory) -> Self {
        let mut regions = Vec::new();
        let mut next = 0u64;
        let mut host = 0usize;
        let mut all: Vec<_> = mem.iter().collect();
        all.sort_by_key(|r| r.start_addr().0);
        for r in all {
            if host == 0 {
                host = r
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .map_or(0, |h| h as usize);
            }
            let pages = r.len().div_ceil(DIRTY_PAGE);
            regions.push((r.start_addr().0, pages, next));
            next += pages;
        }
        let words = (0..next.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self {
            regions,
            words,
            active: AtomicBool::new(false),
            host,
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.2 + r.1)
    }

    /// The guest-physical address of page `index` (see the module documentation).
    pub fn page_address(&self, index: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| index >= r.2 && index < r.2 + r.1)
            .map(|r| r.0 + (index - r.2) * DIRTY_PAGE)
    }

    /// Whether writes are being recorded.
    #[inline]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts or stops recording; starting clears what was recorded before.
    pub fn set_active(&self, on: bool) {
        if on {
            for w in &self.words {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.active.store(on, Ordering::SeqCst);
    }

    /// Records a write of `len` bytes at guest-physical `gpa` (addresses outside RAM are
    /// ignored). Call after the write, so a page taken after the mark holds the new bytes.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if !self.active() || len == 0 {
            return;
        }
        let last = gpa.saturating_add(len - 1);
        let mut page = gpa & !(DIRTY_PAGE - 1);
        while page <= last {
            self.mark_page(page);
            match page.checked_add(DIRTY_PAGE) {
                Some(p) => page = p,
                None => break,
            }
        }
    }

    #[inline]
    fn mark_page(&self, gpa: u64) {
        for &(start, pages, first) in &self.regions {
            if gpa >= start && (gpa - start) / DIRTY_PAGE < pages {
                let i = first + (gpa - start) / DIRTY_PAGE;
                let (w, bit) = ((i / 64) as usize, 1u64 << (i % 64));
                if let Some(word) = self.words.get(w)
                    && word.load(Ordering::Relaxed) & bit == 0
                {
                    word.fetch_or(bit, Ordering::Relaxed);
                }
                return;
            }
        }
    }

    /// ORs the recorded pages into `into` (one bit per page, [`DirtyBitmap::pages`] bits)
    /// and clears them.
    pub fn take_into(&self, into: &mut [u64]) {
        for (dst, w) in into.iter_mut().zip(&self.words) {
            *dst |= w.swap(0, Ordering::AcqRel);
        }
    }
}

/// A backend's record of the pages the guest wrote, started by
/// [`crate::Vm::start_dirty_log`] and read by the migration thread.
pub trait DirtyLog: Send + Sync {
    /// ORs the pages written since the last call (or since the start) into `into` (one bit
    /// per page over the RAM regions, as [`DirtyBitmap`]) and starts recording anew.
    fn collect(&self, into: &mut [u64]) -> Result<(), AccelError>;
    /// Stops recording (a migration ended); also done when the log is dropped.
    fn stop(&self);
}

/// Bitmaps of memories whose device writes are recorded, found by the host address of the
/// memory's first region.
static DMA: Mutex<Vec<Weak<DirtyBitmap>>> = Mutex::new(Vec::new());
/// How many bitmaps [`DMA`] holds, read without its lock by [`mark`].
static DMA_ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Records device writes to `mem` while it lives (a migration runs); dropping it stops.
#[derive(Debug)]
pub struct DmaTracker {
    bitmap: Arc<DirtyBitmap>,
}

impl DmaTracker {
    /// The bitmap the device writes go to.
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }
}

impl Drop for DmaTracker {
    fn drop(&mut self) {
        self.bitmap.set_active(false);
        let mut list = DMA.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.upgrade().is_some_and(|b| !Arc::ptr_eq(&b, &self.bitmap)));
        DMA_ACTIVE.store(list.len(), Ordering::SeqCst);
    }
}

/// Starts recording the writes devices make to `mem` (through [`mark`]).
pub fn track_dma(mem: &GuestMemory) -> DmaTracker {
    let bitmap = Arc::new(DirtyBitmap::new(mem));
    bitmap.set_active(true);
    let mut list = DMA.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|w| w.strong_count() > 0);
    list.push(Arc::downgrade(&bitmap));
    DMA_ACTIVE.store(list.len(), Ordering::SeqCst);
    DmaTracker { bitmap }
}

/// A device wrote `len` bytes of `mem` at guest-physical `gpa` (virtio request data, a used
/// ring): recorded if a migration tracks `mem` ([`track_dma`]). Call after the write.
#[inline]
pub fn mark(mem: &GuestMemory, gpa: u64, len: u64) {
    if DMA_ACTIVE.load(Ordering::Relaxed) == 0 {
        return;
    }
    mark_slow(mem, gpa, len);
}

#[cold]
fn mark_slow(mem: &GuestMemory, gpa: u64, len: u64) {
    let Some(first) = mem.iter().min_by_key(|r| r.start_addr().0) else {
        return;
    };
    let host = first
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_or(0, |h| h as usize);
    let list = DMA.lock().unwrap_or_else(|p| p.into_inner());
    for b in list.iter().filter_map(Weak::upgrade) {
        if b.host == host {
            b.mark(gpa, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x1_0000_0000), 0x2000),
        ])
        .unwrap()
    }

    fn taken(b: &DirtyBitmap) -> Vec<u64> {
        let mut v = vec![0u64; b.pages().div_ceil(64) as usize];
        b.take_into(&mut v);
        (0..b.pages())
            .filter(|i| v[(*i / 64) as usize] & (1 << (i % 64)) != 0)
            .filter_map(|i| b.page_address(i))
            .collect()
    }

    #[test]
    fn marks_pages_of_both_regions_only_while_active() {
        let m = mem();
        let b = DirtyBitmap::new(&m);
        assert_eq!(b.pages(), 18);
        b.mark(0x1000, 1);
        assert!(taken(&b).is_empty());
        b.set_active(true);
        b.mark(0x1fff, 2);
        b.mark(0x1_0000_1000, 8);
        b.mark(0x5_0000_0000, 8);
        assert_eq!(taken(&b), vec![0x1000, 0x2000, 0x1_0000_1000]);
        assert!(taken(&b).is_empty(), "taking clears");
    }

    #[test]
    fn device_writes_reach_the_tracker_of_their_memory_only() {
        let m = mem();
        let other = mem();
        mark(&m, 0x3000, 1);
        let t = track_dma(&m);
        mark(&m, 0x3000, 1);
        mark(&other, 0x4000, 1);
        assert_eq!(taken(t.bitmap()), vec![0x3000]);
        drop(t);
        mark(&m, 0x3000, 1);
    }
}
