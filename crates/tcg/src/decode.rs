//! Translation of guest code into cached blocks of pre-decoded instructions.
//!
//! A block is a straight run of instructions that ends at the first control transfer, at
//! an instruction that changes the state blocks are specialised on, at 64 instructions,
//! or at the end of a page. Blocks are keyed by (linear RIP, guest-physical address, mode)
//! so that both an aliasing mapping and a mode change select a different block; they are
//! dropped when their page is written (self-modifying code, DMA) or the cache fills up.
//! Each instruction keeps the handler chosen for its form at translation time, so the
//! execution loop is an indirect call per instruction with no decoding.

use std::collections::HashMap;

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, OpKind, Register,
};

use crate::cpu::Cpu;
use crate::exc::Ex;
use crate::exec;
use crate::insn::{Insn, NOREG, Uop, gpr, sreg};
use crate::jit::{Jit, JitSlot};
use crate::mem::Access;

fn prepare(instr: &Instruction, bitness: u32) -> Insn {
    let mut i = Insn {
        exec: exec::generic,
        ip: instr.ip(),
        next_ip: instr.next_ip(),
        imm: 0,
        disp: 0,
        amask: u64::MAX,
        size: 0,
        r0: NOREG,
        r1: NOREG,
        base: NOREG,
        index: NOREG,
        scale: 0,
        seg: 3,
        aux: 0,
        instr: *instr,
        uops: None,
    };
    let mut regs = [NOREG; 2];
    let mut nreg = 0;
    for k in 0..instr.op_count() {
        match instr.op_kind(k) {
            OpKind::Register => {
                if let Some((idx, sz)) = gpr(instr.op_register(k)) {
                    if i.size == 0 {
                        i.size = sz;
                    }
                    if nreg < 2 {
                        regs[nreg] = idx;
                        nreg += 1;
                    }
                }
            }
            OpKind::Memory => {
                let base = instr.memory_base();
                if let Some((b, sz)) = gpr(base) {
                    i.base = b;
                    i.amask = match sz {
                        2 => 0xffff,
                        4 => 0xffff_ffff,
                        _ => u64::MAX,
                    };
                } else if base == Register::EIP {
                    i.amask = 0xffff_ffff;
                }
                if let Some((x, sz)) = gpr(instr.memory_index()) {
                    i.index = x;
                    i.amask = match sz {
                        2 => 0xffff,
                        4 => 0xffff_ffff,
                        _ => u64::MAX,
                    };
                }
                if base == Register::None && instr.memory_index() == Register::None {
                    // Absolute address: the address size comes from the displacement size.
                    i.amask = match (bitness, instr.memory_displ_size()) {
                        (64, 8) => u64::MAX,
                        (_, 2) => 0xffff,
                        _ => 0xffff_ffff,
                    };
                    if bitness == 64 && instr.memory_displ_size() == 4 {
                        // [disp32] in 64-bit mode is sign-extended with 64-bit addressing.
                        i.amask = u64::MAX;
                    }
                }
                i.scale = match instr.memory_index_scale() {
                    2 => 1,
                    4 => 2,
                    8 => 3,
                    _ => 0,
                };
                i.disp = instr.memory_displacement64();
                i.seg = sreg(instr.memory_segment()).unwrap_or(3) as u8;
                if i.size == 0 {
                    i.size = instr.memory_size().size().min(255) as u8;
                }
            }
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                i.imm = instr.near_branch_target();
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {
                i.imm = instr.immediate(k);
            }
            _ => {}
        }
    }
    if i.amask == u64::MAX && bitness != 64 {
        i.amask = if bitness == 32 { 0xffff_ffff } else { 0xffff };
        if instr.memory_base() == Register::None && instr.memory_index() == Register::None {
            i.amask = if instr.memory_displ_size() == 2 {
                0xffff
            } else {
                0xffff_ffff
            };
        }
    }
    i.r0 = regs[0];
    i.r1 = regs[1];
    exec::finish(instr, &mut i, bitness);
    i.exec = exec::select(instr, &i, bitness);
    i
}

/// A translated block.
#[derive(Debug)]
pub struct Block {
    /// Linear RIP of the first instruction (CS-relative offset).
    pub rip: u64,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Mode key.
    pub mode: u32,
    /// Instructions.
    pub insns: Box<[Insn]>,
    /// Guest-physical pages the code came from (second is `u64::MAX` if unused).
    pub pages: [u64; 2],
    /// Cleared when the block is invalidated.
    pub valid: bool,
    /// Cached successors: (rip, block index, cache generation).
    pub links: [std::cell::Cell<(u64, u32, u32)>; 2],
    /// Bytes of code in the first page; a lookup re-checks their fingerprint, so code
    /// rewritten behind the CPU's back (device DMA, the VMM) is noticed even when nobody
    /// called [`crate::vm::TcgVm::invalidate_range`].
    pub code_len: u32,
    /// Fingerprint of those bytes (see `code_hash`).
    pub code_hash: u64,
    /// Run count and compiled code (see `jit`): dropped with the block.
    pub jit: JitSlot,
}

/// A cheap fingerprint of the `len` code bytes at `gpa` (clipped to its page; 0 outside
/// RAM): the first 16 and the last 8 bytes. A page rewritten by DMA almost surely changes
/// them; writes by the CPU itself are caught exactly by the write-protection of code pages.
fn code_hash(cpu: &Cpu, gpa: u64, len: u32) -> u64 {
    let n = (len as usize).min(4096 - (gpa & 0xfff) as usize);
    let Some(host) = cpu.mmu.phys.host(gpa) else {
        return 0;
    };
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ n as u64;
    let tail = n.saturating_sub(8);
    for off in [0usize, 8, tail] {
        let k = n.saturating_sub(off).min(8);
        let w = if k == 8 {
            // SAFETY: `host` maps the rest of this page in live guest RAM and `off + 8 <= n`
            // stays inside it. (A fixed-size read: no call to memcpy on every lookup.)
            unsafe { std::ptr::read_unaligned((host + off) as *const u64) }.to_le()
        } else {
            let mut w = [0u8; 8];
            for (j, b) in w.iter_mut().enumerate().take(k) {
                // SAFETY: as above, `off + j < off + k <= n`.
                *b = unsafe { std::ptr::read((host + off + j) as *const u8) };
            }
            u64::from_le_bytes(w)
        };
        h = (h ^ w).wrapping_mul(0x0100_0000_01b3);
        h ^= h >> 29;
    }
    h
}

const FAST: usize = 4096;

/// The decoded-block cache of one vCPU.
#[derive(Debug)]
pub struct BlockCache {
    /// All blocks (invalid ones stay until the next flush).
    pub blocks: Vec<Block>,
    map: HashMap<(u64, u64, u32), u32>,
    fast: Box<[(u64, u64, u32, u32)]>,
    pages: HashMap<u64, Vec<u32>>,
    /// Bumped on every invalidation; chained links from older generations are ignored.
    pub generation: u32,
    /// Blocks translated (statistics).
    pub translated: u64,
    /// The compiling tier: its code belongs to the blocks here.
    pub jit: Jit,
}

const MAX_BLOCKS: usize = 65536;
const MAX_INSNS: usize = 64;

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    /// An empty cache, compiling as the environment says (see [`JitConfig::from_env`]).
    pub fn new() -> Self {
        Self::with_jit(crate::jit::JitConfig::from_env())
    }

    /// An empty cache whose compiling tier is configured by `jit`.
    pub fn with_jit(jit: crate::jit::JitConfig) -> Self {
        Self {
            blocks: Vec::new(),
            map: HashMap::new(),
            fast: vec![(u64::MAX, 0, 0, 0); FAST].into_boxed_slice(),
            pages: HashMap::new(),
            generation: 1,
            translated: 0,
            jit: Jit::new(jit),
        }
    }

    #[inline(always)]
    fn slot(rip: u64) -> usize {
        ((rip ^ (rip >> 12)) as usize) & (FAST - 1)
    }

    /// Drops every block.
    pub fn flush(&mut self, cpu: &mut Cpu) {
        self.blocks.clear();
        self.map.clear();
        self.pages.clear();
        self.fast.fill((u64::MAX, 0, 0, 0));
        self.generation = self.generation.wrapping_add(1);
        self.jit.reset();
        cpu.mmu.phys.clear_code();
    }

    /// Drops the blocks whose code lies in guest-physical page `page`.
    pub fn invalidate_page(&mut self, cpu: &mut Cpu, page: u64) {
        let page = page & !0xfff;
        cpu.mmu.phys.set_code(page, false);
        if let Some(list) = self.pages.remove(&page) {
            for b in list {
                if let Some(blk) = self.blocks.get_mut(b as usize)
                    && blk.valid
                {
                    blk.valid = false;
                    self.map.remove(&(blk.rip, blk.gpa, blk.mode));
                }
            }
            self.generation = self.generation.wrapping_add(1);
        }
    }

    /// Applies the code-page writes the CPU recorded.
    pub fn process_dirty(&mut self, cpu: &mut Cpu) {
        if cpu.dirty_code_overflow {
            cpu.dirty_code_overflow = false;
            cpu.dirty_code.clear();
            self.flush(cpu);
            return;
        }
        while let Some(p) = cpu.dirty_code.pop() {
            self.invalidate_page(cpu, p);
        }
    }

    /// Finds or translates the block at the CPU's current RIP.
    #[inline]
    pub fn lookup(&mut self, cpu: &mut Cpu) -> Result<u32, Ex> {
        let rip = cpu.rip;
        let lin = cpu.ebase[1].wrapping_add(rip) & cpu.lin_mask;
        let user = cpu.mmu.user;
        let gpa = match cpu.mmu.lookup_gpa(lin, Access::Fetch, user) {
            Some(g) => g,
            None => cpu
                .translate(lin, Access::Fetch, user)
                .map_err(fetch_fault)?,
        };
        let mode = cpu.mode_key();
        let s = Self::slot(rip);
        let f = self.fast[s];
        let hit = if f.0 == rip && f.1 == gpa && f.2 == mode && self.blocks[f.3 as usize].valid {
            Some(f.3)
        } else {
            self.map.get(&(rip, gpa, mode)).copied()
        };
        if let Some(b) = hit {
            let blk = &self.blocks[b as usize];
            if code_hash(cpu, gpa, blk.code_len) == blk.code_hash {
                self.fast[s] = (rip, gpa, mode, b);
                return Ok(b);
            }
            // The bytes changed without a write we saw: drop the page's translations.
            self.invalidate_page(cpu, gpa);
        }
        let b = self.translate(cpu, rip, lin, gpa, mode)?;
        self.fast[s] = (rip, gpa, mode, b);
        Ok(b)
    }

    fn translate(
        &mut self,
        cpu: &mut Cpu,
        rip: u64,
        lin: u64,
        gpa: u64,
        mode: u32,
    ) -> Result<u32, Ex> {
        if self.blocks.len() >= MAX_BLOCKS {
            self.flush(cpu);
        }
        let bitness = mode;
        let page_off = (lin & 0xfff) as usize;
        let avail = 4096 - page_off;
        // Bytes of this page plus up to 15 of the next for a straddling instruction.
        let mut buf = [0u8; MAX_INSNS * 15 + 16];
        // Code outside RAM (a ROM behind a device) is fetched one instruction at a time and
        // never cached as a long block: devices see byte reads only.
        let in_ram = cpu.mmu.phys.host(gpa).is_some();
        let window = if in_ram {
            avail.min(MAX_INSNS * 15 + 16)
        } else {
            avail.min(15)
        };
        if in_ram {
            cpu.mmu.phys.read(gpa, &mut buf[..window]);
        } else {
            for (k, b) in buf[..window].iter_mut().enumerate() {
                let mut one = [0u8; 1];
                cpu.mmu.phys.read(gpa + k as u64, &mut one);
                *b = one[0];
            }
        }
        let mut second: Option<u64> = None;
        let mut insns: Vec<Insn> = Vec::with_capacity(16);
        // 64 instructions of at most 15 bytes fit in 960 bytes: no need to copy the whole page.
        let chunk = window;
        let mut decoder = Decoder::with_ip(bitness, &buf[..chunk], rip, DecoderOptions::NONE);
        let mut instr = Instruction::default();
        let mut pos = 0usize;
        while insns.len() < MAX_INSNS {
            decoder.decode_out(&mut instr);
            if decoder.last_error() == DecoderError::NoMoreBytes && chunk < avail {
                // End of the decode window, not of the page: the next block starts here.
                break;
            }
            if decoder.last_error() == DecoderError::NoMoreBytes {
                // Instruction straddles the page end: fetch the next page and decode it alone.
                let lin2 = (lin & !0xfff).wrapping_add(4096);
                let g2 = match cpu.translate(lin2, Access::Fetch, cpu.mmu.user) {
                    Ok(g) => g,
                    Err(e) => {
                        if insns.is_empty() {
                            return Err(fetch_fault(e));
                        }
                        break;
                    }
                };
                let mut tmp = [0u8; 32];
                let left = avail - pos;
                tmp[..left].copy_from_slice(&buf[pos..avail]);
                cpu.mmu.phys.read(g2, &mut tmp[left..left + 16]);
                let ip = rip.wrapping_add(pos as u64);
                let mut d2 = Decoder::with_ip(bitness, &tmp[..left + 16], ip, DecoderOptions::NONE);
                d2.decode_out(&mut instr);
                if instr.is_invalid() {
                    insns.push(ud_insn(ip, bitness));
                } else {
                    insns.push(prepare(&instr, bitness));
                }
                second = Some(g2 & !0xfff);
                break;
            }
            if instr.is_invalid() {
                insns.push(ud_insn(instr.ip(), bitness));
                break;
            }
            pos += instr.len();
            let ins = prepare(&instr, bitness);
            insns.push(ins);
            if instr.flow_control() != FlowControl::Next || ends_block(&instr) {
                break;
            }
            if pos >= avail || !in_ram {
                break;
            }
        }
        if insns.is_empty() {
            // Defensive: a block always makes progress or faults.
            insns.push(ud_insn(rip, bitness));
        }
        let dead = elide_dead_flags(&mut insns);
        fuse_uops(&mut insns, &dead);
        fuse_cmp_jcc(&mut insns);
        let idx = self.blocks.len() as u32;
        let p0 = gpa & !0xfff;
        let pages = [p0, second.unwrap_or(u64::MAX)];
        for &p in pages.iter().filter(|&&p| p != u64::MAX) {
            cpu.mmu.phys.set_code(p, true);
            cpu.mmu.flush_write_gpa(p);
            self.pages.entry(p).or_default().push(idx);
        }
        let end = insns.last().map_or(rip, |i| i.next_ip);
        let code_len = (end.wrapping_sub(rip) as u32).min(avail as u32);
        let code_hash = code_hash(cpu, gpa, code_len);
        self.blocks.push(Block {
            rip,
            gpa,
            mode,
            insns: insns.into_boxed_slice(),
            pages,
            valid: true,
            links: Default::default(),
            code_len,
            code_hash,
            jit: JitSlot::default(),
        });
        self.map.insert((rip, gpa, mode), idx);
        self.translated += 1;
        Ok(idx)
    }
}

/// Gives the instructions whose six status flags are dead a handler that skips them (see
/// [`exec::FlagUse`]): walking backwards, a result is dead when a later instruction
/// overwrites all six before anything could read them. Everything that may fault counts as
/// a reader, because an exception frame holds RFLAGS; the flags are live at the end of the
/// block; and the first instruction keeps its flags, because after `sti` or `mov ss` the
/// loop runs a block's first instruction alone and may then deliver an interrupt.
///
/// Returns, per instruction, whether its flags were found dead.
fn elide_dead_flags(insns: &mut [Insn]) -> Vec<bool> {
    let mut dead = vec![false; insns.len()];
    let mut live = true;
    for (k, i) in insns.iter_mut().enumerate().rev() {
        match exec::flag_use(&i.instr, i) {
            exec::FlagUse::Pass => {}
            exec::FlagUse::Use => live = true,
            exec::FlagUse::Kill => {
                if !live
                    && k > 0
                    && let Some(h) = exec::select_noflags(&i.instr, i)
                {
                    i.exec = h;
                    dead[k] = true;
                }
                live = false;
            }
        }
    }
    dead
}

/// Gives each run of two or more instructions that have micro-ops (see `exec::uop_of`) one
/// entry run by `exec::run_uops`. Neither the first instruction of the block (after `sti`
/// the loop runs the first entry alone) nor the last (RIP is stored before it) joins a run.
fn fuse_uops(insns: &mut Vec<Insn>, dead: &[bool]) {
    let n = insns.len();
    if n < 4 {
        return;
    }
    let ops: Vec<Option<Uop>> = insns
        .iter()
        .enumerate()
        .map(|(k, i)| {
            if k == 0 || k + 1 == n {
                None
            } else {
                exec::uop_of(&i.instr, i, dead.get(k).copied().unwrap_or(false))
            }
        })
        .collect();
    if !ops.windows(2).any(|w| w[0].is_some() && w[1].is_some()) {
        // No run: keep the block as it is (no copy).
        return;
    }
    let mut out: Vec<Insn> = Vec::with_capacity(n);
    let mut k = 0;
    while k < n {
        let len = ops[k..].iter().take_while(|o| o.is_some()).count();
        if len >= 2 {
            let mut f = insns[k].clone();
            f.exec = exec::run_uops;
            f.next_ip = insns[k + len - 1].next_ip;
            let mut run: Vec<Uop> = ops[k..k + len].iter().flatten().copied().collect();
            exec::fold_moves(&mut run);
            // Runs stay within a block (at most `MAX_INSNS` instructions).
            f.aux = u8::try_from(len).unwrap_or(u8::MAX);
            f.uops = Some(run.into_boxed_slice());
            out.push(f);
            k += len;
        } else {
            out.push(insns[k].clone());
            k += 1;
        }
    }
    *insns = out;
}

/// Gives a block-ending `cmp`/`test` + `jcc` pair (or a register update such as `add` or
/// `dec` + `jcc`) one entry with a fused handler (see `exec::select_cmp_jcc`); the handler
/// counts the extra instruction in `icount`. Neither instruction can fault. Not when the
/// first is the block's first instruction: after `sti` or `mov ss` the loop runs the first
/// entry alone, which must be one instruction.
fn fuse_cmp_jcc(insns: &mut Vec<Insn>) {
    let n = insns.len();
    if n < 3 {
        return;
    }
    let (a, b) = (&insns[n - 2], &insns[n - 1]);
    if a.uops.is_some() {
        return;
    }
    let Some(h) = exec::select_cmp_jcc(&a.instr, a, &b.instr) else {
        return;
    };
    let mut f = b.clone();
    f.exec = h;
    f.r0 = a.r0;
    f.r1 = a.r1;
    f.size = a.size;
    f.disp = a.imm;
    insns.truncate(n - 2);
    insns.push(f);
}

fn fetch_fault(e: Ex) -> Ex {
    e
}

fn ud_insn(ip: u64, bitness: u32) -> Insn {
    let mut instr = Instruction::default();
    instr.set_code(Code::INVALID);
    instr.set_ip(ip);
    instr.set_next_ip(ip);
    let mut i = prepare(&instr, bitness);
    i.exec = exec::raise_ud;
    i
}

/// Instructions after which the block must end because they change mode, paging,
/// segment bases, the interrupt flag or the code itself.
fn ends_block(instr: &Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        instr.mnemonic(),
        M::Mov | M::Pop | M::Lss | M::Lds | M::Les | M::Lfs | M::Lgs
    ) && (0..instr.op_count()).any(|k| {
        instr.op_kind(k) == OpKind::Register
            && k == 0
            && (sreg(instr.op_register(0)).is_some()
                || (Register::CR0 as u32..Register::CR0 as u32 + 16)
                    .contains(&(instr.op_register(0) as u32)))
    }) || matches!(
        instr.mnemonic(),
        M::Sti
            | M::Cli
            | M::Popf
            | M::Popfd
            | M::Popfq
            | M::Wrmsr
            | M::Lgdt
            | M::Lidt
            | M::Lmsw
            | M::Clts
            | M::Invlpg
            | M::Ltr
            | M::Lldt
            | M::Swapgs
            | M::Hlt
            | M::Cpuid
            | M::Wbinvd
            | M::Invd
            | M::Fxrstor
            | M::Fxrstor64
            | M::Rsm
            | M::Wrfsbase
            | M::Wrgsbase
            | M::Out
            | M::Outsb
            | M::Outsw
            | M::Outsd
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use keel_accel::IoBuses;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::cpu::{Seg, fl, sr};
    use crate::mem::PhysMem;

    const CODE: u64 = 0x1000;

    /// A real-mode CPU with `code` at 0:0x1000.
    fn cpu_with(code: &[u8]) -> Cpu {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let phys = PhysMem::new(mem, Arc::new(IoBuses::new()));
        let mut cpu = Cpu::new(phys, Default::default(), 0);
        cpu.seg[sr::CS] = Seg::real(0);
        cpu.refresh_mode();
        cpu.rip = CODE;
        cpu
    }

    /// Translates the block at RIP: (handlers as chosen by `select`, handlers kept).
    fn handlers(cpu: &mut Cpu, cache: &mut BlockCache) -> (Vec<usize>, Vec<usize>) {
        let b = cache.lookup(cpu).unwrap();
        let blk = &cache.blocks[b as usize];
        let chosen = blk
            .insns
            .iter()
            .map(|i| exec::select(&i.instr, i, 16) as usize)
            .collect();
        let kept = blk.insns.iter().map(|i| i.exec as usize).collect();
        (chosen, kept)
    }

    /// Runs the block at RIP to its end.
    fn run_block(cpu: &mut Cpu, cache: &mut BlockCache) {
        let b = cache.lookup(cpu).unwrap();
        let insns = cache.blocks[b as usize].insns.clone();
        for i in insns.iter() {
            cpu.rip = i.next_ip;
            (i.exec)(cpu, i).unwrap();
        }
    }

    /// Runs blocks as the vCPU loop does (RIP stored before the last instruction; an
    /// `EndBlock` resumes at RIP; code writes processed between blocks) until RIP is `end`.
    fn run_until(cpu: &mut Cpu, cache: &mut BlockCache, end: u64) {
        for _ in 0..100 {
            if cpu.rip == end {
                return;
            }
            if cpu.stop_block {
                cpu.stop_block = false;
                cache.process_dirty(cpu);
            }
            let b = cache.lookup(cpu).unwrap();
            let insns = cache.blocks[b as usize].insns.clone();
            let (last, body) = insns.split_last().unwrap();
            let mut ended = false;
            for i in body {
                match (i.exec)(cpu, i) {
                    Ok(()) => {}
                    Err(Ex::EndBlock) => {
                        ended = true;
                        break;
                    }
                    Err(e) => panic!("{e:?} at {:#x}", i.ip),
                }
            }
            if !ended {
                cpu.rip = last.next_ip;
                match (last.exec)(cpu, last) {
                    Ok(()) | Err(Ex::EndBlock) => {}
                    Err(e) => panic!("{e:?} at {:#x}", last.ip),
                }
            }
        }
        panic!("did not reach {end:#x}");
    }

    #[test]
    fn a_write_to_the_next_instruction_ends_the_block() {
        // add [bx], al patches the immediate of `mov cl, 1` four instructions later.
        let code = [
            0xbb, 0x0b, 0x10, // mov bx, 0x100b
            0xb0, 0x41, // mov al, 0x41
            0x00, 0x07, // add [bx], al
            0x90, 0x90, 0x90, // nop x3
            0xb1, 0x01, // 0x100a: mov cl, 1 (becomes 0x42)
            0xeb, 0x00, // 0x100c: jmp 0x100e
        ];
        let mut cpu = cpu_with(&code);
        let mut cache = BlockCache::new();
        run_until(&mut cpu, &mut cache, 0x100e);
        assert_eq!(cpu.gpr[1] & 0xff, 0x42);

        // push ax writes `mov cl, 0x42` over `mov cl, 1`.
        let code = [
            0xbc, 0x0e, 0x10, // mov sp, 0x100e
            0xb8, 0xb1, 0x42, // mov ax, 0x42b1
            0x50, // push ax
            0x90, 0x90, 0x90, 0x90, 0x90, // nop x5
            0xb1, 0x01, // 0x100c: mov cl, 1
            0xeb, 0x00, // 0x100e: jmp 0x1010
        ];
        let mut cpu = cpu_with(&code);
        let mut cache = BlockCache::new();
        run_until(&mut cpu, &mut cache, 0x1010);
        assert_eq!(cpu.gpr[1] & 0xff, 0x42);
        assert_eq!(cpu.gpr[4] & 0xffff, 0x100c);

        // A call whose return address lands on the code page still goes to its target.
        let code = [
            0xbc, 0x00, 0x11, // mov sp, 0x1100
            0xe8, 0x02, 0x00, // call 0x1008
            0xeb, 0xfe, // 0x1006: jmp $
            0xb1, 0x42, // 0x1008: mov cl, 0x42
            0xeb, 0x00, // jmp 0x100c
        ];
        let mut cpu = cpu_with(&code);
        let mut cache = BlockCache::new();
        run_until(&mut cpu, &mut cache, 0x100c);
        assert_eq!(cpu.gpr[1] & 0xff, 0x42);
        assert_eq!(cpu.gpr[4] & 0xffff, 0x10fe);
    }

    /// A CPU in 64-bit mode (paging off, which the interpreter allows) with `code` at 0x1000.
    fn cpu64_with(code: &[u8]) -> Cpu {
        let mut cpu = cpu_with(code);
        cpu.cr0 |= crate::regs::cr0::PE;
        cpu.efer |= crate::regs::efer::LME | crate::regs::efer::LMA;
        cpu.seg[sr::CS].attr |= 1 << 13;
        cpu.refresh_mode();
        assert_eq!(cpu.bitness(), 64);
        cpu
    }

    /// Runs `code` (one block ending in a branch) as translated and with the plain
    /// per-instruction handlers from the same registers; asserts the same registers, flags,
    /// RIP and instruction count, and returns the translated block's entries.
    fn same_as_plain_handlers(code: &[u8], case: u64) -> Box<[Insn]> {
        let mut init = [0u64; 16];
        for (k, v) in init.iter_mut().enumerate() {
            *v = (k as u64 + 1).wrapping_mul(0x0123_4567_89ab_cdef) ^ case << 40;
        }
        // Translated block.
        let mut cpu = cpu64_with(code);
        cpu.gpr[..16].copy_from_slice(&init);
        let mut cache = BlockCache::new();
        let b = cache.lookup(&mut cpu).unwrap();
        let insns = cache.blocks[b as usize].insns.clone();
        cpu.icount += insns.len() as u64;
        let (last, body) = insns.split_last().unwrap();
        for i in body {
            (i.exec)(&mut cpu, i).unwrap();
        }
        cpu.rip = last.next_ip;
        (last.exec)(&mut cpu, last).unwrap();
        // Plain handlers, one instruction at a time.
        let mut plain = cpu64_with(code);
        plain.gpr[..16].copy_from_slice(&init);
        let mut d = Decoder::with_ip(64, code, CODE, DecoderOptions::NONE);
        let mut count = 0;
        for ins in d.iter() {
            count += 1;
            let i = prepare(&ins, 64);
            let h = exec::select(&ins, &i, 64);
            plain.rip = i.next_ip;
            h(&mut plain, &i).unwrap();
            if ins.flow_control() != FlowControl::Next {
                break;
            }
        }
        assert_eq!(cpu.gpr, plain.gpr, "case {case}: registers");
        assert_eq!(cpu.flags(), plain.flags(), "case {case}: flags");
        assert_eq!(cpu.rip, plain.rip, "case {case}: rip");
        assert_eq!(cpu.icount, count, "case {case}: icount");
        insns
    }

    /// A 64-bit `mov d, s` folds into the next micro-op that updates `d` (one micro-op less),
    /// but not across a write of `s` or a read of `d`; results and counts stay exact.
    #[test]
    fn moves_fold_into_the_next_update_of_their_destination() {
        use iced_x86::code_asm::*;
        type Seq = fn(&mut CodeAssembler) -> Result<(), IcedError>;
        let cases: [(Seq, usize); 6] = [
            // mov rax, rcx; imul rax, r9: one micro-op.
            (
                |a| {
                    a.mov(rax, rcx)?;
                    a.imul_2(rax, r9)
                },
                1,
            ),
            // add rax, rax after the move reads rcx twice.
            (
                |a| {
                    a.mov(rax, rcx)?;
                    a.add(rax, rax)
                },
                1,
            ),
            // Across an unrelated micro-op.
            (
                |a| {
                    a.mov(r14, rdx)?;
                    a.lea(rbx, qword_ptr(rsi + 8))?;
                    a.shr(r14, 32)
                },
                2,
            ),
            // The source is rewritten in between: no fold.
            (
                |a| {
                    a.mov(r14, rax)?;
                    a.mov(eax, eax)?;
                    a.shr(r14, 32)
                },
                3,
            ),
            // The destination is read in between: no fold.
            (
                |a| {
                    a.mov(rax, rcx)?;
                    a.lea(rbx, qword_ptr(rax + 1))?;
                    a.add(rax, 1)
                },
                3,
            ),
            // A 32-bit move zero-extends: no fold.
            (
                |a| {
                    a.mov(eax, ecx)?;
                    a.imul_2(rax, r9)
                },
                2,
            ),
        ];
        for (case, (seq, uops)) in cases.into_iter().enumerate() {
            let mut a = CodeAssembler::new(64).unwrap();
            a.nop().unwrap();
            seq(&mut a).unwrap();
            a.xor(r8, r8).unwrap();
            let mut end = a.create_label();
            a.jmp(end).unwrap();
            a.set_label(&mut end).unwrap();
            a.nop().unwrap();
            let code = a.assemble(CODE).unwrap();
            let insns = same_as_plain_handlers(&code, case as u64);
            let run = insns
                .iter()
                .find_map(|i| i.uops.as_deref())
                .expect("a micro-op run");
            // The trailing `xor r8, r8` only makes the flags of the sequence dead (its own stay
            // live at the block's end: no micro-op).
            assert_eq!(run.len(), uops, "case {case}: micro-ops");
        }
    }

    /// Random register-only sequences: the translated block (dead flags, micro-op runs,
    /// fused compare-and-branch) must leave the registers, flags and instruction count
    /// exactly as the plain per-instruction handlers do.
    #[test]
    fn fused_blocks_match_plain_handlers() {
        use iced_x86::code_asm::*;
        let r64 = [rax, rcx, rdx, rbx, rsi, rdi, r8, r9, r10, r13, r15];
        let r32 = [eax, ecx, edx, ebx, esi, edi, r8d, r9d, r10d, r13d, r15d];
        let r8s = [al, cl, dl, bl, sil, dil, r8b, r13b];
        let r16 = [ax, cx, dx, bx, si, di, r8w, r13w];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for case in 0..400 {
            let mut a = CodeAssembler::new(64).unwrap();
            let len = 2 + rnd(24);
            for _ in 0..len {
                let (x, y) = (r64[rnd(r64.len())], r64[rnd(r64.len())]);
                let (x32, y32) = (r32[rnd(r32.len())], r32[rnd(r32.len())]);
                let imm = [0i32, 1, 3, -1, 0x7fff_ffff, -0x8000_0000, 0x1234][rnd(7)];
                match rnd(30) {
                    0 => a.mov(x, y),
                    1 => a.mov(x32, y32),
                    2 => a.mov(x, 0x1234_5678_9abc_def0u64),
                    3 => a.add(x, y),
                    4 => a.add(x32, imm),
                    5 => a.sub(x, imm),
                    6 => a.sub(x32, y32),
                    7 => a.and(x, y),
                    8 => a.or(x32, imm),
                    9 => a.xor(x, y),
                    10 => a.xor(x32, x32),
                    11 => a.imul_2(x, y),
                    12 => a.imul_3(x32, y32, imm),
                    13 => a.neg(x),
                    14 => a.not(x32),
                    15 => a.shl(x, (1 + rnd(63)) as u32),
                    16 => a.shr(x32, (1 + rnd(31)) as u32),
                    17 => a.sar(x, (1 + rnd(63)) as u32),
                    18 => a.sar(x32, (1 + rnd(31)) as u32),
                    19 => a.lea(x, qword_ptr(y + r64[rnd(r64.len())] * 4 + 0x10)),
                    20 => a.lea(x32, dword_ptr(y32 + imm)),
                    21 => a.movzx(x32, r8s[rnd(r8s.len())]),
                    22 => a.movsx(x, r16[rnd(r16.len())]),
                    23 => a.movsxd(x, y32),
                    24 => a.cmp(x, y),
                    25 => a.test(x32, y32),
                    26 => a.adc(x, y),
                    27 => a.setb(r8s[rnd(r8s.len())]),
                    28 => a.cmovl(x, y),
                    _ => a.inc(x32),
                }
                .unwrap();
            }
            let mut end = a.create_label();
            // A fused pair (compare or counter update, then a branch) or none.
            let (x, y) = (r64[rnd(r64.len())], r64[rnd(r64.len())]);
            let (x32, y32) = (r32[rnd(r32.len())], r32[rnd(r32.len())]);
            match rnd(9) {
                0 => a.cmp(x, y).and_then(|()| a.jl(end)),
                1 => a.add(x, 1).and_then(|()| a.jne(end)),
                2 => a.sub(x32, y32).and_then(|()| a.jb(end)),
                3 => a.dec(x).and_then(|()| a.jnz(end)),
                4 => a.inc(x32).and_then(|()| a.jle(end)),
                5 => a.xor(x, y).and_then(|()| a.js(end)),
                6 => a.and(x32, 0x7f).and_then(|()| a.jp(end)),
                7 => a.dec(x32).and_then(|()| a.jbe(end)),
                _ => Ok(()),
            }
            .unwrap();
            a.jmp(end).unwrap();
            a.set_label(&mut end).unwrap();
            a.nop().unwrap();
            let code = a.assemble(CODE).unwrap();
            same_as_plain_handlers(&code, case);
        }
    }

    #[test]
    fn compare_and_branch_run_as_one_entry() {
        // mov ax,5; cmp ax,bx; jb 0x1010 / mov ax,5; test al,4; jnz 0x1010
        for (code, bx, taken, cf, zf) in [
            (
                &[0xb8, 0x05, 0x00, 0x39, 0xd8, 0x72, 0x09][..],
                7u64,
                true,
                true,
                false,
            ),
            (
                &[0xb8, 0x05, 0x00, 0x39, 0xd8, 0x72, 0x09][..],
                5,
                false,
                false,
                true,
            ),
            (
                &[0xb8, 0x05, 0x00, 0xa8, 0x04, 0x75, 0x09][..],
                0,
                true,
                false,
                false,
            ),
            (
                &[0xb8, 0x05, 0x00, 0xa8, 0x02, 0x75, 0x09][..],
                0,
                false,
                false,
                true,
            ),
        ] {
            let mut cpu = cpu_with(code);
            cpu.gpr[3] = bx;
            let mut cache = BlockCache::new();
            let b = cache.lookup(&mut cpu).unwrap();
            let insns = cache.blocks[b as usize].insns.clone();
            assert_eq!(insns.len(), 2, "the pair is one entry");
            // As the block loop does: count the entries, then run them.
            cpu.icount += insns.len() as u64;
            for i in insns.iter() {
                cpu.rip = i.next_ip;
                (i.exec)(&mut cpu, i).unwrap();
            }
            assert_eq!(cpu.icount, 3);
            assert_eq!(cpu.rip, if taken { 0x1010 } else { 0x1007 });
            let f = cpu.flags();
            assert_eq!(f & fl::CF != 0, cf);
            assert_eq!(f & fl::ZF != 0, zf);
        }
        // A compare that starts the block stays a separate entry.
        let mut cpu = cpu_with(&[0x39, 0xd8, 0x72, 0x09]);
        let mut cache = BlockCache::new();
        let b = cache.lookup(&mut cpu).unwrap();
        assert_eq!(cache.blocks[b as usize].insns.len(), 2);
    }

    #[test]
    fn dead_flags_are_skipped_and_results_kept() {
        // mov ax,1; add ax,0xffff; shl bx,3; imul cx,dx; sub si,di; neg bp; imul di,si,5;
        // sar dx,1; cmp ax,bx; jmp $+2
        let code = [
            0xb8, 0x01, 0x00, 0x05, 0xff, 0xff, 0xc1, 0xe3, 0x03, 0x0f, 0xaf, 0xca, 0x29, 0xfe,
            0xf7, 0xdd, 0x6b, 0xfe, 0x05, 0xd1, 0xfa, 0x39, 0xd8, 0xeb, 0x00,
        ];
        let mut cpu = cpu_with(&code);
        cpu.gpr[3] = 0x1234; // bx
        cpu.gpr[1] = 7; // cx
        cpu.gpr[2] = 0x8006; // dx
        cpu.gpr[5] = 0x10; // bp
        cpu.gpr[6] = 0x100; // si
        cpu.gpr[7] = 0x20; // di
        let mut cache = BlockCache::new();
        let (chosen, kept) = handlers(&mut cpu, &mut cache);
        // add, shl, imul, sub, neg, imul, sar: dead (cmp overwrites); cmp and mov: kept.
        for k in 1..=7 {
            assert_ne!(chosen[k], kept[k], "instruction {k} keeps its flags");
        }
        assert_eq!(chosen[0], kept[0]);
        assert_eq!(chosen[8], kept[8]);
        run_block(&mut cpu, &mut cache);
        assert_eq!(cpu.gpr[0], 0); // 1 + 0xffff
        assert_eq!(cpu.gpr[3], 0x91a0); // 0x1234 << 3
        assert_eq!(cpu.gpr[1], (7 * 0x8006) & 0xffff);
        assert_eq!(cpu.gpr[6], 0xe0); // 0x100 - 0x20
        assert_eq!(cpu.gpr[5], 0xfff0); // -0x10
        assert_eq!(cpu.gpr[7], 0x460); // 0xe0 * 5
        assert_eq!(cpu.gpr[2], 0xc003); // 0x8006 >> 1, arithmetic
        // Flags of `cmp ax, bx` (0 - 0x91a0): CF, no ZF, SF clear, OF clear.
        let f = cpu.flags();
        assert_eq!(f & (fl::CF | fl::ZF | fl::SF | fl::OF), fl::CF);
    }

    #[test]
    fn flags_before_a_possible_fault_or_a_reader_stay() {
        // add ax,bx; mov cx,[bx]; cmp ax,bx; add ax,bx; adc dx,0; shl bx,cl; sub ax,1; jmp $+2
        let code = [
            0x01, 0xd8, 0x8b, 0x0f, 0x39, 0xd8, 0x01, 0xd8, 0x83, 0xd2, 0x00, 0xd3, 0xe3, 0x83,
            0xe8, 0x01, 0xeb, 0x00,
        ];
        let mut cpu = cpu_with(&code);
        let mut cache = BlockCache::new();
        let (chosen, kept) = handlers(&mut cpu, &mut cache);
        // The load may fault: the first add's flags stay (it is also the first instruction).
        assert_eq!(chosen[0], kept[0]);
        // cmp: overwritten by the add after it with nothing in between: dead.
        assert_ne!(chosen[2], kept[2]);
        // add before adc (reads CF): kept. shl by CL may leave the flags: sub's are kept
        // because the block ends after it.
        assert_eq!(chosen[3], kept[3]);
        assert_eq!(chosen[6], kept[6]);
    }

    #[test]
    fn first_instruction_keeps_its_flags() {
        // add ax,bx; sub ax,1; jmp $+2
        let code = [0x01, 0xd8, 0x83, 0xe8, 0x01, 0xeb, 0x00];
        let mut cpu = cpu_with(&code);
        let mut cache = BlockCache::new();
        let (chosen, kept) = handlers(&mut cpu, &mut cache);
        assert_eq!(chosen, kept);
    }
}
