//! Boots the Debian guest built by `scripts/build-guest.sh` under the interpreter (tcg) with
//! ACPI on, through the machine API: without an IOAPIC the machine builds a full FADT with the
//! PM register block, so the stock kernel keeps its 8259 PIC, calibrates against the PM timer
//! and powers off through PM1a control (`SystemEvent::Shutdown`).
//!
//! The guest files come from `$KEEL_GUEST_DIR` or `~/.cache/keel-guest/current`. When they are
//! missing the tests print why and pass, unless `KEEL_REQUIRE_GUEST=1` (CI), where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod debian;

use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use keel_accel::SystemEvent;
use keel_machine::{Capture, MachineEvent, Microvm, MicrovmConfig, SerialBackend};

/// Generous: a boot takes seconds on an idle host, but CI hosts are shared.
const TIMEOUT: Duration = Duration::from_secs(180);

fn guest_dir() -> Option<PathBuf> {
    debian::guest_dir(&["vmlinux", "bzImage", "initramfs.cpio.gz"])
}

struct Booted {
    vm: Microvm,
    cap: Capture,
    rx: mpsc::Receiver<MachineEvent>,
    started: Instant,
}

fn boot(dir: &std::path::Path, kernel: &str, append: &str) -> Booted {
    let accel = keel_tcg::TcgAccel::new();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        memory: 256 << 20,
        kernel: Some(dir.join(kernel)),
        initrd: Some(dir.join("initramfs.cpio.gz")),
        append: append.to_string(),
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    assert!(!vm.resolved().ioapic, "tcg has only the 8259 pair");
    assert!(vm.resolved().acpi);
    vm.finish_init().unwrap();
    let started = Instant::now();
    vm.start().unwrap();
    Booted {
        vm,
        cap,
        rx,
        started,
    }
}

impl Booted {
    /// Waits until the console shows `needle` (after byte `from`); returns the end of its match.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        loop {
            let text = self.cap.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            if let Ok(ev) = self.rx.try_recv() {
                panic!("guest stopped ({ev:?}) before printing {needle:?}:\n{text}");
            }
            assert!(
                self.started.elapsed() < TIMEOUT,
                "no {needle:?} within {TIMEOUT:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `line` on COM1, feeding the UART's small FIFO as the guest drains it.
    fn type_line(&self, line: &[u8]) {
        let serial = self.vm.serial().unwrap();
        let mut sent = 0;
        while sent < line.len() {
            sent += serial.enqueue_input(&line[sent..]);
            if sent < line.len() {
                std::thread::sleep(Duration::from_millis(20));
                assert!(self.started.elapsed() < TIMEOUT, "{}", self.cap.text());
            }
        }
    }

    /// Waits for the machine's power-off and stops it.
    fn expect_power_off(mut self) -> String {
        let left = TIMEOUT.saturating_sub(self.started.elapsed());
        let ev = self.rx.recv_timeout(left);
        self.vm.shutdown();
        let text = self.cap.text();
        assert_eq!(
            ev,
            Ok(MachineEvent::System(SystemEvent::Shutdown)),
            "{text}"
        );
        eprintln!("guest ran {:?} until power-off", self.started.elapsed());
        text
    }
}

fn boots_and_powers_off(kernel: &str) {
    let Some(dir) = guest_dir() else { return };
    let b = boot(&dir, kernel, "console=ttyS0");
    b.wait_for("KEEL-GUEST-READY", 0);
    let text = b.expect_power_off();
    // The PM block works for the guest: no oops, no failed fixed events, and the sleep came
    // through ACPI (not a fallback).
    assert!(text.contains("ACPI: PM-Timer IO Port: 0x608"), "{text}");
    assert!(
        text.contains("Preparing to enter system sleep state S5"),
        "{text}"
    );
    // Calibrating the TSC against the polled PIT may fail on a loaded host; the PM timer is
    // then the reference ("using PMTIMER reference calibration"), so there must be one.
    for bad in [
        "Oops",
        "ACPI Error",
        "No reference (HPET/PMTIMER)",
        "acpi=off",
    ] {
        assert!(!text.contains(bad), "{bad:?} in:\n{text}");
    }
}

#[test]
fn debian_vmlinux_boots_with_acpi_and_powers_off_under_tcg() {
    boots_and_powers_off("vmlinux");
}

#[test]
fn debian_bzimage_boots_with_acpi_and_powers_off_under_tcg() {
    boots_and_powers_off("bzImage");
}

/// The shell answers over the serial port (interrupt-driven input on IRQ 4 through the 8259),
/// the ACPI power button reaches the guest as a fixed event on the SCI, and leaving the shell
/// powers off.
#[test]
fn debian_shell_answers_and_sees_the_power_button_status_under_tcg() {
    let Some(dir) = guest_dir() else { return };
    let b = boot(&dir, "bzImage", "console=ttyS0 keel.mode=shell");
    let at = b.wait_for("KEEL-GUEST-SHELL", 0);
    let at = b.wait_for("# ", at);
    b.type_line(b"echo hi-$((40+2))\n");
    let at = b.wait_for("hi-42", at);
    let at = b.wait_for("# ", at);
    // The power button: PWRBTN_STS set and, once the guest enabled the event, the SCI. This
    // initramfs has no modules, so no button driver claims the fixed event and the guest's
    // ACPI core shows it as pending status ("STS") rather than counting it.
    assert!(b.vm.power_button());
    b.type_line(b"cat /sys/firmware/acpi/interrupts/ff_pwr_btn\n");
    let at = b.wait_for("ff_pwr_btn", at);
    let end = b.wait_for("# ", at);
    let shown = b.cap.text()[at..end].to_string();
    eprintln!("guest sysfs after the power button: {shown:?}");
    assert!(
        shown.contains("STS"),
        "power button status not visible: {shown:?}"
    );
    b.type_line(b"exit\n");
    b.expect_power_off();
}
