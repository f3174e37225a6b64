//! KVM backend for the keel accelerator seam.
//!
//! # How the seam maps onto KVM
//!
//! | seam | KVM |
//! |---|---|
//! | [`KvmAccel::new`] | opens `/dev/kvm`, checks the API version and the capabilities every VM needs; the error says what the user can do (load the module, join group `kvm`, ...) |
//! | [`Accelerator::check`] | `KVM_CAP_MAX_VCPUS`, `KVM_CAP_IRQCHIP`, `KVM_CAP_PIT2`, the guest-physical address width from CPUID leaf 0x8000_0008 |
//! | [`Accelerator::create_vm`] | `KVM_CREATE_VM`, the identity map and TSS pages just below the BIOS area (0xfffb_c000..0xfffc_0000), one `KVM_SET_USER_MEMORY_REGION` per region of the `GuestMemory`, `KVM_CREATE_IRQCHIP` (8259 pair + IOAPIC + LAPICs); when the machine wants a PIT, `KVM_CREATE_PIT2` on the guest's first access to ports 0x40–0x43/0x61 (a VM with a PIT costs ~10 ms more to destroy; the access is replayed against the new PIT, see `pit.rs`) |
//! | [`Vm::irq_line`] | `KVM_IRQ_LINE` on that GSI; [`KvmVm::irqfd`] gives an eventfd bound with `KVM_IRQFD` for event loops |
//! | [`Vm::register_ioevent`] | `KVM_IOEVENTFD` on an MMIO address, with a datamatch of the write's width (or none, any width): the write signals the eventfd in the kernel and the vCPU does not exit |
//! | [`Vm::register_irqfd`] | `KVM_IRQFD` on the GSI; with a resample eventfd `KVM_IRQFD_FLAG_RESAMPLE` (level-triggered: asserted until the guest's EOI, then deasserted and the resample eventfd signalled) |
//! | [`Vm::create_vcpu`] | `KVM_CREATE_VCPU`, CPUID from `KVM_GET_SUPPORTED_CPUID` shaped per vCPU (see [`cpuid`]), boot MSRs, LAPIC LINT0 = ExtINT / LINT1 = NMI, x87/SSE control words |
//! | [`Vcpu::run`](keel_accel::Vcpu::run) | `KVM_RUN`; the exit in `kvm_run` becomes an owned [`VcpuExit`](keel_accel::VcpuExit). A `rep ins/outs` exit with `count > 1` is handed out one element per `run()` without re-entering the guest, so the seam's one-value exits stay exact. |
//! | [`Vcpu::complete_read`](keel_accel::Vcpu::complete_read) | writes the value into the `kvm_run` data area of the pending `in` / MMIO load; KVM finishes the instruction on the next `KVM_RUN` |
//! | [`Vcpu::kicker`](keel_accel::Vcpu::kicker) | sets a flag, sets `kvm_run.immediate_exit` and sends [`kick_signal`] to the vCPU thread; `run()` returns [`VcpuExit::Interrupted`](keel_accel::VcpuExit::Interrupted) whether the kick lands before or during `KVM_RUN` |
//! | `Vcpu::reset` / `Vm::reset` | restore the vCPU state captured after setup (regs, sregs, FPU, MSRs, LAPIC, vCPU events, MP state) / the irqchip and PIT state captured after creation (`KVM_SET_IRQCHIP`, `KVM_SET_PIT2`) |
//! | [`Vcpu::regs`](keel_accel::Vcpu::regs) / [`Vcpu::sregs`](keel_accel::Vcpu::sregs) | `KVM_GET/SET_REGS`, `KVM_GET/SET_SREGS`, field for field |
//!
//! Exits KVM should never produce for this configuration (internal errors, failed entries,
//! unknown hardware exits) come back as [`AccelError::Guest`] with KVM's reason (for an
//! emulation failure, the instruction bytes and RIP), never a panic. `KVM_EXIT_SHUTDOWN`
//! (triple fault) is `VcpuExit::Shutdown`; the system events `RESET` and `SHUTDOWN` are
//! `VcpuExit::Reset` / `VcpuExit::PowerOff`; `CRASH` is reported to the machine's
//! [`SystemEvents`] as `SystemEvent::Panic` and `run()` returns `VcpuExit::Interrupted` so the
//! loop looks at its requests.
//!
//! # Using it
//!
//! ```no_run
//! use std::sync::Arc;
//! use keel_accel::{Accelerator, ExitAction, GuestMemory, IoBuses, IrqChip, MachineRequirements,
//!                  SystemEvent, SystemEvents, Vcpu, handle_exit};
//!
//! struct Events;
//! impl SystemEvents for Events {
//!     fn request(&self, _: SystemEvent) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let accel = keel_kvm::KvmAccel::new()?; // Err explains what to fix; fall back to tcg
//! let req = MachineRequirements {
//!     machine: "microvm".into(), vcpus: 1, memory: 128 << 20,
//!     irqchip: IrqChip::PicIoapic, pit: true,
//! };
//! accel.check(&req)?;
//! let memory = Arc::new(GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 128 << 20)])?);
//! let buses = Arc::new(IoBuses::new());
//! let vm = accel.create_vm(&req, memory, buses.clone(), Arc::new(Events))?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! // ... set_regs / set_sregs for the boot protocol, then on the vCPU thread:
//! loop {
//!     let exit = vcpu.run()?;
//!     match handle_exit(&exit, &buses) {
//!         ExitAction::Resume => {}
//!         ExitAction::CompleteRead(v) => vcpu.complete_read(v),
//!         _ => break, // halt, kick, reset, power off: the VMM decides
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The kick uses the real-time signal [`kick_signal`] (a no-op handler is installed when the
//! first [`KvmAccel`] is opened); a VMM must leave that signal alone. Like Firecracker and
//! Cloud Hypervisor, the kicker writes `immediate_exit` in the shared `kvm_run` page while
//! the vCPU thread may be inside `KVM_RUN`; the write is an atomic byte store.
//!
//! On KVM-PVM hosts (nested KVM without hardware virtualization exposed) real-mode and CPL0
//! guest code is emulated instruction by instruction (~1.5 MIPS), and some instructions are
//! not emulated there (`lock cmpxchg16b`, `xrstor` and `int3` were seen): such a guest stops
//! with an `AccelError::Guest` naming the instruction bytes.

#![deny(missing_docs)]

pub mod cpuid;
mod kick;
mod pit;
mod probe;
mod regs;
mod snapshot;
mod vcpu;
mod vm;

pub use kick::{KICK_SIGNAL_OFFSET, kick_signal};
pub use probe::{KvmProbe, shared};
pub use vcpu::KvmVcpu;
pub use vm::KvmVm;

use std::path::Path;
use std::sync::Arc;

use keel_accel::{
    AccelError, Accelerator, CpuidLeaf, GuestMemory, IoBuses, MachineRequirements, SystemEvents, Vm,
};
use kvm_bindings::{KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Cap, Kvm};

/// The `-accel` name of this backend.
pub const ACCEL_NAME: &str = "kvm";

/// Options of the KVM backend that are not machine requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmOptions {
    /// Create the in-kernel interrupt controller (8259 pair, IOAPIC, local APICs). Without it
    /// `hlt` returns [`keel_accel::VcpuExit::Halted`] to user space and no IRQ line exists; only tests and
    /// special-purpose VMMs turn it off.
    pub in_kernel_irqchip: bool,
}

impl Default for KvmOptions {
    fn default() -> Self {
        Self {
            in_kernel_irqchip: true,
        }
    }
}

/// `query-kvm`'s answer: whether KVM is in use and whether it could be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmInfo {
    /// The running machine uses KVM.
    pub enabled: bool,
    /// `/dev/kvm` can be opened and has what Keel needs.
    pub present: bool,
}

/// Answers `query-kvm`. `enabled` is whether the current machine runs on KVM (the caller knows
/// which accelerator it picked); `present` is probed by opening `/dev/kvm`.
pub fn query_kvm(enabled: bool) -> KvmInfo {
    KvmInfo {
        enabled,
        present: KvmAccel::new().is_ok(),
    }
}

fn unavailable(reason: impl Into<String>) -> AccelError {
    AccelError::Unavailable {
        accel: ACCEL_NAME,
        reason: reason.into(),
    }
}

/// The KVM device node.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Turns the errno of a failed `open` of the KVM device into advice.
fn open_failure_reason(path: &Path, err: &std::io::Error) -> String {
    let p = path.display();
    match err.raw_os_error() {
        Some(libc::ENOENT) => format!(
            "{p} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) or run on \
             a host with hardware virtualization enabled"
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "no permission to open {p}: add your user to group 'kvm' (usermod -aG kvm $USER, \
             then log in again) or adjust its mode"
        ),
        Some(libc::ENXIO) | Some(libc::ENODEV) => format!(
            "{p} exists but no KVM driver is bound: enable virtualization (VT-x/AMD-V) in the \
             firmware and load kvm_intel or kvm_amd"
        ),
        _ => format!("cannot open {p}: {err}"),
    }
}

/// Capabilities every Keel VM relies on, with why.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (
        Cap::UserMemory,
        "KVM_CAP_USER_MEMORY (guest RAM from user space)",
    ),
    (
        Cap::SetTssAddr,
        "KVM_CAP_SET_TSS_ADDR (real-mode support pages)",
    ),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID (guest CPUID)"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT (race-free pause of vCPUs)",
    ),
];

/// The KVM accelerator: an open `/dev/kvm` and what it supports.
#[derive(Debug)]
pub struct KvmAccel {
    kvm: Kvm,
    options: KvmOptions,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
    msr_index_list: Vec<u32>,
}

impl KvmAccel {
    /// Opens `/dev/kvm` with the default options; the error says what the user can do.
    pub fn new() -> Result<Self, AccelError> {
        Self::with_options(KvmOptions::default())
    }

    /// Opens `/dev/kvm` with `options`.
    pub fn with_options(options: KvmOptions) -> Result<Self, AccelError> {
        Self::open(Path::new(KVM_DEVICE), options)
    }

    /// Opens the KVM device at `path` (normally [`KVM_DEVICE`]) with `options`.
    pub fn open(path: &Path, options: KvmOptions) -> Result<Self, AccelError> {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            unavailable(format!(
                "device path {} contains a NUL byte",
                path.display()
            ))
        })?;
        let kvm = Kvm::new_with_path(&c_path)
            .map_err(|e| unavailable(open_failure_reason(path, &e.into())))?;
        let api = kvm.get_api_version();
        if api < 0 {
            return Err(unavailable(format!(
                "{} is not a KVM device (KVM_GET_API_VERSION failed)",
                path.display()
            )));
        }
        if api != KVM_API_VERSION as i32 {
            return Err(unavailable(format!(
                "{} speaks KVM API version {api}, Keel needs {KVM_API_VERSION}",
                path.display()
            )));
        }
        for (cap, what) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(unavailable(format!("the host KVM lacks {what}")));
            }
        }
        kick::install_handler().map_err(|source| AccelError::Host {
            what: "installing the vCPU kick signal handler",
            source,
        })?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| AccelError::Host {
                what: "KVM_GET_SUPPORTED_CPUID",
                source: e.into(),
            })?
            .as_slice()
            .to_vec();
        let msr_index_list = kvm
            .get_msr_index_list()
            .map_err(|e| AccelError::Host {
                what: "KVM_GET_MSR_INDEX_LIST",
                source: e.into(),
            })?
            .as_slice()
            .to_vec();
        Ok(Self {
            kvm,
            options,
            supported_cpuid,
            msr_index_list,
        })
    }

    /// The options this accelerator was opened with.
    pub fn options(&self) -> KvmOptions {
        self.options
    }

    /// The most vCPUs one VM may have on this host (`KVM_CAP_MAX_VCPUS`).
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// Guest-physical address width KVM supports (CPUID 0x8000_0008 EAX bits 7..0, 36 if absent).
    pub fn phys_addr_bits(&self) -> u32 {
        self.supported_cpuid
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map_or(36, |e| e.eax & 0xff)
    }

    /// Like [`Accelerator::create_vm`] but returns the concrete [`KvmVm`] (for
    /// [`KvmVm::irqfd`] and [`KvmVm::create_kvm_vcpu`]).
    pub fn create_kvm_vm(
        &self,
        req: &MachineRequirements,
        memory: Arc<GuestMemory>,
        events: Arc<dyn SystemEvents>,
    ) -> Result<KvmVm, AccelError> {
        self.check(req)?;
        KvmVm::new(self, req, memory, events)
    }

    fn incompatible(req: &MachineRequirements, reason: impl Into<String>) -> AccelError {
        AccelError::Incompatible {
            accel: ACCEL_NAME,
            machine: req.machine.clone(),
            reason: reason.into(),
        }
    }
}

impl Accelerator for KvmAccel {
    fn name(&self) -> &'static str {
        ACCEL_NAME
    }

    fn cpuid(&self, vcpus: u32) -> Vec<CpuidLeaf> {
        let topo = cpuid::CpuTopology {
            index: 0,
            count: vcpus.max(1),
            lapic: self.options.in_kernel_irqchip,
        };
        cpuid::to_leaves(&cpuid::vcpu_cpuid(&self.supported_cpuid, &topo))
    }

    fn check(&self, req: &MachineRequirements) -> Result<(), AccelError> {
        let max = self.max_vcpus();
        if req.vcpus == 0 {
            return Err(Self::incompatible(req, "a machine needs at least one vCPU"));
        }
        if usize::try_from(req.vcpus).map_or(true, |n| n > max) {
            return Err(Self::incompatible(
                req,
                format!(
                    "{} vCPUs requested, this host's KVM allows at most {max} (KVM_CAP_MAX_VCPUS)",
                    req.vcpus
                ),
            ));
        }
        if req.vcpus > 255 {
            return Err(Self::incompatible(
                req,
                "more than 255 vCPUs need x2APIC ids, which Keel does not set up",
            ));
        }
        if req.memory == 0 {
            return Err(Self::incompatible(req, "a machine needs some RAM"));
        }
        let bits = self.phys_addr_bits();
        if bits < 64 && req.memory > (1u64 << bits) {
            return Err(Self::incompatible(
                req,
                format!(
                    "{} bytes of RAM exceed the {bits}-bit guest-physical address space KVM offers",
                    req.memory
                ),
            ));
        }
        if !self.options.in_kernel_irqchip {
            if req.pit {
                return Err(Self::incompatible(
                    req,
                    "the in-kernel PIT needs the in-kernel irqchip, which these KVM options disable",
                ));
            }
        } else if !self.kvm.check_extension(Cap::Irqchip) {
            return Err(Self::incompatible(
                req,
                "the host KVM has no in-kernel irqchip (KVM_CAP_IRQCHIP)",
            ));
        }
        if req.pit && !self.kvm.check_extension(Cap::Pit2) {
            return Err(Self::incompatible(
                req,
                "the machine wants a PIT and the host KVM has no in-kernel PIT (KVM_CAP_PIT2); \
                 use pit=off",
            ));
        }
        Ok(())
    }

    fn create_vm(
        &self,
        req: &MachineRequirements,
        memory: Arc<GuestMemory>,
        _buses: Arc<IoBuses>,
        events: Arc<dyn SystemEvents>,
    ) -> Result<Box<dyn Vm>, AccelError> {
        Ok(Box::new(self.create_kvm_vm(req, memory, events)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_failures_give_actionable_reasons() {
        let dev = Path::new(KVM_DEVICE);
        let r = open_failure_reason(dev, &std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(r.contains("modprobe"), "{r}");
        let r = open_failure_reason(dev, &std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(r.contains("group 'kvm'"), "{r}");
        let r = open_failure_reason(dev, &std::io::Error::from_raw_os_error(libc::ENXIO));
        assert!(r.contains("firmware"), "{r}");
    }

    #[test]
    fn a_missing_device_is_unavailable_with_advice() {
        let e = KvmAccel::open(Path::new("/nonexistent/kvm"), KvmOptions::default()).unwrap_err();
        assert!(matches!(e, AccelError::Unavailable { accel: "kvm", .. }));
        let msg = e.to_string();
        assert!(
            msg.starts_with("accelerator 'kvm' is not available: /nonexistent/kvm does not exist"),
            "{msg}"
        );
        assert!(msg.contains("modprobe"), "{msg}");
    }

    #[test]
    fn a_device_that_is_not_kvm_is_refused() {
        let e = KvmAccel::open(Path::new("/dev/null"), KvmOptions::default()).unwrap_err();
        assert!(e.to_string().contains("not a KVM device"), "{e}");
    }

    #[test]
    fn query_kvm_reports_presence() {
        let info = query_kvm(false);
        assert!(!info.enabled);
        assert_eq!(info.present, KvmAccel::new().is_ok());
    }
}
