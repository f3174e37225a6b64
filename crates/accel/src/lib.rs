//! The seam between machine models and execution backends.
//!
//! A machine builds guest memory and two buses (port I/O and MMIO), then asks an
//! [`Accelerator`] for a [`Vm`] and one [`Vcpu`] per CPU. A backend's `Vcpu::run` returns an
//! owned [`VcpuExit`] that borrows nothing, so KVM (which fills a shared `kvm_run` page) and
//! the interpreter (which has no such page) produce the same values, and [`handle_exit`]
//! turns any exit plus the buses into the next [`ExitAction`] without touching a backend.
//!
//! Backends that can signal eventfds themselves (KVM) also offer [`Vm::register_ioevent`]
//! (a guest write becomes an eventfd signal without a vCPU exit) and [`Vm::register_irqfd`]
//! (an eventfd write raises an interrupt without a vCPU thread); the defaults say
//! [`AccelError::Unsupported`], and callers then keep the MMIO handler and [`Vm::irq_line`]
//! (the interpreter's path).
//!
//! Lock order (documented once, relied on everywhere): a bus map lock is taken before a
//! device's own lock; device handlers never change a bus map while handling an access.

#![deny(missing_docs)]

mod bus;
pub mod dirty;
mod exit;
mod probe;
mod regs;
mod state;

pub use bus::{Bus, BusDevice, BusError, BusRange, IoBuses, MmioAddress, PioAddress};
pub use exit::{ExitAction, VcpuExit, handle_exit};
pub use probe::AccelProbe;
pub use regs::{
    AMD_EDX_ALIASES, CPUID_FEATURE_WORDS, CpuMode, CpuidBit, CpuidLeaf, DescriptorTable, Regs,
    Segment, SpecialRegs, cpuid_for_vcpu, cpuid_missing, cpuid_word,
};
pub use state::{
    IoapicState, PLATFORM_SECTION, PLATFORM_VERSION, PendingEvent, PicChipState, PitChannelState,
    PlatformState, RunState, SAVED_MSRS, VCPU_SECTION, VCPU_VERSION, VcpuEvents, VcpuState,
};

use std::sync::Arc;

pub use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as every backend and device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// Errors of the accelerator layer; backends map their own failures onto these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccelError {
    /// The backend cannot be used on this host (no device node, no permission, missing capability).
    #[error("accelerator '{accel}' is not available: {reason}")]
    Unavailable {
        /// Backend name, e.g. `kvm`.
        accel: &'static str,
        /// What the user can do about it.
        reason: String,
    },
    /// The backend works here but cannot serve this machine.
    #[error("accelerator '{accel}' cannot run machine '{machine}': {reason}")]
    Incompatible {
        /// Backend name.
        accel: &'static str,
        /// Machine type name.
        machine: String,
        /// Which requirement failed.
        reason: String,
    },
    /// A host call failed while creating or running the VM.
    #[error("{what} failed")]
    Host {
        /// Which operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backend does not offer this feature; the caller uses its fallback (for example
    /// the MMIO-handler path instead of an ioeventfd under the interpreter).
    #[error("accelerator '{accel}' does not support {what}")]
    Unsupported {
        /// Backend name.
        accel: &'static str,
        /// The feature, e.g. `ioeventfd`.
        what: &'static str,
    },
    /// An `-accel NAME,PROP=VALUE` property the backend does not have (QEMU's text).
    #[error("Property '{accel}-accel.{name}' not found")]
    UnknownProperty {
        /// Backend name.
        accel: &'static str,
        /// The property given.
        name: String,
    },
    /// An `-accel` property with a value the backend refuses; the text says why.
    #[error("{0}")]
    BadProperty(String),
    /// A CPUID table asks for features the backend cannot present (it must not advertise
    /// what it does not do).
    #[error("accelerator '{accel}' cannot present {missing}")]
    CpuidFeatures {
        /// Backend name.
        accel: &'static str,
        /// The feature bits, in QEMU's spelling (`CPUID.01H:ECX [bit 0]`), comma-separated.
        missing: String,
    },
    /// The guest did something the backend cannot continue from.
    #[error("vCPU {vcpu}: {reason}")]
    Guest {
        /// vCPU index.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
}

/// Refuses `table` with [`AccelError::CpuidFeatures`] if it sets a feature bit `capable`
/// lacks (see [`cpuid_missing`]).
pub fn check_cpuid(
    accel: &'static str,
    table: &[CpuidLeaf],
    capable: &[CpuidLeaf],
) -> Result<(), AccelError> {
    let missing = cpuid_missing(table, capable);
    if missing.is_empty() {
        return Ok(());
    }
    Err(AccelError::CpuidFeatures {
        accel,
        missing: missing
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Interrupt controller model the machine wires its devices to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChip {
    /// Legacy 8259 pair only (ISA IRQs 0-15).
    Pic,
    /// 8259 pair plus IOAPIC and per-CPU local APICs (GSIs 0-23).
    PicIoapic,
}

/// What a machine needs from a backend; the accelerator checks it before the machine exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRequirements {
    /// Machine type name, for error messages.
    pub machine: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Interrupt controller model.
    pub irqchip: IrqChip,
    /// Whether an i8254 PIT must exist (microvm's `pit=on`).
    pub pit: bool,
}

/// A system-level request raised by a device or a vCPU (reset line, power off, test exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SystemEvent {
    /// Reset the machine (i8042 0xFE, triple fault without `-no-reboot`).
    Reset,
    /// The guest powered off (ACPI S5) or asked to shut down.
    Shutdown,
    /// End the process with this status (`isa-debug-exit`).
    Exit(i32),
    /// The guest reported a panic (pvpanic).
    Panic,
}

/// Receives [`SystemEvent`]s; the VMM decides what they mean (`-no-reboot`, run state, events).
pub trait SystemEvents: Send + Sync {
    /// Records a request; must not block and must be callable from a vCPU thread.
    fn request(&self, event: SystemEvent);
}

/// One interrupt input (a GSI) of the VM's interrupt controller.
pub trait IrqLine: Send + Sync {
    /// Drives a level-triggered line.
    fn set_level(&self, high: bool);
    /// Raises an edge (assert then deassert).
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// Which guest writes to a registered address signal an ioeventfd
/// ([`Vm::register_ioevent`]). A sized match needs a write of exactly that width and value;
/// other writes to the address reach the MMIO bus as usual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventMatch {
    /// Any write of any width.
    Any,
    /// A 1-byte write of this value.
    U8(u8),
    /// A 2-byte write of this value.
    U16(u16),
    /// A 4-byte write of this value (a virtio-mmio `QueueNotify` with the queue index).
    U32(u32),
    /// An 8-byte write of this value.
    U64(u64),
}

/// Makes a running vCPU return from [`Vcpu::run`] with [`VcpuExit::Interrupted`] soon.
pub trait Kick: Send + Sync {
    /// Asks the vCPU to leave guest mode; safe to call from any thread, any number of times.
    fn kick(&self);
}

/// A hardware-assisted or interpreted execution engine that can create VMs.
pub trait Accelerator: Send + Sync {
    /// The `-accel` name (`kvm`, `tcg`).
    fn name(&self) -> &'static str;
    /// Checks that this backend can serve a machine with these needs; the error says why not.
    fn check(&self, req: &MachineRequirements) -> Result<(), AccelError>;
    /// Creates a VM over `memory`; PIO and MMIO the backend does not handle itself go to `buses`.
    fn create_vm(
        &self,
        req: &MachineRequirements,
        memory: Arc<GuestMemory>,
        buses: Arc<IoBuses>,
        events: Arc<dyn SystemEvents>,
    ) -> Result<Box<dyn Vm>, AccelError>;
    /// The CPUID leaves vCPU 0 of a VM with `vcpus` vCPUs would see (the CPU model this
    /// backend presents; what `query-cpu-model-expansion` and the vCPU's QOM feature
    /// properties report). The default reports none: the backend does not say.
    fn cpuid(&self, vcpus: u32) -> Vec<CpuidLeaf> {
        let _ = vcpus;
        Vec::new()
    }
}

/// A created virtual machine: memory is attached, the interrupt controller exists.
pub trait Vm: Send + Sync {
    /// Creates vCPU `index` (0 is the bootstrap processor).
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, AccelError>;
    /// The input line for `gsi` of the interrupt controller.
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError>;
    /// Platform devices the backend emulates in user space (the interpreter's PIC and PIT);
    /// the machine maps them on its PIO bus. In-kernel backends return none.
    fn platform_devices(&self) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        Vec::new()
    }
    /// Makes `template` (the table of vCPU 0, see [`cpuid_for_vcpu`]) the CPUID of the vCPUs
    /// created after this call, instead of the backend's own model: how a machine presents a
    /// named CPU model (`-cpu qemu64`). A table with a feature the backend cannot present is
    /// refused, naming it. The default says [`AccelError::Unsupported`].
    fn set_cpuid(&self, template: &[CpuidLeaf]) -> Result<(), AccelError> {
        let _ = template;
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "choosing the CPU model",
        })
    }
    /// Puts the backend's own platform state (an in-kernel interrupt controller and PIT) back
    /// into its power-on state, for `system_reset`. The default has nothing to reset.
    fn reset(&self) -> Result<(), AccelError> {
        Ok(())
    }
    /// Starts recording the guest's writes to RAM (live migration) and returns the log the
    /// migration reads them from; recording stops when the log is stopped or dropped. The
    /// default says [`AccelError::Unsupported`].
    fn start_dirty_log(&self) -> Result<Arc<dyn dirty::DirtyLog>, AccelError> {
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "dirty page tracking",
        })
    }
    /// Captures the platform devices this backend owns (8259 pair, 8254, IOAPIC) in their
    /// backend-neutral form, for a snapshot; call with every vCPU stopped. The default has
    /// none to save.
    fn save_platform(&self) -> Result<PlatformState, AccelError> {
        Ok(PlatformState::default())
    }
    /// Puts the platform devices in `state` (saved by this or another backend). A device
    /// `state` has and this VM lacks is refused before anything changes; one this VM has
    /// and `state` lacks keeps its current state. The default refuses any device.
    fn restore_platform(&self, state: &PlatformState) -> Result<(), AccelError> {
        if state.pic.is_some() || state.pit.is_some() || state.ioapic.is_some() {
            return Err(AccelError::Unsupported {
                accel: "this accelerator",
                what: "restoring platform devices",
            });
        }
        Ok(())
    }
    /// Signals `fd` (adds 1 to it) when a vCPU writes at MMIO address `addr` in a way that
    /// `matches`, instead of returning a [`VcpuExit::MmioWrite`]: the write never leaves the
    /// backend, and a device's event loop waiting on `fd` does the work (KVM's
    /// `KVM_IOEVENTFD`). The default says [`AccelError::Unsupported`]; callers then keep
    /// the MMIO handler on the bus, which sees these writes as usual.
    fn register_ioevent(
        &self,
        addr: MmioAddress,
        matches: IoEventMatch,
        fd: &EventFd,
    ) -> Result<(), AccelError> {
        let _ = (addr, matches, fd);
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "ioeventfd",
        })
    }
    /// Removes a registration made with [`Vm::register_ioevent`] (same arguments).
    fn unregister_ioevent(
        &self,
        addr: MmioAddress,
        matches: IoEventMatch,
        fd: &EventFd,
    ) -> Result<(), AccelError> {
        let _ = (addr, matches, fd);
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "ioeventfd",
        })
    }
    /// Binds `trigger` to interrupt input `gsi`: a write to `trigger` asserts the line without
    /// a trip through this process's vCPU threads (KVM's `KVM_IRQFD`).
    ///
    /// Without `resample` each write is an edge (assert then deassert). With `resample`
    /// the line is level-triggered: it stays asserted until the guest's EOI, then the
    /// backend deasserts it and signals `resample`; a device whose interrupt is still
    /// pending writes `trigger` again (KVM's `KVM_IRQFD_FLAG_RESAMPLE`). The default says
    /// [`AccelError::Unsupported`]; callers then use [`Vm::irq_line`].
    fn register_irqfd(
        &self,
        gsi: u32,
        trigger: &EventFd,
        resample: Option<&EventFd>,
    ) -> Result<(), AccelError> {
        let _ = (gsi, trigger, resample);
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "irqfd",
        })
    }
    /// Removes a binding made with [`Vm::register_irqfd`].
    fn unregister_irqfd(&self, gsi: u32, trigger: &EventFd) -> Result<(), AccelError> {
        let _ = (gsi, trigger);
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "irqfd",
        })
    }
    /// Delivers one message-signalled interrupt (PCI MSI or MSI-X) as the platform's
    /// interrupt controller would receive a write of `data` at `address` (on x86: the local
    /// APICs decode destination, destination mode, vector and delivery mode from them, as
    /// KVM's `KVM_SIGNAL_MSI` does). The default says [`AccelError::Unsupported`] (a
    /// platform without local APICs cannot take messages; PCI devices then use INTx).
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
        let _ = (address, data);
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "MSI",
        })
    }
}

/// One virtual CPU. Lives on its own thread; only [`Kick`] crosses threads.
pub trait Vcpu: Send {
    /// vCPU index.
    fn index(&self) -> u32;
    /// Runs guest code until something needs the caller.
    fn run(&mut self) -> Result<VcpuExit, AccelError>;
    /// Supplies the value for the last [`VcpuExit::IoIn`] / [`VcpuExit::MmioRead`] before the next run.
    fn complete_read(&mut self, data: u64);
    /// General-purpose registers.
    fn regs(&self) -> Result<Regs, AccelError>;
    /// Sets general-purpose registers.
    fn set_regs(&mut self, regs: &Regs) -> Result<(), AccelError>;
    /// Segment, control and descriptor-table registers.
    fn sregs(&self) -> Result<SpecialRegs, AccelError>;
    /// Sets segment, control and descriptor-table registers.
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<(), AccelError>;
    /// A handle other threads use to interrupt [`Vcpu::run`].
    fn kicker(&self) -> Arc<dyn Kick>;
    /// Captures the whole vCPU (registers, FPU/SSE, MSRs, events, local APIC) in its
    /// backend-neutral form, between two [`Vcpu::run`] calls. The default says the backend
    /// cannot.
    fn save_state(&self) -> Result<VcpuState, AccelError> {
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "saving vCPU state",
        })
    }
    /// Puts the vCPU in `state`, which may come from another backend; the next
    /// [`Vcpu::run`] continues where the saved vCPU stopped. The default says the backend
    /// cannot.
    fn restore_state(&mut self, state: &VcpuState) -> Result<(), AccelError> {
        let _ = state;
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "restoring vCPU state",
        })
    }
    /// Makes `template` (the machine's vCPU 0 table, see [`cpuid_for_vcpu`]) this vCPU's
    /// CPUID, before it first runs (a restore gives the guest the CPUID it saw when saved).
    /// As [`Vm::set_cpuid`], a feature the backend cannot present is refused. The default
    /// says [`AccelError::Unsupported`].
    fn set_cpuid(&mut self, template: &[CpuidLeaf]) -> Result<(), AccelError> {
        let _ = template;
        Err(AccelError::Unsupported {
            accel: "this accelerator",
            what: "choosing the CPU model",
        })
    }
    /// Puts the vCPU back into its power-on state (registers, FPU, MSRs, local APIC, and the
    /// wait-for-SIPI state of application processors), for `system_reset` and a triple fault
    /// without `-no-reboot`. The machine then reloads its boot state. A pending kick stays
    /// pending. The default says the backend cannot do it.
    fn reset(&mut self) -> Result<(), AccelError> {
        Err(AccelError::Guest {
            vcpu: self.index(),
            reason: "this accelerator cannot reset a vCPU".to_string(),
        })
    }
}
