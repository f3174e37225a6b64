//! virtio-mmio transport (version 2) and the virtio devices Linux guests use.
//!
//! Layout:
//! * [`MmioTransport`] is a [`keel_accel::BusDevice`] that implements the virtio-mmio
//!   register block (modern layout, `Version == 2`) for any [`VirtioDevice`].
//! * Devices: [`Block`] (`virtio-blk-device`, raw file), [`Rng`] (`virtio-rng-device`,
//!   host `/dev/urandom`), [`Console`] (single-port virtio console, shown by Linux as `hvc0`),
//!   [`Net`] (`virtio-net-device`, tap, a `keel-slirp` user network or any [`NetBackend`]).
//! * [`Interrupt`] is the device's side of the interrupt: the interrupt status register,
//!   the level-triggered [`keel_accel::IrqLine`], the `DEVICE_NEEDS_RESET` flag and the
//!   config generation, shared by the transport and whatever thread processes a queue.
//! * [`IoWorker`] processes a transport's queues on an event-loop thread: guest notifies
//!   arrive through ioeventfds under KVM (no vCPU exit) or through the MMIO write under
//!   tcg, and the interrupt goes through a resampled irqfd under KVM ([`IrqfdLine`]).
//! * [`TransportCore`] and [`DriverState`] are what every transport shares (status state
//!   machine, feature negotiation, queue setup, activation, reset); `MmioTransport` and
//!   `keel-pci`'s virtio-pci transport decode their registers into them. A transport with
//!   message-signalled interrupts routes them per queue through [`MessageDelivery`].
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
//! Each device describes itself to the device model next to its implementation:
//! `X::QDEV_TYPE` is its QEMU type name, `X::qdev_type()` its [`keel_qdev::DeviceType`]
//! (bus, properties with defaults and ranges, description), and [`qdev_types`] lists them
//! all. The properties of a realized device become a typed value in one call
//! ([`BlockProps::from_props`], [`NetProps::from_props`], [`ConsolePortProps::from_props`]);
//! the caller looks up the backend they name.
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
mod block_error;
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
mod transport;
mod worker;

pub use block::{Block, BlockConfig, BlockProps, SECTOR_SIZE};
pub use block_error::{ErrorAction, ErrorPolicy, IoErrorReport, IoErrorSink, IoOperation, OnError};
pub use console::{Console, ConsoleInput, ConsolePortProps, INPUT_CAPACITY};
pub use device::{Activation, Interrupt, MessageDelivery, VirtioDevice};
pub use mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, QueueNotifyHook, TransportSnapshot};
pub use net::{
    MAX_FRAME_LEN, NET_HDR_LEN, Net, NetBackend, NetConfig, NetProps, RxPoller, RxState,
};
pub use notify::QueueEvents;
pub use rng::{MAX_BYTES_PER_REQUEST, Rng};
pub use slot::{MMIO_WINDOW_SIZE, VirtioMmioSlot};
pub use tap::Tap;
pub use transport::{DriverState, QueueConfig, TransportCore};
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

/// The qdev types of this crate's devices, for a machine to register in one line:
/// `virtio-blk-device`, `virtio-rng-device`, `virtio-net-device`, `virtio-serial-device`,
/// `virtconsole`, and the onboard `virtio-mmio` transport.
pub fn qdev_types() -> Vec<keel_qdev::DeviceType> {
    vec![
        Block::qdev_type(),
        Rng::qdev_type(),
        Net::qdev_type(),
        Console::qdev_type(),
        Console::port_qdev_type(),
        MmioTransport::qdev_type(),
    ]
}

#[cfg(test)]
mod qdev_tests {
    use super::*;
    use keel_qdev::{RawValue, TypeRegistry};

    fn validate(t: &keel_qdev::DeviceType, raw: &[(&str, &str)]) -> keel_qdev::Props {
        let raw: Vec<_> = raw
            .iter()
            .map(|(k, v)| ((*k).to_owned(), RawValue::Str((*v).to_owned())))
            .collect();
        t.validate(&raw).unwrap()
    }

    #[test]
    fn types_register() {
        let mut r = TypeRegistry::new();
        for t in qdev_types() {
            r.register(t).unwrap();
        }
    }

    #[test]
    fn block_props() {
        let t = Block::qdev_type();
        let p = BlockProps::from_props(&validate(&t, &[("drive", "d0")])).unwrap();
        assert_eq!(
            p,
            BlockProps {
                drive: "d0".into(),
                serial: None,
                read_only: false,
                queue_size: 256,
                share_rw: false,
                on_error: ErrorPolicy::default(),
                explicit_on_error: (None, None),
            }
        );
        let c = p.config("/x.img", true);
        assert!(c.read_only);
        assert_eq!(c.queue_size, 256);
        let p = validate(
            &t,
            &[
                ("drive", "d"),
                ("serial", "s,n"),
                ("read-only", "on"),
                ("queue-size", "64"),
            ],
        );
        let p = BlockProps::from_props(&p).unwrap();
        assert_eq!(
            (p.serial.as_deref(), p.read_only, p.queue_size),
            (Some("s,n"), true, 64)
        );
        assert!(p.config("/x", false).read_only);
        let p = validate(&t, &[("drive", "d"), ("queue-size", "100")]);
        assert!(matches!(
            BlockProps::from_props(&p),
            Err(Error::QueueSize(100))
        ));
        let p = validate(&t, &[("drive", "d"), ("serial", &"x".repeat(21))]);
        assert!(matches!(
            BlockProps::from_props(&p),
            Err(Error::SerialTooLong(_))
        ));
        // Required: the type refuses a request without drive.
        assert!(t.validate(&[]).is_err());
        let e = BlockProps::from_props(&keel_qdev::Props::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Property 'virtio-blk-device.drive' is missing or invalid"
        );
    }

    #[test]
    fn net_and_console_props() {
        let t = Net::qdev_type();
        let p = NetProps::from_props(&validate(&t, &[("netdev", "n0")])).unwrap();
        assert_eq!(p.config(), NetConfig::default());
        assert_eq!(p.netdev, "n0");
        let p = validate(&t, &[("netdev", "n0"), ("mac", "02:00:00:00:00:01")]);
        assert_eq!(NetProps::from_props(&p).unwrap().mac, [2, 0, 0, 0, 0, 1]);
        let p = validate(&t, &[("netdev", "n0"), ("mac", "01:00:00:00:00:01")]);
        assert!(matches!(
            NetProps::from_props(&p),
            Err(Error::InvalidMac(_))
        ));
        let t = Console::port_qdev_type();
        assert_eq!(t.bus_type(), &Console::port_bus_type());
        let p = ConsolePortProps::from_props(&validate(&t, &[("chardev", "c0")])).unwrap();
        assert_eq!(p.chardev, "c0");
        assert_eq!(Console::port_bus_name(Some("s"), Some(3)), "s.0");
        assert_eq!(Console::port_bus_name(None, Some(3)), "virtio-serial-bus.3");
    }
}

/// Errors of the virtio devices and their backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device property is missing or has the wrong type: the properties did not come from
    /// the device's own qdev type.
    #[error("Property '{driver}.{property}' is missing or invalid")]
    Property {
        /// Device type.
        driver: &'static str,
        /// Property name.
        property: &'static str,
    },
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
    /// A user network (`-netdev user`) could not be attached.
    #[error("{0}")]
    UserNet(String),
    /// An interface name that the kernel cannot accept.
    #[error("invalid tap interface name '{0}': 1 to 15 bytes, no NUL")]
    InvalidIfname(String),
    /// A `rerror=`/`werror=` value that is not one of QEMU's.
    #[error(
        "Parameter '{property}' does not accept value '{value}': use report, ignore, enospc, stop or auto"
    )]
    OnError {
        /// `rerror` or `werror`.
        property: &'static str,
        /// The value given.
        value: String,
    },
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
