//! The accelerator seam for the interpreter: [`TcgAccel`], [`TcgVm`], [`TcgVcpu`].
//!
//! The VM owns the 8259 PIC pair and the 8254 PIT (from [`crate::platform`]); the machine maps
//! them on its PIO bus through [`keel_accel::Vm::platform_devices`]. Port and MMIO accesses
//! go from the interpreter straight to the machine's buses (the same [`IoBuses`] KVM exits
//! are dispatched to), so `run` never returns `IoIn`/`MmioRead` and `complete_read` is unused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use keel_accel::{
    AccelError, Accelerator, BusDevice, BusRange, GuestMemory, IoBuses, IrqChip, IrqLine, Kick,
    MachineRequirements, Regs, SpecialRegs, SystemEvents, Vcpu, VcpuExit, Vm,
};

use crate::cpu::{Cpu, Seg, Shadow, fl, sr};
use crate::cpuid::CpuidConfig;
use crate::decode::BlockCache;
use crate::exc::{Ex, vec};
use crate::mem::{Access, PhysMem};
use crate::platform::pic::Pic;
use crate::platform::pit::Pit;
use crate::platform::{Clock, MonotonicClock, Wakeup};
use crate::system;

const NAME: &str = "tcg";

/// The interpreting accelerator; always available.
#[derive(Debug, Clone, Default)]
pub struct TcgAccel {
    /// CPUID the guest sees.
    pub cpuid: CpuidConfig,
}

impl TcgAccel {
    /// An accelerator with the default CPUID (see [`CpuidConfig`]).
    pub fn new() -> Self {
        Self::default()
    }
}

impl Accelerator for TcgAccel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, req: &MachineRequirements) -> Result<(), AccelError> {
        let bad = |reason: &str| AccelError::Incompatible {
            accel: NAME,
            machine: req.machine.clone(),
            reason: reason.to_string(),
        };
        if req.vcpus != 1 {
            return Err(bad(
                "tcg runs one vCPU: no local APIC is modelled, so application processors cannot be started (use -smp 1)",
            ));
        }
        match req.irqchip {
            // GSIs 0-15 go to the 8259 pair; no IOAPIC is modelled and none is advertised.
            IrqChip::Pic | IrqChip::PicIoapic => Ok(()),
        }
    }

    fn create_vm(
        &self,
        req: &MachineRequirements,
        memory: Arc<GuestMemory>,
        buses: Arc<IoBuses>,
        events: Arc<dyn SystemEvents>,
    ) -> Result<Box<dyn Vm>, AccelError> {
        self.check(req)?;
        Ok(Box::new(TcgVm::new(
            memory,
            buses,
            events,
            self.cpuid.clone(),
        )?))
    }
}

/// Per-vCPU attention bits, checked once per block.
#[derive(Debug, Default)]
struct Attention {
    bits: AtomicU32,
    pending_inval: Mutex<Vec<(u64, u64)>>,
}

const ATT_KICK: u32 = 1;
const ATT_INVAL: u32 = 2;

struct VcpuHandle {
    att: Arc<Attention>,
    wakeup: Arc<Wakeup>,
}

impl Kick for VcpuHandle {
    fn kick(&self) {
        self.att.bits.fetch_or(ATT_KICK, Ordering::AcqRel);
        self.wakeup.notify();
    }
}

/// A VM running on the interpreter.
pub struct TcgVm {
    memory: Arc<GuestMemory>,
    buses: Arc<IoBuses>,
    _events: Arc<dyn SystemEvents>,
    pic: Arc<Pic>,
    pit: Arc<Pit>,
    clock: Arc<MonotonicClock>,
    wakeup: Arc<Wakeup>,
    cpuid: CpuidConfig,
    vcpus: Mutex<Vec<Weak<Attention>>>,
}

impl std::fmt::Debug for TcgVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcgVm")
            .field("pic", &self.pic)
            .finish_non_exhaustive()
    }
}

impl TcgVm {
    /// Creates the VM, its PIC and PIT.
    pub fn new(
        memory: Arc<GuestMemory>,
        buses: Arc<IoBuses>,
        events: Arc<dyn SystemEvents>,
        cpuid: CpuidConfig,
    ) -> Result<Self, AccelError> {
        let pic = Arc::new(Pic::new());
        let clock = Arc::new(MonotonicClock::new());
        let irq0 = pic.irq_line(0).map_err(|e| AccelError::Guest {
            vcpu: 0,
            reason: e.to_string(),
        })?;
        let pit = Arc::new(Pit::new(irq0, clock.clone() as Arc<dyn Clock>));
        let wakeup = Arc::new(Wakeup::new());
        let w = wakeup.clone();
        pic.set_wakeup(move || w.notify());
        Ok(Self {
            memory,
            buses,
            _events: events,
            pic,
            pit,
            clock,
            wakeup,
            cpuid,
            vcpus: Mutex::new(Vec::new()),
        })
    }

    /// Creates the concrete vCPU (the trait method boxes this).
    pub fn create_tcg_vcpu(&self, index: u32) -> TcgVcpu {
        let phys = PhysMem::new(self.memory.clone(), self.buses.clone());
        let cpu = Cpu::new(phys, self.cpuid.clone(), index);
        let att = Arc::new(Attention::default());
        self.vcpus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&att));
        TcgVcpu {
            cpu,
            cache: BlockCache::new(),
            att,
            pic: self.pic.clone(),
            pit: self.pit.clone(),
            clock: self.clock.clone(),
            wakeup: self.wakeup.clone(),
            next_poll: 0,
        }
    }

    /// Tells every vCPU that guest-physical `[gpa, gpa+len)` was written behind its back
    /// (device DMA, the VMM loading an image): translated code from those pages is dropped
    /// before the vCPU runs its next block.
    pub fn invalidate_range(&self, gpa: u64, len: u64) {
        let list = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        for v in list.iter().filter_map(Weak::upgrade) {
            let mut p = v.pending_inval.lock().unwrap_or_else(|p| p.into_inner());
            if p.len() < 256 {
                p.push((gpa, len));
            } else {
                p.clear();
                p.push((0, u64::MAX));
            }
            v.bits.fetch_or(ATT_INVAL, Ordering::AcqRel);
        }
    }

    /// The PIC, for tests and machines that wire lines themselves.
    pub fn pic(&self) -> &Arc<Pic> {
        &self.pic
    }
}

impl Vm for TcgVm {
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, AccelError> {
        if index != 0 {
            return Err(AccelError::Guest {
                vcpu: index,
                reason: crate::TcgError::OneVcpu(index).to_string(),
            });
        }
        Ok(Box::new(self.create_tcg_vcpu(index)))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
        self.pic.irq_line(gsi).map_err(|e| {
            let e = crate::TcgError::NoSuchGsi(e);
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            AccelError::Incompatible {
                accel: NAME,
                machine: String::new(),
                reason: format!("{e}{cause}"),
            }
        })
    }

    fn platform_devices(&self) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        let mut v = self.pic.bus_devices();
        v.extend(self.pit.bus_devices());
        v
    }

    /// Machine reset: the PIT and the PIC pair go back to their power-on state.
    fn reset(&self) -> Result<(), AccelError> {
        self.pit.reset();
        self.pic.reset();
        Ok(())
    }
}

/// A vCPU running on the interpreter.
pub struct TcgVcpu {
    /// Architectural state (public for tests and debuggers).
    pub cpu: Cpu,
    /// Decoded-block cache.
    pub cache: BlockCache,
    att: Arc<Attention>,
    pic: Arc<Pic>,
    pit: Arc<Pit>,
    clock: Arc<MonotonicClock>,
    wakeup: Arc<Wakeup>,
    next_poll: u64,
}

impl std::fmt::Debug for TcgVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcgVcpu")
            .field("rip", &self.cpu.rip)
            .field("icount", &self.cpu.icount)
            .finish_non_exhaustive()
    }
}

enum Stop {
    Exit(VcpuExit),
}

/// Set in a link's block index when the successor starts on another page than the block.
const CROSS_PAGE: u32 = 1 << 31;

/// Chained blocks run between two checks for attention, interrupts and timers.
const CHAIN_CHECK: u32 = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockEnd {
    /// Ran to the end; RIP is the successor.
    Normal,
    /// Stopped early after an instruction that wrote translated code.
    Stopped,
    /// An instruction at `ip` ended with a non-local outcome.
    Ex(Ex, u64),
}

/// Executes the instructions of one block.
///
/// Branches only end blocks, so only the last instruction can transfer control: RIP is
/// stored before it (branch handlers overwrite it; the generic handler stores its own),
/// and after a mid-block stop.
#[inline(always)]
fn exec_block(cpu: &mut Cpu, insns: &[crate::decode::Insn]) -> BlockEnd {
    let Some((last, body)) = insns.split_last() else {
        return BlockEnd::Normal;
    };
    // Counted up front, so that nothing but the instruction pointer stays live across the
    // calls; an early exit takes back what did not retire. The index of an instruction is
    // recomputed from its address there instead of being counted in the loop.
    let n = insns.len() as u64;
    cpu.icount += n;
    let index = |ins: &crate::decode::Insn| {
        ((ins as *const crate::decode::Insn as usize - insns.as_ptr() as usize)
            / std::mem::size_of::<crate::decode::Insn>()) as u64
    };
    for ins in body {
        if let Err(e) = (ins.exec)(cpu, ins) {
            let retired = index(ins) + u64::from(!matches!(e, Ex::Fault { .. }));
            cpu.icount -= n - retired;
            return BlockEnd::Ex(e, ins.ip);
        }
        if cpu.stop_block {
            cpu.rip = ins.next_ip;
            cpu.icount -= n - (index(ins) + 1);
            return BlockEnd::Stopped;
        }
    }
    cpu.rip = last.next_ip;
    if let Err(e) = (last.exec)(cpu, last) {
        if matches!(e, Ex::Fault { .. }) {
            cpu.icount -= 1;
        }
        return BlockEnd::Ex(e, last.ip);
    }
    if cpu.stop_block {
        return BlockEnd::Stopped;
    }
    BlockEnd::Normal
}

impl TcgVcpu {
    fn poll_timers(&self) {
        if let Some(d) = self.pit.next_deadline_ns()
            && self.clock.now_ns() >= d
        {
            self.pit.poll();
        }
    }

    fn process_attention(&mut self, bits: u32) -> Option<VcpuExit> {
        if bits & ATT_INVAL != 0 {
            self.att.bits.fetch_and(!ATT_INVAL, Ordering::AcqRel);
            let list: Vec<(u64, u64)> = std::mem::take(
                &mut *self
                    .att
                    .pending_inval
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            for (gpa, len) in list {
                if len > 64 * 4096 {
                    self.cache.flush(&mut self.cpu);
                    break;
                }
                let mut p = gpa & !0xfff;
                while p < gpa.saturating_add(len) {
                    self.cache.invalidate_page(&mut self.cpu, p);
                    p += 4096;
                }
            }
        }
        if bits & ATT_KICK != 0 {
            self.att.bits.fetch_and(!ATT_KICK, Ordering::AcqRel);
            return Some(VcpuExit::Interrupted);
        }
        None
    }

    /// Delivers an exception with double- and triple-fault handling.
    fn raise(&mut self, v: u8, err: Option<u32>, soft: bool, ext: bool) -> Result<(), Stop> {
        self.raise_at(v, err, soft, ext, 0)
    }

    /// [`Self::raise`] for a software interrupt at `soft_ip`.
    fn raise_at(
        &mut self,
        v: u8,
        err: Option<u32>,
        soft: bool,
        ext: bool,
        soft_ip: u64,
    ) -> Result<(), Stop> {
        let cpu = &mut self.cpu;
        if !ext {
            cpu.last_exception = Some((v, err.unwrap_or(u32::MAX), cpu.rip));
        }
        let mut cur = (v, err);
        let mut first = true;
        for _ in 0..3 {
            match system::deliver(cpu, cur.0, cur.1, soft && first, ext && first) {
                Ok(()) => return Ok(()),
                Err(Ex::Fault { vector, error }) => {
                    let error = Ex::code(error);
                    if first && soft {
                        // A software interrupt whose delivery faults reports the fault at
                        // the INT instruction itself.
                        cpu.rip = soft_ip;
                    }
                    if cur.0 == vec::DF {
                        return Err(Stop::Exit(VcpuExit::Shutdown));
                    }
                    let a = cur.0;
                    let df = (system::contributory(a) && system::contributory(vector))
                        || (a == vec::PF && (system::contributory(vector) || vector == vec::PF));
                    cur = if df {
                        (vec::DF, Some(0))
                    } else {
                        (vector, error)
                    };
                    first = false;
                }
                Err(_) => return Err(Stop::Exit(VcpuExit::Shutdown)),
            }
        }
        Err(Stop::Exit(VcpuExit::Shutdown))
    }

    fn handle_ex(&mut self, e: Ex, ip: u64) -> Result<(), Stop> {
        match e {
            Ex::Fault { vector, error } => {
                self.cpu.rip = ip;
                self.raise(vector, Ex::code(error), false, false)
            }
            Ex::SoftInt(v) => self.raise_at(v, None, v != 1, false, ip),
            Ex::Halt => {
                self.cpu.halted = true;
                Ok(())
            }
            Ex::EndBlock => Ok(()),
            Ex::Shutdown => Err(Stop::Exit(VcpuExit::Shutdown)),
        }
    }

    /// Runs until an exit; the inner loop of [`Vcpu::run`].
    fn run_inner(&mut self) -> Result<VcpuExit, Stop> {
        // Block whose successor link may be filled by the next lookup.
        let mut prev: Option<u32> = None;
        loop {
            let bits = self.att.bits.load(Ordering::Relaxed);
            if bits != 0 {
                prev = None;
                if let Some(x) = self.process_attention(bits) {
                    return Ok(x);
                }
            }
            if self.cpu.icount >= self.next_poll {
                // Reading the clock costs as much as a few blocks: do it every ~50k instructions.
                self.next_poll = self.cpu.icount + 50_000;
                self.poll_timers();
            }
            if self.cpu.stop_block {
                // Code was written outside a block (e.g. by exception delivery).
                self.cpu.stop_block = false;
                self.cache.process_dirty(&mut self.cpu);
                prev = None;
            }
            let shadow = self.cpu.shadow == Shadow::Active;
            if !shadow && self.cpu.rflags & fl::IF != 0 && self.pic.has_interrupt() {
                if let Some(v) = self.pic.acknowledge() {
                    self.raise(v, None, false, true)?;
                }
                prev = None;
            }
            if self.cpu.halted {
                if self.cpu.rflags & fl::IF == 0 {
                    return Ok(VcpuExit::Halted);
                }
                // Sleep until an interrupt, a kick or the next timer deadline.
                if !self.pic.has_interrupt() {
                    let deadline = self
                        .pit
                        .next_deadline_ns()
                        .map(|d| self.clock.instant_at(d));
                    self.wakeup.wait_until(deadline);
                }
                self.poll_timers();
                continue;
            }
            let mut idx = match self.cache.lookup(&mut self.cpu) {
                Ok(i) => i,
                Err(e) => {
                    let ip = self.cpu.rip;
                    self.handle_ex(e, ip)?;
                    prev = None;
                    continue;
                }
            };
            if let Some(p) = prev.take() {
                self.link(p, idx);
            }
            if shadow {
                self.cpu.shadow = Shadow::None;
                let r = exec_block(&mut self.cpu, &self.cache.blocks[idx as usize].insns[..1]);
                self.after_block(r)?;
                continue;
            }
            // Hot path: run blocks, following cached links, until something needs attention.
            // Attention (kicks, invalidations), pending interrupts and the timer poll are
            // checked every `CHAIN_CHECK` blocks rather than after each one: that bounds their
            // latency to a few thousand guest instructions and keeps the per-block cost to a
            // counter decrement.
            let mut budget = CHAIN_CHECK;
            loop {
                let r = exec_block(&mut self.cpu, &self.cache.blocks[idx as usize].insns);
                if r != BlockEnd::Normal {
                    self.after_block(r)?;
                    break;
                }
                budget -= 1;
                if budget == 0 {
                    if self.att.bits.load(Ordering::Relaxed) != 0
                        || (self.cpu.rflags & fl::IF != 0 && self.pic.has_interrupt())
                        || self.cpu.icount >= self.next_poll
                    {
                        break;
                    }
                    budget = CHAIN_CHECK;
                }
                match self.follow(idx) {
                    Some(b) => idx = b,
                    None => {
                        prev = Some(idx);
                        break;
                    }
                }
            }
        }
    }

    /// The cached successor of block `idx` for the current RIP.
    #[inline(always)]
    fn follow(&self, idx: u32) -> Option<u32> {
        let blk = &self.cache.blocks[idx as usize];
        let rip = self.cpu.rip;
        let generation = self.cache.generation;
        for l in &blk.links {
            let (r, b, g) = l.get();
            if r == rip && g == generation {
                if b & CROSS_PAGE == 0 {
                    // Same page: mapped like the block we are in.
                    return Some(b);
                }
                let b = b & !CROSS_PAGE;
                // Another page: follow only while the fetch TLB still maps it to the
                // guest-physical page the target was translated from.
                let lin = self.cpu.ebase[1].wrapping_add(rip) & self.cpu.lin_mask;
                let t = &self.cache.blocks[b as usize];
                return (self
                    .cpu
                    .mmu
                    .lookup_gpa(lin, Access::Fetch, self.cpu.mmu.user)
                    == Some(t.gpa))
                .then_some(b);
            }
        }
        None
    }

    /// Records `to` as a successor of `from` (same mode; `to` starts at the current RIP).
    fn link(&self, from: u32, to: u32) {
        let generation = self.cache.generation;
        let (Some(f), Some(t)) = (
            self.cache.blocks.get(from as usize),
            self.cache.blocks.get(to as usize),
        ) else {
            return;
        };
        if !f.valid || f.mode != t.mode || t.rip != self.cpu.rip {
            return;
        }
        let slot = if f.links[0].get().2 != generation {
            0
        } else {
            1
        };
        // Block indices stay far below bit 31 (the cache holds at most 65536 blocks).
        let cross = if (t.rip ^ f.rip) & !0xfff != 0 {
            CROSS_PAGE
        } else {
            0
        };
        f.links[slot].set((t.rip, to | cross, generation));
    }

    fn after_block(&mut self, r: BlockEnd) -> Result<(), Stop> {
        match r {
            BlockEnd::Normal => Ok(()),
            BlockEnd::Stopped => {
                self.cpu.stop_block = false;
                self.cache.process_dirty(&mut self.cpu);
                Ok(())
            }
            BlockEnd::Ex(e, ip) => {
                if self.cpu.stop_block {
                    self.cpu.stop_block = false;
                    self.cache.process_dirty(&mut self.cpu);
                }
                self.handle_ex(e, ip)
            }
        }
    }

    /// Instructions retired so far.
    pub fn icount(&self) -> u64 {
        self.cpu.icount
    }
}

impl Vcpu for TcgVcpu {
    fn index(&self) -> u32 {
        self.cpu.index
    }

    fn run(&mut self) -> Result<VcpuExit, AccelError> {
        match self.run_inner() {
            Ok(x) => Ok(x),
            Err(Stop::Exit(x)) => Ok(x),
        }
    }

    fn complete_read(&mut self, _data: u64) {
        // The interpreter performs I/O inline and never returns IoIn/MmioRead.
    }

    fn regs(&self) -> Result<Regs, AccelError> {
        let g = &self.cpu.gpr;
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.cpu.rip,
            rflags: self.cpu.flags(),
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<(), AccelError> {
        let c = &mut self.cpu;
        c.gpr[..16].copy_from_slice(&[
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ]);
        c.rip = r.rip;
        c.set_rflags(r.rflags);
        c.halted = false;
        c.refresh_mode();
        Ok(())
    }

    fn sregs(&self) -> Result<SpecialRegs, AccelError> {
        let c = &self.cpu;
        Ok(SpecialRegs {
            cs: c.seg[sr::CS].to_api(),
            ds: c.seg[sr::DS].to_api(),
            es: c.seg[sr::ES].to_api(),
            fs: c.seg[sr::FS].to_api(),
            gs: c.seg[sr::GS].to_api(),
            ss: c.seg[sr::SS].to_api(),
            tr: c.tr.to_api(),
            ldt: c.ldtr.to_api(),
            gdt: keel_accel::DescriptorTable {
                base: c.gdt.0,
                limit: c.gdt.1,
            },
            idt: keel_accel::DescriptorTable {
                base: c.idt.0,
                limit: c.idt.1,
            },
            cr0: c.cr0,
            cr2: c.cr2,
            cr3: c.cr3,
            cr4: c.cr4,
            cr8: c.cr8,
            efer: c.efer,
            apic_base: c.msr.apic_base,
        })
    }

    fn set_sregs(&mut self, s: &SpecialRegs) -> Result<(), AccelError> {
        let c = &mut self.cpu;
        c.seg[sr::CS] = Seg::from_api(&s.cs);
        c.seg[sr::DS] = Seg::from_api(&s.ds);
        c.seg[sr::ES] = Seg::from_api(&s.es);
        c.seg[sr::FS] = Seg::from_api(&s.fs);
        c.seg[sr::GS] = Seg::from_api(&s.gs);
        c.seg[sr::SS] = Seg::from_api(&s.ss);
        c.tr = Seg::from_api(&s.tr);
        c.ldtr = Seg::from_api(&s.ldt);
        c.gdt = (s.gdt.base, s.gdt.limit);
        c.idt = (s.idt.base, s.idt.limit);
        c.cr0 = s.cr0;
        c.cr2 = s.cr2;
        c.cr3 = s.cr3;
        c.cr4 = s.cr4;
        c.cr8 = s.cr8;
        c.efer = s.efer;
        c.msr.apic_base = s.apic_base;
        c.cpl = if c.protected() {
            c.seg[sr::SS].dpl()
        } else {
            0
        };
        c.halted = false;
        system::update_paging(c);
        Ok(())
    }

    fn reset(&mut self) -> Result<(), AccelError> {
        let phys = self.cpu.mmu.phys.fresh();
        let cpuid = self.cpu.cpuid.clone();
        let index = self.cpu.index;
        self.cpu = Cpu::new(phys, cpuid, index);
        self.cache = BlockCache::new();
        self.next_poll = 0;
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        Arc::new(VcpuHandle {
            att: self.att.clone(),
            wakeup: self.wakeup.clone(),
        })
    }
}
