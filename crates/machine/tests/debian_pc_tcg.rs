//! Boots the Debian guest of `scripts/build-guest.sh` on the `pc` machine under the
//! interpreter, through the machine seam (`PcType`, its board and device tree), with
//! cold-plugged virtio-pci devices: the guest loads `virtio_pci` from the virtio initramfs,
//! reads and writes the virtio-blk-pci disk and reads the virtio-rng-pci device, and (with a
//! guest built by this tree's script) lists the PCI functions it enumerated.
//!
//! One vCPU: the 8259 pair alone, INTx on the `_PRT`'s GSIs, the FADT says "no MSI". Two
//! vCPUs: local APICs and the IOAPIC, MSI-X through `Vm::signal_msi`. The guest files come
//! from `$KEEL_GUEST_DIR` or `~/.cache/keel-guest/current` (skipped when missing unless
//! `KEEL_REQUIRE_GUEST=1`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod debian;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_machine::PcType;
use keel_machine::backends::{Backends, BlockBackend};
use keel_machine::board::{BoardContext, BoardEvent, MachineConfig, MachineType};
use keel_phase::Phase;
use keel_qdev::DeviceRequest;

const TIMEOUT: Duration = Duration::from_secs(240);

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("keel-pc-{}-{name}", std::process::id()))
}

/// Boots `kernel` with `cpus` vCPUs and the devices, waits for power-off, returns the console.
fn boot(dir: &Path, kernel: &str, cpus: u32, tag: &str) -> String {
    let disk = tmp(&format!("{tag}.img"));
    let mut img = vec![0u8; 8 << 20];
    img[..22].copy_from_slice(b"KEEL-PC-DISK-SECTOR0\n\0");
    std::fs::write(&disk, &img).unwrap();
    let console = tmp(&format!("{tag}.console"));
    let cfg = MachineConfig {
        type_name: "pc".into(),
        memory: Some(256 << 20),
        cpus: Some(cpus),
        kernel: Some(dir.join(kernel)),
        initrd: Some(dir.join("initramfs-virtio.cpio.gz")),
        append: Some("console=ttyS0 keel.mode=virtio-test".into()),
        serial: vec![format!("file:{}", console.display())],
        no_reboot: true,
        ..MachineConfig::default()
    };
    let backends = Arc::new(Backends::new());
    backends
        .add_block(
            "d0",
            BlockBackend {
                filename: disk.clone(),
                read_only: false,
            },
        )
        .unwrap();
    let ctx = BoardContext {
        backends,
        ..BoardContext::default()
    };
    let ty = PcType;
    ty.check_config(&cfg).unwrap();
    let mut board = ty
        .create(&cfg, Arc::new(keel_tcg::TcgAccel::new()), &ctx)
        .unwrap();
    let events = board.take_events().unwrap();
    for dev in [
        "virtio-blk-pci,drive=d0,id=disk0",
        "virtio-rng-pci,id=rng0,addr=05",
    ] {
        board
            .device_add(Phase::MachineInit, &DeviceRequest::parse_cli(dev).unwrap())
            .unwrap();
    }
    board.done(&cfg).unwrap();
    let started = Instant::now();
    board.resume().unwrap();
    let ev = events.recv_timeout(TIMEOUT);
    board.shutdown();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    std::fs::remove_file(&disk).ok();
    std::fs::remove_file(&console).ok();
    assert_eq!(ev, Ok(BoardEvent::GuestShutdown), "{text}");
    eprintln!(
        "pc guest ({kernel}, {cpus} vCPUs) ran {:?}",
        started.elapsed()
    );
    text
}

/// The guest's `KEEL-PCI` lines, or `None` with a guest built before the listing existed.
fn pci_listing(text: &str) -> Option<Vec<String>> {
    if !text.contains("KEEL-PCI-BEGIN") {
        eprintln!(
            "note: this guest's initramfs predates the PCI listing (rebuild it with \
             scripts/build-guest.sh); only the devices' function is checked"
        );
        return None;
    }
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("KEEL-PCI 0000:"))
        .map(|l| l.trim().to_owned())
        .collect();
    eprintln!("guest's PCI functions:\n{}", lines.join("\n"));
    Some(lines)
}

fn check(text: &str) -> Option<Vec<String>> {
    for want in [
        "KEEL-VDA-TEXT KEEL-PC-DISK-SECTOR0",
        "KEEL-VDA-WRITE OK",
        "KEEL-RNG-CURRENT virtio_rng.0",
        "KEEL-VIRTIO-TEST-DONE",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    assert!(!text.contains("KEEL-MODULE-FAILED"), "{text}");
    for bad in ["Oops", "ACPI Error", "WARNING:", "irq 10: nobody cared"] {
        assert!(!text.contains(bad), "{bad:?} in:\n{text}");
    }
    let lines = pci_listing(text)?;
    for (addr, id, driver) in [
        ("00:00.0", "0x8086:0x1237", "-"),
        ("00:01.0", "0x8086:0x7000", "-"),
        ("00:01.3", "0x8086:0x7113", "-"),
        ("00:02.0", "0x1af4:0x1001", "virtio-pci"),
        ("00:05.0", "0x1af4:0x1005", "virtio-pci"),
    ] {
        assert!(
            lines.iter().any(|l| l.contains(addr)
                && l.contains(id)
                && l.ends_with(&format!("driver={driver}"))),
            "{addr} {id} {driver} not listed: {lines:?}"
        );
    }
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(
        text.contains("KEEL-BLOCK vda 16384 sectors 0000:00:02.0"),
        "{text}"
    );
    Some(lines)
}

/// One vCPU, bzImage: the 8259 platform; virtio-pci interrupts are INTx on GSI 10/11.
#[test]
fn debian_bzimage_on_pc_reads_virtio_blk_pci_with_intx() {
    let Some(dir) = debian::guest_dir(&["bzImage", "initramfs-virtio.cpio.gz"]) else {
        return;
    };
    let text = boot(&dir, "bzImage", 1, "intx");
    assert!(
        text.contains("FADT declares the system doesn't support MSI"),
        "{text}"
    );
    if let Some(lines) = check(&text) {
        assert!(
            lines
                .iter()
                .any(|l| l.contains("00:02.0") && l.contains("irq=10"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("00:05.0") && l.contains("irq=10"))
        );
        assert!(text.contains("KEEL-PCI-MSI 0 vectors"), "{text}");
    }
}

/// Two vCPUs, the PVH vmlinux: local APICs and the IOAPIC; virtio-pci uses MSI-X.
#[test]
fn debian_vmlinux_on_pc_smp_reads_virtio_blk_pci_with_msix() {
    let Some(dir) = debian::guest_dir(&["vmlinux", "initramfs-virtio.cpio.gz"]) else {
        return;
    };
    let text = boot(&dir, "vmlinux", 2, "msix");
    assert!(
        text.contains("smpboot: Total of 2 processors activated"),
        "{text}"
    );
    if check(&text).is_some() {
        let msi = text
            .lines()
            .find_map(|l| l.strip_prefix("KEEL-PCI-MSI "))
            .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(0);
        assert!(msi >= 2, "no MSI-X vectors in use:\n{text}");
    }
}

/// ACPI PCI hot plug with the guest answering: `device_add` in machine-ready raises GPE 1,
/// the guest's acpiphp finds the virtio-blk-pci function, places its BARs and binds
/// virtio_blk; `device_del` raises it again, the guest ejects the slot through `_EJ0`, the
/// board reports `DeviceEjected` and the device leaves the tree with `DEVICE_DELETED`.
#[test]
fn debian_on_pc_hot_plugs_and_ejects_virtio_blk_pci() {
    let Some(dir) = debian::guest_dir(&["bzImage", "initramfs-virtio.cpio.gz"]) else {
        return;
    };
    let disk = tmp("hp.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let console = tmp("hp.console");
    let cfg = MachineConfig {
        type_name: "pc".into(),
        memory: Some(256 << 20),
        kernel: Some(dir.join("bzImage")),
        initrd: Some(dir.join("initramfs-virtio.cpio.gz")),
        append: Some("console=ttyS0 keel.mode=shell".into()),
        serial: vec![format!("file:{}", console.display())],
        no_reboot: true,
        ..MachineConfig::default()
    };
    let backends = Arc::new(Backends::new());
    backends
        .add_block(
            "d0",
            BlockBackend {
                filename: disk.clone(),
                read_only: false,
            },
        )
        .unwrap();
    let log = Arc::new(keel_qdev::EventLog::new());
    let ctx = BoardContext {
        backends,
        events: log.clone(),
        ..BoardContext::default()
    };
    let mut board = PcType
        .create(&cfg, Arc::new(keel_tcg::TcgAccel::new()), &ctx)
        .unwrap();
    let events = board.take_events().unwrap();
    board.done(&cfg).unwrap();
    board.resume().unwrap();
    let started = Instant::now();
    let wait_for = |needle: &str| loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "no {needle:?} within {TIMEOUT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for("acpiphp: Slot [2] registered");
    wait_for("KEEL-GUEST-SHELL");
    let added = board
        .device_add(
            Phase::MachineReady,
            &DeviceRequest::parse_cli("virtio-blk-pci,drive=d0,id=hd1").unwrap(),
        )
        .unwrap();
    assert!(added.hotplugged);
    wait_for("[vda] 8192 512-byte logical blocks");
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(text.contains("pci 0000:00:02.0: [1af4:1001]"), "{text}");
    let slot2 = |b: &dyn keel_machine::board::Board| {
        b.pci()[0]
            .devices
            .iter()
            .any(|d| d.slot == 2 && d.qdev_id == "hd1")
    };
    assert!(slot2(board.as_ref()));

    let outcome = board
        .devices_mut()
        .device_del(Phase::MachineReady, "hd1")
        .unwrap();
    assert_eq!(outcome, keel_qdev::DelOutcome::Pending);
    let ev = events.recv_timeout(TIMEOUT);
    assert_eq!(ev, Ok(BoardEvent::DeviceEjected));
    // The guest no longer sees the slot; the tree lets the device go now.
    assert!(!slot2(board.as_ref()));
    assert!(board.devices().find("hd1").is_some());
    board.guest_ejected();
    assert!(board.devices().find("hd1").is_none());
    let deleted: Vec<_> = log
        .take()
        .into_iter()
        .filter_map(|e| match e {
            keel_qdev::DeviceEvent::DeviceDeleted { device, .. } => device,
            _ => None,
        })
        .collect();
    assert_eq!(deleted, ["hd1"]);
    eprintln!("hot plug and eject took {:?}", started.elapsed());
    board.shutdown();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    for bad in ["Oops", "ACPI Error", "WARNING:"] {
        assert!(!text.contains(bad), "{bad:?} in:\n{text}");
    }
    std::fs::remove_file(&disk).ok();
    std::fs::remove_file(&console).ok();
}
