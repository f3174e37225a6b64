//! The PCI layer of Keel: what a PC-style machine with a PCI root bus needs, below the
//! machine and its ACPI tables.
//!
//! * [`PciConfig`]: the type-0 configuration space of a function (identification, command
//!   and status, BARs with sizing, interrupt pin, capability list), safe for any guest
//!   access.
//! * [`PciDevice`]: a function as the bus sees it; [`PciFunction`] for simple functions
//!   such as the host bridge.
//! * [`PciBus`]: 32 slots × 8 functions with the multifunction visibility rules and the
//!   staged mode for "function 0 last" hot plug; it routes window accesses to the BARs
//!   that decode them ([`PciBus::window`]) and tells a [`BarObserver`] when they move.
//! * [`PciConfigIo`]: configuration mechanism #1 (ports 0xCF8/0xCFC) as a
//!   [`keel_accel::BusDevice`].
//! * [`BarAllocator`]: places BARs in the machine's I/O, 32-bit and 64-bit windows at
//!   realize time, as firmware would.
//! * [`Msix`], [`Msi`], [`MsiSink`], [`IntxLine`]: interrupts.
//! * [`VirtioPci`]: the virtio 1.x PCI transport (transitional ids as QEMU's `pc`) for any
//!   [`keel_virtio::VirtioDevice`], and the qdev types `virtio-blk-pci`, `virtio-net-pci`,
//!   `virtio-rng-pci`, `virtio-serial-pci` ([`qdev_types`], [`PciDeviceProps`]).
//!
//! A machine puts them together like this:
//!
//! ```
//! use std::sync::Arc;
//! use keel_accel::IoBuses;
//! use keel_pci::*;
//!
//! let buses = IoBuses::new();
//! let bus = Arc::new(PciBus::new());
//! buses.pio.insert(u64::from(CONFIG_ADDRESS_PORT), CONFIG_IO_LEN, Arc::new(PciConfigIo::new(bus.clone())))?;
//! buses.pio.insert(0xc000, 0x4000, bus.window(AddressSpace::Io, 0xc000))?;
//! buses.mmio.insert(0xe000_0000, 0x1ec0_0000, bus.window(AddressSpace::Memory, 0xe000_0000))?;
//! let mut allocator = BarAllocator::new(
//!     Window::new(0xc000, 0x4000).unwrap(),
//!     Window::new(0xe000_0000, 0x1ec0_0000).unwrap(),
//!     None,
//! );
//! bus.add_function(PciAddress::new(0, 0).unwrap(), Arc::new(PciFunction::host_bridge()))?;
//! // ... add devices, then bus.assign_bars(address, &mut allocator) for each cold one.
//! let mut id = [0u8; 4];
//! buses.pio_write(keel_accel::PioAddress(0xcf8), &0x8000_0000u32.to_le_bytes());
//! buses.pio_read(keel_accel::PioAddress(0xcfc), &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x1237_8086);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod address;
mod alloc;
mod bus;
pub mod config;
mod device;
mod msi;
mod qdev;
mod snapshot;
mod virtio_pci;

pub use address::{FUNCTIONS, PciAddress, SLOTS};
pub use alloc::{BarAllocator, MIN_MEMORY_PLACEMENT, Window};
pub use bus::{BarObserver, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, PciBus, PciConfigIo};
pub use config::{AddressSpace, BarKind, BarRegion, BarSpec, PciConfig, PciIds};
pub use device::{PciDevice, PciFunction, assign_config_bars};
pub use msi::{IntxLine, MSIX_ENTRY_SIZE, Msi, MsiMessage, MsiSink, Msix, MsixOutcome};
pub use qdev::{PciDeviceProps, VIRTIO_BACKEND, qdev_types, virtio_pci_type};
pub use snapshot::{FUNCTION_STATE_VERSION, FunctionState, VirtioPciState};

pub use virtio_pci::{
    Interfaces, NO_VECTOR, VIRTIO_VENDOR_ID, VirtioPci, VirtioPciLayout, legacy, legacy_capable,
    virtio_pci_ids,
};

/// Errors of the PCI layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PciError {
    /// A BAR declaration the configuration space cannot hold.
    #[error("BAR{index} of {size:#x} bytes is invalid: {reason}")]
    InvalidBar {
        /// BAR index.
        index: usize,
        /// Requested size.
        size: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// No room left in the configuration space for a capability.
    #[error("no room in config space for capability {id:#x} ({len} bytes)")]
    ConfigSpaceFull {
        /// Capability ID.
        id: u8,
        /// Its length.
        len: usize,
    },
    /// An MSI-X vector count outside 1..=2048.
    #[error("MSI-X vector count {0} is invalid: use 1 to 2048")]
    MsixVectors(u16),
    /// A BAR that does not fit in its window.
    #[error("no room for a {size:#x}-byte {kind:?} BAR in the PCI windows")]
    NoRoom {
        /// Its size.
        size: u64,
        /// Its kind.
        kind: BarKind,
    },
    /// The slot and function are taken.
    #[error("PCI: slot {} function {} is already occupied", .0.slot(), .0.function())]
    Occupied(PciAddress),
    /// Nothing is at that address.
    #[error("PCI: no function at {0}")]
    Absent(PciAddress),
    /// A multifunction rule: function 0 without the multifunction bit shares its slot.
    #[error(
        "PCI: single function device can't be populated in function {} of slot {} (function 0 needs multifunction=on)",
        .0.function(), .0.slot()
    )]
    NotMultifunction(PciAddress),
    /// Staged mode: the slot is already exposed by function 0.
    #[error(
        "PCI: slot {} function 0 already occupied, new function {} cannot be exposed to guest",
        .0.slot(), .0.function()
    )]
    SlotExposed(PciAddress),
    /// `disable-legacy=on` and `disable-modern=on` together (QEMU's message).
    #[error(
        "device cannot work as neither modern nor legacy mode is enabled (set either disable-modern or disable-legacy to off)"
    )]
    NoVirtioInterface,
    /// The legacy interface asked of a device Keel offers through the modern one only.
    #[error(
        "virtio device type {0} has no legacy interface in Keel (its queues need VERSION_1): use disable-legacy=on or auto"
    )]
    NoLegacyInterface(u32),
    /// A snapshot was asked of a function whose device cannot be saved.
    #[error("this PCI function has no snapshot support: it cannot be saved or restored")]
    NotSaveable,
    /// A saved function state does not fit this function.
    #[error("the saved state does not fit this function: {0}")]
    StateMismatch(String),
    /// An `addr=` value QEMU would not accept either.
    #[error(
        "Property 'addr' doesn't take value '{0}' (expected SLOT[.FUNCTION] in hex, e.g. 04 or 0x4.1)"
    )]
    BadAddress(String),
}
