//! The [`keel_testguest::pci`] guest on `-M pc -smp 2`: Keel under kvm and tcg and QEMU 7.2
//! under tcg and kvm must print the same text, byte for byte: the bus scan (IDs, classes,
//! header types, command and status, subsystem IDs, interrupt pin and line, capability lists
//! with MSI-X table sizes and virtio structures), BAR sizing, and a virtio-rng queue
//! completing through MSI-X with vector and function masking. Where `unshare -n` and
//! /dev/net/tun work, a virtio-net-pci on a tap joins (in a network namespace of the run's
//! own) and must be transitional: 1af4:1000 with the legacy I/O BAR0.
//!
//! The one expected difference is QEMU's PIIX3 IDE function at 01.1, which Keel's `pc`
//! does not have: its lines are taken out of QEMU's output (and must be there).
//!
//! The Keel binary is `$KEEL_VMM` or `vmm` in this test's target directory (build it first:
//! `cargo build --release -p keel --bin vmm`); QEMU is `$QEMU` or
//! /usr/bin/qemu-system-x86_64. Missing ones, and kvm without a usable /dev/kvm, are skipped
//! with a printed reason; without both a Keel and a QEMU run nothing is compared (the test
//! says so). `KEEL_PCI_GUEST_DUMP=DIR` keeps the guest ELF and each run's output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vmm_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_VMM") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("vmm");
    p.exists().then_some(p)
}

fn qemu_binary() -> Option<PathBuf> {
    let p = std::env::var_os("QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"));
    p.is_file().then_some(p)
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && std::env::var_os("KEEL_TEST_NO_KVM").is_none()
}

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

/// Whether a tap can be opened in a network namespace of the run's own (`unshare -n`), so
/// that a virtio-net-pci joins the machine without touching the host's interfaces.
fn tap_usable() -> bool {
    let unshare = Command::new("unshare")
        .args(["-n", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok();
    unshare && tun
}

/// The command line both run: QEMU's `pc` with a virtio-rng on the first free slot, a
/// multifunction pair at 05.0/05.1 and, with `net`, a virtio-net-pci on a tap at 06.0 (in a
/// network namespace of its own).
fn run(bin: &Path, accel: &str, elf: &Path, net: bool, timeout: Duration) -> Run {
    let mut cmd = if net {
        let mut c = Command::new("unshare");
        c.arg("-n").arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args([
        "-M",
        "pc",
        "-accel",
        accel,
        "-m",
        "32M",
        // Two vCPUs: Keel's interpreter gives a one-vCPU machine no local APIC (the
        // guest then says so and skips MSI-X); the guest runs on the first.
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-kernel",
    ])
    .arg(elf)
    .args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-device",
        "virtio-rng-pci",
        "-device",
        "virtio-rng-pci,addr=05.0,multifunction=on",
        "-device",
        "virtio-rng-pci,addr=05.1",
    ]);
    if net {
        // After -M: Keel reads its command line left to right.
        cmd.args([
            "-netdev",
            "tap,id=n0,ifname=keelpci0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,addr=06.0",
        ]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
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

/// QEMU's output without the IDE function's block (its line and the indented lines after
/// it); panics when there is none, so that a change in QEMU's machine is noticed.
fn without_qemu_ide(out: &str) -> String {
    let mut kept = Vec::new();
    let mut skipping = false;
    let mut seen = false;
    for line in out.split_inclusive('\n') {
        if line.starts_with("01.1 8086:7010 ") {
            skipping = true;
            seen = true;
            continue;
        }
        if skipping && line.starts_with("  ") {
            continue;
        }
        skipping = false;
        kept.push(line);
    }
    assert!(seen, "QEMU showed no PIIX3 IDE function at 01.1:\n{out}");
    kept.concat()
}

#[test]
fn pci_guest_prints_the_same_on_keel_and_qemu() {
    let guest = keel_testguest::pci().unwrap();
    let dir = std::env::temp_dir().join(format!("keel-pci-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let elf = dir.join("pci.elf");
    std::fs::write(&elf, guest.pvh_elf()).unwrap();
    // KEEL_PCI_GUEST_DUMP=DIR keeps the guest and every run's output there.
    let dump = std::env::var_os("KEEL_PCI_GUEST_DUMP").map(PathBuf::from);
    if let Some(d) = &dump {
        std::fs::write(d.join("pci.elf"), guest.pvh_elf()).unwrap();
    }
    let net = tap_usable();
    if !net {
        eprintln!("virtio-net-pci: left out, 'unshare -n' or /dev/net/tun is not usable here");
    }
    let kvm = kvm_usable();
    if !kvm {
        eprintln!("kvm: /dev/kvm not usable here, tcg only");
    }
    let mut runs: Vec<(String, Run)> = Vec::new();
    let accels: Vec<&str> = if kvm { vec!["kvm", "tcg"] } else { vec!["tcg"] };
    match vmm_binary() {
        Some(vmm) => {
            for accel in &accels {
                runs.push((
                    format!("keel {accel}"),
                    run(&vmm, accel, &elf, net, Duration::from_secs(120)),
                ));
            }
        }
        None => eprintln!("skipping Keel: no vmm binary (set KEEL_VMM or build -p vmm)"),
    }
    match qemu_binary() {
        Some(qemu) => {
            for accel in accels.iter().rev() {
                let mut r = run(&qemu, accel, &elf, net, Duration::from_secs(120));
                if *accel == "kvm" && r.stdout.is_empty() && r.status != Some(1) {
                    eprintln!(
                        "skipping QEMU kvm: it does not start here: {}",
                        r.stderr.trim()
                    );
                    continue;
                }
                r.stdout = without_qemu_ide(&r.stdout);
                runs.push((format!("qemu {accel}"), r));
            }
        }
        None => eprintln!("skipping QEMU: not installed (set QEMU)"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(d) = &dump {
        for (name, r) in &runs {
            let f = d.join(name.replace(' ', "-"));
            std::fs::write(f, &r.stdout).unwrap();
        }
    }
    let mut problems = Vec::new();
    for (name, r) in &runs {
        // isa-debug-exit with 0: status 1; the output ends with the guest's last line.
        if r.timed_out || r.status != Some(1) || !r.stdout.ends_with("end\n") {
            problems.push(format!(
                "{name}: status {:?}{}\n--- output\n{}--- stderr\n{}",
                r.status,
                if r.timed_out { ", timed out" } else { "" },
                r.stdout,
                r.stderr
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let keel = runs.iter().any(|(n, _)| n.starts_with("keel"));
    let qemu = runs.iter().any(|(n, _)| n.starts_with("qemu"));
    if !(keel && qemu) {
        eprintln!("nothing to compare: need Keel and QEMU");
        return;
    }
    let (first, reference) = runs.last().unwrap();
    for (name, r) in &runs {
        assert_eq!(
            r.stdout, reference.stdout,
            "{name} and {first} differ\n--- {name}\n{}--- {first}\n{}",
            r.stdout, reference.stdout
        );
    }
    // The runs did what the guest is for (not only agree).
    let out = &reference.stdout;
    for want in [
        "virtio-rng at 02.0\n",
        " queue size 0008 ",
        "round 1\n  used idx 0001 id 00 len 0010 filled 1\n",
        "  after sti; hlt: irr 0 pba 0 handled 3\n",
    ] {
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }
    // virtio-net-pci is transitional, as on QEMU: device 0x1000 with the legacy I/O BAR0.
    if net {
        let want = "06.0 1af4:1000 class 020000 rev 00 hdr 00 cmd 0103 status 0010 sub 1af4:0001";
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }
    eprintln!("{out}");
}
