//! virtio-mmio transport (version 2) and the virtio devices Linux guests use.
//!
//! Layout:
//! * [`MmioTransport`] is a [`keel_accel::BusDevice`] that implements the virtio-mmio
//!   register block (modern layout, `Version == 2`) for any [`VirtioDevice`].
//! * Devices: [`Block`] (`virtio-blk-device`, raw file), [`Rng`] (`virtio-rng-device`,
//!   host `/dev/urandom`), [`Console`] (single-port virtio console, shown by Linux as `hvc0`),
//!   [`Net`] (`virtio-net-device`, tap or any [`NetBackend`]).
//! * [`Interrupt`] is the device's side of the interrupt: the interrupt status register,
//!   the level-triggered [`keel_accel::IrqLine`], the `DEVICE_NEEDS_RESET` flag and the
//!   config generation, shared by the transport and whatever thread processes a queue.
//! * [`IoWorker`] processes a transport's queues on an event-loop thread: guest notifies
//!   arrive through ioeventfds under KVM (no vCPU exit) or through the MMIO write under
//!   tcg, and the interrupt goes through a resampled irqfd under KVM ([`IrqfdLine`]).
//! * [`VirtioMmioSlot`] describes where a device sits (MMIO window, IRQ) so a machine can
//!   list it in the ACPI DSDT (`LNRO0005`) or on the kernel command line.
//!
//! Guest-controlled rings are treated as hostile: every descriptor chain is walked with
//! virtio-queue's bounded iterator, checked against guest memory and against the
//! readable-then-writable order before any byte moves. A driver error that leaves no
//! way to answer the request puts the device into a defined error state (the transport
//! shows `DEVICE_NEEDS_RESET` and the device processes nothing until the driver resets
//! it); request-level errors (bad sector, write to a read-only disk) are answered with an
//! error status. Nothing a guest writes can panic or hang the VMM.
//!
//! This crate is separate from `keel-devices` so that embedders of the legacy devices
//! (serial, i8042, ...) do not pull in virtio-queue.
//!
//! # Wiring a device
//!
//! QEMU's `-blockdev driver=file,filename=disk.img,node-name=d0` plus
//! `-device virtio-blk-device,drive=d0` becomes:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use keel_accel::{GuestMemory, IoBuses, IrqLine};
//! use keel_virtio::{Block, BlockConfig, MmioTransport, VirtioMmioSlot};
//! # struct Gsi;
//! # impl IrqLine for Gsi { fn set_level(&self, _high: bool) {} }
//! # let path = std::env::temp_dir().join(format!("keel-virtio-doc-{}.img", std::process::id()));
//! # std::fs::write(&path, vec![0u8; 4096]).unwrap();
//! # let memory = Arc::new(GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap());
//! # let buses = IoBuses::new();
//! # let irq_line: Arc<dyn IrqLine> = Arc::new(Gsi); // from Vm::irq_line(slot.irq)
//! let mut config = BlockConfig::new(&path); // filename=
//! config.read_only = false;                 // read-only=on|off
//! config.serial = Some("disk0".into());     // serial=
//! let device = Arc::new(Mutex::new(Block::new(&config)?));
//! let transport = Arc::new(MmioTransport::new(device, memory, irq_line));
//! let slot = VirtioMmioSlot::new(0xfeb0_0000, 16);
//! slot.attach(&buses, transport)?;
//! // Firmware view: a `LNRO0005` DSDT node with Memory32Fixed(slot.base, 0x200) and a
//! // level, active-high Interrupt(slot.irq); or, for kernels that parse it:
//! assert_eq!(slot.kernel_cmdline_arg(), "virtio_mmio.device=512@0xfeb00000:16");
//! # std::fs::remove_file(&path).ok();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod block;
mod chain;
mod console;
mod device;
mod mmio;
mod net;
mod notify;
mod rng;
mod slot;
mod tap;
#[cfg(test)]
mod testutil;
mod worker;

pub use block::{Block, BlockConfig, SECTOR_SIZE};
pub use console::{Console, ConsoleInput, INPUT_CAPACITY};
pub use device::{Activation, Interrupt, VirtioDevice};
pub use mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, QueueNotifyHook};
pub use net::{MAX_FRAME_LEN, NET_HDR_LEN, Net, NetBackend, NetConfig, RxPoller, RxState};
pub use notify::QueueEvents;
pub use rng::{MAX_BYTES_PER_REQUEST, Rng};
pub use slot::{MMIO_WINDOW_SIZE, VirtioMmioSlot};
pub use tap::Tap;
pub use worker::{IoWorker, IrqfdLine};

/// The `Magic` register value: "virt" in little-endian ASCII.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The `Version` register value of the modern virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// The `VendorID` register value ("QEMU", as QEMU reports, so guests see the same values).
pub const MMIO_VENDOR_ID: u32 = 0x554d_4551;

/// Feature bit numbers shared by all device types (virtio 1.x, section 6).
pub mod features {
    /// The device accepts indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// Used/available event index notification suppression (not offered by Keel's devices).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Modern (non-legacy) device; every Keel device requires it.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Errors of the virtio devices and their backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk image could not be opened.
    #[error(
        "cannot open disk image '{path}' (check the path and permissions, or use read-only=on)"
    )]
    OpenImage {
        /// Path given by `filename=`.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The disk image's size could not be read.
    #[error("cannot read the size of disk image '{path}'")]
    ImageSize {
        /// Path given by `filename=`.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host entropy source could not be opened.
    #[error("cannot open the entropy source '{path}'")]
    OpenEntropy {
        /// Path of the source (`/dev/urandom`).
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tap device could not be opened or configured.
    #[error(
        "cannot set up tap interface '{ifname}' ({step}); it needs /dev/net/tun and CAP_NET_ADMIN, \
         or an interface created beforehand with 'ip tuntap add {ifname} mode tap vnet_hdr'"
    )]
    Tap {
        /// Interface name given by `ifname=`.
        ifname: String,
        /// Which step failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An interface name that the kernel cannot accept.
    #[error("invalid tap interface name '{0}': 1 to 15 bytes, no NUL")]
    InvalidIfname(String),
    /// A serial number longer than virtio-blk's 20-byte ID field.
    #[error("serial '{0}' is longer than 20 bytes")]
    SerialTooLong(String),
    /// A MAC address that is not six hex bytes or is multicast.
    #[error("invalid MAC address '{0}': expected six hex bytes like 52:54:00:12:34:56, unicast")]
    InvalidMac(String),
    /// The driver made a queue the device cannot use (bad size, alignment or placement).
    #[error("queue {index} is invalid: {reason}")]
    InvalidQueue {
        /// Queue index.
        index: u16,
        /// What is wrong.
        reason: String,
    },
    /// A queue size that is not a power of two from 1 to 32768.
    #[error("queue size {0} is invalid: use a power of two from 1 to 32768")]
    QueueSize(u16),
    /// The queue worker (event loop) could not be set up.
    #[error("cannot start the virtio queue worker ({what})")]
    Worker {
        /// Which step failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The driver did not make a queue ready that the device needs.
    #[error("queue {0} was not made ready by the driver")]
    QueueNotReady(u16),
}
