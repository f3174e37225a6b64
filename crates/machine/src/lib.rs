//! Machine models for Keel and the seam a VMM drives them through.
//!
//! * **The seam** ([`board`]): a [`MachineType`](board::MachineType) validates a
//!   configuration, accepts or refuses an opened accelerator and builds a
//!   [`Board`](board::Board), which owns its device tree and does what the lifecycle commands
//!   ask. A VMM holds a list of machine types and never names a concrete one; the machine
//!   types here are [`NoneMachine`](board::NoneMachine) and [`MicrovmType`].
//! * **microvm**: QEMU's `microvm` x86-64 machine (its name and properties) with its memory
//!   map and e820, onboard devices, ACPI tables, kernel loading (PVH ELF, ELF vmlinux,
//!   bzImage), a built-in demo guest, and the vCPU threads that run it. [`Microvm`] is the
//!   model an embedder can drive directly; [`MicrovmType`] puts it behind the seam with a
//!   qdev device tree and the device back ends.
//! * **Backends** ([`backends`]): the block, network and character backends devices look up
//!   by id when they are realized.
//!
//! * **Lifecycle.** [`Microvm::new`] is machine-init (RAM, onboard devices, vCPUs; the
//!   accelerator checks [`requirements`] first); [`Microvm::add_debug_exit`] cold-plugs;
//!   [`Microvm::finish_init`] is machine-done (ACPI tables and boot data are built from the
//!   devices added so far, once); then [`Microvm::start`], [`Microvm::pause`],
//!   [`Microvm::resume`], [`Microvm::reset`], [`Microvm::shutdown`].
//! * **Events.** Resets, power-off, `isa-debug-exit` and vCPU errors reach the owner as
//!   [`MachineEvent`]s (an `mpsc::Sender` works as the sink). The vCPUs are held (run no guest
//!   code) from the event until the owner calls `reset()` or `shutdown()`; with `no_reboot` a
//!   reset request arrives as a shutdown.
//! * **Power-off.** `poweroff` in an ACPI guest writes S5 to the GED sleep control register
//!   (QEMU microvm's layout, see `keel_devices::AcpiGed`): [`SystemEvent::Shutdown`], status 0.
//! * **vCPU threads live here**, not in the assembling `vmm` crate, so that an embedder using
//!   only keel-machine and a backend can run a machine (see `examples/custom_vmm.rs`).
//!
//! [`SystemEvent::Shutdown`]: keel_accel::SystemEvent::Shutdown
//!
//! ```no_run
//! # fn demo(accel: &dyn keel_accel::Accelerator) -> Result<(), keel_machine::MachineError> {
//! use std::sync::{Arc, mpsc};
//! use keel_machine::{MachineEvent, Microvm, MicrovmConfig};
//!
//! let (tx, rx) = mpsc::channel::<MachineEvent>();
//! let mut vm = Microvm::new(MicrovmConfig::default(), accel, Arc::new(tx))?;
//! let exit = keel_devices::DebugExitConfig::new(0xf4, 4).map_err(keel_machine::MachineError::DebugExit)?;
//! vm.add_debug_exit(exit)?;
//! vm.finish_init()?;
//! vm.start()?;
//! let event = rx.recv(); // e.g. System(Shutdown) when the demo guest powers off
//! vm.shutdown();
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod acpi;
pub mod backends;
pub mod board;
pub mod boot;
pub mod config;
mod core;
pub mod cpu_model;
pub mod device_types;
mod disk_errors;
pub mod factory;
pub mod layout;
mod microvm;
mod microvm_board;
pub mod migration;
pub mod pc;
pub mod pc_acpi;
mod pc_board;
pub mod pc_hotplug;
mod pc_snapshot;
mod runner;
mod snapshot;

pub use acpi::VirtioMmioDevice;
pub use boot::{BootError, BootProtocol, BootState, KernelImage};
pub use config::{
    BadOnOffAuto, MACHINE_PROPERTIES, MicrovmConfig, OnOffAuto, PropertyError, SerialBackend,
};
pub use disk_errors::{BlockIoError, query_block};
pub use keel_devices::{Capture, SharedWriter, set_mux_escape};
#[cfg(feature = "demo-guest")]
pub use microvm::DEMO_GUEST;
pub use microvm::{
    AddedDevice, DeviceInfo, MACHINE_NAME, MAX_CPUS, MAX_MEMORY, MIN_MEMORY, MachineError, Microvm,
    Resolved, VIRTIO_MMIO_SLOTS, requirements,
};
pub use microvm_board::{MicrovmType, microvm_config};
pub use pc::{Pc, PcConfig};
pub use pc_board::{
    PcType, PciBusInfo, PciClassInfo, PciDeviceInfo, PciIdInfo, PciRegionInfo, info_pci, pc_config,
    pci_info,
};
pub use runner::{CpuInfo, MachineEvent, MachineEvents};
