//! The accelerator seam for the interpreter: [`TcgAccel`], [`TcgVm`], [`TcgVcpu`].
//!
//! The VM owns the 8259 PIC pair and the 8254 PIT (from [`crate::platform`]); the machine maps
//! them on its PIO bus through [`keel_accel::Vm::platform_devices`]. With local APICs
//! ([`ApicMode`]) it also owns one [`Lapic`] per vCPU and an [`Ioapic`], and maps their
//! windows (0xfee00000, 0xfec00000) on the machine's MMIO bus itself when the VM is created.
//! Port and MMIO accesses go from the interpreter straight to the machine's buses (the same
//! [`IoBuses`] KVM exits are dispatched to), so `run` never returns `IoIn`/`MmioRead` and
//! `complete_read` is unused.
//!
//! # Several vCPUs: one execution lock
//!
//! Guest memory is shared by the vCPU threads, but the interpreter's LOCK-prefixed
//! read-modify-write instructions and its page-walk Accessed/Dirty updates are plain loads and
//! stores, not host atomics. So, as QEMU's TCG did before multi-threaded TCG, only one vCPU
//! interprets at a time: each [`TcgVm`] has one execution lock ([`ExecLock`], a ticket lock, so
//! hand-over is first come first served). A vCPU holds it while it runs guest code and gives it
//! up
//! * after a slice of [`SLICE_NS`] when another vCPU is waiting (checked at the timer poll,
//!   every ~50k instructions), or at that poll already when the waiter was woken from `hlt`
//!   by an interrupt or its timer ([`ExecLock::acquire_urgent`]): a guest's tick must not
//!   wait for another vCPU's slice, or it falls behind the TSC,
//! * when it spins in a `pause` loop while another vCPU waits (likely the one it waits for),
//! * while halted (`hlt`) or waiting for a start-up IPI, and
//! * whenever `run` returns to the machine's vCPU loop.
//!
//! Devices (the machine's buses) are called inline with the lock held; they serialise
//! themselves and never wait for a vCPU.
//!
//! Code written by another vCPU (cross-modifying code): each vCPU's block cache
//! write-protects, in that vCPU's TLB, the pages it translated; a page any vCPU starts
//! translating is also queued for the others, which write-protect it before they run again
//! (`CodePages`). So a write by any vCPU to code any vCPU translated traps; the writer drops
//! its own translations of the page and queues the page for every other vCPU, which drops
//! them before it runs again (the same path as [`TcgVm::invalidate_range`] for DMA).
//!
//! Application processors start in wait-for-SIPI: INIT then a start-up IPI from another
//! vCPU's ICR puts them in real mode at `CS = vector << 8`, `IP = 0`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};

use keel_accel::{
    AccelError, Accelerator, BusDevice, BusRange, CpuidLeaf, GuestMemory, IoBuses, IrqChip,
    IrqLine, Kick, MachineRequirements, Regs, SpecialRegs, SystemEvents, Vcpu, VcpuExit, Vm,
};

use crate::cpu::{Cpu, Seg, Shadow, fl, sr};
use crate::cpuid::CpuidConfig;
use crate::decode::BlockCache;
use crate::exc::{Ex, vec};
use crate::exec::system;
use crate::insn::Insn;
use crate::mem::{Access, PhysMem};
use crate::platform::ioapic::{IOAPIC_BASE, IOAPIC_LEN, Ioapic, IoapicError, IoapicMmio};
use crate::platform::lapic::{self, ApicBus, EoiListener, LAPIC_BASE, LAPIC_LEN, Lapic, LapicMmio};
use crate::platform::pic::{Pic, PicError};
use crate::platform::pit::Pit;
use crate::platform::{Clock, MonotonicClock, Wakeup};
use crate::regs::dr;
use crate::time::{guest_tsc_khz, host_tsc};

mod snapshot;

#[cfg(all(test, target_arch = "x86_64"))]
mod jit_tests;

const NAME: &str = "tcg";

/// The most vCPUs a VM may have (APIC IDs are the vCPU indices; xAPIC flat logical mode
/// addresses eight, physical mode up to 255).
pub const MAX_VCPUS: u32 = 64;

/// How long a vCPU keeps the execution lock while another one waits for it.
pub const SLICE_NS: u64 = 2_000_000;

/// Whether the VM has local APICs and an IOAPIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ApicMode {
    /// Only with more than one vCPU (the default). A one-vCPU VM then keeps the 8259-only
    /// platform (no APIC in CPUID, no IOAPIC), which boots Linux fastest here: with `On` a
    /// one-vCPU Debian boot reached its marker in 7.77 s instead of 7.30 s (median of 5,
    /// interleaved, `scripts/bench-boot.py`).
    #[default]
    Auto,
    /// Always: every vCPU has a local APIC (enabled, advertised in CPUID) and GSIs 0-23 reach
    /// the IOAPIC (0-15 the 8259 pair too).
    On,
    /// Never; more than one vCPU is then refused.
    Off,
}

impl ApicMode {
    fn enabled(self, vcpus: u32) -> bool {
        match self {
            Self::Auto => vcpus > 1,
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// Errors of this crate's own operations (reported to callers as [`keel_accel::AccelError`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TcgError {
    /// The interrupt line does not exist on the 8259 pair (a VM without IOAPIC).
    #[error("this tcg VM routes GSIs 0-15 to the 8259 pair only (it has no IOAPIC)")]
    NoSuchGsi(#[source] PicError),
    /// The GSI does not exist on the IOAPIC.
    #[error("tcg routes GSIs 0-23 to the IOAPIC (0-15 also to the 8259 pair)")]
    NoSuchIoapicPin(#[source] IoapicError),
    /// A VM without local APICs has only the bootstrap processor.
    #[error(
        "this tcg VM has no local APICs to start other vCPUs (ApicMode::Off); vCPU {0} was requested"
    )]
    OneVcpu(u32),
}

/// The interpreting accelerator; always available.
#[derive(Debug, Clone, Default)]
pub struct TcgAccel {
    /// CPUID the guest sees (the APIC bit is added when the VM has local APICs).
    pub cpuid: CpuidConfig,
    /// Local APIC / IOAPIC policy.
    pub apic: ApicMode,
    /// `-accel tcg,jit=on|off`: whether hot blocks are compiled (`None`: as the environment
    /// says, see [`crate::jit::JitConfig::from_env`]).
    pub jit: Option<bool>,
}

impl TcgAccel {
    /// An accelerator with the default CPUID (see [`CpuidConfig`]) and [`ApicMode::Auto`].
    pub fn new() -> Self {
        Self::default()
    }
}

impl Accelerator for TcgAccel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check(&self, req: &MachineRequirements) -> Result<(), AccelError> {
        let bad = |reason: String| AccelError::Incompatible {
            accel: NAME,
            machine: req.machine.clone(),
            reason,
        };
        if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
            return Err(bad(format!(
                "tcg runs 1 to {MAX_VCPUS} vCPUs, {} were requested",
                req.vcpus
            )));
        }
        if req.vcpus > 1 && !self.apic.enabled(req.vcpus) {
            return Err(bad(
                "more than one vCPU needs local APICs to start the others (APIC mode is off)"
                    .to_string(),
            ));
        }
        match req.irqchip {
            // GSIs 0-15 go to the 8259 pair; with APICs, 0-23 also to the IOAPIC.
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
        let mut cpuid = self.cpuid.clone();
        cpuid.cores = req.vcpus;
        let mut vm = TcgVm::with_apic(memory, buses, events, cpuid, self.apic.enabled(req.vcpus))?;
        if let Some(on) = self.jit {
            vm.set_jit(on);
        }
        Ok(Box::new(vm))
    }

    fn cpuid(&self, vcpus: u32) -> Vec<CpuidLeaf> {
        let mut cpuid = self.cpuid.clone();
        cpuid.cores = vcpus.max(1);
        if self.apic.enabled(vcpus) {
            cpuid.edx1 |= crate::cpuid::edx1::APIC;
        }
        leaves(&cpuid)
    }
}

/// The leaves `cpuid` answers for vCPU 0, as a table.
fn leaves(cpuid: &CpuidConfig) -> Vec<CpuidLeaf> {
    let leaves = (0..=0xd_u32)
        .chain(0x4000_0000..=0x4000_0001)
        .chain(0x8000_0000..=0x8000_0008);
    leaves
        .map(|function| {
            let (eax, ebx, ecx, edx) = cpuid.query(function, 0, 0);
            CpuidLeaf {
                function,
                index: 0,
                eax,
                ebx,
                ecx,
                edx,
            }
        })
        .collect()
}

/// Per-vCPU attention bits, checked once per block.
#[derive(Debug, Default)]
struct Attention {
    bits: AtomicU32,
    pending_inval: Mutex<Vec<(u64, u64)>>,
    /// Pages another vCPU started translating code from: this vCPU must trap its writes to
    /// them (see [`CodePages`]).
    pending_code: Mutex<CodeMarks>,
}

/// Code pages to write-protect, queued for a vCPU.
#[derive(Debug, Default)]
struct CodeMarks {
    pages: Vec<u64>,
    /// The queue overflowed: write-protect everything in the VM-wide set.
    resync: bool,
}

/// Most queued code pages per vCPU before it resynchronises from the VM-wide set.
const MAX_CODE_MARKS: usize = 4096;

/// The guest-physical pages some vCPU of the VM holds translated code from.
///
/// Each vCPU's block cache write-protects (in that vCPU's TLB) only the pages *it*
/// translated. With several vCPUs, a page one of them starts translating is also queued for
/// every other vCPU, which write-protects it before it runs again; so a write by any vCPU to
/// code any vCPU translated traps, and the writer passes the page on for invalidation (see
/// `TcgVcpu::process_dirty`). A page leaves the set when every vCPU is told to drop its
/// translations of it.
type CodePages = Arc<Mutex<std::collections::HashSet<u64>>>;

const ATT_KICK: u32 = 1;
const ATT_INVAL: u32 = 2;
/// The local APIC has an event (INIT, SIPI, NMI) or a new interrupt.
const ATT_APIC: u32 = 4;
/// Code pages to write-protect are queued in `pending_code`.
const ATT_CODE: u32 = 8;

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

#[derive(Debug, Default)]
struct Tickets {
    next: u64,
    serving: u64,
}

/// The VM's execution lock: a fair (ticket) lock only one interpreting vCPU holds.
#[derive(Debug, Default)]
pub struct ExecLock {
    tickets: Mutex<Tickets>,
    cv: Condvar,
    waiting: AtomicU32,
    /// Waiters that have an interrupt or event to handle (woken from `hlt`): the holder hands
    /// over at its next timer poll instead of at the end of its slice.
    urgent: AtomicU32,
}

impl ExecLock {
    /// An unowned lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for the lock, in arrival order. Every `acquire` must be paired with one
    /// [`ExecLock::release`] by the same holder.
    pub fn acquire(&self) {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let mine = t.next;
        t.next += 1;
        if t.serving != mine {
            self.waiting.fetch_add(1, Ordering::AcqRel);
            while t.serving != mine {
                t = self.cv.wait(t).unwrap_or_else(|p| p.into_inner());
            }
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// [`ExecLock::acquire`] for a vCPU that has work that should not wait for the holder's
    /// slice to end (a timer or device interrupt woke it).
    pub fn acquire_urgent(&self) {
        self.urgent.fetch_add(1, Ordering::AcqRel);
        self.acquire();
        self.urgent.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether a waiter acquired with [`ExecLock::acquire_urgent`] (one atomic load).
    #[inline]
    pub fn urgent(&self) -> bool {
        self.urgent.load(Ordering::Relaxed) > 0
    }

    /// Hands the lock to the next waiter.
    pub fn release(&self) {
        let mut t = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        t.serving += 1;
        drop(t);
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.cv.notify_all();
        }
    }

    /// Whether another vCPU waits for the lock (one atomic load).
    #[inline]
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }
}

/// Releases the execution lock when `run` returns or unwinds.
struct ExecGuard(Arc<ExecLock>);

impl Drop for ExecGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Queues "drop translations of `[gpa, gpa+len)`" for every vCPU of `list` but `except`.
fn post_invalidation(
    list: &Mutex<Vec<Weak<Attention>>>,
    except: Option<&Arc<Attention>>,
    gpa: u64,
    len: u64,
) {
    let list = list.lock().unwrap_or_else(|p| p.into_inner());
    for v in list.iter().filter_map(Weak::upgrade) {
        if except.is_some_and(|e| Arc::ptr_eq(e, &v)) {
            continue;
        }
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

/// Removes `[gpa, gpa+len)` from the VM-wide code pages (every vCPU is being told to drop
/// them); ranges past the per-page limit of `TcgVcpu::take_invalidations` flush everything.
fn forget_code(pages: &Mutex<std::collections::HashSet<u64>>, gpa: u64, len: u64) {
    let mut set = pages.lock().unwrap_or_else(|p| p.into_inner());
    if len > 64 * 4096 {
        set.clear();
        return;
    }
    let mut p = gpa & !0xfff;
    while p < gpa.saturating_add(len) {
        set.remove(&p);
        p += 4096;
    }
}

/// Queues code page `page` for write protection on every vCPU of `list` but `except`.
fn post_code_page(list: &Mutex<Vec<Weak<Attention>>>, except: &Arc<Attention>, page: u64) {
    let list = list.lock().unwrap_or_else(|p| p.into_inner());
    for v in list.iter().filter_map(Weak::upgrade) {
        if Arc::ptr_eq(except, &v) {
            continue;
        }
        let mut m = v.pending_code.lock().unwrap_or_else(|p| p.into_inner());
        if m.pages.len() < MAX_CODE_MARKS {
            m.pages.push(page);
        } else {
            m.pages.clear();
            m.resync = true;
        }
        v.bits.fetch_or(ATT_CODE, Ordering::AcqRel);
    }
}

/// Local APICs and IOAPIC of a VM that has them.
struct Apics {
    bus: Arc<ApicBus>,
    ioapic: Arc<Ioapic>,
}

/// A VM running on the interpreter.
pub struct TcgVm {
    memory: Arc<GuestMemory>,
    buses: Arc<IoBuses>,
    _events: Arc<dyn SystemEvents>,
    pic: Arc<Pic>,
    pit: Arc<Pit>,
    apics: Option<Apics>,
    clock: Arc<MonotonicClock>,
    /// The interpreter's own model for this VM: what it can present.
    cpuid: CpuidConfig,
    /// The model new vCPUs get: `cpuid`, or a table the machine chose (`Vm::set_cpuid`).
    model: Mutex<CpuidConfig>,
    exec: Arc<ExecLock>,
    /// IA32_TSC offset every vCPU starts with (TSC 0 at VM creation or reset), so that the
    /// vCPUs' TSCs agree as on one board (Linux checks for warps between CPUs).
    tsc_origin: Arc<AtomicU64>,
    vcpus: Arc<Mutex<Vec<Weak<Attention>>>>,
    code_pages: CodePages,
    /// Every vCPU's wake-up flag (the 8259's INTR wakes them all; those whose APIC does not
    /// take ExtINT go back to sleep).
    wakeups: Arc<Mutex<Vec<Arc<Wakeup>>>>,
    /// Guest stores to RAM, recorded while a live migration runs.
    dirty: Arc<keel_accel::dirty::DirtyBitmap>,
    /// The compiling tier's configuration for this VM's vCPUs.
    jit: crate::jit::JitConfig,
}

impl std::fmt::Debug for TcgVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcgVm")
            .field("pic", &self.pic)
            .field("apic", &self.apics.is_some())
            .finish_non_exhaustive()
    }
}

/// A GSI: the 8259 input (ISA IRQs 0-15) and the IOAPIC pin of the same number.
struct GsiLine {
    pic: Option<Arc<dyn IrqLine>>,
    ioapic: Arc<dyn IrqLine>,
}

impl IrqLine for GsiLine {
    fn set_level(&self, high: bool) {
        if let Some(p) = &self.pic {
            p.set_level(high);
        }
        self.ioapic.set_level(high);
    }
}

fn guest_err(e: impl std::fmt::Display) -> AccelError {
    AccelError::Guest {
        vcpu: 0,
        reason: e.to_string(),
    }
}

impl TcgVm {
    /// Creates a VM with the PIC and PIT only (no local APIC, one vCPU).
    pub fn new(
        memory: Arc<GuestMemory>,
        buses: Arc<IoBuses>,
        events: Arc<dyn SystemEvents>,
        cpuid: CpuidConfig,
    ) -> Result<Self, AccelError> {
        Self::with_apic(memory, buses, events, cpuid, false)
    }

    /// Turns the compiling tier on or off for the vCPUs created from now on (`-accel
    /// tcg,jit=`); it exists on x86-64 hosts only.
    pub fn set_jit(&mut self, on: bool) {
        self.jit.enabled = on && cfg!(target_arch = "x86_64");
    }

    /// Creates the VM, its PIC and PIT, and with `apic` the IOAPIC and the APIC bus (each
    /// vCPU gets its local APIC at creation); the APIC windows are mapped on `buses.mmio`.
    pub fn with_apic(
        memory: Arc<GuestMemory>,
        buses: Arc<IoBuses>,
        events: Arc<dyn SystemEvents>,
        mut cpuid: CpuidConfig,
        apic: bool,
    ) -> Result<Self, AccelError> {
        let pic = Arc::new(Pic::new());
        let clock = Arc::new(MonotonicClock::new());
        let apics = if apic {
            let bus = Arc::new(ApicBus::new());
            let ioapic = Arc::new(Ioapic::new(bus.clone()));
            let listener: Arc<dyn EoiListener> = ioapic.clone();
            bus.set_eoi_listener(Arc::downgrade(&listener));
            buses
                .mmio
                .insert(LAPIC_BASE, LAPIC_LEN, Arc::new(LapicMmio::new(bus.clone())))
                .map_err(guest_err)?;
            buses
                .mmio
                .insert(
                    IOAPIC_BASE,
                    IOAPIC_LEN,
                    Arc::new(IoapicMmio(ioapic.clone())),
                )
                .map_err(guest_err)?;
            cpuid.edx1 |= crate::cpuid::edx1::APIC;
            Some(Apics { bus, ioapic })
        } else {
            cpuid.ecx1 &= !crate::cpuid::ecx1::TSC_DEADLINE;
            None
        };
        let irq0: Arc<dyn IrqLine> = match &apics {
            // The PIT's output reaches 8259 input 0 and IOAPIC pin 0 (no interrupt source
            // override: ISA IRQ 0 = GSI 0).
            Some(a) => Arc::new(GsiLine {
                pic: Some(pic.irq_line(0).map_err(guest_err)?),
                ioapic: a.ioapic.irq_line(0).map_err(guest_err)?,
            }),
            None => pic.irq_line(0).map_err(guest_err)?,
        };
        let pit = Arc::new(Pit::new(irq0, clock.clone() as Arc<dyn Clock>));
        let wakeups: Arc<Mutex<Vec<Arc<Wakeup>>>> = Arc::default();
        let w = wakeups.clone();
        pic.set_wakeup(move || {
            for x in w.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                x.notify();
            }
        });
        Ok(Self {
            jit: crate::jit::JitConfig::from_env(),
            dirty: Arc::new(keel_accel::dirty::DirtyBitmap::new(&memory)),
            memory,
            buses,
            _events: events,
            pic,
            pit,
            apics,
            clock,
            model: Mutex::new(cpuid.clone()),
            cpuid,
            exec: Arc::new(ExecLock::new()),
            tsc_origin: Arc::new(AtomicU64::new(0u64.wrapping_sub(host_tsc()))),
            vcpus: Arc::default(),
            code_pages: Arc::default(),
            wakeups,
        })
    }

    /// Creates the concrete vCPU (the trait method boxes this). With local APICs, a vCPU
    /// other than 0 is an application processor and waits for INIT/SIPI.
    pub fn create_tcg_vcpu(&self, index: u32) -> TcgVcpu {
        let phys =
            PhysMem::new(self.memory.clone(), self.buses.clone()).with_dirty(self.dirty.clone());
        let model = self.model.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut cpu = Cpu::new(phys, model, index);
        let att = Arc::new(Attention::default());
        let wakeup = Arc::new(Wakeup::new());
        self.vcpus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&att));
        self.wakeups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wakeup.clone());
        // The TSC-deadline mode exists when the CPUID the guest sees says so (not by default:
        // see `CpuidConfig`).
        let tsc_deadline_khz = if self.cpuid.ecx1 & crate::cpuid::ecx1::TSC_DEADLINE != 0 {
            guest_tsc_khz()
        } else {
            0
        };
        let lapic = self.apics.as_ref().map(|a| {
            let l = Arc::new(
                Lapic::new(index, true, self.clock.clone() as Arc<dyn Clock>)
                    .with_tsc_deadline(tsc_deadline_khz),
            );
            let (at, w) = (att.clone(), wakeup.clone());
            l.set_signal(Arc::new(move || {
                at.bits.fetch_or(ATT_APIC, Ordering::AcqRel);
                w.notify();
            }));
            a.bus.attach(l.clone());
            l
        });
        if let Some(l) = &lapic {
            cpu.msr.apic_base = l.apic_base();
        }
        cpu.msr.tsc_offset = self.tsc_origin.load(Ordering::Acquire);
        cpu.lapic = lapic.clone();
        TcgVcpu {
            cpu,
            cache: BlockCache::with_jit(self.jit),
            att,
            pic: self.pic.clone(),
            pit: self.pit.clone(),
            lapic: lapic.clone(),
            clock: self.clock.clone(),
            wakeup,
            exec: self.exec.clone(),
            peers: self.vcpus.clone(),
            code_pages: self.apics.as_ref().map(|_| self.code_pages.clone()),
            blocks_seen: 0,
            tsc_origin: self.tsc_origin.clone(),
            next_poll: 0,
            slice_end: 0,
            wait_sipi: lapic.as_ref().is_some_and(|l| !l.is_bsp()),
            nmi_pending: false,
            base_cpuid: self.cpuid.clone(),
        }
    }

    /// Tells every vCPU that guest-physical `[gpa, gpa+len)` was written behind its back
    /// (device DMA, the VMM loading an image): translated code from those pages is dropped
    /// before the vCPU runs its next block.
    pub fn invalidate_range(&self, gpa: u64, len: u64) {
        forget_code(&self.code_pages, gpa, len);
        post_invalidation(&self.vcpus, None, gpa, len);
    }
}

/// The interpreter's dirty log: every store to RAM marks its page (see `PhysMem::mark`).
struct TcgDirtyLog(Arc<keel_accel::dirty::DirtyBitmap>);

impl keel_accel::dirty::DirtyLog for TcgDirtyLog {
    fn collect(&self, into: &mut [u64]) -> Result<(), AccelError> {
        self.0.take_into(into);
        Ok(())
    }
    fn stop(&self) {
        self.0.set_active(false);
    }
}

impl Drop for TcgDirtyLog {
    fn drop(&mut self) {
        self.0.set_active(false);
    }
}

impl TcgVm {
    /// `self.cpuid` answering from `template`, once the template is checked against what
    /// the interpreter implements.
    fn model_from(&self, template: &[CpuidLeaf]) -> Result<CpuidConfig, AccelError> {
        keel_accel::check_cpuid(NAME, template, &leaves(&self.cpuid))?;
        Ok(self.cpuid.with_table(template))
    }
}

impl Vm for TcgVm {
    fn set_cpuid(&self, template: &[CpuidLeaf]) -> Result<(), AccelError> {
        let m = self.model_from(template)?;
        *self.model.lock().unwrap_or_else(|p| p.into_inner()) = m;
        Ok(())
    }

    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, AccelError> {
        if index != 0 && self.apics.is_none() {
            return Err(AccelError::Guest {
                vcpu: index,
                reason: TcgError::OneVcpu(index).to_string(),
            });
        }
        if index >= MAX_VCPUS {
            return Err(AccelError::Guest {
                vcpu: index,
                reason: format!("tcg supports at most {MAX_VCPUS} vCPUs"),
            });
        }
        Ok(Box::new(self.create_tcg_vcpu(index)))
    }

    fn start_dirty_log(&self) -> Result<Arc<dyn keel_accel::dirty::DirtyLog>, AccelError> {
        self.dirty.set_active(true);
        Ok(Arc::new(TcgDirtyLog(self.dirty.clone())))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
        let err = |e: TcgError| {
            let cause = std::error::Error::source(&e)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            AccelError::Incompatible {
                accel: NAME,
                machine: String::new(),
                reason: format!("{e}{cause}"),
            }
        };
        match &self.apics {
            None => self
                .pic
                .irq_line(gsi)
                .map_err(|e| err(TcgError::NoSuchGsi(e))),
            Some(a) => {
                let ioapic = a
                    .ioapic
                    .irq_line(gsi)
                    .map_err(|e| err(TcgError::NoSuchIoapicPin(e)))?;
                let pic = if gsi < 16 {
                    self.pic.irq_line(gsi).ok()
                } else {
                    None
                };
                Ok(Arc::new(GsiLine { pic, ioapic }))
            }
        }
    }

    /// Decodes the message as the local APICs decode a write to 0xFEEx_xxxx: destination
    /// (address bits 19:12), destination mode (bit 2), vector (data bits 7:0), delivery mode
    /// (data bits 10:8) and trigger mode (data bit 15), then delivers it on the APIC bus as
    /// the IOAPIC delivers a redirection entry. Without local APICs (one vCPU,
    /// [`ApicMode::Auto`]) there is nothing to deliver to: `Unsupported`.
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
        let Some(a) = &self.apics else {
            return Err(AccelError::Unsupported {
                accel: NAME,
                what: "MSI without local APICs (use -smp 2 or ApicMode::On)",
            });
        };
        a.bus.deliver(&msi_message(address, data));
        Ok(())
    }

    fn platform_devices(&self) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        let mut v = self.pic.bus_devices();
        v.extend(self.pit.bus_devices());
        v
    }

    /// Machine reset: the PIT, the PIC pair and the IOAPIC go back to their power-on state
    /// (the local APICs are reset with their vCPUs).
    fn save_platform(&self) -> Result<keel_accel::PlatformState, AccelError> {
        Ok(self.save())
    }

    fn restore_platform(&self, state: &keel_accel::PlatformState) -> Result<(), AccelError> {
        self.restore(state)
    }

    fn reset(&self) -> Result<(), AccelError> {
        self.tsc_origin
            .store(0u64.wrapping_sub(host_tsc()), Ordering::Release);
        // Every vCPU starts over with an empty block cache.
        forget_code(&self.code_pages, 0, u64::MAX);
        self.pit.reset();
        self.pic.reset();
        if let Some(a) = &self.apics {
            a.ioapic.reset();
        }
        Ok(())
    }
}

/// The APIC-bus message an MSI write of `data` at `address` stands for.
fn msi_message(address: u64, data: u32) -> lapic::Message {
    lapic::Message {
        dest: (address >> 12) as u8,
        logical: address & (1 << 2) != 0,
        mode: lapic::DeliveryMode::from_bits(data),
        vector: data as u8,
        level: data & (1 << 15) != 0,
        shorthand: lapic::Shorthand::None,
        source: None,
    }
}

/// A vCPU running on the interpreter.
pub struct TcgVcpu {
    /// Architectural state.
    pub(crate) cpu: Cpu,
    /// Decoded-block cache.
    pub(crate) cache: BlockCache,
    att: Arc<Attention>,
    pic: Arc<Pic>,
    pit: Arc<Pit>,
    lapic: Option<Arc<Lapic>>,
    clock: Arc<MonotonicClock>,
    wakeup: Arc<Wakeup>,
    exec: Arc<ExecLock>,
    /// Every vCPU's attention bits (this one's included), to pass on code-page writes.
    peers: Arc<Mutex<Vec<Weak<Attention>>>>,
    /// The VM-wide code pages; `None` with a single vCPU (no local APICs).
    code_pages: Option<CodePages>,
    /// Blocks in the cache after the last look, to notice a full flush (which drops the
    /// write protection of every page, including other vCPUs' code pages).
    blocks_seen: usize,
    tsc_origin: Arc<AtomicU64>,
    next_poll: u64,
    /// Clock time until which this vCPU keeps the execution lock when others wait.
    slice_end: u64,
    /// An application processor that has not received its start-up IPI yet.
    wait_sipi: bool,
    /// An NMI arrived while NMIs were blocked.
    nmi_pending: bool,
    /// The VM's own model: what [`Vcpu::set_cpuid`] may present.
    base_cpuid: CpuidConfig,
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
fn exec_block(cpu: &mut Cpu, insns: &[Insn]) -> BlockEnd {
    let Some((last, body)) = insns.split_last() else {
        return BlockEnd::Normal;
    };
    // Counted up front; an early exit takes back what did not retire. The loop runs on an
    // index (one induction variable: measured 4-5% fewer host instructions per guest
    // instruction than a slice iterator plus an index recomputed from the address).
    let n = insns.len() as u64;
    cpu.icount += n;
    // A handler that wrote translated code ends the block itself (`Ex::EndBlock` with RIP at
    // its successor, see `exec`), so `stop_block` is looked at once per block, not per
    // instruction.
    let mut k = 0;
    while let Some(ins) = body.get(k) {
        if let Err(e) = (ins.exec)(cpu, ins) {
            let retired = k as u64 + u64::from(!matches!(e, Ex::Fault { .. }));
            cpu.icount -= n - retired;
            return BlockEnd::Ex(e, ins.ip);
        }
        k += 1;
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

/// Runs one block: its compiled code when it has some (and no dirty log is recorded: the
/// compiled stores do not mark pages), else the interpreter, counting the run towards
/// compilation. Compiled code that stops before an instruction leaves RIP there; when that
/// is the block's first instruction the block is interpreted at once (its state is
/// untouched), otherwise the loop goes on from that RIP.
#[inline(always)]
fn run_block(cpu: &mut Cpu, blk: &crate::decode::Block, jit: &mut crate::jit::Jit) -> BlockEnd {
    #[cfg(target_arch = "x86_64")]
    {
        let mut code = blk.jit.code.get();
        if code == 0 && jit.config.enabled {
            code = jit.tick(cpu, blk);
        }
        if code > crate::jit::REJECTED && !cpu.mmu.phys.logging() {
            let r = crate::jit::run(cpu, code);
            if r != crate::jit::BAILED {
                return BlockEnd::Normal;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = jit;
    exec_block(cpu, &blk.insns)
}

/// The cached successor of `blk` (an element of `blocks`) for the CPU's current RIP, among
/// the links made in cache generation `generation`.
#[inline(always)]
fn follow(
    blocks: &[crate::decode::Block],
    blk: &crate::decode::Block,
    cpu: &Cpu,
    generation: u32,
) -> Option<u32> {
    let rip = cpu.rip;
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
            let lin = cpu.ebase[1].wrapping_add(rip) & cpu.lin_mask;
            let t = blocks.get(b as usize)?;
            return (cpu.mmu.lookup_gpa(lin, Access::Fetch, cpu.mmu.user) == Some(t.gpa))
                .then_some(b);
        }
    }
    None
}

/// Why [`run_chain`] returned.
enum Chain {
    /// A block ended other than normally.
    End(BlockEnd),
    /// Block `.0` ran normally and has no cached successor for the current RIP.
    Miss(u32),
    /// Block `.0` ran normally as the last of `CHAIN_CHECK` chained blocks: time to look at
    /// attention, interrupts and timers before following its successor.
    Budget(u32),
    /// The block index was out of the cache (not expected: links carry the generation).
    Lost,
}

/// Runs block `idx` and the cached successors after it, up to `CHAIN_CHECK` blocks.
///
/// Kept out of line from [`TcgVcpu::run_inner`] on purpose: inlined there, the compiler
/// spilled the CPU pointer and the chain state to the stack around every handler call.
#[inline(never)]
fn run_chain(
    cpu: &mut Cpu,
    blocks: &[crate::decode::Block],
    jit: &mut crate::jit::Jit,
    generation: u32,
    mut idx: u32,
) -> Chain {
    let mut budget = CHAIN_CHECK;
    loop {
        let Some(blk) = blocks.get(idx as usize) else {
            return Chain::Lost;
        };
        let r = run_block(cpu, blk, jit);
        if r != BlockEnd::Normal {
            return Chain::End(r);
        }
        budget -= 1;
        if budget == 0 {
            return Chain::Budget(idx);
        }
        match follow(blocks, blk, cpu, generation) {
            Some(b) => idx = b,
            None => return Chain::Miss(idx),
        }
    }
}

impl TcgVcpu {
    /// Polls the PIT and the local APIC timer against the clock, and hands the execution lock
    /// over when another vCPU waits and this one's slice is used up.
    fn poll_timers(&mut self) {
        let pit_due = self.pit.next_deadline_ns();
        let apic_due = self.lapic.as_ref().and_then(|l| l.next_deadline_ns());
        let contended = self.exec.contended();
        if pit_due.is_none() && apic_due.is_none() && !contended {
            return;
        }
        let now = self.clock.now_ns();
        if pit_due.is_some_and(|d| now >= d) {
            self.pit.poll_at(now);
        }
        if let Some(l) = &self.lapic
            && apic_due.is_some_and(|d| now >= d)
        {
            l.poll_timer(now);
        }
        if contended && (now >= self.slice_end || self.exec.urgent()) {
            self.exec.release();
            self.reacquire(false);
        }
    }

    /// Takes the execution lock back after giving it up. Code pages other vCPUs wrote in the
    /// meantime are dropped from the block cache before anything else runs.
    fn reacquire(&mut self, urgent: bool) {
        if urgent {
            self.exec.acquire_urgent();
        } else {
            self.exec.acquire();
        }
        let bits = self.att.bits.load(Ordering::Acquire);
        if bits & ATT_INVAL != 0 {
            self.take_invalidations();
        }
        if bits & ATT_CODE != 0 {
            self.take_code_marks();
        }
        self.slice_end = self.clock.now_ns().saturating_add(SLICE_NS);
    }

    /// Applies this vCPU's own writes to translated code, after passing them on to the other
    /// vCPUs (which may have translated the same pages: text patching by the guest kernel).
    fn process_dirty(&mut self) {
        if self.cpu.dirty_code_overflow {
            if let Some(c) = &self.code_pages {
                forget_code(c, 0, u64::MAX);
            }
            post_invalidation(&self.peers, Some(&self.att), 0, u64::MAX);
        } else {
            for &p in &self.cpu.dirty_code {
                if let Some(c) = &self.code_pages {
                    forget_code(c, p, 4096);
                }
                post_invalidation(&self.peers, Some(&self.att), p, 4096);
            }
        }
        self.cache.process_dirty(&mut self.cpu);
        self.check_flush();
    }

    /// Publishes the pages of block `idx`, just translated, to the other vCPUs.
    fn publish_code(&mut self, idx: u32) {
        let Some(c) = &self.code_pages else { return };
        let Some(blk) = self.cache.blocks.get(idx as usize) else {
            return;
        };
        for p in blk.pages.into_iter().filter(|&p| p != u64::MAX) {
            let new = c.lock().unwrap_or_else(|e| e.into_inner()).insert(p);
            if new {
                post_code_page(&self.peers, &self.att, p);
            }
        }
    }

    /// Write-protects the code pages other vCPUs queued for this one.
    fn take_code_marks(&mut self) {
        self.att.bits.fetch_and(!ATT_CODE, Ordering::AcqRel);
        let m = std::mem::take(
            &mut *self
                .att
                .pending_code
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if m.resync {
            self.resync_code();
            return;
        }
        for p in m.pages {
            self.cpu.mmu.phys.set_code(p, true);
            self.cpu.mmu.flush_write_gpa(p);
        }
    }

    /// Write-protects every page of the VM-wide set (after this vCPU's block cache flushed all
    /// its marks, or its queue overflowed).
    fn resync_code(&mut self) {
        let Some(c) = &self.code_pages else { return };
        let set = c.lock().unwrap_or_else(|p| p.into_inner());
        for &p in set.iter() {
            self.cpu.mmu.phys.set_code(p, true);
        }
        drop(set);
        self.cpu.mmu.flush();
    }

    /// Notices a full flush of the block cache (it clears every page's write protection).
    #[inline]
    fn check_flush(&mut self) {
        let n = self.cache.blocks.len();
        if n < self.blocks_seen && self.code_pages.is_some() {
            self.resync_code();
        }
        self.blocks_seen = n;
    }

    /// Drops the translations other vCPUs or devices asked to drop.
    fn take_invalidations(&mut self) {
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
        self.check_flush();
    }

    /// Sleeps without the execution lock until woken (interrupt, APIC event, kick) or until
    /// `deadline_ns` on the VM clock.
    fn idle(&mut self, deadline_ns: Option<u64>) {
        self.exec.release();
        self.wakeup
            .wait_until(deadline_ns.map(|d| self.clock.instant_at(d)));
        self.reacquire(true);
    }

    /// Whether an interrupt waits for the CPU (RFLAGS.IF aside): from the local APIC, or the
    /// 8259's INTR when it reaches the CPU (no APIC, APIC disabled, LINT0 in ExtINT mode).
    #[inline(always)]
    fn irq_pending(&self) -> bool {
        match &self.lapic {
            None => self.pic.has_interrupt(),
            Some(l) => l.has_interrupt() || (l.accepts_pic() && self.pic.has_interrupt()),
        }
    }

    /// The interrupt acknowledge cycle: the local APIC's vector first, then the 8259's.
    fn irq_ack(&self) -> Option<u8> {
        match &self.lapic {
            None => self.pic.acknowledge(),
            Some(l) => l.acknowledge().or_else(|| {
                (l.accepts_pic() && self.pic.has_interrupt())
                    .then(|| self.pic.acknowledge())
                    .flatten()
            }),
        }
    }

    /// INIT: the CPU returns to its reset state (the TSC and IA32_APIC_BASE are kept) and its
    /// local APIC to its power-on registers; an application processor then waits for SIPI.
    fn init_cpu(&mut self) {
        let phys = self.cpu.mmu.phys.fresh();
        let lapic = self.cpu.lapic.take();
        let apic_base = self.cpu.msr.apic_base;
        let tsc_offset = self.cpu.msr.tsc_offset;
        self.cpu = Cpu::new(phys, self.cpu.cpuid.clone(), self.cpu.index);
        self.cpu.msr.apic_base = apic_base;
        self.cpu.msr.tsc_offset = tsc_offset;
        self.cpu.lapic = lapic;
        self.nmi_pending = false;
        self.cache = BlockCache::with_jit(self.cache.jit.config);
        self.blocks_seen = 0;
        // The fresh memory view write-protects nothing: protect the other vCPUs' code pages.
        self.resync_code();
        if let Some(l) = &self.lapic {
            l.init_reset();
            self.wait_sipi = !l.is_bsp();
        }
    }

    /// Start-up IPI: real mode at `vector << 8 : 0`.
    fn start_up(&mut self, vector: u8) {
        let sel = u16::from(vector) << 8;
        let mut cs = Seg::real(sel);
        cs.attr = 0x9b;
        self.cpu.seg[sr::CS] = cs;
        self.cpu.rip = 0;
        self.cpu.halted = false;
        self.wait_sipi = false;
        self.cpu.refresh_mode();
    }

    /// Takes the local APIC's INIT / SIPI / NMI events.
    fn apic_events(&mut self) -> Result<(), Stop> {
        let Some(l) = self.lapic.clone() else {
            return Ok(());
        };
        let ev = l.take_events();
        if ev & lapic::event::INIT != 0 {
            self.init_cpu();
        }
        if ev & lapic::event::SIPI != 0 && self.wait_sipi {
            self.start_up(l.sipi_vector());
        }
        if ev & lapic::event::NMI != 0 && !self.wait_sipi {
            // One NMI is latched while another is being handled.
            self.nmi_pending = true;
        }
        self.deliver_nmi()
    }

    /// Delivers the latched NMI unless an NMI handler is still running (until its IRET).
    fn deliver_nmi(&mut self) -> Result<(), Stop> {
        if self.nmi_pending && !self.cpu.nmi_blocked && !self.wait_sipi {
            self.nmi_pending = false;
            self.cpu.halted = false;
            self.raise(vec::NMI, None, false, true)?;
            self.cpu.nmi_blocked = true;
        }
        Ok(())
    }

    fn process_attention(&mut self, bits: u32) -> Result<Option<VcpuExit>, Stop> {
        if bits & ATT_INVAL != 0 {
            self.take_invalidations();
        }
        if bits & ATT_CODE != 0 {
            self.take_code_marks();
        }
        if bits & ATT_APIC != 0 {
            self.att.bits.fetch_and(!ATT_APIC, Ordering::AcqRel);
            self.apic_events()?;
        }
        if bits & ATT_KICK != 0 {
            self.att.bits.fetch_and(!ATT_KICK, Ordering::AcqRel);
            return Ok(Some(VcpuExit::Interrupted));
        }
        Ok(None)
    }

    /// Delivers an interrupt or a trap-class exception with double- and triple-fault
    /// handling.
    fn raise(&mut self, v: u8, err: Option<u32>, soft: bool, ext: bool) -> Result<(), Stop> {
        self.raise_at(v, err, soft, ext, 0, false)
    }

    /// [`Self::raise`] for a software interrupt at `soft_ip`; `rf`: a fault-class exception,
    /// delivered with RF set in the pushed EFLAGS (as are faults met while delivering).
    fn raise_at(
        &mut self,
        v: u8,
        err: Option<u32>,
        soft: bool,
        ext: bool,
        soft_ip: u64,
        rf: bool,
    ) -> Result<(), Stop> {
        let cpu = &mut self.cpu;
        if !ext {
            cpu.last_exception = Some((v, err.unwrap_or(u32::MAX), cpu.rip));
        }
        let mut cur = (v, err);
        let mut first = true;
        for _ in 0..3 {
            match system::deliver(cpu, cur.0, cur.1, soft && first, ext && first, rf || !first) {
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
                self.raise_at(vector, Ex::code(error), false, false, 0, true)
            }
            Ex::SoftInt(v) => self.raise_at(v, None, v != 1, false, ip, false),
            Ex::Halt => {
                self.cpu.halted = true;
                Ok(())
            }
            Ex::EndBlock => Ok(()),
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
                if let Some(x) = self.process_attention(bits)? {
                    return Ok(x);
                }
            }
            if self.wait_sipi {
                // An application processor before its start-up IPI runs nothing.
                self.idle(None);
                continue;
            }
            if self.nmi_pending {
                prev = None;
                self.deliver_nmi()?;
            }
            if self.cpu.icount >= self.next_poll {
                // Reading the clock costs as much as a few blocks: do it every ~50k instructions.
                self.next_poll = self.cpu.icount + 50_000;
                self.poll_timers();
            }
            if self.cpu.stop_block {
                // Code was written outside a block (e.g. by exception delivery).
                self.cpu.stop_block = false;
                self.process_dirty();
                prev = None;
            }
            let shadow = self.cpu.shadow != Shadow::None;
            if !shadow && self.cpu.rflags & fl::IF != 0 && self.irq_pending() {
                if let Some(v) = self.irq_ack() {
                    self.raise(v, None, false, true)?;
                }
                prev = None;
            }
            if self.cpu.halted {
                if self.cpu.rflags & fl::IF == 0 {
                    return Ok(VcpuExit::Halted);
                }
                // Sleep until an interrupt, a kick or the next timer deadline.
                if !self.irq_pending() {
                    let pit = self.pit.next_deadline_ns();
                    let apic = self.lapic.as_ref().and_then(|l| l.next_deadline_ns());
                    let deadline = match (pit, apic) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    self.idle(deadline);
                }
                self.poll_timers();
                continue;
            }
            if self.cpu.debug_active() {
                // Single-stepping, breakpoints or RF: one instruction at a time, with the
                // checks around it. Every instruction that can make this true ends its
                // block, so this one test per trip through the loop is all the hot path pays.
                prev = None;
                self.step_debug()?;
                continue;
            }
            let translated = self.cache.translated;
            let mut idx = match self.cache.lookup(&mut self.cpu) {
                Ok(i) => i,
                Err(e) => {
                    let ip = self.cpu.rip;
                    self.handle_ex(e, ip)?;
                    prev = None;
                    continue;
                }
            };
            if self.code_pages.is_some() && self.cache.translated != translated {
                self.check_flush();
                self.publish_code(idx);
            }
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
            //
            // The chain itself runs in `run_chain`, a small function of its own: its registers
            // hold only what the chain needs (the CPU, the block, the budget) instead of
            // sharing them with this loop's state.
            loop {
                let generation = self.cache.generation;
                match run_chain(
                    &mut self.cpu,
                    &self.cache.blocks,
                    &mut self.cache.jit,
                    generation,
                    idx,
                ) {
                    Chain::End(r) => {
                        self.after_block(r)?;
                        break;
                    }
                    Chain::Miss(i) => {
                        prev = Some(i);
                        break;
                    }
                    Chain::Lost => break,
                    Chain::Budget(i) => {
                        if self.att.bits.load(Ordering::Relaxed) != 0
                            || (self.cpu.rflags & fl::IF != 0 && self.irq_pending())
                            || self.cpu.icount >= self.next_poll
                        {
                            break;
                        }
                        if self.exec.contended() && self.spin_wait(i) {
                            // A spin-wait loop (`pause`) while another vCPU waits for the
                            // execution lock: let it run, it is likely the one to end the wait.
                            self.exec.release();
                            self.reacquire(false);
                            break;
                        }
                        let Some(blk) = self.cache.blocks.get(i as usize) else {
                            break;
                        };
                        match follow(&self.cache.blocks, blk, &self.cpu, generation) {
                            Some(b) => idx = b,
                            None => {
                                prev = Some(i);
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs one instruction with the debug checks (see [`Cpu::debug_active`]): an instruction
    /// breakpoint at RIP faults before it (unless RF is set); RF is cleared when it
    /// completes (unless it loaded RF, as `iret` does); then a single-step trap (if TF was set
    /// when it started) and the data breakpoints its accesses met are reported as one #DB
    /// trap, after it — or after the next instruction when it opened a `mov ss` shadow.
    /// Faults and software interrupts take no trap (delivery clears TF).
    fn step_debug(&mut self) -> Result<(), Stop> {
        let cpu = &mut self.cpu;
        if cpu.rflags & fl::RF == 0 && cpu.dr[7] & dr::ENABLES != 0 && cpu.pending_db == 0 {
            let lin = cpu.ebase[sr::CS].wrapping_add(cpu.rip) & cpu.lin_mask;
            let hits = dr::code_hits(&cpu.dr, lin);
            if hits != 0 {
                cpu.dr[6] = (cpu.dr[6] & !dr::B_MASK) | hits;
                cpu.shadow = Shadow::None;
                // A fault, but the one fault delivered without RF: the handler returns with
                // RF set itself (or removes the breakpoint).
                return self.raise(vec::DB, None, false, false);
            }
        }
        let tf = cpu.rflags & fl::TF != 0;
        cpu.shadow = Shadow::None;
        cpu.db_hits = 0;
        cpu.rflags &= !fl::RF;
        let translated = self.cache.translated;
        let idx = match self.cache.lookup(&mut self.cpu) {
            Ok(i) => i,
            Err(e) => {
                self.cpu.pending_db = 0;
                let ip = self.cpu.rip;
                return self.handle_ex(e, ip);
            }
        };
        if self.code_pages.is_some() && self.cache.translated != translated {
            self.check_flush();
            self.publish_code(idx);
        }
        let r = exec_block(&mut self.cpu, &self.cache.blocks[idx as usize].insns[..1]);
        let completed = matches!(
            r,
            BlockEnd::Normal | BlockEnd::Stopped | BlockEnd::Ex(Ex::EndBlock | Ex::Halt, _)
        );
        let hits = self.cpu.db_hits;
        self.after_block(r)?;
        if !completed {
            self.cpu.pending_db = 0;
            return Ok(());
        }
        let mut bits = self.cpu.pending_db | hits;
        if tf {
            bits |= dr::BS;
        }
        if self.cpu.shadow == Shadow::MovSs {
            self.cpu.pending_db = bits;
            return Ok(());
        }
        self.cpu.pending_db = 0;
        if bits != 0 {
            self.cpu.dr[6] = (self.cpu.dr[6] & !dr::B_MASK) | bits;
            self.raise(vec::DB, None, false, false)?;
        }
        Ok(())
    }

    /// Whether block `idx` is a spin-wait loop body: it contains `pause` (Linux's
    /// `cpu_relax()`) and branches back to its own start. Only looked at when another vCPU
    /// waits for the execution lock.
    fn spin_wait(&self, idx: u32) -> bool {
        let blk = &self.cache.blocks[idx as usize];
        blk.rip == self.cpu.rip
            && blk
                .insns
                .iter()
                .any(|i| i.instr.mnemonic() == iced_x86::Mnemonic::Pause)
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
                self.process_dirty();
                Ok(())
            }
            BlockEnd::Ex(e, ip) => {
                if self.cpu.stop_block {
                    self.cpu.stop_block = false;
                    self.process_dirty();
                }
                self.handle_ex(e, ip)
            }
        }
    }

    /// Instructions retired so far.
    pub fn icount(&self) -> u64 {
        self.cpu.icount
    }

    /// The last exception an instruction raised: (vector, error code or `u32::MAX`, RIP of
    /// the instruction), for diagnosing triple faults in tests; `None` before the first one.
    pub fn last_exception(&self) -> Option<(u8, u32, u64)> {
        self.cpu.last_exception
    }
}

impl Vcpu for TcgVcpu {
    fn index(&self) -> u32 {
        self.cpu.index
    }

    fn run(&mut self) -> Result<VcpuExit, AccelError> {
        // MMIO to 0xfee00000 from this thread reaches this vCPU's local APIC.
        lapic::set_current(self.lapic.clone());
        self.reacquire(true);
        let _held = ExecGuard(self.exec.clone());
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
        match &c.lapic {
            Some(l) => {
                l.set_apic_base(s.apic_base);
                c.msr.apic_base = l.apic_base();
            }
            None => c.msr.apic_base = s.apic_base,
        }
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
        // Every vCPU's TSC counts from the same origin (the VM's last reset).
        self.cpu.msr.tsc_offset = self.tsc_origin.load(Ordering::Acquire);
        self.cache = BlockCache::with_jit(self.cache.jit.config);
        self.blocks_seen = 0;
        self.resync_code();
        self.nmi_pending = false;
        self.next_poll = 0;
        if let Some(l) = &self.lapic {
            l.set_apic_base(LAPIC_BASE | lapic::APIC_BASE_ENABLE);
            l.init_reset();
            self.cpu.msr.apic_base = l.apic_base();
            self.cpu.lapic = Some(l.clone());
            self.wait_sipi = !l.is_bsp();
        }
        Ok(())
    }

    fn save_state(&self) -> Result<keel_accel::VcpuState, AccelError> {
        self.save()
    }

    fn set_cpuid(&mut self, template: &[CpuidLeaf]) -> Result<(), AccelError> {
        keel_accel::check_cpuid(NAME, template, &leaves(&self.base_cpuid))?;
        let mut c = self.base_cpuid.with_table(template);
        c.cores = self.cpu.cpuid.cores;
        // Instructions consult CPUID when they run (LZCNT), not when decoded: the cached
        // blocks stay valid.
        self.cpu.cpuid = c;
        Ok(())
    }

    fn restore_state(&mut self, state: &keel_accel::VcpuState) -> Result<(), AccelError> {
        self.restore(state)
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        Arc::new(VcpuHandle {
            att: self.att.clone(),
            wakeup: self.wakeup.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn req(vcpus: u32) -> MachineRequirements {
        MachineRequirements {
            machine: "microvm".into(),
            vcpus,
            memory: 256 << 20,
            irqchip: IrqChip::PicIoapic,
            pit: true,
        }
    }

    #[test]
    fn check_accepts_1_to_max_vcpus_and_needs_apics_for_more_than_one() {
        let auto = TcgAccel::new();
        assert!(auto.check(&req(1)).is_ok());
        assert!(auto.check(&req(2)).is_ok());
        assert!(auto.check(&req(MAX_VCPUS)).is_ok());
        for bad in [0, MAX_VCPUS + 1] {
            let e = auto.check(&req(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("1 to {MAX_VCPUS} vCPUs")), "{e}");
        }
        let off = TcgAccel {
            apic: ApicMode::Off,
            ..TcgAccel::new()
        };
        assert!(off.check(&req(1)).is_ok());
        let e = off.check(&req(2)).unwrap_err().to_string();
        assert!(e.contains("local APICs"), "{e}");
        assert!(ApicMode::Auto.enabled(2) && !ApicMode::Auto.enabled(1));
        assert!(ApicMode::On.enabled(1));
    }

    #[test]
    fn exec_lock_hands_over_in_arrival_order() {
        let l = Arc::new(ExecLock::new());
        l.acquire();
        assert!(!l.contended());
        let l2 = l.clone();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            l2.acquire();
            tx.send(()).unwrap();
            l2.release();
        });
        while !l.contended() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(rx.try_recv().is_err(), "the waiter runs only after release");
        l.release();
        // Asking again queues behind the waiter: it has run by the time we get the lock.
        l.acquire();
        assert!(rx.try_recv().is_ok());
        assert!(!l.contended());
        l.release();
        t.join().unwrap();
    }

    /// The 8259 pair as Linux programs it, driven through the VM's port bus.
    #[test]
    fn linux_init_8259a_then_irq4_gives_vector_0x34() {
        struct NoEvents;
        impl SystemEvents for NoEvents {
            fn request(&self, _e: keel_accel::SystemEvent) {}
        }
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let buses = Arc::new(IoBuses::new());
        let vm = TcgVm::new(mem, buses.clone(), Arc::new(NoEvents), Default::default()).unwrap();
        for (r, d) in vm.platform_devices() {
            buses.pio.insert(r.base, r.len, d).unwrap();
        }
        let pic = &vm.pic;
        let out = |port: u16, v: u8| buses.pio_write(keel_accel::PioAddress(port), &[v]);
        out(0x21, 0xff);
        out(0x20, 0x11);
        out(0x21, 0x30);
        out(0x21, 0x04);
        out(0x21, 0x01);
        out(0xa0, 0x11);
        out(0xa1, 0x38);
        out(0xa1, 0x02);
        out(0xa1, 0x01);
        out(0x21, 0xfb);
        out(0xa1, 0xff);
        // Unmask IRQ 4 as the serial driver does.
        out(0x21, 0xeb);
        pic.set_irq(4, true).unwrap();
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    /// An MSI write decodes as the local APICs decode it: a fixed message to APIC 1 raises
    /// its vector there and nowhere else; logical destination 0xff reaches every APIC;
    /// without local APICs the accelerator says it cannot take messages.
    #[test]
    fn signal_msi_reaches_the_addressed_local_apic() {
        struct NoEvents;
        impl SystemEvents for NoEvents {
            fn request(&self, _e: keel_accel::SystemEvent) {}
        }
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let buses = Arc::new(IoBuses::new());
        let vm = TcgVm::with_apic(
            mem.clone(),
            buses,
            Arc::new(NoEvents),
            Default::default(),
            true,
        )
        .unwrap();
        let v0 = vm.create_tcg_vcpu(0);
        let v1 = vm.create_tcg_vcpu(1);
        let (l0, l1) = (v0.lapic.clone().unwrap(), v1.lapic.clone().unwrap());
        for l in [&l0, &l1] {
            l.write_reg(lapic::reg::SVR, 0x1ff);
        }
        // Physical destination 1, fixed, edge, vector 0x41.
        vm.signal_msi(0xfee0_1000, 0x0041).unwrap();
        assert!(!l0.has_interrupt());
        assert!(l1.has_interrupt());
        assert_eq!(l1.acknowledge(), Some(0x41));
        // Logical broadcast reaches both.
        vm.signal_msi(0xfee0_0000 | (0xff << 12) | 4, 0x0052)
            .unwrap();
        assert_eq!(l0.acknowledge(), Some(0x52));
        assert_eq!(l1.acknowledge(), Some(0x52));
        let no_apic = TcgVm::new(
            mem,
            Arc::new(IoBuses::new()),
            Arc::new(NoEvents),
            Default::default(),
        )
        .unwrap();
        assert!(matches!(
            no_apic.signal_msi(0xfee0_0000, 0x30),
            Err(AccelError::Unsupported { .. })
        ));
    }

    /// `-accel tcg,jit=off|on` reaches every vCPU's block cache (and its reset), over the
    /// environment's default; unknown or bad properties are refused with QEMU's texts.
    #[test]
    fn accel_properties_configure_the_compiling_tier() {
        use keel_accel::AccelProbe;
        struct NoEvents;
        impl SystemEvents for NoEvents {
            fn request(&self, _e: keel_accel::SystemEvent) {}
        }
        let props = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, x)| (k.to_string(), x.to_string()))
                .collect()
        };
        let probe = crate::TcgProbe;
        assert!(
            probe
                .open_with(&props(&[("jit", "off"), ("thread", "single")]))
                .is_ok()
        );
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        for on in [false, true] {
            let mut vm = TcgVm::new(
                mem.clone(),
                Arc::new(IoBuses::new()),
                Arc::new(NoEvents),
                Default::default(),
            )
            .unwrap();
            vm.set_jit(on);
            let mut v = vm.create_tcg_vcpu(0);
            let want = on && cfg!(target_arch = "x86_64");
            assert_eq!(v.cache.jit.config.enabled, want);
            keel_accel::Vcpu::reset(&mut v).unwrap();
            assert_eq!(v.cache.jit.config.enabled, want, "after a reset");
        }
        let err = |v: &[(&str, &str)]| probe.open_with(&props(v)).err().unwrap().to_string();
        assert_eq!(err(&[("foo", "bar")]), "Property 'tcg-accel.foo' not found");
        assert_eq!(
            err(&[("thread", "bogus")]),
            "Invalid 'thread' setting bogus"
        );
        assert!(err(&[("thread", "multi")]).contains("one vCPU at a time"));
        assert!(err(&[("jit", "maybe")]).contains("'on' or 'off'"));
    }
}
