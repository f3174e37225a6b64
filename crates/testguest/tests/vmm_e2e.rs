//! End to end through the `vmm` binary: every predicted guest booted as a PVH ELF with
//! QEMU's command line (`-M microvm -accel tcg|kvm -m 32M -nodefaults -no-user-config
//! -display none -serial stdio -kernel G.elf -device isa-debug-exit,iobase=0xf4,iosize=0x04`)
//! must print exactly the predicted text and exit with status 1 (the guest wrote 0), as
//! `qemu-system-x86_64` does with the same files.
//!
//! The binary is `$KEEL_VMM`, or `vmm` next to this test's target directory (built by
//! `cargo test --workspace` / nextest; with `-p keel-testguest` alone, build `-p vmm` first
//! or an older binary is tested). The test skips, saying why, when there is no such binary
//! or it does not offer the microvm machine.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_testguest::TestGuest;

fn vmm_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_VMM") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/vmm_e2e-<hash> -> target/<profile>/vmm
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("vmm");
    p.exists().then_some(p)
}

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

fn run_vmm(vmm: &Path, accel: &str, elf: &Path, timeout: Duration) -> Run {
    let mut child = Command::new(vmm)
        .args([
            "-M",
            "microvm",
            "-accel",
            accel,
            "-m",
            "32M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(elf)
        // After -kernel: the vmm reads its command line left to right and -device builds
        // the machine (the order of issue 3's reference command line).
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmm starts");
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    Run {
        status,
        stdout,
        stderr,
        timed_out,
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && std::env::var_os("KEEL_TEST_NO_KVM").is_none()
}

fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Guests and whether they can run under kvm on a PVM host (see differential.rs).
fn guests() -> Vec<(TestGuest, bool)> {
    let pvm = is_pvm();
    let mut v = Vec::new();
    for g in keel_testguest::all() {
        let g = g.unwrap();
        // Unpredicted output, or a triple fault (QEMU resets there unless -no-reboot).
        if g.expected_serial.is_none() || g.ends_in_triple_fault {
            continue;
        }
        let kvm_ok = !pvm
            || !matches!(
                g.name.as_str(),
                "exceptions" | "usermode" | "paging32" | "paging-pae" | "interrupts"
            );
        v.push((g, kvm_ok));
    }
    if pvm {
        v.push((keel_testguest::exceptions_without(&["bp"]).unwrap(), true));
        v.push((keel_testguest::usermode_pvm_safe().unwrap(), true));
        v.push((keel_testguest::interrupts_pvm_safe().unwrap(), true));
    }
    v
}

#[test]
fn guests_through_the_vmm_binary() {
    let Some(vmm) = vmm_binary() else {
        eprintln!("skipping: no vmm binary (set KEEL_VMM or build the workspace)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("keel-vmm-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hello = keel_testguest::hello(keel_testguest::Mode::Long64).unwrap();
    let probe_elf = dir.join("probe.elf");
    std::fs::write(&probe_elf, hello.pvh_elf()).unwrap();
    let probe = run_vmm(&vmm, "tcg", &probe_elf, Duration::from_secs(30));
    // (Status 1 is both "the guest wrote 0" and the vmm's own error status: read stderr.)
    if probe.stdout.is_empty()
        && (probe.stderr.contains("not available") || probe.stderr.contains("not integrated"))
    {
        eprintln!(
            "skipping: {} does not boot microvm yet: {}",
            vmm.display(),
            probe.stderr.trim()
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let mut accels = vec!["tcg"];
    if kvm_usable() {
        accels.push("kvm");
    } else {
        eprintln!("kvm: not usable here, tcg only");
    }
    let mut problems = Vec::new();
    for (i, (g, kvm_ok)) in guests().iter().enumerate() {
        let elf = dir.join(format!("{i}-{}.elf", g.name));
        std::fs::write(&elf, g.pvh_elf()).unwrap();
        for accel in &accels {
            if *accel == "kvm" && !kvm_ok {
                continue;
            }
            let r = run_vmm(&vmm, accel, &elf, Duration::from_secs(120));
            let want = g.expected_serial.as_deref().unwrap_or("");
            let want_status = i32::from(g.expected_exit) << 1 | 1;
            if r.timed_out || r.status != Some(want_status) || r.stdout != want {
                problems.push(format!(
                    "{} on {accel}: status {:?} (want {want_status}){}\n--- got\n{}--- want\n{}--- stderr\n{}",
                    g.name,
                    r.status,
                    if r.timed_out { ", timed out" } else { "" },
                    r.stdout,
                    want,
                    r.stderr
                ));
            } else {
                eprintln!("{} on {accel}: ok", g.name);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
