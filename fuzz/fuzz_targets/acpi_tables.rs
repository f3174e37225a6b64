//! The ACPI table builder (`keel_machine::acpi::build`) on arbitrary inputs: CPU count,
//! which onboard devices exist, the PM block's port and a list of virtio-mmio devices
//! (windows and GSIs), all from the input.
//!
//! Checks: no panic; when the tables are built, every table with a checksum sums to zero,
//! the lengths in the headers are the lengths of the blobs, the RSDP address is the first
//! blob's, and no two tables overlap.
//!
//! Run (nightly): `cargo +nightly fuzz run --fuzz-dir fuzz acpi_tables`.
#![no_main]

use keel_machine::VirtioMmioDevice;
use keel_machine::acpi::{AcpiConfig, build};
use libfuzzer_sys::fuzz_target;

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(at + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let flags = data[0];
    let cfg = AcpiConfig {
        // Up to 511 CPUs (a MADT entry each).
        cpus: u32::from(u16::from_le_bytes([data[1], data[2]]) & 0x1ff),
        ioapic: flags & 1 != 0,
        pic: flags & 2 != 0,
        rtc: flags & 4 != 0,
        i8042: flags & 8 != 0,
        serial: flags & 16 != 0,
        pm_base: (flags & 32 != 0).then(|| u16::from(data[3]) << 4),
        virtio_mmio: data[4..]
            .chunks(20)
            .map(|c| VirtioMmioDevice {
                base: u64_at(c, 0),
                size: u64_at(c, 8),
                gsi: u64_at(c, 16) as u32,
            })
            .collect(),
    };
    let Ok(t) = build(&cfg) else {
        return;
    };
    assert_eq!(t.blobs.first().map(|b| b.0), Some(t.rsdp_addr));
    for (k, (addr, blob)) in t.blobs.iter().enumerate() {
        match &blob[..4] {
            b"RSD " => {
                assert_eq!(sum(&blob[..20]), 0, "RSDP checksum");
                assert_eq!(sum(blob), 0, "RSDP extended checksum");
            }
            b"FACS" => {}
            sig => {
                let len = u32::from_le_bytes(blob[4..8].try_into().expect("4 bytes"));
                assert_eq!(len as usize, blob.len(), "{sig:?} length");
                assert_eq!(sum(blob), 0, "{sig:?} checksum");
            }
        }
        for (a2, b2) in &t.blobs[k + 1..] {
            let (e1, e2) = (addr + blob.len() as u64, a2 + b2.len() as u64);
            assert!(
                e1 <= *a2 || e2 <= *addr,
                "tables overlap: {addr:#x} and {a2:#x}"
            );
        }
    }
});
