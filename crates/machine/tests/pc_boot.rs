//! A small PVH guest on the `pc` machine under both accelerators: it scans the PCI
//! configuration space through ports 0xCF8/0xCFC (the i440FX at 00.0, the PIIX4 PM function
//! at 01.3) and reports through `isa-debug-exit`. KVM is skipped with a message when
//! /dev/kvm is absent or unusable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::pvh_elf;
use keel_accel::{Accelerator, SystemEvent};
use keel_machine::{MachineEvent, Pc, PcConfig, SerialBackend};

/// Reads 00.0 and 01.3's vendor/device through mechanism #1; exits with 0x10 when both
/// match (status 33), 0x11 otherwise (status 35).
fn pci_scan_code() -> Vec<u8> {
    let mut c = Vec::new();
    for (addr, id) in [(0x8000_0000u32, 0x1237_8086u32), (0x8000_0b00, 0x7113_8086)] {
        c.push(0xb8); // mov eax, addr
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x0c, 0xef]); // mov dx, 0xcf8; out dx, eax
        c.extend_from_slice(&[0x66, 0xba, 0xfc, 0x0c, 0xed]); // mov dx, 0xcfc; in eax, dx
        c.push(0x3d); // cmp eax, id
        c.extend_from_slice(&id.to_le_bytes());
        c.extend_from_slice(&[0x75, 0x00]); // jne bad (patched below)
    }
    let (j1, j2) = (20, 42);
    let bad = c.len() + 4;
    c[j1 + 1] = (bad - (j1 + 2)) as u8;
    c[j2 + 1] = (bad - (j2 + 2)) as u8;
    c.extend_from_slice(&[0xb0, 0x10, 0xeb, 0x02]); // mov al, 0x10; jmp out
    c.extend_from_slice(&[0xb0, 0x11]); // bad: mov al, 0x11
    c.extend_from_slice(&[0x66, 0xba, 0xf4, 0x00, 0xee, 0xf4]); // out 0xf4, al; hlt
    c
}

fn scan(accel: &dyn Accelerator, cpus: u32) {
    let elf = std::env::temp_dir().join(format!(
        "keel-pc-scan-{}-{}-{cpus}.elf",
        std::process::id(),
        accel.name()
    ));
    std::fs::write(&elf, pvh_elf(&pci_scan_code())).unwrap();
    let cfg = PcConfig {
        memory: 64 << 20,
        cpus,
        kernel: Some(elf.clone()),
        serial: SerialBackend::Null,
        ..PcConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut pc = Pc::new(cfg, accel, Arc::new(tx)).unwrap();
    pc.add_debug_exit(keel_devices::DebugExitConfig::new(0xf4, 4).unwrap())
        .unwrap();
    pc.finish_init().unwrap();
    std::fs::remove_file(&elf).ok();
    pc.start().unwrap();
    let ev = rx.recv_timeout(Duration::from_secs(60));
    pc.shutdown();
    assert_eq!(ev, Ok(MachineEvent::System(SystemEvent::Exit(33))));
}

#[test]
fn pvh_guest_scans_pci_under_tcg() {
    scan(&keel_tcg::TcgAccel::new(), 1);
    scan(&keel_tcg::TcgAccel::new(), 2);
}

#[test]
fn pvh_guest_scans_pci_under_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is absent on this host");
        return;
    }
    let accel = match keel_kvm::KvmAccel::new() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping: KVM is not usable here: {e}");
            return;
        }
    };
    scan(&accel, 1);
    scan(&accel, 2);
}
