//! Boots the Debian guest built by `scripts/build-guest.sh` with two vCPUs under the
//! interpreter (tcg): the application processor starts through INIT/SIPI from the BSP's local
//! APIC, interrupts are routed through the IOAPIC, and the guest reports both CPUs before it
//! powers off through the ACPI PM block.
//!
//! Run it on a release build (`cargo test --release -p keel-machine --test debian_tcg_smp`);
//! a debug build works but takes minutes. The guest files come from `$KEEL_GUEST_DIR` or
//! `~/.cache/keel-guest/current`. When they are missing the test prints why and passes, unless
//! `KEEL_REQUIRE_GUEST=1` (CI), where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod debian;

use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use keel_accel::SystemEvent;
use keel_machine::{Capture, MachineEvent, Microvm, MicrovmConfig, SerialBackend};

/// Generous: a boot takes seconds on an idle host, but CI hosts are shared.
const TIMEOUT: Duration = Duration::from_secs(300);

fn guest_dir() -> Option<PathBuf> {
    debian::guest_dir(&["vmlinux", "initramfs.cpio.gz"])
}

fn machine(
    dir: &std::path::Path,
    append: &str,
) -> (Microvm, Capture, mpsc::Receiver<MachineEvent>) {
    let accel = keel_tcg::TcgAccel::new();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        cpus: 2,
        memory: 256 << 20,
        kernel: Some(dir.join("vmlinux")),
        initrd: Some(dir.join("initramfs.cpio.gz")),
        append: append.to_string(),
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    (vm, cap, rx)
}

#[test]
fn debian_boots_with_two_cpus_and_powers_off_under_tcg() {
    let Some(dir) = guest_dir() else { return };
    let (mut vm, cap, rx) = machine(&dir, "console=ttyS0");
    assert!(
        vm.resolved().ioapic,
        "tcg with two vCPUs has local APICs and an IOAPIC"
    );
    vm.finish_init().unwrap();
    let started = Instant::now();
    vm.start().unwrap();

    let ev = rx.recv_timeout(TIMEOUT);
    vm.shutdown();
    let text = cap.text();
    assert_eq!(
        ev,
        Ok(MachineEvent::System(SystemEvent::Shutdown)),
        "no power-off within {TIMEOUT:?}:\n{text}"
    );
    eprintln!("guest ran {:?} until power-off", started.elapsed());
    assert!(text.contains("KEEL-GUEST-READY"), "{text}");
    // The tables the guest parsed: two enabled local APICs and the IOAPIC; the AP came up
    // through INIT/SIPI.
    assert!(text.contains("smpboot: Allowing 2 CPUs"), "{text}");
    assert!(
        text.contains("IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23"),
        "{text}"
    );
    assert!(text.contains("smp: Brought up 1 node, 2 CPUs"), "{text}");
    assert!(
        text.contains("ACPI: Using IOAPIC for interrupt routing"),
        "{text}"
    );
    assert!(
        text.contains("Preparing to enter system sleep state S5"),
        "{text}"
    );
    for bad in [
        "Oops",
        "ACPI Error",
        "BUG:",
        "not responding",
        "failed to boot",
        "No reference (HPET/PMTIMER)",
        "IO-APIC + timer doesn't work",
    ] {
        assert!(!text.contains(bad), "{bad:?} in:\n{text}");
    }
}

/// A guest reboot resets the machine: the AP goes back to wait-for-SIPI and the second boot
/// starts it again.
#[test]
fn debian_brings_up_both_cpus_again_after_a_reboot_under_tcg() {
    let Some(dir) = guest_dir() else { return };
    let (mut vm, cap, rx) = machine(&dir, "console=ttyS0 keel.off=reboot");
    vm.finish_init().unwrap();
    vm.start().unwrap();
    for boot in 1..=2 {
        let ev = rx.recv_timeout(TIMEOUT);
        assert_eq!(
            ev,
            Ok(MachineEvent::System(SystemEvent::Reset)),
            "boot {boot}:\n{}",
            cap.text()
        );
        if boot == 1 {
            vm.reset().unwrap();
        }
    }
    vm.shutdown();
    let text = cap.text();
    assert_eq!(
        text.matches("smp: Brought up 1 node, 2 CPUs").count(),
        2,
        "{text}"
    );
    assert_eq!(text.matches("KEEL-GUEST-READY").count(), 2, "{text}");
}
