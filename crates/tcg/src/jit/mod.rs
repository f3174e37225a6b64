//! The compiling tier: hot blocks of 64-bit code run as host code (x86-64 hosts only).
//!
//! A block is interpreted on first use; each run counts in its [`JitSlot`], and when the count
//! passes the threshold (`KEEL_TCG_JIT_THRESHOLD`, default [`DEFAULT_THRESHOLD`]) the block
//! is compiled if every instruction in it is of a supported form (`compile`); otherwise it
//! stays interpreted and the reason is counted in [`JitStats`].
//!
//! Guest and host are the same ISA, so an integer instruction runs as itself: its guest
//! registers are loaded from `Cpu::gpr` into host registers, the instruction is re-encoded
//! with those registers (and a memory operand replaced by the host address of the guest
//! data), and the registers it writes are stored back. Host EFLAGS carry the guest's six
//! status flags through the block: loaded from `Cpu::rflags` at entry (the lazy record is
//! made eager first), stored back at every exit.
//!
//! Memory operands: the effective address is computed in host code and looked up inline in
//! the data TLB of [`crate::mem::Mmu`] (tag compare, add the host offset). Anything else — a
//! miss, a page crossing, MMIO, a write to a code page (write-TLB entries never map one), a
//! data breakpoint (the TLB is then empty) — leaves the compiled code *before* the
//! instruction: RIP is set to it, the instructions before it are counted, and the vCPU loop
//! interprets from there (where the access is done, or faults, exactly as the interpreter
//! does). Compiled code thus never faults and never writes a code page; while a dirty log
//! is recorded (live migration) compiled code is not entered at all, so every store goes
//! through the interpreter's marking path.
//!
//! A compiled block belongs to its [`crate::decode::Block`]: whatever drops or bypasses the
//! block (self-modifying code, mode changes, a cache flush) drops or bypasses its code. The
//! code lives in an [`arena::Arena`] that is never writable and executable at once.

#[cfg(target_arch = "x86_64")]
mod arena;
#[cfg(target_arch = "x86_64")]
mod compile;

use std::cell::Cell;
use std::collections::HashMap;

use crate::cpu::Cpu;

/// Runs of a block before it is compiled, unless `KEEL_TCG_JIT_THRESHOLD` says otherwise.
pub const DEFAULT_THRESHOLD: u32 = 2000;

/// `JitSlot::code` of a block that was looked at and will not be compiled.
pub const REJECTED: usize = 1;

/// Set in the value [`run`] returns when the compiled code left before an instruction it
/// could not complete (the low 32 bits count the instructions that retired).
pub const BAILED: u64 = 1 << 32;

/// The compiled state of one block.
#[derive(Debug, Default)]
pub struct JitSlot {
    /// Runs so far while not compiled.
    count: Cell<u32>,
    /// 0: not compiled (yet); [`REJECTED`]; otherwise the address of the compiled code.
    pub code: Cell<usize>,
}

/// Why blocks were not compiled, and how many were (diagnostics; printed when the cache
/// is dropped with `KEEL_TCG_JIT_STATS` set).
#[derive(Debug, Default)]
pub struct JitStats {
    /// Blocks compiled.
    pub compiled: u64,
    /// Bytes of host code produced.
    pub bytes: u64,
    /// Blocks left to the interpreter, by reason (an unsupported mnemonic's name, or one of
    /// "mode", "straddle", "rom", "decode", "encode", "arena").
    pub rejected: HashMap<String, u64>,
}

/// Whether the tier is on and when it compiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitConfig {
    /// Compile hot blocks at all.
    pub enabled: bool,
    /// Runs of a block before it is compiled (0: at its first run).
    pub threshold: u32,
}

impl JitConfig {
    /// The default: on (x86-64 hosts only) with [`DEFAULT_THRESHOLD`], overridden by the
    /// environment: `KEEL_TCG_JIT=off|on`, `KEEL_TCG_JIT_THRESHOLD=<runs>` (tests set 0 to
    /// run every eligible block compiled).
    pub fn from_env() -> Self {
        let mut c = Self {
            enabled: cfg!(target_arch = "x86_64"),
            threshold: DEFAULT_THRESHOLD,
        };
        if let Ok(v) = std::env::var("KEEL_TCG_JIT") {
            c.enabled = cfg!(target_arch = "x86_64") && v != "off" && v != "0";
        }
        if let Some(t) = std::env::var("KEEL_TCG_JIT_THRESHOLD")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            c.threshold = t;
        }
        c
    }
}

/// The compiler state of one vCPU's block cache: configuration, code arena, statistics.
#[derive(Debug)]
pub struct Jit {
    /// Configuration.
    pub config: JitConfig,
    /// Statistics.
    pub stats: JitStats,
    #[cfg(target_arch = "x86_64")]
    arena: Option<arena::Arena>,
    /// Blocks compiled or refused so far (stats are printed at powers of two of it).
    decided: u64,
}

impl Default for Jit {
    fn default() -> Self {
        Self::new(JitConfig::from_env())
    }
}

impl Jit {
    /// A compiler with configuration `config` (its arena is mapped at the first compile).
    pub fn new(config: JitConfig) -> Self {
        Self {
            config,
            stats: JitStats::default(),
            #[cfg(target_arch = "x86_64")]
            arena: None,
            decided: 0,
        }
    }

    /// Forgets all compiled code (the block cache was flushed: no block refers to it any
    /// more); the arena is made writable again, not executable, for reuse.
    pub fn reset(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(a) = self.arena.as_mut() {
            a.reset();
        }
    }

    fn reject(&mut self, slot: &JitSlot, why: &str) -> usize {
        *self.stats.rejected.entry(why.to_string()).or_default() += 1;
        slot.code.set(REJECTED);
        REJECTED
    }

    /// Counts one run of a block that is not compiled yet and compiles it when the count
    /// passes the threshold; returns the slot's new `code`.
    #[cold]
    #[inline(never)]
    pub fn tick(&mut self, cpu: &Cpu, blk: &crate::decode::Block) -> usize {
        let slot = &blk.jit;
        let n = slot.count.get().saturating_add(1);
        slot.count.set(n);
        if n <= self.config.threshold {
            return 0;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let r = self.compile_block(cpu, blk);
            self.decided += 1;
            if self.decided.is_power_of_two() && self.decided >= 256 {
                self.print_stats();
            }
            r
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = cpu;
            self.reject(slot, "host")
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn compile_block(&mut self, cpu: &Cpu, blk: &crate::decode::Block) -> usize {
        use iced_x86::{Decoder, DecoderOptions, Instruction};
        let slot = &blk.jit;
        if blk.mode != 64 {
            return self.reject(slot, "mode");
        }
        if blk.pages[1] != u64::MAX {
            return self.reject(slot, "straddle");
        }
        if cpu.mmu.phys.host(blk.gpa).is_none() {
            return self.reject(slot, "rom");
        }
        let Some(end) = blk.insns.last().map(|i| i.next_ip) else {
            return self.reject(slot, "decode");
        };
        // The block's bytes are those it was translated from: its pages are write-protected
        // and a lookup re-checks their fingerprint.
        let len = end.wrapping_sub(blk.rip) as usize;
        if len == 0 || len > 4096 - (blk.gpa & 0xfff) as usize {
            return self.reject(slot, "decode");
        }
        let mut buf = vec![0u8; len];
        cpu.mmu.phys.read(blk.gpa, &mut buf);
        let mut d = Decoder::with_ip(64, &buf, blk.rip, DecoderOptions::NONE);
        let mut raw: Vec<Instruction> = Vec::with_capacity(blk.insns.len() + 4);
        while d.can_decode() {
            let i = d.decode();
            if i.is_invalid() {
                return self.reject(slot, "decode");
            }
            raw.push(i);
        }
        if raw.last().map(|i| i.next_ip()) != Some(end) {
            return self.reject(slot, "decode");
        }
        if self.arena.is_none() {
            self.arena = arena::Arena::new(arena::ARENA_SIZE);
        }
        let Some(arena) = self.arena.as_mut() else {
            return self.reject(slot, "arena");
        };
        let at = arena.next_addr();
        let code = match compile::compile(&raw, at as u64) {
            Ok((c, None)) => c,
            Ok((c, Some(why))) => {
                *self
                    .stats
                    .rejected
                    .entry(format!("partial:{why}"))
                    .or_default() += 1;
                c
            }
            Err(why) => return self.reject(slot, &why),
        };
        let Some(addr) = arena.commit(&code) else {
            return self.reject(slot, "arena");
        };
        self.stats.compiled += 1;
        self.stats.bytes += code.len() as u64;
        slot.code.set(addr);
        addr
    }
}

impl Jit {
    /// With `KEEL_TCG_JIT_STATS` set: prints the statistics to stderr (at powers of two of
    /// the blocks decided, and when the cache is dropped).
    fn print_stats(&self) {
        if std::env::var_os("KEEL_TCG_JIT_STATS").is_some() {
            let mut r: Vec<_> = self.stats.rejected.iter().collect();
            r.sort_by(|a, b| b.1.cmp(a.1));
            r.truncate(24);
            eprintln!(
                "tcg jit: {} blocks compiled ({} bytes); not compiled: {:?}",
                self.stats.compiled, self.stats.bytes, r
            );
        }
    }
}

impl Drop for Jit {
    fn drop(&mut self) {
        self.print_stats();
    }
}

/// Runs compiled code `code` (a [`JitSlot::code`] address) on `cpu`; returns the number of
/// instructions retired, with [`BAILED`] set when it stopped before an instruction (RIP then
/// addresses that instruction). `icount` and RIP are updated, the flags are eager.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn run(cpu: &mut Cpu, code: usize) -> u64 {
    use crate::mem::Access;
    cpu.flush_flags();
    let ctx = compile::Ctx {
        tlb_read: cpu.mmu.tlb_base(Access::Read),
        tlb_write: cpu.mmu.tlb_base(Access::Write),
        user: u64::from(cpu.mmu.user),
    };
    // SAFETY: `code` is the entry of a function `compile::compile` produced with this
    // signature, in an arena mapped read+execute that is only remapped (reset) when the
    // block cache that holds the address is flushed. The code reads and writes only `Cpu`
    // fields at their `offset_of!` offsets (gpr, rip, rflags, ebase), the TLB tables `ctx`
    // points to (alive: owned by `cpu.mmu`), and guest RAM at host addresses a TLB hit
    // gives (live for the VM's lifetime, as for the interpreter's own TLB hits); it saves
    // and restores the callee-saved registers it uses and leaves DF clear.
    let f: unsafe extern "sysv64" fn(*mut Cpu, *const compile::Ctx) -> u64 =
        unsafe { std::mem::transmute::<usize, _>(code) };
    // SAFETY: see above; `cpu` is exclusively borrowed for the call.
    let r = unsafe { f(cpu, &ctx) };
    cpu.icount += r & 0xffff_ffff;
    r
}
