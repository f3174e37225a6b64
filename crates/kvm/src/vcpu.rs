//! A KVM vCPU: setup (CPUID, MSRs, LAPIC, FPU), the run loop and exit mapping.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use keel_accel::{
    AccelError, GuestMemory, Kick, MmioAddress, PioAddress, Regs, SpecialRegs, SystemEvent,
    SystemEvents, Vcpu, VcpuExit,
};
use kvm_bindings::{
    CpuId, KVM_INTERNAL_ERROR_DELIVERY_EV, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_SUSPEND, KVM_SYSTEM_EVENT_WAKEUP, Msrs,
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd, VmFd};

use crate::cpuid::{CpuTopology, vcpu_cpuid};
use crate::kick;
use crate::pit::LazyPit;
use crate::regs::{regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_to_kvm};
use vm_memory::Bytes;

pub(crate) fn host(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> AccelError {
    move |e| AccelError::Host {
        what,
        source: e.into(),
    }
}

/// What [`KvmVcpu::new`] needs from the VM.
pub(crate) struct VcpuSetup<'a> {
    pub vm: &'a VmFd,
    pub index: u32,
    pub count: u32,
    pub irqchip: bool,
    pub supported_cpuid: &'a [kvm_cpuid_entry2],
    /// The table the machine chose (`Vm::set_cpuid`), vCPU 0's; `None`: KVM's own.
    pub model: Option<Vec<keel_accel::CpuidLeaf>>,
    pub msr_index_list: &'a [u32],
    pub memory: Arc<GuestMemory>,
    pub events: Arc<dyn SystemEvents>,
    pub pit: Arc<LazyPit>,
}

/// MSRs given defined boot values (as Firecracker does): SYSENTER/SYSCALL entry points zero,
/// fast strings on, MTRRs on with write-back as the default type.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SFMASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // IA32_MTRR_DEF_TYPE: enabled, write-back
];

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| l.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().into_iter().enumerate() {
        l.regs[off + i] = byte as libc::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Architectural state right after setup; `Vcpu::reset` goes back to it.
struct InitialState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    msrs: Vec<kvm_msr_entry>,
    lapic: Option<kvm_lapic_state>,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
}

/// A pointer into the `kvm_run` data area and how many bytes there belong to one access.
#[derive(Clone, Copy)]
struct DataSlot {
    ptr: NonNull<u8>,
    len: usize,
}

/// The rest of a `rep ins/outs` exit (`count > 1`), handed out one element per `run()`.
struct Repeat {
    port: u16,
    size: u8,
    out: bool,
    base: NonNull<u8>,
    count: u32,
    next: u32,
}

/// A KVM exit reduced to plain values, so the `kvm_run` borrow ends before it is handled.
enum Raw {
    Io {
        port: u16,
        out: bool,
        data: NonNull<u8>,
        len: usize,
    },
    MmioRead {
        addr: u64,
        slot: DataSlot,
    },
    MmioWrite {
        addr: u64,
        size: u8,
        data: u64,
    },
    Hlt,
    Shutdown,
    SystemEvent(u32),
    Intr,
    FailEntry(u64, u32),
    InternalError,
    Unknown,
    Other(&'static str),
}

fn le_value(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

impl Raw {
    fn from_exit(exit: KvmExit<'_>) -> Self {
        match exit {
            KvmExit::IoIn(port, data) => Raw::Io {
                port,
                out: false,
                len: data.len(),
                data: NonNull::from(data).cast(),
            },
            KvmExit::IoOut(port, data) => Raw::Io {
                port,
                out: true,
                len: data.len(),
                data: NonNull::from(data).cast(),
            },
            KvmExit::MmioRead(addr, data) => Raw::MmioRead {
                addr,
                slot: DataSlot {
                    len: data.len(),
                    ptr: NonNull::from(data).cast(),
                },
            },
            KvmExit::MmioWrite(addr, data) => Raw::MmioWrite {
                addr,
                size: data.len() as u8,
                data: le_value(data),
            },
            KvmExit::Hlt => Raw::Hlt,
            KvmExit::Shutdown => Raw::Shutdown,
            KvmExit::SystemEvent(kind, _) => Raw::SystemEvent(kind),
            KvmExit::Intr => Raw::Intr,
            KvmExit::FailEntry(reason, cpu) => Raw::FailEntry(reason, cpu),
            KvmExit::InternalError => Raw::InternalError,
            KvmExit::Unknown => Raw::Unknown,
            KvmExit::Exception => Raw::Other("KVM_EXIT_EXCEPTION"),
            KvmExit::Debug(_) => Raw::Other("KVM_EXIT_DEBUG"),
            KvmExit::Hypercall(_) => Raw::Other("KVM_EXIT_HYPERCALL"),
            KvmExit::IrqWindowOpen => Raw::Other("KVM_EXIT_IRQ_WINDOW_OPEN"),
            KvmExit::SetTpr | KvmExit::TprAccess => Raw::Other("KVM_EXIT_TPR_ACCESS"),
            KvmExit::Nmi => Raw::Other("KVM_EXIT_NMI"),
            KvmExit::IoapicEoi(_) => Raw::Other("KVM_EXIT_IOAPIC_EOI"),
            KvmExit::Hyperv => Raw::Other("KVM_EXIT_HYPERV"),
            KvmExit::X86Rdmsr(_) => Raw::Other("KVM_EXIT_X86_RDMSR"),
            KvmExit::X86Wrmsr(_) => Raw::Other("KVM_EXIT_X86_WRMSR"),
            KvmExit::MemoryFault { .. } => Raw::Other("KVM_EXIT_MEMORY_FAULT"),
            _ => Raw::Other("an exit reason this backend does not handle"),
        }
    }
}

/// A vCPU created by [`crate::KvmVm`].
pub struct KvmVcpu {
    // Field order is drop order: the vCPU fd (and its kvm_run mapping) before the memory.
    fd: VcpuFd,
    index: u32,
    kick: Arc<kick::Shared>,
    immediate_exit: NonNull<AtomicU8>,
    tid: libc::pid_t,
    pending_read: Option<DataSlot>,
    repeat: Option<Repeat>,
    initial: InitialState,
    events: Arc<dyn SystemEvents>,
    pit: Arc<LazyPit>,
    _memory: Arc<GuestMemory>,
    /// KVM's own model of vCPU 0 of this machine: the features `set_cpuid` may present.
    capable: Vec<keel_accel::CpuidLeaf>,
}

/// KVM's own model (vCPU 0 of a `count`-vCPU machine): what a chosen table may use.
pub(crate) fn capable(
    supported: &[kvm_cpuid_entry2],
    count: u32,
    lapic: bool,
) -> Vec<keel_accel::CpuidLeaf> {
    let topo = CpuTopology {
        index: 0,
        count,
        lapic,
    };
    crate::cpuid::to_leaves(&vcpu_cpuid(supported, &topo))
}

/// `KVM_SET_CPUID2` with `entries`.
fn set_cpuid(fd: &VcpuFd, index: u32, entries: &[kvm_cpuid_entry2]) -> Result<(), AccelError> {
    let cpuid = CpuId::from_entries(entries).map_err(|_| AccelError::Guest {
        vcpu: index,
        reason: format!("{} CPUID entries exceed what KVM accepts", entries.len()),
    })?;
    fd.set_cpuid2(&cpuid).map_err(host("KVM_SET_CPUID2"))
}

// SAFETY: the raw pointers point into this vCPU's own `kvm_run` mapping (owned by `fd`), which
// moves with it; nothing else dereferences them except the kicker, which synchronises through
// `kick::Shared` and is detached in `Drop` before the mapping goes away.
unsafe impl Send for KvmVcpu {}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu")
            .field("index", &self.index)
            .field("tid", &self.tid)
            .finish_non_exhaustive()
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kick.detach();
    }
}

impl KvmVcpu {
    pub(crate) fn new(s: VcpuSetup<'_>) -> Result<Self, AccelError> {
        let mut fd =
            s.vm.create_vcpu(u64::from(s.index))
                .map_err(host("KVM_CREATE_VCPU"))?;

        let topo = CpuTopology {
            index: s.index,
            count: s.count,
            lapic: s.irqchip,
        };
        let entries = match &s.model {
            Some(t) => crate::cpuid::from_leaves(t, s.index),
            None => vcpu_cpuid(s.supported_cpuid, &topo),
        };
        set_cpuid(&fd, s.index, &entries)?;

        let msrs: Vec<kvm_msr_entry> = BOOT_MSRS
            .iter()
            .filter(|(i, _)| s.msr_index_list.contains(i))
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        set_msrs(&fd, s.index, &msrs)?;

        let lapic = if s.irqchip {
            let mut l = fd.get_lapic().map_err(host("KVM_GET_LAPIC"))?;
            let lint0 = lapic_reg(&l, APIC_LVT_LINT0);
            set_lapic_reg(
                &mut l,
                APIC_LVT_LINT0,
                with_delivery_mode(lint0, APIC_MODE_EXTINT),
            );
            let lint1 = lapic_reg(&l, APIC_LVT_LINT1);
            set_lapic_reg(
                &mut l,
                APIC_LVT_LINT1,
                with_delivery_mode(lint1, APIC_MODE_NMI),
            );
            fd.set_lapic(&l).map_err(host("KVM_SET_LAPIC"))?;
            Some(l)
        } else {
            None
        };

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(host("KVM_SET_FPU"))?;

        let initial = InitialState {
            regs: fd.get_regs().map_err(host("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(host("KVM_GET_SREGS"))?,
            fpu,
            msrs,
            lapic,
            mp_state: fd.get_mp_state().map_err(host("KVM_GET_MP_STATE"))?,
            events: fd.get_vcpu_events().map_err(host("KVM_GET_VCPU_EVENTS"))?,
        };

        let immediate_exit = NonNull::from(&mut fd.get_kvm_run().immediate_exit).cast::<AtomicU8>();
        fd.set_kvm_immediate_exit(0);
        Ok(Self {
            fd,
            index: s.index,
            kick: Arc::new(kick::Shared::new(immediate_exit)),
            immediate_exit,
            tid: 0,
            pending_read: None,
            repeat: None,
            initial,
            events: s.events,
            pit: s.pit,
            _memory: s.memory,
            capable: capable(s.supported_cpuid, s.count, s.irqchip),
        })
    }

    /// The host thread id (as `gettid`) of the thread that last ran this vCPU, for
    /// `query-cpus-fast`; `None` before the first [`Vcpu::run`].
    pub fn thread_id(&self) -> Option<i32> {
        self.kick.thread()
    }

    /// The underlying KVM vCPU, for KVM-specific calls the seam does not cover.
    pub fn vcpu_fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        // SAFETY: points at `immediate_exit` in this vCPU's kvm_run mapping, alive as `self.fd`.
        unsafe { self.immediate_exit.as_ref() }
    }

    /// Records the thread that runs us and makes sure it can receive the kick signal.
    fn note_thread(&mut self) -> Result<(), AccelError> {
        let tid = kick::current_tid();
        if tid != self.tid {
            kick::unblock_on_this_thread().map_err(|source| AccelError::Host {
                what: "unblocking the vCPU kick signal",
                source,
            })?;
            self.tid = tid;
            self.kick.set_thread(tid);
        }
        Ok(())
    }

    fn element(&mut self, port: u16, size: u8, out: bool, ptr: NonNull<u8>) -> VcpuExit {
        let port = PioAddress(port);
        if out {
            let mut b = [0u8; 8];
            // SAFETY: `ptr` addresses `size` (<= 4) bytes of the kvm_run I/O data area that KVM
            // filled for this exit; the area lives as long as `self.fd`.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.as_ptr(), b.as_mut_ptr(), usize::from(size))
            };
            VcpuExit::IoOut {
                port,
                size,
                data: u64::from_le_bytes(b),
            }
        } else {
            self.pending_read = Some(DataSlot {
                ptr,
                len: usize::from(size),
            });
            VcpuExit::IoIn { port, size }
        }
    }

    /// The next element of a pending string I/O exit, if any.
    fn next_repeat(&mut self) -> Option<VcpuExit> {
        let r = self.repeat.as_mut()?;
        let i = r.next;
        r.next += 1;
        let (port, size, out) = (r.port, r.size, r.out);
        // SAFETY: i < count and the data area holds count * size bytes (checked in io_exit).
        let ptr = unsafe { r.base.add(i as usize * usize::from(size)) };
        if r.next >= r.count {
            self.repeat = None;
        }
        Some(self.element(port, size, out, ptr))
    }

    fn io_exit(
        &mut self,
        port: u16,
        out: bool,
        data: NonNull<u8>,
        len: usize,
    ) -> Result<VcpuExit, AccelError> {
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the valid union member.
        let io = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io };
        let (size, count) = (io.size, io.count);
        if !matches!(size, 1 | 2 | 4) || count == 0 || usize::from(size) * count as usize != len {
            return Err(self.guest(format!(
                "KVM reported port I/O at {port:#x} with size {size} and count {count}"
            )));
        }
        if count == 1 {
            return Ok(self.element(port, size, out, data));
        }
        self.repeat = Some(Repeat {
            port,
            size,
            out,
            base: data,
            count,
            next: 0,
        });
        self.next_repeat()
            .ok_or_else(|| self.guest("empty string I/O".to_string()))
    }

    /// The guest touched a PIT port while no in-kernel PIT existed (see the `pit` module):
    /// creates it, completes the pending access without entering the guest, and rewinds to the
    /// `in`/`out` so that the next `KVM_RUN` executes it against the PIT. `false` when the
    /// access cannot be replayed (string I/O) and goes to the bus as an ordinary exit.
    fn replay_on_new_pit(&mut self, port: u16) -> Result<bool, AccelError> {
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the valid union member.
        let io = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.io };
        let (count, size) = (io.count, io.size);
        let at_exit = self.fd.get_regs().map_err(host("KVM_GET_REGS"))?;
        self.pit.ensure()?;
        if count != 1 {
            return Ok(false);
        }
        self.immediate_exit().store(1, Ordering::SeqCst);
        let completed = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.immediate_exit().store(0, Ordering::SeqCst);
        match completed {
            Err(libc::EINTR) => {}
            Ok(()) => {
                return Err(self.guest(format!(
                    "KVM exited again while completing the first access to PIT port {port:#x}"
                )));
            }
            Err(errno) => {
                return Err(host("KVM_RUN")(vmm_sys_util::errno::Error::new(errno)));
            }
        }
        let after = self.fd.get_regs().map_err(host("KVM_GET_REGS"))?;
        let mut rewind = at_exit;
        if after.rip == at_exit.rip {
            // The exit came with RIP already past the instruction: KVM's instruction emulator
            // (real mode, or guest kernels on KVM-PVM) finishes an `out` before exiting.
            rewind.rip = at_exit
                .rip
                .checked_sub(self.io_insn_len_before(at_exit.rip, port, size)?)
                .ok_or_else(|| self.guest("port I/O at RIP 0".to_string()))?;
        }
        self.fd.set_regs(&rewind).map_err(host("KVM_SET_REGS"))?;
        Ok(true)
    }

    /// The length of the `in`/`out` on `port` that ends at `rip`, read from guest memory:
    /// `E4`–`E7 ib` (imm8 port) or `EC`–`EF` (port in DX), with an operand-size prefix when
    /// the access size is not the code's default.
    fn io_insn_len_before(&self, rip: u64, port: u16, size: u8) -> Result<u64, AccelError> {
        let sregs = self.fd.get_sregs().map_err(host("KVM_GET_SREGS"))?;
        let linear = sregs.cs.base.wrapping_add(rip);
        let mut bytes = [0u8; 3];
        for (i, b) in bytes.iter_mut().enumerate() {
            let addr = linear.wrapping_sub(3 - i as u64);
            let t = self.fd.translate_gva(addr).map_err(host("KVM_TRANSLATE"))?;
            if t.valid == 0 {
                return Err(self.guest(format!(
                    "cannot read the instruction before RIP {rip:#x} (linear {addr:#x} unmapped)"
                )));
            }
            self._memory
                .read_slice(
                    std::slice::from_mut(b),
                    vm_memory::GuestAddress(t.physical_address),
                )
                .map_err(|e| self.guest(format!("cannot read the port I/O instruction: {e}")))?;
        }
        let opcode_len = if matches!(bytes[1], 0xe4..=0xe7) && u16::from(bytes[2]) == port {
            2
        } else if matches!(bytes[2], 0xec..=0xef) {
            1
        } else {
            return Err(self.guest(format!(
                "no in/out on port {port:#x} ends at RIP {rip:#x} (bytes {bytes:02x?})"
            )));
        };
        let default_size = if sregs.cs.l != 0 || sregs.cs.db != 0 {
            4
        } else {
            2
        };
        if size != 1 && size != default_size {
            if bytes[2 - opcode_len] != 0x66 {
                return Err(self.guest(format!(
                    "a {size}-byte in/out on port {port:#x} without an operand-size prefix \
                     before RIP {rip:#x} (bytes {bytes:02x?})"
                )));
            }
            return Ok(opcode_len as u64 + 1);
        }
        Ok(opcode_len as u64)
    }

    fn guest(&self, reason: String) -> AccelError {
        AccelError::Guest {
            vcpu: self.index,
            reason,
        }
    }

    fn rip_suffix(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!(" at rip {:#x}", r.rip),
            Err(_) => String::new(),
        }
    }

    fn internal_error(&mut self) -> AccelError {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is valid; for the
        // emulation suberror the layout is `emulation_failure`, which KVM fills the same way.
        let (internal, emu) = unsafe {
            let u = &self.fd.get_kvm_run().__bindgen_anon_1;
            (u.internal, u.emulation_failure)
        };
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => "KVM could not emulate an instruction",
            KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit",
            _ => "KVM internal error",
        };
        let mut reason = format!("{what} (suberror {})", internal.suberror);
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION
            && internal.ndata >= 1
            && emu.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // SAFETY: plain bytes; the flag says KVM filled them.
            let insn = unsafe { emu.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(insn.insn_size).min(insn.insn_bytes.len());
            reason.push_str(", instruction bytes");
            for b in &insn.insn_bytes[..n] {
                reason.push_str(&format!(" {b:02x}"));
            }
        } else {
            let n = (internal.ndata as usize).min(internal.data.len());
            if n > 0 {
                reason.push_str(&format!(", data {:x?}", &internal.data[..n]));
            }
        }
        reason.push_str(&self.rip_suffix());
        self.guest(reason)
    }
}

fn set_msrs(fd: &VcpuFd, vcpu: u32, entries: &[kvm_msr_entry]) -> Result<(), AccelError> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|_| AccelError::Guest {
        vcpu,
        reason: "too many boot MSRs".to_string(),
    })?;
    let n = fd.set_msrs(&msrs).map_err(host("KVM_SET_MSRS"))?;
    if n != entries.len() {
        let which = entries.get(n).map_or(0, |e| e.index);
        return Err(AccelError::Guest {
            vcpu,
            reason: format!(
                "KVM refused MSR {which:#x} (set {n} of {} boot MSRs)",
                entries.len()
            ),
        });
    }
    Ok(())
}

impl Vcpu for KvmVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn run(&mut self) -> Result<VcpuExit, AccelError> {
        // A read the caller did not complete is not carried over to a later exit.
        self.pending_read = None;
        if let Some(exit) = self.next_repeat() {
            return Ok(exit);
        }
        self.note_thread()?;
        loop {
            let raw = match self.fd.run() {
                Ok(exit) => Raw::from_exit(exit),
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => Raw::Intr,
                Err(e) => return Err(host("KVM_RUN")(e)),
            };
            return match raw {
                Raw::Io {
                    port,
                    out,
                    data,
                    len,
                } => {
                    if self.pit.claims(port) && self.replay_on_new_pit(port)? {
                        if self.kick.take() {
                            return Ok(VcpuExit::Interrupted);
                        }
                        continue;
                    }
                    self.io_exit(port, out, data, len)
                }
                Raw::MmioRead { addr, slot } => {
                    self.pending_read = Some(slot);
                    Ok(VcpuExit::MmioRead {
                        addr: MmioAddress(addr),
                        size: slot.len as u8,
                    })
                }
                Raw::MmioWrite { addr, size, data } => Ok(VcpuExit::MmioWrite {
                    addr: MmioAddress(addr),
                    size,
                    data,
                }),
                Raw::Hlt => Ok(VcpuExit::Halted),
                Raw::Shutdown => Ok(VcpuExit::Shutdown),
                Raw::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => Ok(VcpuExit::PowerOff),
                Raw::SystemEvent(KVM_SYSTEM_EVENT_RESET) => Ok(VcpuExit::Reset),
                Raw::SystemEvent(KVM_SYSTEM_EVENT_CRASH) => {
                    self.events.request(SystemEvent::Panic);
                    Ok(VcpuExit::Interrupted)
                }
                Raw::SystemEvent(KVM_SYSTEM_EVENT_WAKEUP | KVM_SYSTEM_EVENT_SUSPEND) => continue,
                Raw::SystemEvent(kind) => {
                    Err(self.guest(format!("unknown KVM system event {kind}")))
                }
                Raw::Intr => {
                    // Clear first, then look at the flag: see the `kick` module.
                    self.immediate_exit().store(0, Ordering::SeqCst);
                    if self.kick.take() {
                        Ok(VcpuExit::Interrupted)
                    } else {
                        continue;
                    }
                }
                Raw::FailEntry(reason, cpu) => Err(self.guest(format!(
                    "KVM could not enter the guest: hardware entry failure reason {reason:#x} \
                     on host CPU {cpu} (invalid guest state?){}",
                    self.rip_suffix()
                ))),
                Raw::InternalError => Err(self.internal_error()),
                Raw::Unknown => {
                    // SAFETY: KVM_EXIT_UNKNOWN fills `hw`.
                    let hw = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.hw };
                    Err(self.guest(format!(
                        "unknown hardware exit reason {:#x}{}",
                        hw.hardware_exit_reason,
                        self.rip_suffix()
                    )))
                }
                Raw::Other(what) => {
                    Err(self.guest(format!("unexpected {what}{}", self.rip_suffix())))
                }
            };
        }
    }

    fn complete_read(&mut self, data: u64) {
        if let Some(slot) = self.pending_read.take() {
            let bytes = data.to_le_bytes();
            let n = slot.len.min(bytes.len());
            // SAFETY: `slot` addresses `slot.len` bytes of this vCPU's kvm_run data area
            // (I/O data or `mmio.data`) for the exit that is being completed.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), slot.ptr.as_ptr(), n) };
        }
    }

    fn regs(&self) -> Result<Regs, AccelError> {
        Ok(regs_from_kvm(
            &self.fd.get_regs().map_err(host("KVM_GET_REGS"))?,
        ))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<(), AccelError> {
        self.fd
            .set_regs(&regs_to_kvm(regs))
            .map_err(host("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs, AccelError> {
        Ok(sregs_from_kvm(
            &self.fd.get_sregs().map_err(host("KVM_GET_SREGS"))?,
        ))
    }

    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<(), AccelError> {
        let mut k = self.fd.get_sregs().map_err(host("KVM_GET_SREGS"))?;
        sregs_to_kvm(sregs, &mut k);
        self.fd.set_sregs(&k).map_err(host("KVM_SET_SREGS"))
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.kick.clone()
    }

    fn set_cpuid(&mut self, template: &[keel_accel::CpuidLeaf]) -> Result<(), AccelError> {
        keel_accel::check_cpuid(crate::ACCEL_NAME, template, &self.capable)?;
        // KVM takes a new table only before the vCPU first runs (or the same one again).
        set_cpuid(
            &self.fd,
            self.index,
            &crate::cpuid::from_leaves(template, self.index),
        )
    }

    fn save_state(&self) -> Result<keel_accel::VcpuState, AccelError> {
        crate::snapshot::save_vcpu(&self.fd, self.index, self.initial.lapic.is_some())
    }

    /// A pending `in`/MMIO load or string I/O is dropped (a saved vCPU has none).
    fn restore_state(&mut self, state: &keel_accel::VcpuState) -> Result<(), AccelError> {
        self.pending_read = None;
        self.repeat = None;
        crate::snapshot::restore_vcpu(&self.fd, self.index, self.initial.lapic.is_some(), state)
    }

    /// Restores the state captured right after creation (x86 reset state plus Keel's MSR,
    /// LAPIC and FPU setup; CPUID is unchanged). A pending `in`/MMIO load or string I/O is
    /// dropped; a pending kick stays pending.
    fn reset(&mut self) -> Result<(), AccelError> {
        self.pending_read = None;
        self.repeat = None;
        let i = &self.initial;
        self.fd.set_sregs(&i.sregs).map_err(host("KVM_SET_SREGS"))?;
        self.fd.set_regs(&i.regs).map_err(host("KVM_SET_REGS"))?;
        self.fd.set_fpu(&i.fpu).map_err(host("KVM_SET_FPU"))?;
        set_msrs(&self.fd, self.index, &i.msrs)?;
        if let Some(l) = &i.lapic {
            self.fd.set_lapic(l).map_err(host("KVM_SET_LAPIC"))?;
        }
        self.fd
            .set_vcpu_events(&i.events)
            .map_err(host("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_mp_state(i.mp_state)
            .map_err(host("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes_are_patched_in_place() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT_LINT0, 0x0001_0000);
        let v = with_delivery_mode(lapic_reg(&l, APIC_LVT_LINT0), APIC_MODE_EXTINT);
        set_lapic_reg(&mut l, APIC_LVT_LINT0, v);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }

    #[test]
    fn le_value_takes_at_most_eight_bytes() {
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_value(&[1; 9]), 0x0101_0101_0101_0101);
    }
}
