//! A serial port on a `pty` character backend both ways, as `virsh console` uses it:
//! `-chardev pty,id=c0 -device isa-serial,chardev=c0` prints QEMU's redirect line, the
//! guest's console output reaches the terminal and what a program types on the terminal
//! reaches the guest's shell. The Debian reference guest under tcg, on QEMU 7.2 too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Boots the guest's shell on a pty serial port under `program`, types a command on the
/// terminal and returns what the guest answered.
fn shell_over_pty(program: &str, kernel: &Path, initrd: &Path) -> String {
    let append = format!(
        "console=ttyS0 quiet keel.mode=shell tsc_early_khz={}",
        keel_tcg::guest_tsc_khz()
    );
    let child = Command::new(program)
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "256M",
            "-nodefaults",
        ])
        .args(["-display", "none", "-no-reboot"])
        .args(["-chardev", "pty,id=c0", "-device", "isa-serial,chardev=c0"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = common::Guard(child);
    // QEMU's one line on standard output: "char device redirected to /dev/pts/N (label c0)".
    let mut err = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let pty = line
        .strip_prefix("char device redirected to ")
        .and_then(|r| r.strip_suffix(" (label c0)\n"))
        .unwrap_or_else(|| panic!("{program}: no redirect line, got {line:?}"))
        .to_owned();
    let term = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty)
        .unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut reader = term.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        while let Ok(n) = reader.read(&mut b) {
            if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |what: &str, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !seen.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{program}: no {what:?} on the terminal in:\n{seen}"
            );
            if let Ok(b) = rx.recv_timeout(left) {
                seen.push_str(&String::from_utf8_lossy(&b));
            }
        }
    };
    wait_for("KEEL-GUEST-READY", 120);
    // The answer is computed by the guest, so it cannot be an echo of the input.
    (&term).write_all(b"echo typed-$((6*7))-done\n").unwrap();
    wait_for("typed-42-done", 60);
    (&term).write_all(b"poweroff -f\n").unwrap();
    let _ = child.wait();
    seen
}

#[test]
fn a_pty_serial_port_carries_output_and_typed_input() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs.cpio.gz") else {
        return;
    };
    let keel = shell_over_pty(common::BIN, &kernel, &initrd);
    assert!(keel.contains("typed-42-done"), "{keel}");
    if Path::new(QEMU).exists() {
        let qemu = shell_over_pty(QEMU, &kernel, &initrd);
        assert!(qemu.contains("typed-42-done"), "{qemu}");
    } else {
        eprintln!("QEMU 7.2 not installed: Keel alone was checked");
    }
}
