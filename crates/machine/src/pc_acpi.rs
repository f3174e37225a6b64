//! ACPI tables of the `pc` machine: RSDP, XSDT, a full FADT (PIIX4 PM blocks at 0xb000,
//! GPE0 at 0xafe0, SCI on IRQ 9, reset through 0xCF9), FACS, MADT and a DSDT with the PCI
//! host bridge (`PCI0`: `_CRS` windows, `_PRT` routing) and one device per slot.
//!
//! The `_PRT` names GSIs directly (no link devices): pin P of slot S on
//! [`crate::pc::intx_gsi`], which Linux accepts with the 8259 pair alone and with an IOAPIC
//! (it programs the line level-triggered from the `_PRT`, through the ELCR or the IOAPIC).
//! Every slot from 2 on has a device node with `_ADR` and `_SUN` whether or not it holds a
//! function, so that slots filled later already have their ACPI companions (ACPI PCI hot
//! plug adds `_EJ0` and the GPE handler to these nodes).

use acpi_tables::Aml;
use acpi_tables::aml::{
    Acquire, AddressSpace, AddressSpaceCacheable, And, Arg, BufferData, EISAName, Equal, Field,
    FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, IO, If, Index, Interrupt,
    LessThan, Local, Method, MethodCall, Mutex, Name, NotEqual, Notify, ONE, OpRegion,
    OpRegionSpace, Package, Path, Release, ResourceTemplate, Return, Scope, ShiftLeft, Store, Uuid,
    ZERO,
};

use crate::acpi::{self, AcpiConfig, AcpiError, AcpiTables, Raw, Sdt, align16, device};
use crate::layout::{ACPI_END, ACPI_START};
use crate::pc::{PC_GPE0_BASE, PC_GPE0_LEN, PC_PM_BASE, PC_SCI_IRQ, RESET_CONTROL_PORT, intx_gsi};
use crate::pc_hotplug::{HOTPLUG_SLOTS, PCI_HOTPLUG_BASE};

/// What the `pc` tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcAcpiConfig {
    /// Number of CPUs.
    pub cpus: u32,
    /// Whether an IOAPIC exists.
    pub ioapic: bool,
    /// COM1 present.
    pub serial: bool,
    /// Whether the platform takes message-signalled interrupts (it has local APICs);
    /// without, the FADT says "MSI not supported" and PCI devices use INTx.
    pub msi: bool,
    /// The 32-bit PCI memory window (base, length).
    pub pci_mem32: (u64, u64),
    /// The 64-bit PCI memory window, if declared.
    pub pci_mem64: Option<(u64, u64)>,
}

fn fadt(cfg: &PcAcpiConfig, dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let msi = if cfg.msi { 0 } else { acpi::IAPC_NO_MSI };
    acpi::fadt_table(
        &acpi::FadtSpec {
            facs: Some(facs_addr),
            sci: PC_SCI_IRQ as u16,
            pm_base: Some(PC_PM_BASE),
            gpe0: Some((PC_GPE0_BASE, PC_GPE0_LEN)),
            rtc: true,
            iapc: acpi::IAPC_LEGACY_DEVICES | acpi::IAPC_8042 | msi,
            flags: acpi::FADT_WBINVD
                | acpi::FADT_PROC_C1
                | acpi::FADT_SLP_BUTTON
                | acpi::FADT_RESET_REG_SUP,
            // The PIIX3's reset control register: RST_CPU | SYS_RST.
            reset: (acpi::ResetRegister::Io(RESET_CONTROL_PORT), 0x06),
        },
        dsdt_addr,
    )
}

/// The interrupt-routing table: every pin of every slot from 1 on.
fn prt() -> Raw {
    let zero = 0u8;
    let mut entries: Vec<(u32, u8, u32)> = Vec::new();
    for slot in 1..keel_pci::SLOTS {
        for pin in 0..4u8 {
            entries.push((
                (u32::from(slot) << 16) | 0xffff,
                pin,
                intx_gsi(slot, pin + 1),
            ));
        }
    }
    let pkgs: Vec<Raw> = entries
        .iter()
        .map(|(adr, pin, gsi)| acpi::encode(&Package::new(vec![adr, pin, &zero, gsi])))
        .collect();
    let refs: Vec<&dyn Aml> = pkgs.iter().map(|p| p as &dyn Aml).collect();
    acpi::encode(&Name::new(Path::new("_PRT"), &Package::new(refs)))
}

fn pci0(cfg: &PcAcpiConfig) -> Raw {
    let zero = 0u8;
    let bus = AddressSpace::new_bus_number(0u16, 0xff);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::new_io(0u16, 0x0cf7, None);
    let io_hi = AddressSpace::new_io(0x0d00u16, 0xffff, None);
    let (b32, l32) = cfg.pci_mem32;
    let mem32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        b32 as u32,
        (b32 + l32 - 1) as u32,
        None,
    );
    let mem64 = cfg.pci_mem64.map(|(b, l)| {
        AddressSpace::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            b,
            b + l - 1,
            None,
        )
    });
    let mut res: Vec<&dyn Aml> = vec![&bus, &cfg_io, &io_lo, &io_hi, &mem32];
    if let Some(m) = &mem64 {
        res.push(m);
    }
    let crs = ResourceTemplate::new(res);
    let prt = prt();
    let slots: Vec<Raw> = (2..keel_pci::SLOTS)
        .map(|slot| {
            let adr = u32::from(slot) << 16;
            let sun = u32::from(slot);
            let sun_path = Path::new("_SUN");
            let call = MethodCall::new(Path::new("PCEJ"), vec![&ZERO, &sun_path]);
            let ej0 = Method::new(Path::new("_EJ0"), 1, false, vec![&call]);
            let pdsm = MethodCall::new(
                Path::new("PDSM"),
                vec![&Arg(0), &Arg(1), &Arg(2), &Arg(3), &sun_path],
            );
            let ret = Return::new(&pdsm);
            let dsm = Method::new(Path::new("_DSM"), 4, true, vec![&ret]);
            let hotpluggable = HOTPLUG_SLOTS & (1 << slot) != 0;
            let mut children: Vec<&dyn Aml> = vec![];
            let adr_name = Name::new(Path::new("_ADR"), &adr);
            let sun_name = Name::new(Path::new("_SUN"), &sun);
            children.push(&adr_name);
            children.push(&sun_name);
            children.push(&dsm);
            if hotpluggable {
                children.push(&ej0);
            }
            device(&slot_name(slot), &children)
        })
        .collect();
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &zero);
    let uid = Name::new(Path::new("_UID"), &zero);
    let crs = Name::new(Path::new("_CRS"), &crs);
    let hotplug = hotplug_nodes();
    let mut children: Vec<&dyn Aml> = vec![&hid, &adr, &uid, &crs, &prt];
    children.extend(hotplug.iter().map(|s| s as &dyn Aml));
    children.extend(slots.iter().map(|s| s as &dyn Aml));
    device("PCI0", &children)
}

/// The ACPI name of slot `slot`'s device (QEMU's: `S` and the devfn in hex).
fn slot_name(slot: u8) -> String {
    format!("S{:02X}_", slot << 3)
}

/// The hot plug interface inside `PCI0`: the registers at 0xAE00 as fields, the lock,
/// `PCEJ` (eject: bus select, then the slot's bit to B0EJ), `DVNT` (notify every slot of a
/// bitmap) and `PCNT` (inserts get a device check, removals an eject request).
fn hotplug_nodes() -> Vec<Raw> {
    let base = u32::from(PCI_HOTPLUG_BASE);
    let field = |region: &str, names: &[&[u8; 4]]| {
        acpi::encode(&Field::new(
            Path::new(region),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            names.iter().map(|n| FieldEntry::Named(**n, 32)).collect(),
        ))
    };
    let (pcst, sej, bnmr) = (base, base + 8, base + 0x10);
    let (eight, four) = (8u32, 4u32);
    let mut v = vec![
        acpi::encode(&OpRegion::new(
            Path::new("PCST"),
            OpRegionSpace::SystemIO,
            &pcst,
            &eight,
        )),
        field("PCST", &[b"PCIU", b"PCID"]),
        acpi::encode(&OpRegion::new(
            Path::new("SEJ_"),
            OpRegionSpace::SystemIO,
            &sej,
            &four,
        )),
        field("SEJ_", &[b"B0EJ"]),
        acpi::encode(&OpRegion::new(
            Path::new("BNMR"),
            OpRegionSpace::SystemIO,
            &bnmr,
            &eight,
        )),
        field("BNMR", &[b"BNUM", b"PIDX"]),
        acpi::encode(&Mutex::new(Path::new("BLCK"), 0)),
    ];
    let (bnum, b0ej) = (Path::new("BNUM"), Path::new("B0EJ"));
    let acquire = Acquire::new(Path::new("BLCK"), 0xffff);
    let release = Release::new(Path::new("BLCK"));
    let sel = Store::new(&bnum, &Arg(0));
    let ej = ShiftLeft::new(&b0ej, &ONE, &Arg(1));
    let ret = Return::new(&ZERO);
    v.push(acpi::encode(&Method::new(
        Path::new("PCEJ"),
        2,
        false,
        vec![&acquire, &sel, &ej, &release, &ret],
    )));
    v.extend(acpi_index_methods());
    let masks: Vec<(u32, Path)> = (2..keel_pci::SLOTS)
        .filter(|s| HOTPLUG_SLOTS & (1 << s) != 0)
        .map(|s| (1u32 << s, Path::new(&slot_name(s))))
        .collect();
    let tests: Vec<(And<'_>, Notify<'_>)> = masks
        .iter()
        .map(|(m, p)| (And::new(&ZERO, &Arg(0), m), Notify::new(p, &Arg(1))))
        .collect();
    let ifs: Vec<If<'_>> = tests.iter().map(|(t, n)| If::new(t, vec![n])).collect();
    let body: Vec<&dyn Aml> = ifs.iter().map(|i| i as &dyn Aml).collect();
    v.push(acpi::encode(&Method::new(
        Path::new("DVNT"),
        2,
        false,
        body,
    )));
    let three = 3u8;
    let (pciu, pcid) = (Path::new("PCIU"), Path::new("PCID"));
    let clear = Store::new(&bnum, &ZERO);
    let insert = MethodCall::new(Path::new("DVNT"), vec![&pciu, &ONE]);
    let remove = MethodCall::new(Path::new("DVNT"), vec![&pcid, &three]);
    v.push(acpi::encode(&Method::new(
        Path::new("PCNT"),
        0,
        false,
        vec![&clear, &insert, &remove],
    )));
    v
}

/// `AIDX(slot)`: the acpi-index of the slot's device through PIDX (0: none), and
/// `PDSM(uuid, revision, function, arguments, slot)`, which each slot's `_DSM` calls: the
/// PCI firmware `_DSM` (UUID E5C937D0-...; revision 2 and up) with function 7, the device
/// label Linux turns into `acpi_index`, offered when the slot's device has an index.
fn acpi_index_methods() -> Vec<Raw> {
    let (bnum, pidx) = (Path::new("BNUM"), Path::new("PIDX"));
    let acquire = Acquire::new(Path::new("BLCK"), 0xffff);
    let release = Release::new(Path::new("BLCK"));
    let sel = Store::new(&bnum, &ZERO);
    let ask = ShiftLeft::new(&pidx, &ONE, &Arg(0));
    let read = Store::new(&Local(0), &pidx);
    let ret = Return::new(&Local(0));
    let aidx = acpi::encode(&Method::new(
        Path::new("AIDX"),
        1,
        false,
        vec![&acquire, &sel, &ask, &read, &release, &ret],
    ));

    let uuid = Uuid::new("E5C937D0-3553-4D7A-9117-EA4D19C3434D");
    let none = BufferData::new(vec![0]);
    let ret_none = Return::new(&none);
    let other_uuid = NotEqual::new(&Arg(0), &uuid);
    let bad_uuid = If::new(&other_uuid, vec![&ret_none]);
    let two = 2u8;
    let old_rev = LessThan::new(&Arg(1), &two);
    let bad_rev = If::new(&old_rev, vec![&ret_none]);
    let lookup = MethodCall::new(Path::new("AIDX"), vec![&Arg(4)]);
    let index = Store::new(&Local(2), &lookup);
    let caps = BufferData::new(vec![0x81]);
    let ret_caps = Return::new(&caps);
    let has_index = NotEqual::new(&Local(2), &ZERO);
    let offer = If::new(&has_index, vec![&ret_caps]);
    let is_f0 = Equal::new(&Arg(2), &ZERO);
    let f0 = If::new(&is_f0, vec![&offer, &ret_none]);
    let empty: &str = "";
    let pkg = Package::new(vec![&ZERO, &empty]);
    let make = Store::new(&Local(0), &pkg);
    let first = Index::new(&ZERO, &Local(0), &ZERO);
    let put = Store::new(&first, &Local(2));
    let ret_pkg = Return::new(&Local(0));
    let seven = 7u8;
    let is_f7 = Equal::new(&Arg(2), &seven);
    let f7 = If::new(&is_f7, vec![&make, &put, &ret_pkg]);
    let pdsm = acpi::encode(&Method::new(
        Path::new("PDSM"),
        5,
        true,
        vec![&bad_uuid, &bad_rev, &index, &f0, &f7, &ret_none],
    ));
    vec![aidx, pdsm]
}

/// `\_GPE`: GPE 1 runs the hot plug scan under the lock.
fn gpe_scope() -> Raw {
    let hid: &'static str = "ACPI0006";
    let acquire = Acquire::new(Path::new("\\_SB_.PCI0.BLCK"), 0xffff);
    let scan = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
    let release = Release::new(Path::new("\\_SB_.PCI0.BLCK"));
    let e01 = Method::new(Path::new("_E01"), 0, false, vec![&acquire, &scan, &release]);
    acpi::encode(&Scope::new(
        Path::new("\\_GPE"),
        vec![&Name::new(Path::new("_HID"), &hid), &e01],
    ))
}

fn dsdt(cfg: &PcAcpiConfig) -> Vec<u8> {
    let mut sb: Vec<Raw> = vec![pci0(cfg)];
    if cfg.serial {
        sb.push(acpi::com1_node());
    }
    sb.push(acpi::rtc_node());
    let data = IO::new(0x60, 0x60, 1, 1);
    let cmd = IO::new(0x64, 0x64, 1, 1);
    let irq = Interrupt::new(true, true, false, false, 1);
    let crs = ResourceTemplate::new(vec![&data, &cmd, &irq]);
    let sta = 0x0fu8;
    sb.push(device(
        "KBD_",
        &[
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0303")),
            &Name::new(Path::new("_STA"), &sta),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ));
    acpi::dsdt_table(&sb, &[gpe_scope()], keel_devices::PM_SLP_TYP_S5)
}

/// Builds the tables, placed from [`ACPI_START`] (the RSDP first, where the BIOS-area scan
/// finds it too).
pub fn build(cfg: &PcAcpiConfig) -> Result<AcpiTables, AcpiError> {
    let madt_cfg = AcpiConfig {
        cpus: cfg.cpus,
        ioapic: cfg.ioapic,
        pic: true,
        rtc: true,
        i8042: true,
        serial: cfg.serial,
        virtio_mmio: Vec::new(),
        pm_base: Some(PC_PM_BASE),
    };
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + 36);
    let fadt_addr = align16(xsdt_addr + 36 + 16);
    let facs_addr = (fadt_addr + 276 + 63) & !63;
    let madt_addr = align16(facs_addr + 64);
    let madt = acpi::madt(&madt_cfg);
    let dsdt_addr = align16(madt_addr + madt.len() as u64);
    let dsdt = dsdt(cfg);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooBig {
            needed: end - ACPI_START,
            room: ACPI_END - ACPI_START,
        });
    }
    let mut xsdt = Sdt::new(b"XSDT", 1, b"KEELXSDT");
    xsdt.u64(fadt_addr).u64(madt_addr);
    Ok(AcpiTables {
        rsdp_addr,
        blobs: vec![
            (rsdp_addr, acpi::rsdp(xsdt_addr)),
            (xsdt_addr, xsdt.finish()),
            (fadt_addr, fadt(cfg, dsdt_addr, facs_addr)),
            (facs_addr, acpi::facs()),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_and_sum_to_zero() {
        let t = build(&PcAcpiConfig {
            cpus: 2,
            ioapic: true,
            serial: true,
            msi: true,
            pci_mem32: (0x2000_0000, 0xfec0_0000 - 0x2000_0000),
            pci_mem64: Some((4 << 30, 32 << 30)),
        })
        .unwrap();
        for (_, b) in &t.blobs[1..] {
            if &b[..4] != b"FACS" {
                assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
            }
        }
        let fadt = &t.blobs[2].1;
        assert_eq!(fadt.len(), 276);
        // GPE0_BLK at 0xafe0, 4 bytes.
        assert_eq!(&fadt[80..84], &0xafe0u32.to_le_bytes());
        assert_eq!(fadt[92], 4);
        let dsdt = &t.blobs[5].1;
        assert!(dsdt.windows(4).any(|w| w == b"_PRT"));
        assert!(dsdt.windows(4).any(|w| w == b"S10_"));
    }
}
