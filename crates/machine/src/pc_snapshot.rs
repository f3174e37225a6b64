//! Saving and restoring a `pc`: the sections every machine has ([`crate::snapshot`]), the
//! onboard devices (COM1 if present, the RTC, the i8042, the ACPI PM block, the GPE0 block,
//! the ACPI PCI hot plug registers, the configuration address latch at 0xCF8 and the reset
//! control at 0xCF9) and one section per PCI function, keyed by its devfn, with the
//! function's vendor and device ID in front of its state (`keel_pci::FunctionState`:
//! configuration space, and for virtio-pci the transport, the vectors and the MSI-X table).
//!
//! A restore checks that the stream's functions are this machine's (same address, same
//! vendor and device, a state the device accepts) before anything changes: QEMU's rule that
//! the destination is started with the same `-device`s, hot-plugged ones included. After
//! the functions are restored the bus routes their BARs again.

use keel_devices::{AcpiPm, I8042, Rtc, Serial};
use keel_pci::{FUNCTION_STATE_VERSION, PciAddress, PciDevice};
use keel_snapshot::{
    Dec, DecodeError, Enc, Header, Persist, RamStats, SectionId, Shape, Snapshot, SnapshotError,
    Stateful,
};

use crate::pc::{PC_MACHINE_NAME, Pc};
use crate::pc_hotplug::HotplugRegisters;
use crate::snapshot::ExtraSection;
use crate::snapshot::{self as common, CoreRestore};

/// The GPE0 block: two status and two enable bytes.
pub const GPE_SECTION: SectionId = SectionId(*b"GPE0");
const GPE_VERSION: u32 = 1;
/// The ACPI PCI hot plug registers.
pub const HOTPLUG_SECTION: SectionId = SectionId(*b"PCHP");
const HOTPLUG_VERSION: u32 = 1;
/// The PIIX ports: the configuration address latch (0xCF8) and the reset control (0xCF9).
pub const PORTS_SECTION: SectionId = SectionId(*b"PCPT");
const PORTS_VERSION: u32 = 1;
/// One PCI function (instance = devfn).
pub const PCI_SECTION: SectionId = SectionId(*b"PCIF");

impl Persist for HotplugRegisters {
    fn encode(&self, e: &mut Enc) {
        e.u32(self.up).u32(self.down).u32(self.bnum).u32(self.pidx);
    }
    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            up: d.u32("PCIU")?,
            down: d.u32("PCID")?,
            bnum: d.u32("BNUM")?,
            pidx: d.u32("PIDX")?,
        })
    }
}

/// The PIIX ports' state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    config_address: u32,
    reset_control: u8,
}

impl Persist for Ports {
    fn encode(&self, e: &mut Enc) {
        e.u32(self.config_address).u8(self.reset_control);
    }
    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            config_address: d.u32("configuration address")?,
            reset_control: d.u8("reset control")?,
        })
    }
}

struct Gpe([u8; 4]);

impl Persist for Gpe {
    fn encode(&self, e: &mut Enc) {
        e.fixed(&self.0);
    }
    fn decode(d: &mut Dec<'_>) -> Result<Self, DecodeError> {
        Ok(Self(d.fixed::<4>("GPE0 registers")?))
    }
}

/// A PCI function's section: its vendor and device ID, then its state.
struct PciSection<'a> {
    vendor: u16,
    device: u16,
    state: &'a [u8],
}

impl<'a> PciSection<'a> {
    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::new();
        e.u16(self.vendor).u16(self.device).bytes(self.state);
        e.finish()
    }
    fn decode(p: &'a [u8]) -> Result<Self, DecodeError> {
        let mut d = Dec::new(p);
        let s = Self {
            vendor: d.u16("vendor ID")?,
            device: d.u16("device ID")?,
            state: d.bytes("function state")?,
        };
        d.end()?;
        Ok(s)
    }
}

/// The vendor and device ID of a function, as the guest reads them.
fn ids(dev: &dyn PciDevice) -> (u16, u16) {
    let mut b = [0u8; 4];
    dev.config_read(0, &mut b);
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    )
}

/// Every devfn of bus 0 with the function there.
fn functions(pc: &Pc) -> Vec<(PciAddress, std::sync::Arc<dyn PciDevice>)> {
    (0..=255u8)
        .map(PciAddress::from_devfn)
        .filter_map(|a| pc.pci_bus().function(a).map(|d| (a, d)))
        .collect()
}

/// Everything a stream holds for a `pc`, decoded and checked against the machine.
pub struct PcRestore {
    core: CoreRestore,
    serial: Option<keel_devices::SerialSnapshot>,
    rtc: keel_devices::RtcSnapshot,
    i8042: keel_devices::I8042Snapshot,
    pm: keel_devices::AcpiPmSnapshot,
    gpe: [u8; 4],
    hotplug: HotplugRegisters,
    ports: Ports,
    pci: Vec<SavedFunction>,
}

/// A function of this machine with the state the stream has for it (checked).
type SavedFunction = (PciAddress, std::sync::Arc<dyn PciDevice>, Vec<u8>);

impl std::fmt::Debug for PcRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcRestore")
            .field("core", &self.core)
            .field("functions", &self.pci.len())
            .finish_non_exhaustive()
    }
}

impl PcRestore {
    /// Whether the guest was running when the stream was saved.
    pub fn running(&self) -> bool {
        self.core.machine.running
    }
}

impl Pc {
    /// The shape a stream must have to restore into this machine.
    pub fn snapshot_shape(&self) -> Shape {
        Shape {
            machine: PC_MACHINE_NAME.to_string(),
            vcpus: self.config().cpus,
            memory: self.config().memory,
        }
    }

    /// The stream's header for this machine.
    pub fn snapshot_header(&self) -> Header {
        common::header(self.snapshot_shape(), self.accel_name())
    }

    /// Starts recording the guest's writes to RAM (a live migration's dirty log).
    pub fn start_dirty_log(
        &self,
    ) -> Result<std::sync::Arc<dyn keel_accel::dirty::DirtyLog>, keel_accel::AccelError> {
        self.core_ref().vm().start_dirty_log()
    }

    /// Every PCI function's section, each function quiesced first (no request in flight).
    /// The vCPUs must be stopped. A function that cannot be saved is named with `name`
    /// (the board's name for an address) in the error.
    pub(crate) fn pci_sections(
        &self,
        name: &dyn Fn(PciAddress) -> String,
    ) -> Result<Vec<ExtraSection>, String> {
        let mut out = Vec::new();
        for (a, dev) in functions(self) {
            dev.quiesce();
            let state = dev
                .save_state()
                .map_err(|e| format!("the PCI device at {a} ({}) cannot be saved: {e}", name(a)))?;
            let (vendor, device) = ids(&*dev);
            let payload = PciSection {
                vendor,
                device,
                state: &state,
            }
            .encode();
            out.push((
                PCI_SECTION,
                u32::from(a.devfn()),
                FUNCTION_STATE_VERSION,
                payload,
            ));
        }
        Ok(out)
    }

    /// Writes the whole machine to `out`: the common sections, the onboard devices,
    /// `pci` ([`Pc::pci_sections`]), RAM unless `ram` is off (a live migration's state),
    /// the end marker. The vCPUs must be stopped; `running` is the run state to record.
    pub(crate) fn save_stream(
        &mut self,
        out: &mut dyn std::io::Write,
        running: bool,
        pci: &[ExtraSection],
        ram: bool,
    ) -> Result<Option<RamStats>, SnapshotError> {
        let header = self.snapshot_header();
        let (serial, rtc, i8042, pm) = self.onboard();
        let gpe = Gpe(self.gpe().registers()).to_payload();
        let hotplug = self.hotplug().registers().to_payload();
        let ports = self.ports().to_payload();
        let mut w = common::begin(self.core_mut(), out, &header, running)?;
        common::device(&mut w, serial.as_ref())?;
        common::device(&mut w, Some(&rtc))?;
        common::device(&mut w, Some(&i8042))?;
        common::device(&mut w, Some(&pm))?;
        w.section(GPE_SECTION, 0, GPE_VERSION, &gpe)?;
        w.section(HOTPLUG_SECTION, 0, HOTPLUG_VERSION, &hotplug)?;
        w.section(PORTS_SECTION, 0, PORTS_VERSION, &ports)?;
        for (id, instance, version, payload) in pci {
            w.section(*id, *instance, *version, payload)?;
        }
        common::finish(w, self.core_ref(), ram)
    }

    /// Decodes and checks everything of `snap` this machine needs (shape, RAM, every
    /// section, every PCI function against the one at its address) without changing
    /// anything.
    pub fn check_snapshot(&self, snap: &Snapshot) -> Result<PcRestore, SnapshotError> {
        let known = [
            <Serial as Stateful>::SECTION,
            <Rtc as Stateful>::SECTION,
            <I8042 as Stateful>::SECTION,
            <AcpiPm as Stateful>::SECTION,
            GPE_SECTION,
            HOTPLUG_SECTION,
            PORTS_SECTION,
            PCI_SECTION,
        ];
        let core = common::check_core(self.core_ref(), snap, &self.snapshot_shape(), &known)?;
        let serial = common::optional::<Serial>(snap, self.serial().is_some(), "COM1")?;
        let rtc = snap.decode(<Rtc as Stateful>::SECTION, 0, <Rtc as Stateful>::VERSION)?;
        let i8042 = snap.decode(
            <I8042 as Stateful>::SECTION,
            0,
            <I8042 as Stateful>::VERSION,
        )?;
        let pm = snap.decode(
            <AcpiPm as Stateful>::SECTION,
            0,
            <AcpiPm as Stateful>::VERSION,
        )?;
        let Gpe(gpe) = snap.decode(GPE_SECTION, 0, GPE_VERSION)?;
        let hotplug = snap.decode(HOTPLUG_SECTION, 0, HOTPLUG_VERSION)?;
        let ports = snap.decode(PORTS_SECTION, 0, PORTS_VERSION)?;
        let pci = self.check_functions(snap)?;
        Ok(PcRestore {
            core,
            serial,
            rtc,
            i8042,
            pm,
            gpe,
            hotplug,
            ports,
            pci,
        })
    }

    /// The stream's PCI functions against this machine's, address by address.
    fn check_functions(&self, snap: &Snapshot) -> Result<Vec<SavedFunction>, SnapshotError> {
        let mismatch = |saved: String, here: String| SnapshotError::ShapeMismatch {
            what: "PCI function",
            saved,
            here: format!("{here} (start it with the same -device options)"),
        };
        if let Some(s) = snap
            .sections()
            .iter()
            .find(|s| s.id == PCI_SECTION && s.instance > 255)
        {
            return Err(mismatch(
                format!("#{} (no such devfn)", s.instance),
                "a bus of 256 functions".into(),
            ));
        }
        let mut out = Vec::new();
        for devfn in 0..=255u8 {
            let a = PciAddress::from_devfn(devfn);
            let here = self.pci_bus().function(a);
            let saved = snap.payload(PCI_SECTION, u32::from(devfn), FUNCTION_STATE_VERSION)?;
            let saved = match saved {
                Some((_, p)) => {
                    Some(
                        PciSection::decode(p).map_err(|source| SnapshotError::Section {
                            section: format!("{PCI_SECTION} #{devfn}"),
                            source,
                        })?,
                    )
                }
                None => None,
            };
            match (here, saved) {
                (None, None) => {}
                (Some(dev), None) => {
                    let (v, d) = ids(&*dev);
                    return Err(mismatch(
                        format!("nothing at {a}"),
                        format!("{v:04x}:{d:04x} at {a}"),
                    ));
                }
                (None, Some(s)) => {
                    return Err(mismatch(
                        format!("{:04x}:{:04x} at {a}", s.vendor, s.device),
                        format!("nothing at {a}"),
                    ));
                }
                (Some(dev), Some(s)) => {
                    let (v, d) = ids(&*dev);
                    if (v, d) != (s.vendor, s.device) {
                        return Err(mismatch(
                            format!("{:04x}:{:04x} at {a}", s.vendor, s.device),
                            format!("{v:04x}:{d:04x} at {a}"),
                        ));
                    }
                    dev.check_state(s.state).map_err(|e| {
                        mismatch(
                            format!("{v:04x}:{d:04x} at {a} in another state"),
                            format!("a device that refuses it ({e})"),
                        )
                    })?;
                    out.push((a, dev, s.state.to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// Puts the machine in the state `r` was decoded from (RAM too with `ram`; without it
    /// the stream must have none). The vCPUs must be stopped. A failure here leaves the
    /// machine held: it must not run half restored.
    pub fn apply_stream(
        &mut self,
        snap: &Snapshot,
        r: PcRestore,
        ram: bool,
    ) -> Result<(), SnapshotError> {
        common::apply_core(self.core_mut(), snap, r.core, ram)?;
        let (serial, rtc, i8042, pm) = self.onboard();
        if let (Some(d), Some(s)) = (&serial, &r.serial) {
            d.restore_state(s);
        }
        rtc.restore_state(&r.rtc);
        i8042.restore_state(&r.i8042);
        pm.restore_state(&r.pm);
        self.gpe().restore_registers(r.gpe);
        self.hotplug().restore_registers(&r.hotplug);
        self.restore_ports(r.ports.config_address, r.ports.reset_control);
        let mut slots = 0u32;
        for (a, dev, state) in &r.pci {
            dev.restore_state(state)
                .map_err(|e| common::section_err(PCI_SECTION, format!("{a}: {e}")))?;
            slots |= 1 << a.slot();
        }
        // The BARs decode where the guest had placed them.
        for slot in 0..keel_pci::SLOTS {
            if slots & (1 << slot) != 0 {
                self.pci_bus().refresh_routes(slot);
            }
        }
        Ok(())
    }

    fn ports(&self) -> Ports {
        let (config_address, reset_control) = self.port_registers();
        Ports {
            config_address,
            reset_control,
        }
    }
}
