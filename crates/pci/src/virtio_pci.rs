//! The virtio-pci transport (virtio 1.2, section 4.1) for any [`VirtioDevice`], laid out
//! as QEMU 7.2's transitional devices on `pc`:
//!
//! * vendor 0x1AF4, the legacy (transitional) device ID for net, blk, console and rng
//!   (0x1000, 0x1001, 0x1003, 0x1005; others 0x1040 + type), revision 0, subsystem vendor
//!   0x1AF4 and subsystem ID = the virtio device type (which is how Linux identifies a
//!   transitional device), interrupt pin INTA;
//! * BAR1: 32-bit memory, 4 KiB, the MSI-X table at 0 and the PBA at 0x800;
//! * BAR4: 64-bit prefetchable memory, 16 KiB: common configuration at 0x0000, ISR at
//!   0x1000, device configuration at 0x2000, notifications at 0x3000 with a notify offset
//!   multiplier of 4 (queue N notifies at 0x3000 + 4·N);
//! * vendor capabilities for those four structures (at 0x40, 0x50, 0x60, 0x70) and the PCI
//!   configuration access capability (0x84), then the MSI-X capability (0x98) with one
//!   vector per queue plus one for configuration changes (virtio-net: one more, as QEMU's,
//!   whose control queue has one); as in QEMU each capability is
//!   linked in at the head of the list, so the list reads MSI-X first.
//!
//! * BAR0 (transitional and legacy devices): I/O, the legacy virtio header (virtio 0.9.5,
//!   [`legacy`] offsets) followed by the device configuration, sized as QEMU sizes it: the
//!   next power of two of 24 + the configuration's length (virtio-rng: 32 bytes,
//!   virtio-blk: 128). Queues take one guest page number; the rings follow the descriptor
//!   table at 4 KiB alignment.
//!
//! [`Interfaces`] chooses the interfaces, as QEMU's `disable-legacy`/`disable-modern`: both
//! (QEMU 7.2's default on `pc`, whose bus is conventional PCI), modern only (device ID
//! 0x1040 + type, revision 1, subsystem 0x1100, no BAR0) or legacy only (no BAR4 and no
//! virtio capabilities). Linux's `virtio_pci` uses the modern interface when there is one.
//! A modern driver must accept `VERSION_1`; a legacy driver negotiates the low 32 bits
//! (virtio-net then uses its 10-byte legacy header).
//!
//! Interrupts: with MSI-X enabled, a used-buffer interrupt of queue N goes to
//! `queue_msix_vector[N]` and a configuration change to `msix_config` (nothing when the
//! vector is `NO_VECTOR`), through the [`MsiSink`]; with MSI-X disabled they set the ISR
//! bits and assert INTx until the driver reads the ISR.
//!
//! Queue work happens on the vCPU thread that writes the notify register unless a
//! [`QueueNotifyHook`] is set ([`VirtioPci::set_notify_hook`], e.g.
//! [`keel_virtio::QueueEvents::hook`]); the event loop then calls
//! [`VirtioPci::process_queue`]. Under KVM the machine can register ioeventfds at
//! [`VirtioPci::notify_address`] and move them when its [`crate::BarObserver`] reports that
//! BAR4 moved. (`keel_virtio::IoWorker` serves virtio-mmio transports only.)

use std::sync::{Arc, Mutex, MutexGuard};

use keel_accel::{GuestMemory, IrqLine};
use keel_virtio::{
    DriverState, Interrupt, MessageDelivery, QueueNotifyHook, TransportCore, VirtioDevice,
};

use crate::alloc::BarAllocator;
use crate::config::{BarRegion, BarSpec, PciConfig, PciIds, cap_id};
use crate::device::{PciDevice, assign_config_bars};
use crate::msi::{IntxLine, MsiSink, Msix, MsixOutcome};
use crate::snapshot::{FunctionState, VirtioPciState};
use crate::{PciAddress, PciError};

/// The vendor ID of virtio devices.
pub const VIRTIO_VENDOR_ID: u16 = 0x1af4;
/// The value of a vector register that names no vector.
pub const NO_VECTOR: u16 = 0xffff;

/// Where things are in a [`VirtioPci`] function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioPciLayout;

impl VirtioPciLayout {
    /// BAR of the MSI-X table and PBA.
    pub const MSIX_BAR: u8 = 1;
    /// Size of the MSI-X BAR.
    pub const MSIX_BAR_SIZE: u64 = 0x1000;
    /// Offset of the PBA in the MSI-X BAR.
    pub const PBA_OFFSET: u64 = 0x800;
    /// BAR of the virtio structures.
    pub const MODERN_BAR: u8 = 4;
    /// Size of the virtio BAR.
    pub const MODERN_BAR_SIZE: u64 = 0x4000;
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// ISR status.
    pub const ISR: u64 = 0x1000;
    /// Device-specific configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Notifications.
    pub const NOTIFY: u64 = 0x3000;
    /// Size of each structure's region.
    pub const REGION_SIZE: u64 = 0x1000;
    /// Notify offset multiplier: queue N notifies at `NOTIFY + N * NOTIFY_MULTIPLIER`.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
}

/// virtio-pci capability types.
mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// Legacy header offsets in BAR0 (virtio 0.9.5; virtio 1.2, 4.1.4.10).
pub mod legacy {
    /// Device features, bits 0-31 (read-only).
    pub const HOST_FEATURES: u64 = 0x00;
    /// Driver features, bits 0-31.
    pub const GUEST_FEATURES: u64 = 0x04;
    /// Guest page number (4 KiB) of the selected queue's descriptor table; 0 resets.
    pub const QUEUE_PFN: u64 = 0x08;
    /// Size of the selected queue (read-only: the device's maximum).
    pub const QUEUE_NUM: u64 = 0x0c;
    /// Queue select.
    pub const QUEUE_SEL: u64 = 0x0e;
    /// Queue notify (write the queue's index).
    pub const QUEUE_NOTIFY: u64 = 0x10;
    /// Device status (8 bits).
    pub const STATUS: u64 = 0x12;
    /// ISR status (8 bits, read acknowledges).
    pub const ISR: u64 = 0x13;
    /// MSI-X vector of configuration changes (only while MSI-X is enabled).
    pub const MSIX_CONFIG: u64 = 0x14;
    /// MSI-X vector of the selected queue (only while MSI-X is enabled).
    pub const MSIX_QUEUE: u64 = 0x16;
    /// Where the device configuration starts with MSI-X disabled.
    pub const CONFIG: u64 = 0x14;
    /// Where it starts with MSI-X enabled.
    pub const CONFIG_MSIX: u64 = 0x18;
    /// Ring alignment of a legacy queue.
    pub const VRING_ALIGN: u64 = 4096;
}

/// The `DRIVER` bit of the device status (the driver found a driver for the device).
const STATUS_DRIVER: u32 = 2;

/// Which virtio-pci interfaces a function offers (QEMU's `disable-legacy` and
/// `disable-modern`, resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interfaces {
    /// The legacy I/O interface in BAR0.
    pub legacy: bool,
    /// The modern interface (BAR4 and the virtio capabilities).
    pub modern: bool,
}

impl Interfaces {
    /// Both, as QEMU 7.2's virtio-pci devices on `pc`.
    pub const TRANSITIONAL: Self = Self {
        legacy: true,
        modern: true,
    };
    /// Modern only.
    pub const MODERN: Self = Self {
        legacy: false,
        modern: true,
    };
}

/// Whether Keel's device of `device_type` works through the legacy interface (its queues
/// mean the same without `VERSION_1`): net (its header is 10 bytes then, see
/// `keel_virtio::guest_header_len`), block, console and entropy.
pub fn legacy_capable(device_type: u32) -> bool {
    matches!(device_type, 1..=4)
}

/// Length of the device configuration of Keel's device of `device_type` (BAR0's size).
fn device_config_len(device_type: u32) -> u64 {
    match device_type {
        // net: the MAC and the status word, as QEMU's (whose BAR0 is then 32 bytes).
        1 => 8,
        3 => 12,
        2 => 60,
        _ => 0,
    }
}

/// Common configuration offsets (virtio 1.2, 4.1.4.3).
mod common {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGENERATION: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESC: u64 = 0x20;
    pub const Q_AVAIL: u64 = 0x28;
    pub const Q_USED: u64 = 0x30;
    pub const SIZE: usize = 0x38;
}

/// The PCI identification of a virtio device of type `device_type`, as QEMU's `pc` shows
/// it (transitional IDs for net, blk, console, rng).
pub fn virtio_pci_ids(device_type: u32) -> PciIds {
    let (device, class, revision) = match device_type {
        1 => (0x1000, 0x02_00_00, 0),
        2 => (0x1001, 0x01_00_00, 0),
        3 => (0x1003, 0x07_80_00, 0),
        4 => (0x1005, 0x00_ff_00, 0),
        t => (0x1040u16.wrapping_add(t as u16), 0xff_00_00, 1),
    };
    PciIds {
        vendor: VIRTIO_VENDOR_ID,
        device,
        class,
        revision,
        subsystem_vendor: VIRTIO_VENDOR_ID,
        subsystem: device_type as u16,
    }
}

/// MSI-X state with the vector each source uses.
struct Vectors {
    msix: Msix,
    config: u16,
    queues: Vec<u16>,
}

impl Vectors {
    fn lock(m: &Mutex<Vectors>) -> MutexGuard<'_, Vectors> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn reset_assignments(&mut self) {
        self.config = NO_VECTOR;
        self.queues.fill(NO_VECTOR);
    }
}

/// The message path the device's [`Interrupt`] takes first.
struct Delivery(Arc<Mutex<Vectors>>);

impl MessageDelivery for Delivery {
    fn queue(&self, index: u16) -> bool {
        let mut v = Vectors::lock(&self.0);
        let vector = v
            .queues
            .get(usize::from(index))
            .copied()
            .unwrap_or(NO_VECTOR);
        v.msix.notify(vector) != MsixOutcome::Disabled
    }
    fn config(&self) -> bool {
        let mut v = Vectors::lock(&self.0);
        let vector = v.config;
        v.msix.notify(vector) != MsixOutcome::Disabled
    }
}

struct State {
    config: PciConfig,
    driver: DriverState,
    notify_hook: Option<QueueNotifyHook>,
}

/// A virtio-pci function (see the module documentation). Add it to a [`crate::PciBus`].
pub struct VirtioPci {
    state: Mutex<State>,
    core: TransportCore,
    vectors: Arc<Mutex<Vectors>>,
    intx: Arc<IntxLine>,
    pci_cfg_cap: u8,
    interfaces: Interfaces,
    legacy_bar_size: u64,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("core", &self.core)
            .field("intx", &self.intx)
            .finish()
    }
}

fn vendor_cap(config: &mut PciConfig, cfg: u8, offset: u64, length: u64, extra: &[u8]) -> u8 {
    let mut body = vec![
        (16 + extra.len()) as u8,
        cfg,
        VirtioPciLayout::MODERN_BAR,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    // The layout fits the empty config space; a failure would be a bug here, and only
    // leaves the capability out.
    config
        .add_capability(cap_id::VENDOR, &body, &[])
        .unwrap_or(0)
}

impl VirtioPci {
    /// A function for `device` over `memory`: INTx drives `intx` (the GSI its slot and pin
    /// route to), MSI-X messages go to `sink`. Transitional when the device works through
    /// the legacy interface ([`legacy_capable`]), modern only otherwise.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: Arc<GuestMemory>,
        intx: Arc<dyn IrqLine>,
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, PciError> {
        let legacy = legacy_capable(
            device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .device_type(),
        );
        let interfaces = Interfaces {
            legacy,
            modern: true,
        };
        Self::with_interfaces(device, memory, intx, sink, interfaces)
    }

    /// [`VirtioPci::new`] with the interfaces chosen (see the module documentation).
    /// Refused: neither interface, or the legacy one for a device without it.
    pub fn with_interfaces(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: Arc<GuestMemory>,
        intx: Arc<dyn IrqLine>,
        sink: Arc<dyn MsiSink>,
        interfaces: Interfaces,
    ) -> Result<Self, PciError> {
        let (core, driver) = TransportCore::new("virtio-pci", device, memory);
        let device_type = core.device_type();
        if !interfaces.legacy && !interfaces.modern {
            return Err(PciError::NoVirtioInterface);
        }
        if interfaces.legacy && !legacy_capable(device_type) {
            return Err(PciError::NoLegacyInterface(device_type));
        }
        let mut ids = virtio_pci_ids(device_type);
        if !interfaces.legacy {
            // A modern-only device has the virtio 1.0 IDs (QEMU: revision 1, subsystem of
            // QEMU's PCI devices).
            ids.device = 0x1040u16.wrapping_add(device_type as u16);
            ids.revision = 1;
            ids.subsystem = 0x1100;
        }
        let legacy_bar_size = (legacy::CONFIG_MSIX + device_config_len(device_type))
            .next_power_of_two()
            .max(4);
        let mut config = PciConfig::new(ids);
        config.set_interrupt_pin(1);
        if interfaces.legacy {
            config.add_bar(0, BarSpec::io(legacy_bar_size))?;
        }
        config.add_bar(
            usize::from(VirtioPciLayout::MSIX_BAR),
            BarSpec::mem32(VirtioPciLayout::MSIX_BAR_SIZE, false),
        )?;
        let pci_cfg_cap = if interfaces.modern {
            Self::modern_capabilities(&mut config)?
        } else {
            0
        };
        let queues = driver.queues.len();
        // One vector per queue and one for configuration changes; QEMU's virtio-net-pci has
        // one more, for its control queue (2 per queue pair + 2), which Keel's net has not:
        // the table is as large as QEMU's and that vector is never used.
        let wanted = queues + 1 + usize::from(device_type == 1);
        // The table must end before the PBA at 0x800: at most 128 vectors.
        let nvectors = u16::try_from(wanted)
            .ok()
            .filter(|&n| u64::from(n) * crate::MSIX_ENTRY_SIZE <= VirtioPciLayout::PBA_OFFSET)
            .ok_or(PciError::MsixVectors(
                u16::try_from(wanted).unwrap_or(u16::MAX),
            ))?;
        let msix = Msix::new(
            &mut config,
            nvectors,
            (VirtioPciLayout::MSIX_BAR, 0),
            (
                VirtioPciLayout::MSIX_BAR,
                VirtioPciLayout::PBA_OFFSET as u32,
            ),
            sink,
        )?;
        let vectors = Arc::new(Mutex::new(Vectors {
            msix,
            config: NO_VECTOR,
            queues: vec![NO_VECTOR; queues],
        }));
        let intx = Arc::new(IntxLine::new(intx));
        core.interrupt().connect(intx.clone());
        core.interrupt()
            .set_delivery(Some(Arc::new(Delivery(Arc::clone(&vectors)))));
        Ok(Self {
            state: Mutex::new(State {
                config,
                driver,
                notify_hook: None,
            }),
            core,
            vectors,
            intx,
            pci_cfg_cap,
            interfaces,
            legacy_bar_size,
        })
    }

    /// BAR4 and the virtio capabilities of the modern interface; returns where the PCI
    /// configuration access capability is.
    fn modern_capabilities(config: &mut PciConfig) -> Result<u8, PciError> {
        config.add_bar(
            usize::from(VirtioPciLayout::MODERN_BAR),
            BarSpec::mem64(VirtioPciLayout::MODERN_BAR_SIZE, true),
        )?;
        let size = VirtioPciLayout::REGION_SIZE;
        vendor_cap(config, cfg_type::COMMON, VirtioPciLayout::COMMON, size, &[]);
        vendor_cap(config, cfg_type::ISR, VirtioPciLayout::ISR, size, &[]);
        vendor_cap(config, cfg_type::DEVICE, VirtioPciLayout::DEVICE, size, &[]);
        vendor_cap(
            config,
            cfg_type::NOTIFY,
            VirtioPciLayout::NOTIFY,
            size,
            &VirtioPciLayout::NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        // PCI configuration access: bar, offset, length and data are writable.
        let mut body = [0u8; 18];
        body[0] = 20;
        body[1] = cfg_type::PCI;
        let wmask = [
            0u8, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff,
        ];
        config.add_capability(cap_id::VENDOR, &body, &wmask)
    }

    /// Sets the multifunction bit (`multifunction=on`); before adding it to the bus.
    pub fn set_multifunction(&self, on: bool) {
        self.lock().config.set_multifunction(on);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        self.core.device()
    }
    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        self.core.interrupt()
    }
    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.lock().driver.queues.len()
    }
    /// The device status the driver reads.
    pub fn status(&self) -> u32 {
        self.core.status(&self.lock().driver)
    }
    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.lock().driver.driver_features
    }

    /// Routes queue notifications to `hook` instead of processing them on the writing
    /// vCPU thread (see [`keel_virtio::QueueNotifyHook`]); `None` processes inline.
    pub fn set_notify_hook(&self, hook: Option<QueueNotifyHook>) {
        self.lock().notify_hook = hook;
    }

    /// Processes queue `index` now (an event loop's side of a notify hook or ioeventfd).
    pub fn process_queue(&self, index: u16) {
        self.core.lock_device().queue_notify(index);
    }

    /// Where queue `index` is notified now (for an ioeventfd), if the virtio BAR decodes.
    pub fn notify_address(&self, index: u16) -> Option<u64> {
        let st = self.lock();
        if usize::from(index) >= st.driver.queues.len() {
            return None;
        }
        st.config
            .bar_regions()
            .into_iter()
            .find(|r| r.bar == VirtioPciLayout::MODERN_BAR)
            .map(|r| {
                r.base
                    + VirtioPciLayout::NOTIFY
                    + u64::from(index) * u64::from(VirtioPciLayout::NOTIFY_MULTIPLIER)
            })
    }

    // ---- common configuration ----

    fn common_read(&self, st: &State, offset: u64, data: &mut [u8]) {
        let d = &st.driver;
        let v = Vectors::lock(&self.vectors);
        let sel = d.selected();
        let mut img = [0u8; common::SIZE];
        let mut put = |off: u64, bytes: &[u8]| {
            let o = off as usize;
            img[o..o + bytes.len()].copy_from_slice(bytes);
        };
        put(common::DFSELECT, &d.device_features_sel.to_le_bytes());
        put(
            common::DF,
            &d.device_features_word(self.core.offered()).to_le_bytes(),
        );
        put(common::GFSELECT, &d.driver_features_sel.to_le_bytes());
        put(common::GF, &d.driver_features_word().to_le_bytes());
        put(common::MSIX, &v.config.to_le_bytes());
        put(common::NUMQ, &(d.queues.len() as u16).to_le_bytes());
        put(common::STATUS, &[self.core.status(d) as u8]);
        put(
            common::CFGGENERATION,
            &[self.core.interrupt().config_generation() as u8],
        );
        put(common::Q_SELECT, &(d.queue_sel as u16).to_le_bytes());
        if let Some(q) = sel {
            let qv = v
                .queues
                .get(d.queue_sel as usize)
                .copied()
                .unwrap_or(NO_VECTOR);
            put(common::Q_SIZE, &q.size.to_le_bytes());
            put(common::Q_MSIX, &qv.to_le_bytes());
            put(common::Q_ENABLE, &u16::from(q.ready).to_le_bytes());
            put(common::Q_NOFF, &(d.queue_sel as u16).to_le_bytes());
            put(common::Q_DESC, &q.desc.to_le_bytes());
            put(common::Q_AVAIL, &q.avail.to_le_bytes());
            put(common::Q_USED, &q.used.to_le_bytes());
        } else {
            put(common::Q_MSIX, &NO_VECTOR.to_le_bytes());
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| img.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A common-configuration write; returns a queue to notify (never: notifications have
    /// their own region) — the state lock is held throughout.
    fn common_write(&self, st: &mut State, offset: u64, data: &[u8]) {
        let len = data.len();
        let mut b = [0u8; 8];
        b[..len.min(8)].copy_from_slice(&data[..len.min(8)]);
        let value = u64::from_le_bytes(b);
        let d = &mut st.driver;
        let nvec = |v: &Vectors, x: u16| if x < v.msix.vectors() { x } else { NO_VECTOR };
        match (offset, len) {
            (common::DFSELECT, 4) => d.device_features_sel = value as u32,
            (common::GFSELECT, 4) => d.driver_features_sel = value as u32,
            (common::GF, 4) => d.write_driver_features(value as u32),
            (common::MSIX, 2) => {
                let mut v = Vectors::lock(&self.vectors);
                v.config = nvec(&v, value as u16);
            }
            (common::STATUS, 1) => {
                self.core.write_status(d, value as u32);
                if value == 0 {
                    Vectors::lock(&self.vectors).reset_assignments();
                }
            }
            (common::Q_SELECT, 2) => d.queue_sel = value as u32,
            (common::Q_SIZE, 2) => {
                if let Some(q) = d.selected_for_setup("size") {
                    q.size = value as u16;
                }
            }
            (common::Q_MSIX, 2) => {
                let sel = d.queue_sel as usize;
                if sel < d.queues.len() {
                    let mut v = Vectors::lock(&self.vectors);
                    let x = nvec(&v, value as u16);
                    if let Some(slot) = v.queues.get_mut(sel) {
                        *slot = x;
                    }
                }
            }
            (common::Q_ENABLE, 2) => {
                if value & 1 == 1
                    && let Some(q) = d.selected_for_setup("enable")
                {
                    q.ready = true;
                }
            }
            (o, 4 | 8) if (common::Q_DESC..common::Q_USED + 8).contains(&o) && o % 4 == 0 => {
                let field = o & !7;
                let high = o % 8 == 4;
                if high && len == 8 {
                    return;
                }
                let Some(q) = d.selected_for_setup("address") else {
                    return;
                };
                let r = match field {
                    common::Q_DESC => &mut q.desc,
                    common::Q_AVAIL => &mut q.avail,
                    _ => &mut q.used,
                };
                *r = match (len, high) {
                    (8, _) => value,
                    (_, false) => (*r & !0xffff_ffff) | (value & 0xffff_ffff),
                    (_, true) => (*r & 0xffff_ffff) | (value << 32),
                };
            }
            _ => log::debug!("virtio-pci: {len}-byte common config write at {offset:#x} ignored"),
        }
    }

    fn modern_read(&self, offset: u64, data: &mut [u8]) {
        let region = offset / VirtioPciLayout::REGION_SIZE;
        let rel = offset % VirtioPciLayout::REGION_SIZE;
        match region {
            0 => {
                let st = self.lock();
                self.common_read(&st, rel, data);
            }
            1 => {
                data.fill(0);
                if rel == 0
                    && let Some(first) = data.first_mut()
                {
                    // Reading the ISR acknowledges it and lowers INTx.
                    let irq = self.core.interrupt();
                    let status = irq.status();
                    irq.ack(status);
                    *first = status as u8;
                }
            }
            2 => {
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    self.core.lock_device().read_config(rel, data);
                } else {
                    data.fill(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn modern_write(&self, offset: u64, data: &[u8]) {
        let region = offset / VirtioPciLayout::REGION_SIZE;
        let rel = offset % VirtioPciLayout::REGION_SIZE;
        match region {
            0 => {
                let mut st = self.lock();
                self.common_write(&mut st, rel, data);
            }
            2 => {
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    self.core.lock_device().write_config(rel, data);
                }
            }
            3 => {
                let Ok(index) = u16::try_from(rel / u64::from(VirtioPciLayout::NOTIFY_MULTIPLIER))
                else {
                    return;
                };
                let st = self.lock();
                if !self.core.notify_allowed(&st.driver, index) {
                    return;
                }
                let hook = st.notify_hook.clone();
                drop(st);
                match hook {
                    Some(hook) => hook(index),
                    None => self.core.lock_device().queue_notify(index),
                }
            }
            _ => {}
        }
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let v = Vectors::lock(&self.vectors);
        if offset < VirtioPciLayout::PBA_OFFSET {
            v.msix.table_read(offset, data);
        } else {
            v.msix.pba_read(offset - VirtioPciLayout::PBA_OFFSET, data);
        }
    }

    fn msix_write(&self, offset: u64, data: &[u8]) {
        if offset < VirtioPciLayout::PBA_OFFSET {
            Vectors::lock(&self.vectors).msix.table_write(offset, data);
        }
    }

    /// The BAR access the PCI configuration access capability describes:
    /// (bar, offset, length) if it is a valid one (length 1, 2 or 4).
    fn pci_cfg_window(&self, config: &PciConfig) -> Option<(u8, u64, usize)> {
        let cap = usize::from(self.pci_cfg_cap);
        let bar = config.read_u8(cap + 4);
        let offset = u64::from(config.read_u32(cap + 8));
        let len = config.read_u32(cap + 12) as usize;
        matches!(len, 1 | 2 | 4).then_some((bar, offset, len))
    }

    /// Where the device configuration starts in BAR0 now (it moves with MSI-X).
    fn legacy_config_offset(&self) -> u64 {
        if Vectors::lock(&self.vectors).msix.enabled() {
            legacy::CONFIG_MSIX
        } else {
            legacy::CONFIG
        }
    }

    fn legacy_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cfg = self.legacy_config_offset();
        if offset >= cfg {
            if matches!(data.len(), 1 | 2 | 4) {
                self.core.lock_device().read_config(offset - cfg, data);
            }
            return;
        }
        if offset == legacy::ISR {
            if let Some(first) = data.first_mut() {
                let irq = self.core.interrupt();
                let status = irq.status();
                irq.ack(status);
                *first = status as u8;
            }
            return;
        }
        let st = self.lock();
        let d = &st.driver;
        let v = Vectors::lock(&self.vectors);
        let sel = d.selected();
        let value: u32 = match offset {
            legacy::HOST_FEATURES => self.core.offered() as u32,
            legacy::GUEST_FEATURES => d.driver_features as u32,
            legacy::QUEUE_PFN => sel.filter(|q| q.ready).map_or(0, |q| (q.desc >> 12) as u32),
            legacy::QUEUE_NUM => sel.map_or(0, |q| u32::from(q.max)),
            legacy::QUEUE_SEL => d.queue_sel & 0xffff,
            legacy::STATUS => self.core.status(d) & 0xff,
            legacy::MSIX_CONFIG => u32::from(v.config),
            legacy::MSIX_QUEUE => u32::from(
                v.queues
                    .get(d.queue_sel as usize)
                    .copied()
                    .unwrap_or(NO_VECTOR),
            ),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn legacy_write(&self, offset: u64, data: &[u8]) {
        let cfg = self.legacy_config_offset();
        if offset >= cfg {
            if matches!(data.len(), 1 | 2 | 4) {
                self.core.lock_device().write_config(offset - cfg, data);
            }
            return;
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(b);
        if offset == legacy::QUEUE_NOTIFY {
            let index = value as u16;
            let st = self.lock();
            if !self.core.notify_allowed(&st.driver, index) {
                return;
            }
            let hook = st.notify_hook.clone();
            drop(st);
            match hook {
                Some(hook) => hook(index),
                None => self.core.lock_device().queue_notify(index),
            }
            return;
        }
        let mut st = self.lock();
        let d = &mut st.driver;
        let nvec = |v: &Vectors, x: u16| if x < v.msix.vectors() { x } else { NO_VECTOR };
        match (offset, data.len()) {
            (legacy::GUEST_FEATURES, 4) => {
                if d.status & STATUS_DRIVER != 0 && !d.running() {
                    d.driver_features = u64::from(value);
                }
            }
            (legacy::QUEUE_PFN, 4) => {
                if value == 0 {
                    self.core.reset(d);
                    Vectors::lock(&self.vectors).reset_assignments();
                    return;
                }
                let Some(q) = d.selected_for_setup("address") else {
                    return;
                };
                let size = u64::from(q.max);
                let desc = u64::from(value) << 12;
                let avail = desc + 16 * size;
                let used = (avail + 6 + 2 * size).next_multiple_of(legacy::VRING_ALIGN);
                q.size = q.max;
                q.desc = desc;
                q.avail = avail;
                q.used = used;
                q.ready = true;
            }
            (legacy::QUEUE_SEL, 2) => d.queue_sel = value & 0xffff,
            (legacy::STATUS, 1) => {
                self.core.write_status_legacy(d, value);
                if value == 0 {
                    Vectors::lock(&self.vectors).reset_assignments();
                }
            }
            (legacy::MSIX_CONFIG, 2) => {
                let mut v = Vectors::lock(&self.vectors);
                v.config = nvec(&v, value as u16);
            }
            (legacy::MSIX_QUEUE, 2) => {
                let sel = d.queue_sel as usize;
                let mut v = Vectors::lock(&self.vectors);
                let x = nvec(&v, value as u16);
                if let Some(slot) = v.queues.get_mut(sel) {
                    *slot = x;
                }
            }
            _ => log::debug!(
                "virtio-pci: {}-byte legacy write at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    fn bar_access_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            0 if self.interfaces.legacy && offset < self.legacy_bar_size => {
                self.legacy_read(offset, data)
            }
            VirtioPciLayout::MSIX_BAR if offset < VirtioPciLayout::MSIX_BAR_SIZE => {
                self.msix_read(offset, data)
            }
            VirtioPciLayout::MODERN_BAR
                if self.interfaces.modern && offset < VirtioPciLayout::MODERN_BAR_SIZE =>
            {
                self.modern_read(offset, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_access_write(&self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 if self.interfaces.legacy && offset < self.legacy_bar_size => {
                self.legacy_write(offset, data)
            }
            VirtioPciLayout::MSIX_BAR if offset < VirtioPciLayout::MSIX_BAR_SIZE => {
                self.msix_write(offset, data)
            }
            VirtioPciLayout::MODERN_BAR
                if self.interfaces.modern && offset < VirtioPciLayout::MODERN_BAR_SIZE =>
            {
                self.modern_write(offset, data)
            }
            _ => {}
        }
    }

    fn overlaps_cfg_data(&self, offset: u16, len: usize) -> bool {
        let data = u16::from(self.pci_cfg_cap) + 16;
        self.pci_cfg_cap != 0 && offset < data + 4 && offset + len as u16 > data
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        let window = {
            let mut st = self.lock();
            st.config.set_interrupt_status(self.intx.asserted());
            st.config.read(u64::from(offset), data);
            (offset < 0x100 && data.len() <= 4 && self.overlaps_cfg_data(offset, data.len()))
                .then(|| self.pci_cfg_window(&st.config))
                .flatten()
        };
        // The configuration access capability: its data field reads through to the BAR.
        if let Some((bar, bar_off, len)) = window {
            let mut buf = [0u8; 4];
            self.bar_access_read(bar, bar_off, &mut buf[..len]);
            let data_off = u16::from(self.pci_cfg_cap) + 16;
            for (i, d) in data.iter_mut().enumerate() {
                let o = offset + i as u16;
                if o >= data_off && o < data_off + 4 {
                    *d = buf[usize::from(o - data_off)];
                }
            }
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let window = {
            let mut st = self.lock();
            st.config.write(u64::from(offset), data);
            Vectors::lock(&self.vectors).msix.config_written(&st.config);
            self.intx.set_disabled(st.config.intx_disabled());
            (offset < 0x100 && data.len() <= 4 && self.overlaps_cfg_data(offset, data.len()))
                .then(|| self.pci_cfg_window(&st.config))
                .flatten()
                .map(|w| {
                    let v = st.config.read_u32(usize::from(self.pci_cfg_cap) + 16);
                    (w, v)
                })
        };
        if let Some(((bar, bar_off, len), v)) = window {
            self.bar_access_write(bar, bar_off, &v.to_le_bytes()[..len]);
        }
    }

    fn bar_regions(&self) -> Vec<BarRegion> {
        self.lock().config.bar_regions()
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        self.bar_access_read(bar, offset, data);
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        self.bar_access_write(bar, offset, data);
    }

    fn assign_bars(&self, owner: PciAddress, allocator: &mut BarAllocator) -> Result<(), PciError> {
        assign_config_bars(&mut self.lock().config, owner, allocator)
    }

    fn reset(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        self.core.reset(&mut st.driver);
        st.config.reset();
        let mut v = Vectors::lock(&self.vectors);
        v.msix.reset();
        v.reset_assignments();
        self.intx.set_disabled(false);
    }

    /// Every queue of a running device is processed once more: the devices complete each
    /// request they take in the same call, so with the vCPUs stopped none is left in
    /// flight, and each queue's next available and next used index are the used ring's.
    fn quiesce(&self) {
        let (running, queues) = {
            let st = self.lock();
            (st.driver.running(), st.driver.queues.len())
        };
        if running {
            for i in 0..queues {
                self.process_queue(u16::try_from(i).unwrap_or(u16::MAX));
            }
        }
    }

    fn save_state(&self) -> Result<Vec<u8>, PciError> {
        let st = self.lock();
        let v = Vectors::lock(&self.vectors);
        let (msix_table, msix_pending) = v.msix.save();
        let state = FunctionState {
            config: st.config.image(),
            virtio: Some(VirtioPciState {
                transport: self.core.save_driver(&st.driver),
                config_vector: v.config,
                queue_vectors: v.queues.clone(),
                msix_table,
                msix_pending,
            }),
        };
        Ok(keel_snapshot::Persist::to_payload(&state))
    }

    fn check_state(&self, state: &[u8]) -> Result<(), PciError> {
        let s = crate::snapshot::decode(state)?;
        self.check_decoded(&s).map(|_| ())
    }

    fn restore_state(&self, state: &[u8]) -> Result<(), PciError> {
        let s = crate::snapshot::decode(state)?;
        let saved = self.check_decoded(&s)?;
        let mut st = self.lock();
        let st = &mut *st;
        st.config.restore_image(&s.config);
        // Resets the device and activates it again with its queues where they stood.
        self.core.restore_driver(&mut st.driver, &saved.transport);
        {
            let mut v = Vectors::lock(&self.vectors);
            let n = v.msix.vectors();
            let valid = |x: u16| if x < n { x } else { NO_VECTOR };
            v.config = valid(saved.config_vector);
            for (slot, &x) in v.queues.iter_mut().zip(&saved.queue_vectors) {
                *slot = valid(x);
            }
            v.msix
                .restore(&saved.msix_table, &saved.msix_pending, &st.config);
        }
        self.intx.set_disabled(st.config.intx_disabled());
        // INTx is asserted again if the saved ISR had a bit set.
        self.core.restore_interrupt(&saved.transport);
        Ok(())
    }
}

impl VirtioPci {
    /// Checks a decoded state against this function without changing anything; returns
    /// its virtio part.
    fn check_decoded<'a>(&self, s: &'a FunctionState) -> Result<&'a VirtioPciState, PciError> {
        let Some(saved) = &s.virtio else {
            return Err(PciError::StateMismatch(
                "the saved function is not a virtio-pci device".into(),
            ));
        };
        let st = self.lock();
        self.core
            .check_driver(&st.driver, &saved.transport)
            .map_err(PciError::StateMismatch)?;
        if saved.queue_vectors.len() != st.driver.queues.len() {
            return Err(PciError::StateMismatch(format!(
                "{} queue vectors saved for {} queues",
                saved.queue_vectors.len(),
                st.driver.queues.len()
            )));
        }
        Vectors::lock(&self.vectors)
            .msix
            .check(&saved.msix_table, &saved.msix_pending)
            .map_err(PciError::StateMismatch)
            .map(|()| saved)
    }
}
