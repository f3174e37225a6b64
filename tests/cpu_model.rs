//! CPU models against the real binary and QEMU 7.2: a guest that prints its CPUID
//! (keel-testguest's `cpuid_report`) sees the same leaves under Keel's tcg and kvm with the
//! default model (`qemu64`), the leaves QEMU 7.2 presents for `qemu64` except where Keel's
//! model leaves features out (those are masked, and named); a stream keeps the CPUID the
//! guest saw across accelerators, refuses a `-cpu max` stream from kvm under tcg naming the
//! features, and refuses a damaged CPUID section. kvm cases skip with the reason printed
//! without a usable `/dev/kvm` (or with `KEEL_TEST_NO_KVM`); QEMU cases without
//! `/usr/bin/qemu-system-x86_64`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TempDir, Vmm};
use serde_json::json;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

fn kvm_usable() -> bool {
    if std::env::var_os("KEEL_TEST_NO_KVM").is_some() {
        eprintln!("skipping kvm: KEEL_TEST_NO_KVM is set");
        return false;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping kvm: /dev/kvm: {e}");
            false
        }
    }
}

/// The guest as a PVH ELF in `dir`.
fn guest(dir: &TempDir, count: u32) -> String {
    let g = keel_testguest::cpuid_report(count).unwrap();
    let p = dir.path("cpuid.elf");
    std::fs::write(&p, g.pvh_elf()).unwrap();
    p.display().to_string()
}

/// The machine on both sides: the same devices under kvm and tcg (see tests/snapshot.rs);
/// two vCPUs, so that the interpreter has local APICs as KVM does.
fn args<'a>(kernel: &'a str, accel: &'a str, serial: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "-machine",
        "microvm,rtc=on,acpi=off",
        "-accel",
        accel,
        "-smp",
        "2",
        "-m",
        "32",
        "-kernel",
        kernel,
        "-nodefaults",
        "-serial",
        serial,
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ];
    v.extend_from_slice(extra);
    v
}

/// Runs `program ARGS` to its end; returns (serial output, stderr).
fn run(program: &str, args: &[&str], serial: &std::path::Path) -> (String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = common::wait_or_kill(&mut child, Duration::from_secs(60), program);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    // isa-debug-exit: status 1 is the guest's EXIT_OK (0).
    assert_eq!(
        st.code(),
        Some(1),
        "{program} {args:?}: {st}, stderr: {err}"
    );
    (std::fs::read_to_string(serial).unwrap(), err)
}

fn keel(kernel: &str, accel: &str, dir: &TempDir, extra: &[&str]) -> (String, String) {
    let out = dir.path(&format!("serial-{accel}"));
    let serial = format!("file:{}", out.display());
    run(common::BIN, &args(kernel, accel, &serial, extra), &out)
}

#[test]
fn explore() {
    let dir = TempDir::new();
    let k = guest(&dir, 3);
    let out = dir.path("serial-qemu");
    let serial = format!("file:{}", out.display());
    let mut a = args(
        &k,
        "tcg",
        &serial,
        &["-cpu", "qemu64", "-display", "none", "-no-user-config"],
    );
    let (q, _) = run(QEMU, &a, &out);
    println!("QEMU tcg\n{q}");
    a[3] = "kvm";
    let (q, e) = run(QEMU, &a, &out);
    println!("QEMU kvm\n{q}{e}");
    std::fs::copy(&k, "/tmp/cpx/cpuid.elf").unwrap();
    let (t, e) = keel(&k, "tcg", &dir, &[]);
    println!("Keel tcg\n{t}{e}");
    let (kv, e) = keel(&k, "kvm", &dir, &[]);
    println!("Keel kvm\n{kv}{e}");
    let (kv, e) = keel(&k, "kvm", &dir, &["-cpu", "max"]);
    println!("Keel kvm max\n{kv}{e}");
    let _ = (Vmm::start, json!(1));
}
