//! Architectural CPU state: registers, segments, control registers, MSRs, lazy flags.
//!
//! Arithmetic flags are kept lazily: an ALU instruction records its operands, result and
//! kind ([`CcOp`]) and the six status flags are computed only when something reads them
//! (a conditional jump reads one or two, `pushf` reads all). Flags that hardware leaves
//! undefined are given fixed values, documented at [`CcOp`].

use crate::exc::{Ex, vec};
use crate::mem::{Access, Mmu, PAGE, PAGE_MASK, PhysMem};
use crate::regs::{cr0, dr, efer};

/// RFLAGS bits.
pub mod fl {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Always-one bit 1.
    pub const FIXED1: u64 = 1 << 1;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Trap.
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u64 = 1 << 9;
    /// Direction.
    pub const DF: u64 = 1 << 10;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check / access control.
    pub const AC: u64 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u64 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u64 = 1 << 20;
    /// CPUID-available bit.
    pub const ID: u64 = 1 << 21;
    /// The six status flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change at CPL0 with popf (64-bit view).
    pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | AC | ID | VIF | VIP;
}

/// Segment register indices (iced order is different; see `decode`).
pub mod sr {
    /// ES.
    pub const ES: usize = 0;
    /// CS.
    pub const CS: usize = 1;
    /// SS.
    pub const SS: usize = 2;
    /// DS.
    pub const DS: usize = 3;
    /// FS.
    pub const FS: usize = 4;
    /// GS.
    pub const GS: usize = 5;
}

/// A segment register with its hidden part.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seg {
    /// Visible selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled).
    pub limit: u32,
    /// Descriptor attribute bits in VMX layout: type (bits 0-3), S (4), DPL (5-6), P (7), AVL (12), L (13), D/B (14), G (15);
    /// bit 16 marks an unusable (null) segment.
    pub attr: u32,
}

impl Seg {
    /// Present bit.
    pub fn present(&self) -> bool {
        self.attr & 0x80 != 0
    }
    /// DPL.
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }
    /// L bit.
    pub fn l(&self) -> bool {
        self.attr & (1 << 13) != 0
    }
    /// D/B bit.
    pub fn db(&self) -> bool {
        self.attr & (1 << 14) != 0
    }
    /// A real-mode segment for `selector`.
    pub fn real(selector: u16) -> Self {
        Self {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            attr: 0x93,
        }
    }
    /// Converts to the seam's representation.
    pub fn to_api(self) -> keel_accel::Segment {
        keel_accel::Segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: (self.attr & 0xf) as u8,
            present: self.present(),
            dpl: self.dpl(),
            db: self.db(),
            s: self.attr & 0x10 != 0,
            l: self.l(),
            g: self.attr & (1 << 15) != 0,
            avl: self.attr & (1 << 12) != 0,
            unusable: self.attr & (1 << 16) != 0,
        }
    }
    /// Converts from the seam's representation.
    pub fn from_api(s: &keel_accel::Segment) -> Self {
        let attr = u32::from(s.type_ & 0xf)
            | u32::from(s.s) << 4
            | u32::from(s.dpl & 3) << 5
            | u32::from(s.present) << 7
            | u32::from(s.avl) << 12
            | u32::from(s.l) << 13
            | u32::from(s.db) << 14
            | u32::from(s.g) << 15
            | u32::from(s.unusable) << 16;
        Self {
            selector: s.selector,
            base: s.base,
            limit: s.limit,
            attr,
        }
    }
}

/// How the arithmetic flags are currently represented.
///
/// Undefined flags, documented choices (they follow what QEMU's TCG computes, which is also
/// what this host's AMD CPU shows for the common cases): logic ops clear AF; shifts by more
/// than one leave OF as computed for a one-bit shift of the last step and clear AF; `mul`/`imul`
/// set SF/ZF/PF from the low half of the result and clear AF; `bsf`/`bsr` with a zero source
/// leave the destination unchanged and set ZF, other flags from the source; `bt*` leave
/// SF/ZF/AF/PF/OF unchanged; `div`/`idiv` leave the flags unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum CcOp {
    /// All flags are in `Cpu::rflags`.
    #[default]
    Eager,
    /// `res = a + b`.
    Add,
    /// `res = a + b + aux`.
    Adc,
    /// `res = a - b`.
    Sub,
    /// `res = a - b - aux`.
    Sbb,
    /// Logic op: CF=OF=AF=0.
    Logic,
    /// Increment; CF is `aux`.
    Inc,
    /// Decrement; CF is `aux`.
    Dec,
}

/// Lazy-flag record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cc {
    /// Kind.
    pub op: CcOp,
    /// Operand size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// Result, truncated to `size`.
    pub res: u64,
    /// First operand (truncated).
    pub a: u64,
    /// Second operand (truncated).
    pub b: u64,
    /// Carry-in (adc/sbb) or preserved CF (inc/dec); stale for the other kinds, which never
    /// read it.
    pub aux: u64,
}

#[inline(always)]
fn sign_bit(size: u8) -> u64 {
    // `size` is 1, 2, 4 or 8; anything else is treated as 8 rather than trusted.
    1u64 << ((u32::from(size) * 8).wrapping_sub(1) & 63)
}

#[inline(always)]
fn parity(res: u64) -> bool {
    (res as u8).count_ones() & 1 == 0
}

/// x87 unit state (registers kept as f64; see the module docs of `x87`).
#[derive(Debug, Clone, Copy)]
pub struct Fpu {
    /// Physical registers ST-relative via `top`.
    pub st: [f64; 8],
    /// Top-of-stack index.
    pub top: u8,
    /// Status word (without TOP, which lives in `top`).
    pub sw: u16,
    /// Control word.
    pub cw: u16,
    /// Abridged tag word: bit set = register valid.
    pub tags: u8,
    /// Last opcode.
    pub fop: u16,
}

impl Default for Fpu {
    fn default() -> Self {
        Self {
            st: [0.0; 8],
            top: 0,
            sw: 0,
            cw: 0x037f,
            tags: 0,
            fop: 0,
        }
    }
}

/// Interrupt-shadow state after `sti` / `mov ss` / `pop ss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shadow {
    /// No shadow.
    #[default]
    None,
    /// After `sti`: the next instruction runs before interrupts are checked.
    Active,
    /// After `mov ss` / `pop ss`: the next instruction runs before interrupts are checked,
    /// and debug traps of the instruction that set it (single step, data breakpoints) wait
    /// until the next one has run.
    MovSs,
}

/// Everything a vCPU's instructions can see or change.
#[derive(Debug)]
pub struct Cpu {
    /// RAX..R15 in encoding order; index 16 is a constant zero used for absent base/index.
    /// The array has 256 entries, so that any `u8` register index needs neither a bounds
    /// check nor a mask on a read (the hot paths index it with the bytes of `Insn` and
    /// `Uop`); entries 16.. are never written and stay zero.
    pub gpr: [u64; 256],
    /// Instruction pointer (during execution: the next instruction's address).
    pub rip: u64,
    /// RFLAGS; the six status flags are valid only when `cc.op` is `Eager`.
    pub rflags: u64,
    /// Lazy flags.
    pub cc: Cc,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Seg; 6],
    /// Effective segment bases for address computation (zero for ES/CS/SS/DS in 64-bit mode).
    pub ebase: [u64; 8],
    /// LDTR.
    pub ldtr: Seg,
    /// Task register.
    pub tr: Seg,
    /// GDTR (base, limit).
    pub gdt: (u64, u16),
    /// IDTR (base, limit).
    pub idt: (u64, u16),
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority; stored only).
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
    /// Debug registers DR0-DR7 (DR4/DR5 are never stored: they alias DR6/DR7).
    pub dr: [u64; 8],
    /// B0-B3 of the data breakpoints the current instruction's accesses met (collected only
    /// while a data breakpoint is armed, see [`Mmu::no_data_tlb`]).
    pub db_hits: u64,
    /// DR6 bits (B0-B3, BS) of a debug trap held back by a `mov ss` shadow.
    pub pending_db: u64,
    /// Current privilege level.
    pub cpl: u8,
    /// Linear address mask (32 bits outside long mode).
    pub lin_mask: u64,
    /// Stack pointer width mask (0xffff, 0xffff_ffff or all ones).
    pub sp_mask: u64,
    /// MSRs.
    pub msr: Msrs,
    /// XMM0-15.
    pub xmm: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// x87.
    pub fpu: Fpu,
    /// Interrupt shadow.
    pub shadow: Shadow,
    /// Set by an instruction that changed state the current block was specialised on, or
    /// that wrote to a page holding translated code: the block loop stops after it.
    pub stop_block: bool,
    /// Code pages written since the last check (processed by the block cache).
    pub dirty_code: Vec<u64>,
    /// Set when `dirty_code` overflowed: flush the whole block cache.
    pub dirty_code_overflow: bool,
    /// Instructions retired (for MIPS accounting and the TSC).
    pub icount: u64,
    /// The last exception raised by an instruction: (vector, error code or `u32::MAX`, RIP of
    /// the instruction), for diagnosing triple faults.
    pub last_exception: Option<(u8, u32, u64)>,
    /// Set by `hlt`: waiting for an interrupt.
    pub halted: bool,
    /// An NMI is being handled: further NMIs wait until the next IRET.
    pub nmi_blocked: bool,
    /// Memory management unit (TLBs, guest RAM).
    pub mmu: Mmu,
    /// CPUID configuration.
    pub cpuid: crate::cpuid::CpuidConfig,
    /// vCPU index (APIC ID).
    pub index: u32,
    /// The local APIC, when the VM has them (IA32_APIC_BASE reads and writes go to it).
    pub lapic: Option<std::sync::Arc<crate::platform::lapic::Lapic>>,
}

/// Model-specific registers the interpreter keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct Msrs {
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_CSTAR.
    pub cstar: u64,
    /// IA32_FMASK.
    pub sfmask: u64,
    /// IA32_KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// IA32_SYSENTER_CS/ESP/EIP.
    pub sysenter: [u64; 3],
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_MISC_ENABLE.
    pub misc_enable: u64,
    /// TSC offset against `icount`-derived time.
    pub tsc_offset: u64,
    /// IA32_TSC_AUX.
    pub tsc_aux: u64,
}

impl Cpu {
    /// A CPU in the x86 reset state (real mode, CS:IP = F000:FFF0) over `phys`.
    pub fn new(phys: PhysMem, cpuid: crate::cpuid::CpuidConfig, index: u32) -> Self {
        let mut cs = Seg::real(0xf000);
        cs.base = 0xffff_0000;
        cs.attr = 0x9b;
        let mut c = Self {
            gpr: [0; 256],
            rip: 0xfff0,
            rflags: fl::FIXED1,
            cc: Cc::default(),
            seg: [
                Seg::real(0),
                cs,
                Seg::real(0),
                Seg::real(0),
                Seg::real(0),
                Seg::real(0),
            ],
            ebase: [0; 8],
            ldtr: Seg {
                attr: 0x82,
                limit: 0xffff,
                ..Seg::default()
            },
            tr: Seg {
                attr: 0x8b,
                limit: 0xffff,
                ..Seg::default()
            },
            gdt: (0, 0xffff),
            idt: (0, 0x3ff),
            cr0: cr0::ET | cr0::NW | cr0::CD,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, dr::DR6_FIXED1, dr::DR7_FIXED1],
            db_hits: 0,
            pending_db: 0,
            cpl: 0,
            sp_mask: 0xffff,
            lin_mask: 0xffff_ffff,
            msr: Msrs {
                apic_base: 0xfee0_0000 | if index == 0 { 1 << 8 } else { 0 },
                pat: 0x0007_0406_0007_0406,
                misc_enable: 1,
                // The TSC counts from zero at reset.
                tsc_offset: 0u64.wrapping_sub(crate::time::host_tsc()),
                ..Msrs::default()
            },
            xmm: [0; 16],
            mxcsr: 0x1f80,
            fpu: Fpu::default(),
            shadow: Shadow::None,
            stop_block: false,
            dirty_code: Vec::new(),
            dirty_code_overflow: false,
            icount: 0,
            last_exception: None,
            halted: false,
            nmi_blocked: false,
            mmu: Mmu::new(phys),
            cpuid,
            index,
            lapic: None,
        };
        c.gpr[2] = 0x600; // EDX: family/model/stepping at reset
        c.refresh_mode();
        c
    }

    /// Whether instructions must run one at a time with the debug checks: TF or RF set, a
    /// breakpoint enabled in DR7, or a debug trap held back by a `mov ss` shadow. Looked at
    /// once per trip through the vCPU loop; every instruction that can change it ends its
    /// block.
    #[inline(always)]
    pub fn debug_active(&self) -> bool {
        self.rflags & (fl::TF | fl::RF) != 0
            || self.dr[7] & dr::ENABLES != 0
            || self.pending_db != 0
    }

    /// Takes a new DR7 (or DR0-3) into account: data breakpoints keep data accesses out of
    /// the TLB so that each one is compared with them.
    pub fn debug_regs_changed(&mut self) {
        let on = dr::watches_data(self.dr[7]);
        self.mmu.set_no_data_tlb(on);
        if on {
            // The breakpoint addresses may have changed under entries already filled.
            self.mmu.flush();
        }
    }

    /// Whether long mode is active.
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    /// Whether the CPU executes 64-bit code.
    #[inline]
    pub fn code64(&self) -> bool {
        self.long_mode() && self.seg[sr::CS].l()
    }

    /// Whether protected mode is on.
    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & cr0::PE != 0
    }

    /// Virtual-8086 mode.
    #[inline]
    pub fn vm86(&self) -> bool {
        self.rflags & fl::VM != 0
    }

    /// Code bitness: 16, 32 or 64.
    pub fn bitness(&self) -> u32 {
        if self.code64() {
            64
        } else if self.protected() && !self.vm86() && self.seg[sr::CS].db() {
            32
        } else {
            16
        }
    }

    /// Recomputes derived state after a change of mode, CS, SS or a segment base.
    pub fn refresh_mode(&mut self) {
        let l64 = self.code64();
        for i in 0..6 {
            self.ebase[i] = if l64 && i < 4 { 0 } else { self.seg[i].base };
        }
        self.lin_mask = if l64 { u64::MAX } else { 0xffff_ffff };
        self.sp_mask = if l64 {
            u64::MAX
        } else if self.seg[sr::SS].db() && self.protected() && !self.vm86() {
            0xffff_ffff
        } else {
            0xffff
        };
        if !self.protected() {
            self.cpl = 0;
        } else if self.vm86() {
            self.cpl = 3;
        }
        self.mmu.user = self.cpl == 3;
    }

    /// Mode bits a translated block is specialised on.
    #[inline]
    pub fn mode_key(&self) -> u32 {
        self.bitness()
    }

    // ---- registers ----

    /// Reads an 8-bit register; indices 16..20 are AH, CH, DH, BH.
    #[inline(always)]
    pub fn r8(&self, r: u8) -> u64 {
        if r < 16 {
            self.gpr[(r & 15) as usize] & 0xff
        } else {
            (self.gpr[(r & 3) as usize] >> 8) & 0xff
        }
    }

    /// Writes an 8-bit register.
    #[inline(always)]
    pub fn w8(&mut self, r: u8, v: u64) {
        if r < 16 {
            let g = &mut self.gpr[(r & 15) as usize];
            *g = (*g & !0xff) | (v & 0xff);
        } else {
            let g = &mut self.gpr[(r & 3) as usize];
            *g = (*g & !0xff00) | ((v & 0xff) << 8);
        }
    }

    /// Reads a register of `size` bytes.
    #[inline(always)]
    pub fn rreg(&self, r: u8, size: u8) -> u64 {
        // Operands wider than a byte name registers 0..15 (16 reads as zero): no mask.
        match size {
            1 => self.r8(r),
            2 => self.gpr[usize::from(r)] & 0xffff,
            4 => self.gpr[usize::from(r)] & 0xffff_ffff,
            _ => self.gpr[usize::from(r)],
        }
    }

    /// Writes a register of `size` bytes with x86 rules (32-bit writes zero-extend).
    #[inline(always)]
    pub fn wreg(&mut self, r: u8, size: u8, v: u64) {
        match size {
            1 => self.w8(r, v),
            2 => {
                let g = &mut self.gpr[(r & 15) as usize];
                *g = (*g & !0xffff) | (v & 0xffff);
            }
            4 => self.gpr[(r & 15) as usize] = v & 0xffff_ffff,
            _ => self.gpr[(r & 15) as usize] = v,
        }
    }

    // ---- flags ----

    /// Records a lazy-flag result. `aux` is left as it was: only the kinds that read it
    /// (`Adc`, `Sbb`, `Inc`, `Dec`) look at it, and their producers set it (one store less
    /// for every `add`, `sub`, `cmp` and logic operation).
    #[inline(always)]
    pub fn set_cc(&mut self, op: CcOp, size: u8, res: u64, a: u64, b: u64) {
        let c = &mut self.cc;
        c.op = op;
        c.size = size;
        c.res = res;
        c.a = a;
        c.b = b;
    }

    /// Carry flag.
    #[inline]
    pub fn cf(&self) -> bool {
        let c = &self.cc;
        match c.op {
            CcOp::Eager => self.rflags & fl::CF != 0,
            CcOp::Add => c.res < c.a,
            CcOp::Adc => {
                if c.aux != 0 {
                    c.res <= c.a
                } else {
                    c.res < c.a
                }
            }
            CcOp::Sub => c.a < c.b,
            CcOp::Sbb => {
                if c.aux != 0 {
                    c.a <= c.b
                } else {
                    c.a < c.b
                }
            }
            CcOp::Logic => false,
            CcOp::Inc | CcOp::Dec => c.aux != 0,
        }
    }

    /// Zero flag.
    #[inline]
    pub fn zf(&self) -> bool {
        if self.cc.op == CcOp::Eager {
            self.rflags & fl::ZF != 0
        } else {
            self.cc.res == 0
        }
    }

    /// Sign flag.
    #[inline]
    pub fn sf(&self) -> bool {
        if self.cc.op == CcOp::Eager {
            self.rflags & fl::SF != 0
        } else {
            self.cc.res & sign_bit(self.cc.size) != 0
        }
    }

    /// Parity flag.
    #[inline]
    pub fn pf(&self) -> bool {
        if self.cc.op == CcOp::Eager {
            self.rflags & fl::PF != 0
        } else {
            parity(self.cc.res)
        }
    }

    /// Auxiliary carry flag.
    #[inline]
    pub fn af(&self) -> bool {
        let c = &self.cc;
        match c.op {
            CcOp::Eager => self.rflags & fl::AF != 0,
            CcOp::Logic => false,
            CcOp::Inc => c.res & 0xf == 0,
            CcOp::Dec => c.res & 0xf == 0xf,
            _ => (c.a ^ c.b ^ c.res) & 0x10 != 0,
        }
    }

    /// Overflow flag.
    #[inline]
    pub fn of(&self) -> bool {
        let c = &self.cc;
        let sb = sign_bit(c.size);
        match c.op {
            CcOp::Eager => self.rflags & fl::OF != 0,
            CcOp::Add | CcOp::Adc => (c.a ^ c.res) & (c.b ^ c.res) & sb != 0,
            CcOp::Sub | CcOp::Sbb => (c.a ^ c.b) & (c.a ^ c.res) & sb != 0,
            CcOp::Logic => false,
            CcOp::Inc => c.res == sb,
            CcOp::Dec => c.res == sb - 1,
        }
    }

    /// Full RFLAGS with the status flags materialised.
    pub fn flags(&self) -> u64 {
        if self.cc.op == CcOp::Eager {
            return self.rflags;
        }
        let mut f = self.rflags & !fl::ARITH;
        if self.cf() {
            f |= fl::CF;
        }
        if self.pf() {
            f |= fl::PF;
        }
        if self.af() {
            f |= fl::AF;
        }
        if self.zf() {
            f |= fl::ZF;
        }
        if self.sf() {
            f |= fl::SF;
        }
        if self.of() {
            f |= fl::OF;
        }
        f
    }

    /// Materialises the status flags into `rflags` and switches to eager mode.
    #[inline]
    pub fn flush_flags(&mut self) {
        if self.cc.op != CcOp::Eager {
            self.rflags = self.flags();
            self.cc.op = CcOp::Eager;
        }
    }

    /// Replaces the status flags (eager) keeping the other bits.
    #[inline]
    pub fn set_arith_flags(&mut self, f: u64) {
        // All six are replaced, so the lazy record need not be materialised first.
        self.cc.op = CcOp::Eager;
        self.rflags = (self.rflags & !fl::ARITH) | (f & fl::ARITH);
    }

    /// Sets status flags from a result with explicit CF/OF/AF (used by shifts, mul, etc.).
    #[inline]
    pub fn set_flags_res(&mut self, size: u8, res: u64, cf: bool, of: bool, af: bool) {
        let mut f = 0;
        if cf {
            f |= fl::CF;
        }
        if of {
            f |= fl::OF;
        }
        if af {
            f |= fl::AF;
        }
        if res == 0 {
            f |= fl::ZF;
        }
        if res & sign_bit(size) != 0 {
            f |= fl::SF;
        }
        if parity(res) {
            f |= fl::PF;
        }
        self.set_arith_flags(f);
    }

    /// Sets one status flag (eager).
    #[inline]
    pub fn set_flag(&mut self, bit: u64, on: bool) {
        self.flush_flags();
        if on {
            self.rflags |= bit;
        } else {
            self.rflags &= !bit;
        }
    }

    /// Evaluates a condition code (0..15 in Jcc encoding order).
    #[inline(always)]
    pub fn cond(&self, cc: u8) -> bool {
        let c = &self.cc;
        if cc >> 1 == 2 {
            // ZF alone: the result is zero whatever the lazy kind.
            return self.zf() ^ (cc & 1 != 0);
        }
        // Fast paths for compare-then-branch.
        if c.op == CcOp::Sub {
            let r = match cc >> 1 {
                1 => c.a < c.b,
                3 => c.a <= c.b,
                6 | 7 => {
                    let sh = 64u32.saturating_sub(u32::from(c.size) * 8) & 63;
                    let a = ((c.a << sh) as i64) >> sh;
                    let b = ((c.b << sh) as i64) >> sh;
                    if cc >> 1 == 6 { a < b } else { a <= b }
                }
                _ => return self.cond_slow(cc),
            };
            return r ^ (cc & 1 != 0);
        }
        if c.op == CcOp::Logic {
            // CF = OF = 0.
            let sf = c.res & sign_bit(c.size) != 0;
            let zf = c.res == 0;
            let r = match cc >> 1 {
                0 | 1 => false,
                3 => zf,
                4 | 6 => sf,
                5 => parity(c.res),
                _ => zf || sf,
            };
            return r ^ (cc & 1 != 0);
        }
        self.cond_slow(cc)
    }

    fn cond_slow(&self, cc: u8) -> bool {
        let r = match cc >> 1 {
            0 => self.of(),
            1 => self.cf(),
            2 => self.zf(),
            3 => self.cf() || self.zf(),
            4 => self.sf(),
            5 => self.pf(),
            6 => self.sf() != self.of(),
            _ => self.zf() || (self.sf() != self.of()),
        };
        r ^ (cc & 1 != 0)
    }

    /// Replaces RFLAGS entirely (used by popf/iret/interrupt delivery after checks).
    pub fn set_rflags(&mut self, v: u64) {
        let old_vm = self.rflags & fl::VM;
        self.cc.op = CcOp::Eager;
        self.rflags = (v & (fl::WRITABLE | fl::VM)) | fl::FIXED1;
        if self.rflags & fl::VM != old_vm {
            self.refresh_mode();
        }
    }

    /// Effective CPL-3 check helper: whether IOPL permits I/O at the current privilege.
    pub fn io_allowed(&self) -> bool {
        !self.protected() || (!self.vm86() && u64::from(self.cpl) <= (self.rflags >> 12) & 3)
    }
}

// ---------------------------------------------------------------------------------------
// Linear memory access (through the MMU's software TLB)

impl Cpu {
    /// Translates with fault delivery semantics: #PF sets CR2.
    #[inline]
    pub fn translate(&mut self, lin: u64, acc: Access, user: bool) -> Result<u64, Ex> {
        match self.mmu.translate(lin, acc, user) {
            Ok(g) => Ok(g),
            Err(u32::MAX) => Err(Ex::gp(0)),
            Err(e) => {
                self.cr2 = lin;
                Err(Ex::Fault {
                    vector: vec::PF,
                    error: e,
                })
            }
        }
    }

    /// Reads `N` bytes (1, 2, 4, 8) at linear `lin` with the current privilege.
    #[inline(always)]
    pub fn rd<const N: usize>(&mut self, lin: u64) -> Result<u64, Ex> {
        let user = self.mmu.user;
        self.rd_as::<N>(lin, user)
    }

    /// Reads with an explicit privilege (`user = false` for implicit supervisor accesses).
    #[inline(always)]
    pub fn rd_as<const N: usize>(&mut self, lin: u64, user: bool) -> Result<u64, Ex> {
        if (lin & 0xfff) as usize <= 4096 - N
            && let Some(h) = self.mmu.lookup(lin, Access::Read, user)
        {
            let mut b = [0u8; 8];
            // SAFETY: a TLB hit maps this whole page to live guest RAM; the access stays in it.
            unsafe { std::ptr::copy_nonoverlapping(h as *const u8, b.as_mut_ptr(), N) };
            return Ok(u64::from_le_bytes(b));
        }
        self.rd_slow(lin, N, user)
    }

    #[inline(never)]
    fn rd_slow(&mut self, lin: u64, n: usize, user: bool) -> Result<u64, Ex> {
        let mut b = [0u8; 16];
        self.read_bytes(lin, &mut b[..n], user)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// Reads up to 16 bytes at `lin`, crossing pages as needed; faults before any side effect.
    pub fn read_bytes(&mut self, lin: u64, buf: &mut [u8], user: bool) -> Result<(), Ex> {
        let n = buf.len();
        let first = (PAGE - (lin & 0xfff)) as usize;
        if n <= first {
            let g = self.translate(lin, Access::Read, user)?;
            self.mmu.phys.read(g, buf);
        } else {
            let g0 = self.translate(lin, Access::Read, user)?;
            let lin1 = lin.wrapping_add(first as u64);
            let g1 = self.translate(lin1, Access::Read, user)?;
            let (a, b) = buf.split_at_mut(first);
            self.mmu.phys.read(g0, a);
            self.mmu.phys.read(g1, b);
        }
        if self.mmu.no_data_tlb {
            self.db_hits |= dr::data_hits(&self.dr, lin, n as u64, false);
        }
        Ok(())
    }

    /// The TLB-hit half of [`Self::rd`]: `None` when the access needs the slow path
    /// (TLB miss, page crossing, MMIO), which the caller then takes out of line.
    #[inline(always)]
    pub fn rd_fast<const N: usize>(&self, lin: u64) -> Option<u64> {
        if (lin & 0xfff) as usize <= 4096 - N
            && let Some(h) = self.mmu.lookup(lin, Access::Read, self.mmu.user)
        {
            let mut b = [0u8; 8];
            // SAFETY: a TLB hit maps this whole page to live guest RAM; the access stays in it.
            unsafe { std::ptr::copy_nonoverlapping(h as *const u8, b.as_mut_ptr(), N) };
            return Some(u64::from_le_bytes(b));
        }
        None
    }

    /// The TLB-hit half of [`Self::wr`]: false (nothing written) when the access needs the
    /// slow path. Write-TLB entries never map code pages, so no translated code changes.
    #[inline(always)]
    pub fn wr_fast<const N: usize>(&mut self, lin: u64, v: u64) -> bool {
        if (lin & 0xfff) as usize <= 4096 - N
            && let Some(h) = self.mmu.lookup(lin, Access::Write, self.mmu.user)
        {
            let b = v.to_le_bytes();
            // SAFETY: a write-TLB hit maps this page to live, non-code guest RAM.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), h as *mut u8, N) };
            self.mark_hit(lin, N, self.mmu.user);
            return true;
        }
        false
    }

    /// Writes `N` bytes at linear `lin` with the current privilege.
    #[inline(always)]
    pub fn wr<const N: usize>(&mut self, lin: u64, v: u64) -> Result<(), Ex> {
        let user = self.mmu.user;
        self.wr_as::<N>(lin, v, user)
    }

    /// Writes with an explicit privilege.
    #[inline(always)]
    pub fn wr_as<const N: usize>(&mut self, lin: u64, v: u64, user: bool) -> Result<(), Ex> {
        if (lin & 0xfff) as usize <= 4096 - N
            && let Some(h) = self.mmu.lookup(lin, Access::Write, user)
        {
            let b = v.to_le_bytes();
            // SAFETY: a write-TLB hit maps this page to live, non-code guest RAM.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), h as *mut u8, N) };
            self.mark_hit(lin, N, user);
            return Ok(());
        }
        let b = v.to_le_bytes();
        self.write_bytes(lin, &b[..N], user)
    }

    /// Writes up to 16 bytes at `lin`, crossing pages; translates both pages before writing.
    #[inline(never)]
    pub fn write_bytes(&mut self, lin: u64, buf: &[u8], user: bool) -> Result<(), Ex> {
        let n = buf.len();
        let first = (PAGE - (lin & 0xfff)) as usize;
        if n <= first {
            let g = self.translate(lin, Access::Write, user)?;
            self.phys_write(g, buf);
        } else {
            let g0 = self.translate(lin, Access::Write, user)?;
            let lin1 = lin.wrapping_add(first as u64);
            let g1 = self.translate(lin1, Access::Write, user)?;
            self.phys_write(g0, &buf[..first]);
            self.phys_write(g1, &buf[first..]);
        }
        if self.mmu.no_data_tlb {
            self.db_hits |= dr::data_hits(&self.dr, lin, n as u64, true);
        }
        Ok(())
    }

    /// Records a write that hit the write TLB in the dirty log, while one is recorded (a
    /// live migration); one relaxed load otherwise.
    #[inline(always)]
    fn mark_hit(&self, lin: u64, n: usize, user: bool) {
        if self.mmu.phys.logging()
            && let Some(g) = self.mmu.lookup_gpa(lin, Access::Write, user)
        {
            self.mmu.phys.mark(g, n as u64);
        }
    }

    /// Physical write that notices translated code on the page.
    pub fn phys_write(&mut self, gpa: u64, buf: &[u8]) {
        if self.mmu.phys.is_code(gpa) {
            self.note_code_write(gpa);
        }
        self.mmu.phys.write(gpa, buf);
    }

    /// Records that the code page of `gpa` was written; the block loop invalidates it.
    pub fn note_code_write(&mut self, gpa: u64) {
        self.mmu.phys.set_code(gpa, false);
        if self.dirty_code.len() < 64 {
            self.dirty_code.push(gpa & PAGE_MASK);
        } else {
            self.dirty_code_overflow = true;
        }
        self.stop_block = true;
    }

    /// Host pointer for `len` bytes at `lin` if they lie in one RAM page reachable for `acc`
    /// (used by bulk string operations). Translates (and may fault).
    pub fn host_span(&mut self, lin: u64, acc: Access) -> Result<Option<(usize, u64)>, Ex> {
        let user = self.mmu.user;
        let g = self.translate(lin, acc, user)?;
        if self.mmu.no_data_tlb {
            // Element by element, so that each access meets the data breakpoints.
            return Ok(None);
        }
        if acc == Access::Write && self.mmu.phys.is_code(g) {
            return Ok(None);
        }
        Ok(self.mmu.phys.host(g).map(|h| (h, g)))
    }
}
