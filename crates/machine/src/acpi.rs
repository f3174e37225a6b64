//! ACPI tables for microvm: RSDP, XSDT, FADT, MADT and DSDT (and a FACS when needed), laid
//! out in guest memory from [`crate::layout::ACPI_START`].
//!
//! With an IOAPIC, as in QEMU's microvm, the platform is hardware-reduced: there are no PM1
//! register blocks and no SCI; power-off and reset go through the ACPI Generic Event Device's
//! sleep control and reset registers (see `keel_devices::AcpiGed`), and the DSDT describes the
//! GED and a power button device.
//!
//! Without an IOAPIC (a backend with only the 8259 pair, such as the interpreter) the FADT is a
//! full one instead ([`AcpiConfig::pm_base`]): Linux treats a hardware-reduced platform as
//! having no legacy PIC, so interrupts arriving through the 8259 would be taken as exceptions.
//! The full FADT points at the PIIX4/ICH9-style PM1a event/control blocks and PM timer of
//! `keel_devices::AcpiPm`, with the SCI on ISA IRQ 9 and the fixed power button; power-off
//! writes `SLP_EN` with the `\_S5` type to PM1a control. The PM timer also gives Linux a
//! reference clock for TSC calibration. The reset register stays the GED's. The interpreter
//! keeps this full FADT when it has local APICs and an IOAPIC (`-smp` > 1, see
//! `keel_tcg::ApicMode`): the MADT then lists the IOAPIC and an interrupt source override
//! making the SCI (ISA IRQ 9 = GSI 9) level-triggered, active high; ISA IRQ 0 stays GSI 0.
//!
//! In both cases the DSDT describes COM1, the RTC, and one `LNRO0005` node per virtio-mmio
//! device the machine was given, which is how kernels without `virtio_mmio.device=` support
//! find them.

use acpi_tables::Aml;
use acpi_tables::aml::{
    And, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, IO, If, Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store,
};

use crate::layout::{ACPI_END, ACPI_START, GED_MMIO_BASE, IOAPIC_ADDR, LAPIC_ADDR};

/// The GED's interrupt (QEMU's microvm uses GSI 9, the traditional SCI).
pub const GED_GSI: u32 = 9;

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"KEEL";
const CREATOR_REVISION: u32 = 1;

/// A virtio-mmio transport the DSDT announces to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Base of its MMIO window.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// GSI (level-triggered, active high).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of CPUs (one local APIC each, APIC id = index).
    pub cpus: u32,
    /// Whether an IOAPIC exists (MADT entry at [`IOAPIC_ADDR`], GSI base 0).
    pub ioapic: bool,
    /// Whether the 8259 pair exists (MADT PCAT_COMPAT).
    pub pic: bool,
    /// Whether the MC146818 RTC exists (else the FADT says "no CMOS RTC").
    pub rtc: bool,
    /// Whether an i8042 exists (FADT IA-PC boot flag).
    pub i8042: bool,
    /// COM1 at 0x3f8 / IRQ 4, if present.
    pub serial: bool,
    /// virtio-mmio devices, in the order they were cold-plugged.
    pub virtio_mmio: Vec<VirtioMmioDevice>,
    /// `Some(port)`: a full (not hardware-reduced) FADT whose PM1a event block, PM1a control
    /// block and PM timer are the `keel_devices::AcpiPm` register block at this I/O port, SCI
    /// on [`SCI_IRQ`], plus a FACS. `None`: hardware-reduced with the GED (needs an IOAPIC
    /// under Linux).
    pub pm_base: Option<u16>,
}

/// The SCI's ISA IRQ with the PM register block (as on PIIX4/ICH9 PCs).
pub const SCI_IRQ: u16 = 9;

/// Errors building or placing the tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the reserved ACPI area below 1 MiB.
    #[error("ACPI tables need {needed} bytes but only {room} are reserved; use fewer devices")]
    TooBig {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
    /// More virtio-mmio devices than the DSDT can name.
    #[error("too many virtio-mmio devices for the DSDT ({0}); at most 4096 are supported")]
    TooManyDevices(usize),
}

/// The tables, ready to copy into guest memory at their addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest-physical address of the RSDP (what `hvm_start_info.rsdp_paddr` and
    /// `boot_params.acpi_rsdp_addr` carry).
    pub rsdp_addr: u64,
    /// (address, bytes) of every table: RSDP, XSDT, FADT, MADT, DSDT, then the FACS if any.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// The 8-bit checksum byte that makes `data` sum to zero.
pub fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table under construction: header first, checksum fixed at the end.
pub(crate) struct Sdt(pub(crate) Vec<u8>);

impl Sdt {
    pub(crate) fn new(signature: &[u8; 4], revision: u8, table_id: &[u8; 8]) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(signature);
        v.extend_from_slice(&0u32.to_le_bytes()); // length, fixed in finish()
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(&OEM_ID);
        v.extend_from_slice(table_id);
        v.extend_from_slice(&OEM_REVISION.to_le_bytes());
        v.extend_from_slice(&CREATOR_ID);
        v.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
        Self(v)
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    /// A Generic Address Structure for a byte register in system memory.
    fn gas_mem8(&mut self, addr: u64) -> &mut Self {
        self.u8(0).u8(8).u8(0).u8(1).u64(addr)
    }
    /// A Generic Address Structure for an I/O port block of `bytes` bytes (0: none).
    pub(crate) fn gas_io(&mut self, port: u16, bytes: u8, access: u8) -> &mut Self {
        if bytes == 0 {
            return self.zeros(12);
        }
        self.u8(1)
            .u8(bytes * 8)
            .u8(0)
            .u8(access)
            .u64(u64::from(port))
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = 0;
        self.0[9] = checksum(&self.0);
        self.0
    }
}

pub(crate) fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0); // checksum of the first 20 bytes
    v.extend_from_slice(&OEM_ID);
    v.push(2); // revision: ACPI 2.0+ (XSDT)
    v.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(&xsdt_addr.to_le_bytes());
    v.push(0); // extended checksum
    v.extend_from_slice(&[0; 3]);
    v[8] = checksum(&v[..20]);
    v[32] = checksum(&v);
    v
}

/// FADT flag: WBINVD works.
pub(crate) const FADT_WBINVD: u32 = 1 << 0;
/// FADT flag: C1 is supported on every processor.
pub(crate) const FADT_PROC_C1: u32 = 1 << 2;
/// FADT flag: no fixed sleep button (the fixed power button exists: PWR_BUTTON clear).
pub(crate) const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT flag: the reset register is supported.
pub(crate) const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// IA-PC boot architecture flag: legacy (ISA) devices exist.
pub(crate) const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flag: an 8042 keyboard controller exists.
pub(crate) const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
/// IA-PC boot architecture flag: message-signalled interrupts must not be enabled.
pub(crate) const IAPC_NO_MSI: u16 = 1 << 3;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Where the FADT's reset register is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ResetRegister {
    /// A byte in memory space (the GED's reset register).
    Mem8(u64),
    /// A byte I/O port (the PIIX3's reset control register).
    Io(u16),
}

/// What a machine's FADT says: the parts machine types differ in. Everything else (no SMI
/// command port, no C2/C3, 64-bit DSDT pointer, version 6.5) is the same for all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FadtSpec {
    /// Address of the FACS, if there is one (a full FADT).
    pub facs: Option<u64>,
    /// The SCI's interrupt (0 on a hardware-reduced platform).
    pub sci: u16,
    /// `Some(port)`: PM1a event/control and the PM timer are the `keel_devices::AcpiPm`
    /// block at this port (a full FADT); `None`: hardware-reduced, sleep control and status
    /// through the GED.
    pub pm_base: Option<u16>,
    /// The GPE0 block (port, length), if any.
    pub gpe0: Option<(u16, u8)>,
    /// Whether the CMOS RTC exists (its century byte is at index 0x32).
    pub rtc: bool,
    /// IA-PC boot architecture flags.
    pub iapc: u16,
    /// Fixed feature flags (without `HW_REDUCED_ACPI`, set from `pm_base`).
    pub flags: u32,
    /// The reset register and the value written to it.
    pub reset: (ResetRegister, u8),
}

/// The FADT (revision 6, ACPI 6.5) for `spec`, pointing at the DSDT at `dsdt_addr`.
pub(crate) fn fadt_table(spec: &FadtSpec, dsdt_addr: u64) -> Vec<u8> {
    let regs = GED_MMIO_BASE + keel_devices::GED_REGS_OFFSET;
    // Register blocks: (port, length) of PM1a event, PM1a control and PM timer.
    let (evt, cnt, tmr, flags) = match spec.pm_base {
        Some(base) => {
            let at = |off: u64| base.wrapping_add(off as u16);
            (
                (at(keel_devices::PM1_EVT_OFFSET), keel_devices::PM1_EVT_LEN),
                (at(keel_devices::PM1_CNT_OFFSET), keel_devices::PM1_CNT_LEN),
                (at(keel_devices::PM_TMR_OFFSET), keel_devices::PM_TMR_LEN),
                spec.flags,
            )
        }
        None => ((0, 0), (0, 0), (0, 0), spec.flags | FADT_HW_REDUCED_ACPI),
    };
    let (gpe0, gpe0_len) = spec.gpe0.unwrap_or((0, 0));
    let mut t = Sdt::new(b"FACP", 6, b"KEELFACP");
    t.u32(spec.facs.unwrap_or(0) as u32) // FIRMWARE_CTRL (FACS below 1 MiB)
        .u32(0) // DSDT (32-bit): use X_DSDT
        .u8(0)
        .u8(0) // preferred PM profile: unspecified
        .u16(spec.sci) // SCI_INT
        .u32(0) // SMI_CMD: none, the platform is always in ACPI mode
        .zeros(4) // ACPI enable/disable, S4BIOS, PSTATE
        .u32(u32::from(evt.0)) // PM1a_EVT_BLK
        .u32(0) // PM1b_EVT_BLK
        .u32(u32::from(cnt.0)) // PM1a_CNT_BLK
        .u32(0) // PM1b_CNT_BLK
        .u32(0) // PM2_CNT_BLK
        .u32(u32::from(tmr.0)) // PM_TMR_BLK
        .u32(u32::from(gpe0)) // GPE0_BLK
        .u32(0) // GPE1_BLK
        .u8(evt.1)
        .u8(cnt.1)
        .u8(0) // PM2_CNT_LEN
        .u8(tmr.1)
        .u8(gpe0_len) // GPE0_BLK_LEN
        .zeros(3) // GPE1 length, GPE1 base, CST_CNT
        .u16(0xfff) // P_LVL2_LAT: C2 not supported (as QEMU)
        .u16(0xfff) // P_LVL3_LAT: C3 not supported
        .zeros(4) // flush size/stride
        .zeros(4) // duty offset/width, day/month alarm
        .u8(if spec.rtc { 0x32 } else { 0 }) // CENTURY index in CMOS
        .u16(spec.iapc)
        .u8(0)
        .u32(flags);
    match spec.reset.0 {
        ResetRegister::Mem8(addr) => t.gas_mem8(addr),
        ResetRegister::Io(port) => t.gas_io(port, 1, 1),
    };
    t.u8(spec.reset.1) // RESET_VALUE
        .u16(0) // ARM boot arch
        .u8(5) // FADT minor version (ACPI 6.5)
        .u64(0) // X_FIRMWARE_CTRL (FIRMWARE_CTRL is used)
        .u64(dsdt_addr)
        .gas_io(evt.0, evt.1, 0) // X_PM1a_EVT_BLK
        .zeros(12) // X_PM1b_EVT_BLK
        .gas_io(cnt.0, cnt.1, 0) // X_PM1a_CNT_BLK
        .zeros(12 * 2) // X_PM1b_CNT_BLK, X_PM2_CNT_BLK
        .gas_io(tmr.0, tmr.1, 3) // X_PM_TMR_BLK (dword access)
        .gas_io(gpe0, gpe0_len, 1) // X_GPE0_BLK (byte access)
        .zeros(12); // X_GPE1_BLK
    if spec.pm_base.is_some() {
        // Sleep control/status registers are for hardware-reduced platforms only.
        t.zeros(12 * 2);
    } else {
        t.gas_mem8(regs + keel_devices::GED_SLEEP_CTL)
            .gas_mem8(regs + keel_devices::GED_SLEEP_STS);
    }
    t.u64(u64::from_le_bytes(*b"KEELKEEL")); // hypervisor vendor identity
    t.finish()
}

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64, facs_addr: Option<u64>) -> Vec<u8> {
    let mut iapc = IAPC_NO_VGA;
    if cfg.i8042 {
        iapc |= IAPC_8042;
    }
    if !cfg.rtc {
        iapc |= IAPC_NO_CMOS_RTC;
    }
    if cfg.pm_base.is_some() {
        iapc |= IAPC_LEGACY_DEVICES;
    }
    let spec = FadtSpec {
        facs: facs_addr,
        sci: if cfg.pm_base.is_some() { SCI_IRQ } else { 0 },
        pm_base: cfg.pm_base,
        gpe0: None,
        rtc: cfg.rtc,
        iapc,
        // As QEMU's pc FADT where there is a PM block: WBINVD works, C1 supported, no fixed
        // sleep button; 24-bit timer (TMR_VAL_EXT clear).
        flags: if cfg.pm_base.is_some() {
            FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
        } else {
            FADT_RESET_REG_SUP
        },
        reset: (
            ResetRegister::Mem8(
                GED_MMIO_BASE + keel_devices::GED_REGS_OFFSET + keel_devices::GED_RESET,
            ),
            keel_devices::GED_RESET_VALUE,
        ),
    };
    fadt_table(&spec, dsdt_addr)
}

/// The Firmware ACPI Control Structure a full FADT points at: no waking vector, no global
/// lock owner, no S4BIOS (version 2, 64 bytes, no checksum).
pub(crate) fn facs() -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(b"FACS");
    v.extend_from_slice(&64u32.to_le_bytes());
    v.resize(64, 0);
    v[32] = 2; // version
    v
}

pub(crate) fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut t = Sdt::new(b"APIC", 5, b"KEELAPIC");
    t.u32(LAPIC_ADDR as u32)
        .u32(if cfg.pic { PCAT_COMPAT } else { 0 });
    for i in 0..cfg.cpus {
        // Processor Local APIC: type 0, length 8, UID, APIC id, flags (enabled).
        t.u8(0).u8(8).u8(i as u8).u8(i as u8).u32(1);
    }
    if cfg.ioapic {
        // I/O APIC: type 1, length 12, id, reserved, address, GSI base.
        t.u8(1).u8(12).u8(0).u8(0).u32(IOAPIC_ADDR as u32).u32(0);
        if cfg.pm_base.is_some() {
            // Interrupt source override for the SCI (type 2, length 10, ISA bus, source
            // IRQ, GSI, flags): level-triggered, active high, as the PM block drives it. ISA
            // IRQ 0 keeps GSI 0 (the interpreter's PIT drives IOAPIC pin 0).
            const ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);
            t.u8(2)
                .u8(10)
                .u8(0)
                .u8(SCI_IRQ as u8)
                .u32(u32::from(SCI_IRQ))
                .u16(ACTIVE_HIGH_LEVEL);
        }
    }
    // Local APIC NMI on LINT1 of every processor: type 4, length 6.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

/// Already-encoded AML, so nodes can be built one at a time.
pub(crate) struct Raw(pub(crate) Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

pub(crate) fn encode(obj: &dyn Aml) -> Raw {
    let mut v = Vec::new();
    obj.to_aml_bytes(&mut v);
    Raw(v)
}

pub(crate) fn device(name: &str, children: &[&dyn Aml]) -> Raw {
    encode(&Device::new(Path::new(name), children.to_vec()))
}

/// The hardware-reduced platform's nodes: the GED as QEMU's microvm describes it (one
/// edge-triggered interrupt, the event selector as a field, and _EVT notifying the power button
/// when its event bit is set) and the power button device it notifies.
fn hw_reduced_nodes(sb: &mut Vec<Raw>) {
    let zero = 0u8;
    // as a field, and _EVT notifying the power button when its event bit is set.
    let ged_irq = Interrupt::new(true, true, false, false, GED_GSI);
    let ged_crs = ResourceTemplate::new(vec![&ged_irq]);
    let ged_hid: &'static str = "ACPI0013";
    let ged_uid: &'static str = "GED";
    let ged_base = GED_MMIO_BASE as u32;
    let ged_len = 4u8;
    let pwr_evt = keel_devices::GED_EVENT_POWER_BUTTON as u8;
    let notify_status_change = 0x80u8;
    let evt_test = And::new(&Local(1), &Local(0), &pwr_evt);
    let evt_eq = Equal::new(&Local(1), &pwr_evt);
    let pwrb = Path::new("PWRB");
    let notify = Notify::new(&pwrb, &notify_status_change);
    let esel = Path::new("ESEL");
    let store = Store::new(&Local(0), &esel);
    let when = If::new(&evt_eq, vec![&notify]);
    let evt = Method::new(Path::new("_EVT"), 1, true, vec![&store, &evt_test, &when]);
    sb.push(device(
        "GED_",
        &[
            &Name::new(Path::new("_HID"), &ged_hid),
            &Name::new(Path::new("_UID"), &ged_uid),
            &Name::new(Path::new("_CRS"), &ged_crs),
            &OpRegion::new(
                Path::new("EREG"),
                OpRegionSpace::SystemMemory,
                &ged_base,
                &ged_len,
            ),
            &Field::new(
                Path::new("EREG"),
                FieldAccessType::DWord,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"ESEL", 32)],
            ),
            &evt,
        ],
    ));

    let pwrb_hid: &'static str = "PNP0C0C";
    sb.push(device(
        "PWRB",
        &[
            &Name::new(Path::new("_HID"), &pwrb_hid),
            &Name::new(Path::new("_UID"), &zero),
        ],
    ));
}

fn dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if cfg.virtio_mmio.len() > 4096 {
        return Err(AcpiError::TooManyDevices(cfg.virtio_mmio.len()));
    }
    let one = 1u8;
    let mut sb: Vec<Raw> = Vec::new();

    if cfg.serial {
        sb.push(com1_node());
    }

    if cfg.pm_base.is_none() {
        hw_reduced_nodes(&mut sb);
    }

    if cfg.rtc {
        sb.push(rtc_node());
    }

    // One LNRO0005 node per virtio-mmio transport, as QEMU's microvm writes them.
    let virtio_hid: &'static str = "LNRO0005";
    for (i, d) in cfg.virtio_mmio.iter().enumerate() {
        let mem = Memory32Fixed::new(true, d.base as u32, d.size as u32);
        let irq = Interrupt::new(true, false, false, false, d.gsi);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        sb.push(device(
            &format!("V{i:03X}"),
            &[
                &Name::new(Path::new("_HID"), &virtio_hid),
                &Name::new(Path::new("_UID"), &uid),
                &Name::new(Path::new("_CCA"), &one),
                &Name::new(Path::new("_CRS"), &crs),
            ],
        ));
    }

    // \_S5: the sleep type Linux writes to the GED sleep control register (hardware-reduced)
    // or to PM1a control's SLP_TYP (full FADT) to power off.
    let s5_typ = if cfg.pm_base.is_some() {
        keel_devices::PM_SLP_TYP_S5
    } else {
        keel_devices::SLP_TYP_S5
    };
    Ok(dsdt_table(&sb, &[], s5_typ))
}

/// COM1 as a PNP device (ports 0x3f8-0x3ff, IRQ 4).
pub(crate) fn com1_node() -> Raw {
    let io = IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = Interrupt::new(true, true, false, false, 4);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let (one, sta) = (1u8, 0x0fu8);
    device(
        "COM1",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &one),
            &Name::new(Path::new("_STA"), &sta),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
}

/// The CMOS RTC as a PNP device (ports 0x70-0x71, IRQ 8 edge/active high), so the guest
/// binds rtc-cmos to exactly what the device decodes.
pub(crate) fn rtc_node() -> Raw {
    let io = IO::new(0x70, 0x70, 1, 2);
    let irq = Interrupt::new(true, true, false, false, 8);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    device(
        "RTC_",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0B00")),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
}

/// The DSDT: `sb` as the `\_SB_` scope, then the other top-level `scopes`, then `\_S5_`
/// with the sleep type that powers the machine off.
pub(crate) fn dsdt_table(sb: &[Raw], scopes: &[Raw], s5_typ: u8) -> Vec<u8> {
    let zero = 0u8;
    let mut body: Vec<u8> = Vec::new();
    let children: Vec<&dyn Aml> = sb.iter().map(|r| r as &dyn Aml).collect();
    Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut body);
    for sc in scopes {
        sc.to_aml_bytes(&mut body);
    }
    let s5 = Package::new(vec![&s5_typ, &zero, &zero, &zero]);
    Name::new(Path::new("_S5_"), &s5).to_aml_bytes(&mut body);
    let mut t = Sdt::new(b"DSDT", 2, b"KEELDSDT");
    t.0.extend_from_slice(&body);
    t.finish()
}

pub(crate) fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Builds all tables for `cfg`, placed from [`ACPI_START`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + 36);
    // The XSDT has two entries (FADT, MADT): 36 + 16 bytes.
    let fadt_addr = align16(xsdt_addr + 36 + 16);
    // The FACS must be 64-byte aligned; only a full FADT has one.
    let facs_addr = cfg.pm_base.map(|_| (fadt_addr + 276 + 63) & !63);
    let madt_addr = align16(facs_addr.map_or(fadt_addr + 276, |a| a + 64));
    let madt = madt(cfg);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = dsdt(cfg)?;
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooBig {
            needed: end - ACPI_START,
            room: ACPI_END - ACPI_START,
        });
    }
    let mut xsdt = Sdt::new(b"XSDT", 1, b"KEELXSDT");
    xsdt.u64(fadt_addr).u64(madt_addr);
    let mut blobs = vec![
        (rsdp_addr, rsdp(xsdt_addr)),
        (xsdt_addr, xsdt.finish()),
        (fadt_addr, fadt(cfg, dsdt_addr, facs_addr)),
        (madt_addr, madt),
        (dsdt_addr, dsdt),
    ];
    if let Some(a) = facs_addr {
        blobs.push((a, facs()));
    }
    Ok(AcpiTables { rsdp_addr, blobs })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n_virtio: usize) -> AcpiConfig {
        AcpiConfig {
            cpus: 2,
            ioapic: true,
            pic: true,
            rtc: false,
            i8042: true,
            serial: true,
            virtio_mmio: (0..n_virtio)
                .map(|i| VirtioMmioDevice {
                    base: crate::layout::VIRTIO_MMIO_BASE + 0x200 * i as u64,
                    size: 0x200,
                    gsi: 16 + i as u32,
                })
                .collect(),
            pm_base: None,
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find(t: &AcpiTables, addr: u64) -> &[u8] {
        &t.blobs.iter().find(|(a, _)| *a == addr).unwrap().1
    }

    #[test]
    fn ioapic_with_pm_block_overrides_the_sci_only() {
        // The interpreter with local APICs: full FADT, IOAPIC, SCI level/active-high on GSI 9,
        // ISA IRQ 0 identity-mapped (no override).
        let mut c = cfg(0);
        c.pm_base = Some(0x600);
        let t = build(&c).unwrap();
        let madt = t
            .blobs
            .iter()
            .map(|(_, b)| b)
            .find(|b| &b[..4] == b"APIC")
            .unwrap();
        assert_eq!(madt.len(), 44 + 2 * 8 + 12 + 10 + 6);
        let iso = &madt[44 + 16 + 12..44 + 16 + 12 + 10];
        assert_eq!(iso, &[2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0]);
        assert_eq!(&madt[82..84], &[4, 6], "LINT1 NMI entry follows");
    }

    #[test]
    fn checksums_and_links() {
        let t = build(&cfg(2)).unwrap();
        let rsdp = &t.blobs[0].1;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, b) in &t.blobs[1..] {
            assert_eq!(sum(b), 0, "{}", String::from_utf8_lossy(&b[..4]));
            assert_eq!(
                u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
                b.len()
            );
        }
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = find(&t, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = find(&t, fadt_addr);
        assert_eq!((&fadt[..4], fadt.len()), (&b"FACP"[..], 276));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        // Sleep control register: byte in system memory at the GED.
        assert_eq!(fadt[244], 0);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            GED_MMIO_BASE + 0x200
        );
        assert_eq!(
            u64::from_le_bytes(fadt[120..128].try_into().unwrap()),
            GED_MMIO_BASE + 0x202
        );
        assert_eq!(fadt[128], 0x42);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&find(&t, dsdt_addr)[..4], b"DSDT");
        let madt = find(&t, madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        // Two LAPICs, one IOAPIC, one NMI entry.
        assert_eq!(madt.len(), 44 + 2 * 8 + 12 + 6);
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(madt[60], 1);
    }

    #[test]
    fn dsdt_lists_virtio_devices() {
        let t0 = build(&cfg(0)).unwrap();
        let t3 = build(&cfg(3)).unwrap();
        let d0 = &t0.blobs[4].1;
        let d3 = &t3.blobs[4].1;
        let count = |d: &[u8]| d.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(count(d0), 0);
        assert_eq!(count(d3), 3);
        assert!(d3.windows(4).any(|w| w == b"_S5_"));
        assert!(d3.windows(4).any(|w| w == b"V002"));
        assert!(d3.windows(8).any(|w| w == b"ACPI0013"));
        assert!(d3.windows(4).any(|w| w == b"_EVT"));
        assert!(!d3.windows(4).any(|w| w == b"RTC_"), "rtc=off: no RTC node");
        let with_rtc = build(&AcpiConfig {
            rtc: true,
            ..cfg(0)
        })
        .unwrap();
        assert!(with_rtc.blobs[4].1.windows(4).any(|w| w == b"RTC_"));
        assert!(d3.windows(4).any(|w| w == b"ESEL"));
    }

    #[test]
    fn without_ioapic_the_fadt_is_full_with_pm_blocks_sci_and_facs() {
        let t = build(&AcpiConfig {
            ioapic: false,
            pm_base: Some(0x600),
            ..cfg(1)
        })
        .unwrap();
        assert_eq!(t.blobs.len(), 6);
        for (_, b) in &t.blobs[1..5] {
            assert_eq!(sum(b), 0, "{}", String::from_utf8_lossy(&b[..4]));
        }
        let fadt = &t.blobs[2].1;
        let u16_at = |o: usize| u16::from_le_bytes(fadt[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(fadt[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(fadt[o..o + 8].try_into().unwrap());
        let flags = u32_at(112);
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        assert_eq!(flags & 0b10_0101, 0b10_0101, "WBINVD, PROC_C1, SLP_BUTTON");
        assert_eq!(flags & (1 << 4), 0, "fixed power button present");
        assert_eq!(flags & (1 << 8), 0, "24-bit PM timer");
        assert_eq!(u16_at(46), 9, "SCI_INT");
        assert_eq!(u32_at(48), 0, "no SMI_CMD");
        assert_eq!((u32_at(56), u32_at(64), u32_at(76)), (0x600, 0x604, 0x608));
        assert_eq!(&fadt[88..92], &[4, 2, 0, 4]);
        assert_eq!(u16_at(109) & 0b11, 0b11, "LEGACY_DEVICES and 8042");
        // X_ forms: system I/O, bit widths 32/16/32.
        assert_eq!(&fadt[148..152], &[1, 32, 0, 0]);
        assert_eq!(u64_at(152), 0x600);
        assert_eq!(&fadt[172..176], &[1, 16, 0, 0]);
        assert_eq!(u64_at(176), 0x604);
        assert_eq!(&fadt[208..212], &[1, 32, 0, 3]);
        assert_eq!(u64_at(212), 0x608);
        // No sleep control/status registers; the reset register is still the GED's.
        assert!(fadt[244..268].iter().all(|&b| b == 0));
        assert_eq!(u64_at(120), GED_MMIO_BASE + 0x202);
        // FACS: 64-byte aligned, pointed at by FIRMWARE_CTRL.
        let (facs_addr, facs) = &t.blobs[5];
        assert_eq!(u64::from(u32_at(36)), *facs_addr);
        assert_eq!(facs_addr % 64, 0);
        assert_eq!((&facs[..4], facs.len()), (&b"FACS"[..], 64));
        // No table overlaps another.
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
        // DSDT: no GED or PWRB node (the fixed power button is used), \_S5 = 5 as AcpiPm.
        let dsdt = &t.blobs[4].1;
        assert!(!dsdt.windows(8).any(|w| w == b"ACPI0013"));
        assert!(!dsdt.windows(4).any(|w| w == b"PWRB"));
        let s5 = dsdt.windows(4).position(|w| w == b"_S5_").unwrap();
        // NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix 5.
        assert_eq!(dsdt[s5 + 4], 0x12);
        assert_eq!(&dsdt[s5 + 7..s5 + 9], &[0x0a, keel_devices::PM_SLP_TYP_S5]);
        // The MADT advertises no IOAPIC.
        assert_eq!(t.blobs[3].1.len(), 44 + 2 * 8 + 6);
    }

    #[test]
    fn too_many_devices_is_an_error() {
        assert!(matches!(
            build(&cfg(5000)),
            Err(AcpiError::TooManyDevices(5000))
        ));
        assert!(matches!(build(&cfg(2000)), Err(AcpiError::TooBig { .. })));
    }
}
/// Developer aid: `cargo test -p keel-machine --lib dump_tables -- --ignored` writes the tables
/// to /tmp/acpi-*.dat; `iasl -d /tmp/acpi-DSDT.dat` (acpica-tools) disassembles them. With
/// `KEEL_DUMP_PM=1` it writes the full-FADT variant (PM block at 0x600, no IOAPIC case).
#[cfg(test)]
mod dump {
    #[test]
    #[ignore = "writes files to /tmp for inspection with iasl"]
    fn dump_tables() {
        let cfg = super::AcpiConfig {
            cpus: 2,
            ioapic: true,
            pic: true,
            rtc: true,
            i8042: true,
            serial: true,
            virtio_mmio: vec![super::VirtioMmioDevice {
                base: 0xfeb00000,
                size: 0x200,
                gsi: 16,
            }],
            pm_base: std::env::var("KEEL_DUMP_PM").ok().map(|_| 0x600),
        };
        let t = super::build(&cfg).unwrap();
        for (_, b) in &t.blobs[1..] {
            let name = String::from_utf8_lossy(&b[..4]).to_string();
            std::fs::write(format!("/tmp/acpi-{name}.dat"), b).unwrap();
        }
    }
}
