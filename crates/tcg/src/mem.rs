//! Guest memory access: RAM as host pointers, the page walker, the software TLB, MMIO fallback.
//!
//! Every guest data access goes through a direct-mapped TLB indexed by linear page. A hit
//! on RAM is one compare plus an unaligned host load or store. Misses walk the guest page
//! tables (setting Accessed/Dirty bits as hardware does) and refill the entry. Pages that
//! hold translated code never enter the write TLB, so every write to them takes the slow
//! path, which records the page for decode-cache invalidation (self-modifying code).
//! Addresses outside RAM go to the machine's MMIO bus inline, and are never cached.

use std::sync::Arc;

use keel_accel::{GuestMemory, IoBuses, MmioAddress};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::regs::{cr0, cr4, efer};

/// Page size.
pub(crate) const PAGE: u64 = 4096;
/// Mask of a page's base address.
pub(crate) const PAGE_MASK: u64 = !(PAGE - 1);
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const TLB_SIZE: usize = 256;

#[derive(Debug, Clone)]
struct Region {
    start: u64,
    end: u64,
    host: usize,
    /// One byte per page: non-zero when translated code lives there.
    code: Vec<u8>,
}

/// The largest device access size (8, 4, 2 or 1) that fits in `left` bytes.
fn mmio_chunk(left: usize) -> usize {
    match left {
        8.. => 8,
        4..=7 => 4,
        2..=3 => 2,
        _ => 1,
    }
}

/// Guest-physical memory: RAM regions as host addresses, everything else through the MMIO bus.
#[derive(Debug)]
pub struct PhysMem {
    regions: Vec<Region>,
    /// Keeps the mappings behind `regions` alive.
    _mem: Arc<GuestMemory>,
    /// Devices for non-RAM accesses.
    pub buses: Arc<IoBuses>,
}

impl PhysMem {
    /// Captures the RAM layout of `mem` (regions must not change while the VM runs).
    pub fn new(mem: Arc<GuestMemory>, buses: Arc<IoBuses>) -> Self {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let start = r.start_addr().0;
            let len = r.len();
            if let Ok(host) = mem.get_host_address(GuestAddress(start)) {
                regions.push(Region {
                    start,
                    end: start + len,
                    host: host as usize,
                    code: vec![0; len.div_ceil(PAGE) as usize],
                });
            }
        }
        regions.sort_by_key(|r| r.start);
        Self {
            regions,
            _mem: mem,
            buses,
        }
    }

    /// The same memory and buses with no code pages marked (for a CPU reset).
    pub fn fresh(&self) -> Self {
        Self::new(self._mem.clone(), self.buses.clone())
    }

    #[inline]
    fn region(&self, gpa: u64) -> Option<usize> {
        // Few regions (one or two): linear scan beats anything fancier.
        self.regions
            .iter()
            .position(|r| gpa >= r.start && gpa < r.end)
    }

    /// Host address of RAM at `gpa`, valid for the rest of that page; `None` outside RAM.
    #[inline]
    pub fn host(&self, gpa: u64) -> Option<usize> {
        let r = &self.regions[self.region(gpa)?];
        Some(r.host + (gpa - r.start) as usize)
    }

    /// Whether translated code lives in the page of `gpa`.
    #[inline]
    pub fn is_code(&self, gpa: u64) -> bool {
        match self.region(gpa) {
            Some(i) => {
                let r = &self.regions[i];
                r.code[((gpa - r.start) / PAGE) as usize] != 0
            }
            None => false,
        }
    }

    /// Marks or clears the code flag of the page of `gpa`.
    pub fn set_code(&mut self, gpa: u64, on: bool) {
        if let Some(i) = self.region(gpa) {
            let r = &mut self.regions[i];
            r.code[((gpa - r.start) / PAGE) as usize] = u8::from(on);
        }
    }

    /// Clears every code flag (after a full decode-cache flush).
    pub fn clear_code(&mut self) {
        for r in &mut self.regions {
            r.code.fill(0);
        }
    }

    /// Reads `buf.len()` bytes at `gpa` (RAM or MMIO); must not cross a page.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        match self.host(gpa) {
            // SAFETY: `host` points into a live mapping of at least the rest of the page,
            // the caller keeps the access within one page, and `buf` does not alias guest RAM.
            Some(h) => unsafe {
                std::ptr::copy_nonoverlapping(h as *const u8, buf.as_mut_ptr(), buf.len())
            },
            None => {
                // Devices take accesses of 1, 2, 4 or 8 bytes: split wider ones.
                let mut off = 0;
                while off < buf.len() {
                    let n = mmio_chunk(buf.len() - off);
                    self.buses.mmio_read(
                        MmioAddress(gpa.wrapping_add(off as u64)),
                        &mut buf[off..off + n],
                    );
                    off += n;
                }
            }
        }
    }

    /// Writes `buf` at `gpa` (RAM or MMIO); must not cross a page. Does not handle code pages.
    pub fn write(&self, gpa: u64, buf: &[u8]) {
        match self.host(gpa) {
            // SAFETY: as in `read`; the mapping is writable guest RAM.
            Some(h) => unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr(), h as *mut u8, buf.len())
            },
            None => {
                let mut off = 0;
                while off < buf.len() {
                    let n = mmio_chunk(buf.len() - off);
                    self.buses.mmio_write(
                        MmioAddress(gpa.wrapping_add(off as u64)),
                        &buf[off..off + n],
                    );
                    off += n;
                }
            }
        }
    }

    /// Reads a little-endian u64 (page-table entries, descriptors).
    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b);
        u64::from_le_bytes(b)
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b);
        u32::from_le_bytes(b)
    }
}

/// Kind of access, for permission checks and TLB selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Access {
    /// Data read.
    Read = 0,
    /// Data write.
    Write = 1,
    /// Instruction fetch.
    Fetch = 2,
}

#[derive(Debug, Clone, Copy)]
struct TlbEntry {
    /// Linear page | user bit; `u64::MAX` when empty.
    tag: u64,
    /// host - linear, to add to a linear address.
    addend: usize,
    /// Guest-physical page.
    gpa: u64,
}

const EMPTY: TlbEntry = TlbEntry {
    tag: u64::MAX,
    addend: 0,
    gpa: 0,
};

/// Paging structure in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// CR0.PG clear: linear = physical.
    Off,
    /// 32-bit 2-level paging.
    Legacy,
    /// PAE 3-level paging.
    Pae,
    /// 4-level paging (long mode).
    Long4,
}

/// The MMU: TLBs plus the paging configuration they were filled under.
#[derive(Debug)]
pub struct Mmu {
    /// Physical memory.
    pub phys: PhysMem,
    /// Accesses are user-mode (CPL 3).
    pub user: bool,
    tlb: Box<[[TlbEntry; TLB_SIZE]; 3]>,
    /// Paging structure.
    pub paging: Paging,
    cr3: u64,
    wp: bool,
    nxe: bool,
    pse: bool,
    large_seen: bool,
}

impl Mmu {
    /// An MMU with paging off.
    pub fn new(phys: PhysMem) -> Self {
        Self {
            phys,
            user: false,
            tlb: Box::new([[EMPTY; TLB_SIZE]; 3]),
            paging: Paging::Off,
            cr3: 0,
            wp: false,
            nxe: false,
            pse: false,
            large_seen: false,
        }
    }

    /// Drops every TLB entry.
    pub fn flush(&mut self) {
        for t in self.tlb.iter_mut() {
            t.fill(EMPTY);
        }
        self.large_seen = false;
    }

    /// Drops entries for the linear page of `lin` (INVLPG).
    pub fn flush_page(&mut self, lin: u64) {
        if self.large_seen {
            self.flush();
            return;
        }
        let i = ((lin >> 12) as usize) & (TLB_SIZE - 1);
        for t in self.tlb.iter_mut() {
            if t[i].tag & PAGE_MASK == lin & PAGE_MASK {
                t[i] = EMPTY;
            }
        }
    }

    /// Drops write entries that map guest-physical page `gpa` (it now holds code).
    pub fn flush_write_gpa(&mut self, gpa: u64) {
        let p = gpa & PAGE_MASK;
        for e in self.tlb[Access::Write as usize].iter_mut() {
            if e.tag != u64::MAX && e.gpa == p {
                *e = EMPTY;
            }
        }
    }

    /// Takes the paging configuration from control registers; flushes when it changed.
    pub fn configure(&mut self, cr0v: u64, cr3v: u64, cr4v: u64, eferv: u64) {
        let paging = if cr0v & cr0::PG == 0 || cr0v & cr0::PE == 0 {
            Paging::Off
        } else if eferv & efer::LMA != 0 {
            Paging::Long4
        } else if cr4v & cr4::PAE != 0 {
            Paging::Pae
        } else {
            Paging::Legacy
        };
        self.paging = paging;
        self.cr3 = cr3v;
        self.wp = cr0v & cr0::WP != 0;
        self.nxe = eferv & efer::NXE != 0;
        self.pse = cr4v & cr4::PSE != 0;
        self.flush();
    }

    /// TLB lookup: host address for `lin` if the page is cached for this access.
    #[inline(always)]
    pub fn lookup(&self, lin: u64, acc: Access, user: bool) -> Option<usize> {
        let e = &self.tlb[acc as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        if e.tag == (lin & PAGE_MASK) | u64::from(user) {
            Some(e.addend.wrapping_add(lin as usize))
        } else {
            None
        }
    }

    /// TLB lookup returning the guest-physical address.
    #[inline(always)]
    pub fn lookup_gpa(&self, lin: u64, acc: Access, user: bool) -> Option<u64> {
        let e = &self.tlb[acc as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        if e.tag == (lin & PAGE_MASK) | u64::from(user) {
            Some(e.gpa | (lin & 0xfff))
        } else {
            None
        }
    }

    fn fill(&mut self, lin: u64, acc: Access, user: bool, gpa: u64) {
        let Some(host) = self.phys.host(gpa & PAGE_MASK) else {
            return;
        };
        if acc == Access::Write && self.phys.is_code(gpa) {
            return;
        }
        let page = lin & PAGE_MASK;
        self.tlb[acc as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)] = TlbEntry {
            tag: page | u64::from(user),
            addend: host.wrapping_sub(page as usize),
            gpa: gpa & PAGE_MASK,
        };
    }

    /// Translates `lin`, filling the TLB; `Err` carries the #PF error code (or #GP for a
    /// non-canonical address, as `u32::MAX`).
    pub fn translate(&mut self, lin: u64, acc: Access, user: bool) -> Result<u64, u32> {
        let gpa = match self.paging {
            Paging::Off => lin & 0xffff_ffff,
            _ => self.walk(lin, acc, user)?,
        };
        self.fill(lin, acc, user, gpa);
        Ok(gpa)
    }

    fn walk(&mut self, lin: u64, acc: Access, user: bool) -> Result<u64, u32> {
        let write = acc == Access::Write;
        let fetch = acc == Access::Fetch;
        let mut err = u32::from(write) << 1 | u32::from(user) << 2;
        if fetch && self.nxe && self.paging != Paging::Legacy {
            err |= 1 << 4;
        }
        let mut rw = true;
        let mut us = true;
        let mut nx = false;
        // (entry address, entry value) of every level used, to set A (and D on the last).
        let mut used: [(u64, u64, bool); 4] = [(0, 0, false); 4];
        let mut n = 0usize;
        let (gpa, large) = match self.paging {
            Paging::Off => return Ok(lin),
            Paging::Legacy => {
                let pde_a = (self.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4;
                let pde = u64::from(self.phys.read_u32(pde_a));
                if pde & 1 == 0 {
                    return Err(err);
                }
                rw &= pde & 2 != 0;
                us &= pde & 4 != 0;
                used[n] = (pde_a, pde, false);
                n += 1;
                if pde & 0x80 != 0 && self.pse {
                    let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
                    (base | (lin & 0x3f_ffff), true)
                } else {
                    let pte_a = (pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4;
                    let pte = u64::from(self.phys.read_u32(pte_a));
                    if pte & 1 == 0 {
                        self.set_accessed(&used[..n], false, 4);
                        return Err(err);
                    }
                    rw &= pte & 2 != 0;
                    us &= pte & 4 != 0;
                    used[n] = (pte_a, pte, true);
                    n += 1;
                    ((pte & 0xffff_f000) | (lin & 0xfff), false)
                }
            }
            Paging::Pae | Paging::Long4 => {
                let long = self.paging == Paging::Long4;
                if long {
                    let top = (lin as i64) >> 47;
                    if top != 0 && top != -1 {
                        return Err(u32::MAX);
                    }
                }
                let mut table;
                let mut level;
                if long {
                    table = self.cr3 & PTE_ADDR;
                    level = 4;
                } else {
                    let pdpte_a = (self.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
                    let pdpte = self.phys.read_u64(pdpte_a);
                    if pdpte & 1 == 0 {
                        return Err(err);
                    }
                    table = pdpte & PTE_ADDR;
                    level = 2;
                }
                loop {
                    let shift = 12 + 9 * (level - 1);
                    let ea = table + ((lin >> shift) & 0x1ff) * 8;
                    let e = self.phys.read_u64(ea);
                    if e & 1 == 0 {
                        self.set_accessed(&used[..n], false, 8);
                        return Err(err);
                    }
                    rw &= e & 2 != 0;
                    us &= e & 4 != 0;
                    nx |= e & (1 << 63) != 0;
                    let leaf = level == 1 || (e & 0x80 != 0 && (level == 2 || level == 3));
                    used[n] = (ea, e, leaf);
                    n += 1;
                    if leaf {
                        let off_mask = (1u64 << shift) - 1;
                        break ((e & PTE_ADDR & !off_mask) | (lin & off_mask), level > 1);
                    }
                    table = e & PTE_ADDR;
                    level -= 1;
                }
            }
        };
        let esize = if self.paging == Paging::Legacy { 4 } else { 8 };
        // Permission checks.
        let denied = if user {
            !us || (write && !rw)
        } else {
            write && !rw && self.wp
        } || (fetch && nx && self.nxe);
        if denied {
            self.set_accessed(&used[..n], false, esize);
            return Err(err | 1);
        }
        self.set_accessed(&used[..n], write, esize);
        if large {
            self.large_seen = true;
        }
        Ok(gpa)
    }

    fn set_accessed(&self, used: &[(u64, u64, bool)], write: bool, esize: u64) {
        for &(a, e, leaf) in used {
            let mut ne = e | 0x20;
            if leaf && write {
                ne |= 0x40;
            }
            if ne != e {
                let bytes = ne.to_le_bytes();
                self.phys.write(a, &bytes[..esize as usize]);
            }
        }
    }
}
