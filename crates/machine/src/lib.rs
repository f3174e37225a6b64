//! Machine models for Keel: the `microvm` x86-64 machine (QEMU's name and properties) with
//! its memory map and e820, onboard devices, ACPI tables, kernel loading (PVH ELF, ELF vmlinux,
//! bzImage), a built-in demo guest, and the vCPU threads that run it.
//!
//! ```no_run
//! # fn demo(accel: &dyn keel_accel::Accelerator) -> Result<(), keel_machine::MachineError> {
//! use std::sync::{Arc, mpsc};
//! use keel_machine::{MachineEvent, Microvm, MicrovmConfig};
//!
//! let (tx, rx) = mpsc::channel::<MachineEvent>();
//! let mut vm = Microvm::new(MicrovmConfig::default(), accel, Arc::new(tx))?;
//! vm.add_device("isa-debug-exit", &[("iobase".into(), "0xf4".into())])?;
//! vm.finish_init()?;
//! vm.start()?;
//! let event = rx.recv(); // e.g. System(Shutdown) when the demo guest powers off
//! vm.shutdown();
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod config;
pub mod layout;
mod microvm;
mod runner;

pub use boot::{BootError, BootProtocol, BootState, KernelImage};
pub use config::{MACHINE_PROPERTIES, MicrovmConfig, OnOffAuto, SerialBackend};
pub use keel_devices::{Capture, SharedWriter};
pub use microvm::{
    AddedDevice, DEMO_GUEST, DRIVERS, DeviceInfo, MACHINE_NAME, MachineError, Microvm, Resolved,
    VIRTIO_MMIO_SLOTS, requirements,
};
pub use runner::{CpuInfo, MachineEvent, MachineEvents};
