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
use crate::mem::PhysMem;
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
            blocks: 0,
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
                reason: "tcg runs one vCPU".into(),
            });
        }
        Ok(Box::new(self.create_tcg_vcpu(index)))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
        self.pic
            .irq_line(gsi)
            .map_err(|e| AccelError::Incompatible {
                accel: NAME,
                machine: String::new(),
                reason: e.to_string(),
            })
    }

    fn platform_devices(&self) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        let mut v = self.pic.bus_devices();
        v.extend(self.pit.bus_devices());
        v
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
    blocks: u64,
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
        let cpu = &mut self.cpu;
        let mut cur = (v, err);
        let mut first = true;
        for _ in 0..3 {
            match system::deliver(cpu, cur.0, cur.1, soft && first, ext && first) {
                Ok(()) => return Ok(()),
                Err(Ex::Fault { vector, error }) => {
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
                self.raise(vector, error, false, false)
            }
            Ex::SoftInt(v) => self.raise(v, None, v != 1, false),
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
        let mut next: Option<u32> = None;
        loop {
            let bits = self.att.bits.load(Ordering::Relaxed);
            if bits != 0 {
                next = None;
                if let Some(x) = self.process_attention(bits) {
                    return Ok(x);
                }
            }
            self.blocks = self.blocks.wrapping_add(1);
            if self.blocks & 63 == 0 {
                self.poll_timers();
            }
            if !self.cpu.dirty_code.is_empty() || self.cpu.dirty_code_overflow {
                self.cache.process_dirty(&mut self.cpu);
                next = None;
            }
            let cpu = &mut self.cpu;
            let shadow = cpu.shadow == Shadow::Active;
            if !shadow && cpu.rflags & fl::IF != 0 && self.pic.has_interrupt() {
                if let Some(v) = self.pic.acknowledge() {
                    self.raise(v, None, false, true)?;
                }
                next = None;
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
                    self.poll_timers();
                }
                continue;
            }
            let idx = match next.take() {
                Some(i) => i,
                None => match self.cache.lookup(&mut self.cpu) {
                    Ok(i) => i,
                    Err(e) => {
                        let ip = self.cpu.rip;
                        self.handle_ex(e, ip)?;
                        continue;
                    }
                },
            };
            let cpu = &mut self.cpu;
            let blk = &self.cache.blocks[idx as usize];
            let insns: &[crate::decode::Insn] = if shadow {
                cpu.shadow = Shadow::None;
                &blk.insns[..1]
            } else {
                &blk.insns
            };
            let mut fault: Option<(Ex, u64)> = None;
            let mut done = 0u64;
            for ins in insns {
                cpu.rip = ins.next_ip;
                done += 1;
                if let Err(e) = (ins.exec)(cpu, ins) {
                    fault = Some((e, ins.ip));
                    break;
                }
                if cpu.stop_block {
                    break;
                }
            }
            cpu.icount += done;
            let stopped = std::mem::take(&mut cpu.stop_block);
            if let Some((e, ip)) = fault {
                if matches!(e, Ex::Fault { .. }) {
                    cpu.icount -= 1;
                }
                self.handle_ex(e, ip)?;
                continue;
            }
            if stopped || shadow {
                continue;
            }
            // Chain to the successor when it is on the same page in the same mode.
            let rip = self.cpu.rip;
            let blk = &self.cache.blocks[idx as usize];
            if (rip ^ blk.rip) & !0xfff != 0 {
                continue;
            }
            let generation = self.cache.generation;
            let mut found = None;
            for l in &blk.links {
                let (r, b, g) = l.get();
                if r == rip && g == generation {
                    found = Some(b);
                    break;
                }
            }
            if found.is_none()
                && let Ok(b) = self.cache.lookup(&mut self.cpu)
            {
                let blk = &self.cache.blocks[idx as usize];
                let slot = if blk.links[0].get().2 != generation {
                    0
                } else {
                    1
                };
                blk.links[slot].set((rip, b, self.cache.generation));
                found = Some(b);
            }
            next = found;
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

    fn kicker(&self) -> Arc<dyn Kick> {
        Arc::new(VcpuHandle {
            att: self.att.clone(),
            wakeup: self.wakeup.clone(),
        })
    }
}
