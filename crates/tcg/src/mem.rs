//! Guest memory access: RAM as host pointers, the page walker, the software TLB, MMIO fallback.
//!
//! Every guest data access goes through a direct-mapped TLB indexed by linear page. A hit
//! on RAM is one compare plus an unaligned host load or store. Misses walk the guest page
//! tables (setting Accessed/Dirty bits as hardware does) and refill the entry. Pages that
//! hold translated code never enter the write TLB, so every write to them takes the slow
//! path, which records the page for decode-cache invalidation (self-modifying code).
//! Addresses outside RAM go to the machine's MMIO bus inline, and are never cached.

use std::sync::Arc;

use keel_accel::dirty::DirtyBitmap;
use keel_accel::{GuestMemory, IoBuses, MmioAddress};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::cpuid::MAXPHYADDR;
use crate::regs::{cr0, cr4, efer};

/// Page size.
pub(crate) const PAGE: u64 = 4096;
/// Mask of a page's base address.
pub(crate) const PAGE_MASK: u64 = !(PAGE - 1);
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
pub(crate) const TLB_SIZE: usize = 256;

/// #PF error code bits.
pub mod pf {
    /// The entry was present (a protection or reserved-bit fault).
    pub const P: u32 = 1 << 0;
    /// The access was a write.
    pub const W: u32 = 1 << 1;
    /// The access was a user-mode (CPL 3) access.
    pub const U: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch (reported with EFER.NXE in PAE/4-level paging).
    pub const ID: u32 = 1 << 4;
}

/// Address bits from MAXPHYADDR to 51: reserved in every PAE and 4-level entry.
const HIGH_RSVD: u64 = ((1u64 << 52) - 1) & !((1u64 << MAXPHYADDR) - 1);
/// The execute-disable bit (reserved while EFER.NXE is clear).
const XD: u64 = 1 << 63;
/// Reserved bits of a PAE PDPTE besides [`HIGH_RSVD`]: 2:1, 8:5 and 63 (no NX there).
const PDPTE_RSVD: u64 = HIGH_RSVD | 0x1e6 | XD;

/// Reserved bits of a present PAE/4-level entry at `level` (4 = PML4E .. 1 = PTE) with PS
/// bit `ps` (a large page at levels 3 and 2; reserved at level 4).
pub(crate) fn rsvd_bits(level: u32, ps: bool, nxe: bool) -> u64 {
    let base = HIGH_RSVD | if nxe { 0 } else { XD };
    match (level, ps) {
        (4, _) => base | 0x80,
        // 1 GiB page: bits 29:13 (the PAT bit is 12).
        (3, true) => base | 0x3fff_e000,
        // 2 MiB page: bits 20:13.
        (2, true) => base | 0x1f_e000,
        _ => base,
    }
}

/// Reserved bits of a 2-level 4 MiB PDE (with CR4.PSE): bit 21; bits 20:13 carry physical
/// address bits 39:32, all below MAXPHYADDR.
const PDE4M_RSVD: u64 = 1 << 21;

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
    /// Where guest writes to RAM are recorded during a live migration.
    dirty: Option<Arc<DirtyBitmap>>,
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
            dirty: None,
        }
    }

    /// Records RAM writes in `dirty` whenever it is active.
    pub fn with_dirty(mut self, dirty: Arc<DirtyBitmap>) -> Self {
        self.dirty = Some(dirty);
        self
    }

    /// Whether RAM writes are being recorded (a live migration runs).
    #[inline(always)]
    pub fn logging(&self) -> bool {
        self.dirty.as_ref().is_some_and(|d| d.active())
    }

    /// Records a write of `len` bytes at `gpa` in the dirty log, if one is active.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if let Some(d) = &self.dirty {
            d.mark(gpa, len);
        }
    }

    /// The same memory and buses with no code pages marked (for a CPU reset).
    pub fn fresh(&self) -> Self {
        let mut p = Self::new(self._mem.clone(), self.buses.clone());
        p.dirty = self.dirty.clone();
        p
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
            Some(h) => {
                // SAFETY: as in `read`; the mapping is writable guest RAM.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), h as *mut u8, buf.len()) };
                self.mark(gpa, buf.len() as u64);
            }
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

/// One TLB entry. `repr(C)`: the compiled code of `jit` reads `tag` at offset 0 and
/// `addend` at offset 8 of a 24-byte entry.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
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
    /// The four PAE PDPTEs, loaded when the paging configuration was taken (as the CPU
    /// loads them on a CR3 write).
    pdpte: [u64; 4],
    /// Data accesses never enter the TLB (a data breakpoint is armed): every one takes the
    /// slow path, where it is compared with the breakpoints.
    pub no_data_tlb: bool,
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
            pdpte: [0; 4],
            no_data_tlb: false,
        }
    }

    /// The four PDPTEs PAE paging would load from `cr3`, or `None` when a present one has
    /// a reserved bit set (the CR3, CR0 or CR4 write that loads them raises #GP).
    pub fn load_pdptes(&self, cr3v: u64) -> Option<[u64; 4]> {
        let mut p = [0u64; 4];
        for (i, e) in p.iter_mut().enumerate() {
            *e = self.phys.read_u64((cr3v & 0xffff_ffe0) + 8 * i as u64);
            if *e & 1 != 0 && *e & PDPTE_RSVD != 0 {
                return None;
            }
        }
        Some(p)
    }

    /// Keeps data accesses out of the TLB (`on`: a data breakpoint is armed) or lets them
    /// in again; drops every entry when that changes.
    pub fn set_no_data_tlb(&mut self, on: bool) {
        if self.no_data_tlb != on {
            self.no_data_tlb = on;
            self.flush();
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
        if paging == Paging::Pae {
            // Loaded as they are; a reserved bit found here (state set from outside, not by
            // a checked CR write) faults at walk time.
            self.pdpte =
                std::array::from_fn(|i| self.phys.read_u64((cr3v & 0xffff_ffe0) + 8 * i as u64));
        }
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

    /// Address of the first entry of the `acc` TLB: `TLB_SIZE` entries of 24 bytes each,
    /// `tag` (linear page | user bit) at offset 0 and `addend` (host - linear) at offset 8.
    /// The compiled code of `jit` looks entries up there itself.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn tlb_base(&self, acc: Access) -> *const u8 {
        const _: () = assert!(std::mem::size_of::<TlbEntry>() == 24);
        self.tlb[acc as usize].as_ptr().cast()
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
        if self.no_data_tlb && acc != Access::Fetch {
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
        let mut err = (u32::from(write) * pf::W) | (u32::from(user) * pf::U);
        if fetch && self.nxe && self.paging != Paging::Legacy {
            err |= pf::ID;
        }
        let rsvd = err | pf::P | pf::RSVD;
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
                let large = pde & 0x80 != 0 && self.pse;
                if large && pde & PDE4M_RSVD != 0 {
                    return Err(rsvd);
                }
                rw &= pde & 2 != 0;
                us &= pde & 4 != 0;
                used[n] = (pde_a, pde, large);
                n += 1;
                if large {
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
                    let pdpte = self.pdpte[((lin >> 30) & 3) as usize];
                    if pdpte & 1 == 0 {
                        return Err(err);
                    }
                    if pdpte & PDPTE_RSVD != 0 {
                        return Err(rsvd);
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
                    let ps = e & 0x80 != 0;
                    if e & rsvd_bits(level, ps, self.nxe) != 0 {
                        return Err(rsvd);
                    }
                    rw &= e & 2 != 0;
                    us &= e & 4 != 0;
                    nx |= e & XD != 0;
                    let leaf = level == 1 || (ps && (level == 2 || level == 3));
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
            return Err(err | pf::P);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::Bytes as _;

    /// The small model: per case, the paging structures (entries written into RAM), the
    /// control bits, the access, and what the walk must give.
    struct Case {
        name: &'static str,
        paging: Paging,
        nxe: bool,
        pse: bool,
        /// (guest-physical address, entry) written before the walk.
        entries: &'static [(u64, u64)],
        acc: Access,
        user: bool,
        /// `Ok(gpa)` or `Err(#PF error code)`.
        want: Result<u64, u32>,
    }

    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const PS: u64 = 0x80;
    const OK: u64 = P | RW | US;
    const LIN: u64 = 0x40_1234;

    // 4-level: CR3 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x5000, for LIN
    // (PML4E 0, PDPTE 0, PDE 2, PTE 1).
    const L4: [(u64, u64); 4] = [
        (0x1000, 0x2000 | OK),
        (0x2000, 0x3000 | OK),
        (0x3000 + 2 * 8, 0x4000 | OK),
        (0x4000 + 8, 0x5000 | OK),
    ];

    const PDE2M: [(u64, u64); 3] = [L4[0], L4[1], (0x3010, 0x20_0000 | PS | OK)];
    const PDE2M_13: [(u64, u64); 3] = [L4[0], L4[1], (0x3010, 0x20_2000 | PS | OK)];
    const PDE2M_20: [(u64, u64); 3] = [L4[0], L4[1], (0x3010, 0x30_0000 | PS | OK)];
    const PDPTE1G: [(u64, u64); 2] = [L4[0], (0x2000, PS | OK)];
    const PDPTE1G_29: [(u64, u64); 2] = [L4[0], (0x2000, 0x2000_0000 | PS | OK)];

    macro_rules! l4 {
        ($i:expr, $or:expr) => {{
            const E: [(u64, u64); 4] = {
                let mut e = L4;
                e[$i].1 |= $or;
                e
            };
            &E
        }};
    }

    fn cases() -> Vec<Case> {
        use Access::{Fetch, Read, Write};
        let c = |name, paging, nxe, entries, acc, user, want| Case {
            name,
            paging,
            nxe,
            pse: true,
            entries,
            acc,
            user,
            want,
        };
        let rsvd = pf::P | pf::RSVD;
        let l = Paging::Long4;
        vec![
            c("4l ok", l, false, &L4, Read, true, Ok(0x5234)),
            c(
                "4l pml4e bit51",
                l,
                false,
                l4!(0, 1 << 51),
                Read,
                false,
                Err(rsvd),
            ),
            c(
                "4l pdpte maxphy",
                l,
                false,
                l4!(1, 1 << 40),
                Write,
                false,
                Err(rsvd | pf::W),
            ),
            c(
                "4l pde bit 45",
                l,
                false,
                l4!(2, 1 << 45),
                Read,
                true,
                Err(rsvd | pf::U),
            ),
            c(
                "4l pte bit39 ok",
                l,
                false,
                l4!(3, 1 << 39),
                Read,
                false,
                Ok((1 << 39) | 0x5234),
            ),
            c(
                "4l pte xd !nxe",
                l,
                false,
                l4!(3, 1 << 63),
                Write,
                true,
                Err(rsvd | pf::W | pf::U),
            ),
            c(
                "4l pte xd nxe read",
                l,
                true,
                l4!(3, 1 << 63),
                Read,
                false,
                Ok(0x5234),
            ),
            c(
                "4l pte xd nxe fetch",
                l,
                true,
                l4!(3, 1 << 63),
                Fetch,
                false,
                Err(pf::P | pf::ID),
            ),
            c("4l pml4e ps", l, false, l4!(0, PS), Read, false, Err(rsvd)),
            c(
                "4l pml4e xd !nxe fetch",
                l,
                false,
                l4!(0, 1 << 63),
                Fetch,
                false,
                Err(rsvd),
            ),
            c(
                "4l pml4e xd nxe fetch",
                l,
                true,
                l4!(0, 1 << 63),
                Fetch,
                true,
                Err(pf::P | pf::U | pf::ID),
            ),
            c("4l pde 2m", l, false, &PDE2M, Read, false, Ok(0x20_1234)),
            c(
                "4l pde 2m bit13",
                l,
                false,
                &PDE2M_13,
                Read,
                false,
                Err(rsvd),
            ),
            c(
                "4l pde 2m bit20",
                l,
                false,
                &PDE2M_20,
                Read,
                false,
                Err(rsvd),
            ),
            c(
                "4l pdpte 1g bit29",
                l,
                false,
                &PDPTE1G_29,
                Read,
                false,
                Err(rsvd),
            ),
            c("4l pdpte 1g ok", l, false, &PDPTE1G, Read, false, Ok(LIN)),
            c(
                "4l user on supervisor",
                l,
                false,
                &[
                    (0x1000, 0x2000 | P | RW),
                    (0x2000, 0x3000 | OK),
                    (0x3000 + 16, 0x4000 | OK),
                    (0x4008, 0x5000 | OK),
                ],
                Read,
                true,
                Err(pf::P | pf::U),
            ),
            c(
                "4l np wins over rsvd",
                l,
                false,
                &[
                    (0x1000, 0x2000 | OK),
                    (0x2000, 0x3000 | OK),
                    (0x3000 + 16, 0x4000 | OK),
                    (0x4008, (1 << 51) | RW),
                ],
                Write,
                true,
                Err(pf::W | pf::U),
            ),
            c(
                "4l np fetch nxe",
                l,
                true,
                &[(0x1000, 0)],
                Fetch,
                false,
                Err(pf::ID),
            ),
            c(
                "4l np fetch !nxe",
                l,
                false,
                &[(0x1000, 0)],
                Fetch,
                false,
                Err(0),
            ),
            c(
                "4l ro write user",
                l,
                false,
                &[
                    (0x1000, 0x2000 | OK),
                    (0x2000, 0x3000 | OK),
                    (0x3000 + 16, 0x4000 | OK),
                    (0x4008, 0x5000 | P | US),
                ],
                Write,
                true,
                Err(pf::P | pf::W | pf::U),
            ),
            // 2-level: PD at CR3 0x1000, PDE 1 -> PT 0x4000, PTE 1 -> 0x5000.
            c(
                "2l ok",
                Paging::Legacy,
                false,
                &[(0x1004, 0x4000 | OK), (0x4004, 0x5000 | OK)],
                Read,
                true,
                Ok(0x5234),
            ),
            c(
                "2l 4m bit21",
                Paging::Legacy,
                false,
                &[(0x1004, PS | OK | 1 << 21)],
                Read,
                false,
                Err(rsvd),
            ),
            c(
                "2l 4m pse36",
                Paging::Legacy,
                false,
                &[(0x1004, 0x40_0000 | PS | OK | 0x3 << 13)],
                Read,
                false,
                Ok(0x3_0040_1234),
            ),
            c(
                "2l np fetch nxe",
                Paging::Legacy,
                true,
                &[(0x1004, 0)],
                Fetch,
                false,
                Err(0),
            ),
            // PAE: PDPT at CR3 0x1000, PDPTE 0 -> PD 0x2000, PDE 2 -> PT 0x4000, PTE 1.
            c(
                "pae ok",
                Paging::Pae,
                false,
                &[
                    (0x1000, 0x2000 | P),
                    (0x2010, 0x4000 | OK),
                    (0x4008, 0x5000 | OK),
                ],
                Read,
                false,
                Ok(0x5234),
            ),
            c(
                "pae pdpte rw bit",
                Paging::Pae,
                false,
                &[
                    (0x1000, 0x2000 | P | RW),
                    (0x2010, 0x4000 | OK),
                    (0x4008, 0x5000 | OK),
                ],
                Read,
                false,
                Err(rsvd),
            ),
            c(
                "pae pdpte xd",
                Paging::Pae,
                true,
                &[
                    (0x1000, 0x2000 | P | 1 << 63),
                    (0x2010, 0x4000 | OK),
                    (0x4008, 0x5000 | OK),
                ],
                Read,
                false,
                Err(rsvd),
            ),
            c(
                "pae pte xd !nxe",
                Paging::Pae,
                false,
                &[
                    (0x1000, 0x2000 | P),
                    (0x2010, 0x4000 | OK),
                    (0x4008, 0x5000 | OK | 1 << 63),
                ],
                Fetch,
                true,
                Err(rsvd | pf::U),
            ),
            c(
                "pae pde 2m bit13",
                Paging::Pae,
                false,
                &[(0x1000, 0x2000 | P), (0x2010, PS | OK | 1 << 13)],
                Read,
                false,
                Err(rsvd),
            ),
        ]
    }

    fn mmu() -> (Mmu, Arc<GuestMemory>) {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let phys = PhysMem::new(mem.clone(), Arc::new(IoBuses::new()));
        (Mmu::new(phys), mem)
    }

    #[test]
    fn page_walk_error_codes_match_the_model() {
        let mut bad = Vec::new();
        for case in cases() {
            let (mut m, mem) = mmu();
            for &(a, e) in case.entries {
                let bytes = e.to_le_bytes();
                let n = if case.paging == Paging::Legacy { 4 } else { 8 };
                mem.write_slice(&bytes[..n], GuestAddress(a)).unwrap();
            }
            let cr0v = cr0::PG | cr0::PE;
            let cr4v = match case.paging {
                Paging::Legacy => {
                    if case.pse {
                        cr4::PSE
                    } else {
                        0
                    }
                }
                _ => cr4::PAE,
            };
            let mut eferv = if case.nxe { efer::NXE } else { 0 };
            if case.paging == Paging::Long4 {
                eferv |= efer::LMA | efer::LME;
            }
            m.configure(cr0v, 0x1000, cr4v, eferv);
            assert_eq!(m.paging, case.paging, "{}", case.name);
            let got = m.translate(LIN, case.acc, case.user);
            if got != case.want {
                bad.push(format!(
                    "{}: got {got:x?}, want {:x?}",
                    case.name, case.want
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    #[test]
    fn pae_pdptes_with_reserved_bits_do_not_load() {
        let (m, mem) = mmu();
        mem.write_obj(0x2000u64 | 1, GuestAddress(0x1008)).unwrap();
        assert!(m.load_pdptes(0x1000).is_some());
        // Not present: anything goes.
        mem.write_obj(1u64 << 63, GuestAddress(0x1010)).unwrap();
        assert!(m.load_pdptes(0x1000).is_some());
        for bad in [
            1u64 << 1,
            1 << 2,
            1 << 5,
            1 << 7,
            1 << 8,
            1 << 40,
            1 << 51,
            1 << 63,
        ] {
            mem.write_obj(0x2000 | 1 | bad, GuestAddress(0x1018))
                .unwrap();
            assert!(m.load_pdptes(0x1000).is_none(), "bit {:#x}", bad);
        }
    }

    #[test]
    fn maxphyaddr_matches_cpuid() {
        let cfg = crate::cpuid::CpuidConfig::default();
        assert_eq!(cfg.query(0x8000_0008, 0, 0).0 & 0xff, MAXPHYADDR);
        assert_eq!(HIGH_RSVD.trailing_zeros(), MAXPHYADDR);
        assert_eq!(63 - HIGH_RSVD.leading_zeros(), 51);
    }
}
