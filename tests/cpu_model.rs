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

use common::{TempDir, Vmm, kvm_usable};
use serde_json::json;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The guest as a PVH ELF in `dir`.
fn guest(dir: &TempDir, count: u32) -> String {
    let g = keel_testguest::cpuid_report(count).unwrap();
    let p = dir.path("cpuid.elf");
    std::fs::write(&p, g.pvh_elf()).unwrap();
    p.display().to_string()
}

/// The machine on both sides: the same devices under kvm and tcg (see tests/snapshot.rs);
/// two vCPUs, so that the interpreter has local APICs as KVM does (the APIC bit of CPUID
/// follows the machine). `extra` comes before `-device`.
fn args<'a>(kernel: &'a str, accel: &'a str, serial: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = extra.to_vec();
    v.extend([
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
    ]);
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

/// Runs QEMU 7.2 with the same machine; `None` without QEMU (the reason printed).
fn qemu(kernel: &str, accel: &str, dir: &TempDir) -> Option<(String, String)> {
    if !std::path::Path::new(QEMU).exists() {
        eprintln!("skipping the QEMU comparison: no {QEMU}");
        return None;
    }
    let out = dir.path(&format!("serial-qemu-{accel}"));
    let serial = format!("file:{}", out.display());
    let extra = ["-cpu", "qemu64", "-display", "none", "-no-user-config"];
    Some(run(QEMU, &args(kernel, accel, &serial, &extra), &out))
}

/// The report's CPUID lines: (leaf, sub-leaf) → [eax, ebx, ecx, edx], in order.
fn leaves(out: &str) -> Vec<((u32, u32), [u32; 4])> {
    out.lines()
        .filter_map(|l| l.strip_prefix("cpuid "))
        .map(|l| {
            let mut w = l.split(' ');
            let (leaf, sub) = w.next().unwrap().split_once('.').unwrap();
            let id = (
                u32::from_str_radix(leaf, 16).unwrap(),
                u32::from_str_radix(sub, 16).unwrap(),
            );
            let mut r = [0u32; 4];
            for (k, v) in w.enumerate() {
                r[k] = u32::from_str_radix(&v[2..], 16).unwrap();
            }
            (id, r)
        })
        .collect()
}

/// The features of QEMU's `qemu64` that Keel's model leaves out because Keel's interpreter
/// does not implement them (so that the model is the same CPU under kvm and tcg), by
/// (leaf, register index) → bits: leaf 1 EDX de mce sep mtrr pge mca pse36 mmx, ECX pni;
/// leaf 0x8000_0001 ECX svm, EDX the AMD copies of de mce mtrr pge mca pse36 mmx.
fn left_out(leaf: u32, reg: usize) -> u32 {
    let bits = |b: &[u32]| b.iter().fold(0, |m, b| m | (1 << b));
    match (leaf, reg) {
        (1, 3) => bits(&[2, 7, 11, 12, 13, 14, 17, 23]),
        (1, 2) => bits(&[0]),
        (0x8000_0001, 2) => bits(&[2]),
        (0x8000_0001, 3) => bits(&[2, 7, 12, 13, 14, 17, 23]),
        _ => 0,
    }
}

/// Leaves KVM-PVM (the development host's KVM) answers from the host whatever
/// `KVM_SET_CPUID2` said: leaf 1 ECX/EDX, leaf 7 and leaf 0xD. QEMU 7.2 under kvm on the
/// same host shows the same values there, which the test checks.
fn host_answered(leaf: u32, reg: usize) -> bool {
    matches!((leaf, reg), (1, 2) | (1, 3) | (7, _) | (0xd, _))
}

/// The counting lines the report prints between its two CPUID reports.
fn counting(n: u32) -> String {
    let mut s = 0u64;
    let mut out = String::new();
    for i in 1..=u64::from(n) {
        s = s.wrapping_mul(3).wrapping_add(i);
        out.push_str(&format!("i={i:08x} s={s:016x}\n"));
    }
    out
}

/// The default model is QEMU's `qemu64` kept to what Keel's accelerators present: under
/// Keel's tcg the guest sees exactly QEMU 7.2 tcg's `qemu64` leaves without the left-out
/// features, under Keel's kvm exactly Keel's tcg leaves but for the hypervisor's name
/// (QEMU's kvm signature) and the leaves a KVM-PVM host answers itself (where the host adds
/// its own features, as it does to QEMU's kvm guest); and Keel warns about the features of
/// its model the host's KVM lacks with QEMU's words.
#[test]
fn default_model_is_qemu64_on_every_accelerator() {
    let dir = TempDir::new();
    let k = guest(&dir, 3);
    let (tcg, tcg_err) = keel(&k, "tcg", &dir, &[]);
    assert_eq!(tcg_err, "", "no warning under tcg");
    let t = leaves(&tcg);
    assert_eq!(t.len(), 2 * keel_testguest::REPORTED_LEAVES.len(), "{tcg}");
    let (first, second) = t.split_at(t.len() / 2);
    assert_eq!(
        first, second,
        "the CPU does not change while the guest runs"
    );
    assert!(tcg.contains(&counting(3)), "{tcg}");
    // Explicitly `-cpu qemu64`: the same.
    assert_eq!(keel(&k, "tcg", &dir, &["-cpu", "qemu64"]).0, tcg);
    if let Some((q, _)) = qemu(&k, "tcg", &dir) {
        for ((id, kr), (qid, qr)) in t.iter().zip(leaves(&q).iter()) {
            assert_eq!(id, qid);
            for r in 0..4 {
                let mask = left_out(id.0, r);
                assert_eq!(
                    kr[r],
                    qr[r] & !mask,
                    "leaf {:#x}.{} register {r}: Keel {:#010x}, QEMU {:#010x}",
                    id.0,
                    id.1,
                    kr[r],
                    qr[r]
                );
                assert_eq!(qr[r] & mask, mask, "QEMU has the left-out features");
            }
        }
    }
    if !kvm_usable() {
        return;
    }
    let (kvm, kvm_err) = keel(&k, "kvm", &dir, &[]);
    let kv = leaves(&kvm);
    assert_eq!(kv.len(), t.len());
    let qk = qemu(&k, "kvm", &dir);
    let qt = qemu(&k, "tcg", &dir);
    for (i, ((id, kr), (_, tr))) in kv.iter().zip(&t).enumerate() {
        if id.0 == 0x4000_0000 {
            // The hypervisor's name, as QEMU's kvm guest sees it: "KVMKVMKVM".
            assert_eq!(*kr, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]);
            if let Some((q, _)) = &qk {
                assert_eq!(*kr, leaves(q)[i].1, "QEMU's kvm signature");
            }
            continue;
        }
        for r in 0..4 {
            if kr[r] == tr[r] {
                continue;
            }
            assert!(
                host_answered(id.0, r),
                "leaf {:#x}.{} register {r}: kvm {:#010x}, tcg {:#010x}",
                id.0,
                id.1,
                kr[r],
                tr[r]
            );
            // The host adds its own features to the model's: every bit of the model is
            // there, and QEMU's kvm guest sees the host's additions on its model too.
            assert_eq!(kr[r] & tr[r], tr[r], "leaf {:#x}: the model's bits", id.0);
            if let (Some((q, _)), Some((qt, _))) = (&qk, &qt) {
                let (qr, qtr) = (leaves(q)[i].1, leaves(qt)[i].1);
                assert_ne!(
                    qr[r], qtr[r],
                    "the host answers leaf {:#x} for QEMU too",
                    id.0
                );
            }
        }
    }
    if let Some((_, qemu_err)) = &qk {
        let warnings = |s: &str| -> Vec<String> {
            s.lines()
                .filter_map(|l| l.split_once("warning: ").map(|(_, w)| w.to_owned()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        // QEMU's warnings about features Keel's model keeps, word for word; none about
        // the ones it leaves out on every accelerator (QEMU warns about `pni` on a host
        // without it: Keel's guest never gets `pni`, whatever the host).
        let dropped = [
            "de", "mce", "sep", "mtrr", "pge", "mca", "pse36", "mmx", "pni", "svm",
        ];
        let kept: Vec<String> = warnings(qemu_err)
            .into_iter()
            .filter(|w| !dropped.iter().any(|d| w.contains(&format!(".{d} [bit"))))
            .collect();
        assert_eq!(
            warnings(&kvm_err),
            kept,
            "QEMU's warnings under kvm: {qemu_err}"
        );
    }
}

/// Saves the report guest on `from` (`cpu`: the `-cpu` value, `None` for the default) while
/// it counts; returns (serial so far, stream path).
fn save(dir: &TempDir, kernel: &str, from: &str, cpu: Option<&str>) -> (String, String) {
    let out = dir.path(&format!("before-{from}"));
    let serial = format!("file:{}", out.display());
    let mut extra = vec!["-S"];
    if let Some(c) = cpu {
        extra.extend(["-cpu", c]);
    }
    let mut a = Vmm::start(&args(kernel, from, &serial, &extra));
    let mut q = a.qmp();
    q.ok("cont", json!(null));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) < 3000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest printed nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let file = dir.path(&format!("snap-{from}"));
    q.ok(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    drop(q);
    drop(a);
    let before = std::fs::read_to_string(&out).unwrap();
    (before, file.display().to_string())
}

/// Lines the report guest counts in the snapshot tests: long enough to be stopped in the
/// middle under tcg.
const COUNT: u32 = 40_000;

/// The guest's output around a restore on `to` of a stream saved on `from`, with the
/// default model: its second CPUID report is its first (the CPU did not change under it,
/// although the accelerator did), and the whole is an uninterrupted run's. Where KVM-PVM
/// answers leaves itself (see `host_answered`), the kvm side shows the host's values there
/// and those registers are compared masked.
fn cross(from: &str, to: &str) {
    let dir = TempDir::new();
    let k = guest(&dir, COUNT);
    let (before, file) = save(&dir, &k, from, None);
    let out = dir.path(&format!("after-{to}"));
    let serial = format!("file:{}", out.display());
    let incoming = format!("file:{file}");
    let mut b = Vmm::start(&args(&k, to, &serial, &["-incoming", &incoming]));
    let st = common::wait_or_kill(&mut b.child, Duration::from_secs(300), "the restored guest");
    assert_eq!(st.code(), Some(1));
    let after = std::fs::read_to_string(&out).unwrap();
    let all = format!("{before}{after}");
    let n = keel_testguest::REPORTED_LEAVES.len();
    let l = leaves(&all);
    assert_eq!(l.len(), 2 * n, "{from} -> {to}");
    let report = |ls: &[((u32, u32), [u32; 4])]| -> String {
        ls.iter()
            .map(|((f, i), r)| {
                let mut line = format!("cpuid {f:08x}.{i:02x}");
                for (k, name) in ["a", "b", "c", "d"].iter().enumerate() {
                    line.push_str(&format!(" {name}={:08x}", r[k]));
                }
                line + "\n"
            })
            .collect()
    };
    let kvm_side = from == "kvm" || to == "kvm";
    let mask = |ls: &[((u32, u32), [u32; 4])]| -> Vec<((u32, u32), [u32; 4])> {
        ls.iter()
            .map(|&(id, mut r)| {
                for (k, v) in r.iter_mut().enumerate() {
                    if kvm_side && host_answered(id.0, k) {
                        *v = 0;
                    }
                }
                (id, r)
            })
            .collect()
    };
    assert_eq!(
        mask(&l[..n]),
        mask(&l[n..]),
        "{from} -> {to}: the guest's CPU changed under it"
    );
    let first = report(&l[..n]);
    let second = report(&l[n..]);
    assert_eq!(
        all,
        format!("{first}{}{second}", counting(COUNT)),
        "{from} -> {to}: not an uninterrupted run"
    );
    assert!(
        before.len() > first.len() && after.len() > second.len(),
        "stopped mid-run"
    );
}

#[test]
fn tcg_to_tcg_keeps_the_cpu() {
    cross("tcg", "tcg");
}

#[test]
fn kvm_to_tcg_keeps_the_cpu() {
    if kvm_usable() {
        cross("kvm", "tcg");
    }
}

#[test]
fn tcg_to_kvm_keeps_the_cpu() {
    if kvm_usable() {
        cross("tcg", "kvm");
    }
}

/// `-incoming file:FILE` into a tcg machine: as QEMU 7.2's failed load, the process ends
/// with status 1 and the reason on stderr, before the guest ran; returns the reason.
fn refused_under_tcg(dir: &TempDir, kernel: &str, file: &str) -> String {
    let uri = format!("file:{file}");
    let mut b = Vmm::start(&args(kernel, "tcg", "null", &["-incoming", &uri]));
    let st = common::wait_or_kill(&mut b.child, Duration::from_secs(30), "the refusing vmm");
    let why = b.post_mortem();
    assert_eq!(st.code(), Some(1), "{why}");
    assert!(why.contains("vmm: load of migration failed: "), "{why}");
    let _ = dir;
    why
}

/// A `-cpu max` guest saved under kvm cannot move to tcg: the refusal names the model,
/// both accelerators, the features tcg cannot present and the way out.
#[test]
fn max_from_kvm_is_refused_under_tcg() {
    if !kvm_usable() {
        return;
    }
    let dir = TempDir::new();
    let k = guest(&dir, COUNT);
    let (_, file) = save(&dir, &k, "kvm", Some("max"));
    let e = refused_under_tcg(&dir, &k, &file);
    for want in [
        "the stream's CPU (max under kvm) has ",
        "x2apic",
        "kvmclock",
        " which tcg cannot present; save the guest with -cpu qemu64",
    ] {
        assert!(e.contains(want), "{want:?} in {e}");
    }
}

/// CRC-32 as the stream uses it (zlib's).
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Offset of the `CPID` section's frame in a stream.
fn cpid_frame(s: &[u8]) -> usize {
    let h = u32::from_le_bytes(s[12..16].try_into().unwrap()) as usize;
    let mut at = 16 + h + 4;
    loop {
        let len = u64::from_le_bytes(s[at + 12..at + 20].try_into().unwrap()) as usize;
        if &s[at..at + 4] == b"CPID" {
            return at;
        }
        at += 24 + len;
    }
}

/// A damaged `CPID` section is refused: a flipped bit by its checksum, a payload whose
/// checksum was recomputed by its content (a leaf count the payload cannot hold, a leaf
/// twice). The good stream then restores.
#[test]
fn damaged_cpuid_section_is_refused() {
    let dir = TempDir::new();
    let k = guest(&dir, COUNT);
    let (_, file) = save(&dir, &k, "tcg", None);
    let good = std::fs::read(&file).unwrap();
    let at = cpid_frame(&good);
    let len = u64::from_le_bytes(good[at + 12..at + 20].try_into().unwrap()) as usize;
    let write = |name: &str, data: &[u8]| -> String {
        let p = dir.path(name);
        std::fs::write(&p, data).unwrap();
        p.display().to_string()
    };
    let reframe = |data: &mut Vec<u8>| {
        let mut c = data[at..at + 20].to_vec();
        c.extend_from_slice(&data[at + 24..at + 24 + len]);
        let crc = crc32(&c);
        data[at + 20..at + 24].copy_from_slice(&crc.to_le_bytes());
    };
    let mut flipped = good.clone();
    flipped[at + 24 + len - 3] ^= 0x40;
    let e = refused_under_tcg(&dir, &k, &write("flipped", &flipped));
    assert!(e.contains("checksum mismatch in section CPID"), "{e}");
    // The payload: str model, str accel, u32 count, leaves.
    let model_len = u32::from_le_bytes(good[at + 24..at + 28].try_into().unwrap()) as usize;
    let p_accel = at + 28 + model_len;
    let accel_len = u32::from_le_bytes(good[p_accel..p_accel + 4].try_into().unwrap()) as usize;
    let p_count = p_accel + 4 + accel_len;
    let mut counted = good.clone();
    counted[p_count..p_count + 4].copy_from_slice(&100_000u32.to_le_bytes());
    reframe(&mut counted);
    let e = refused_under_tcg(&dir, &k, &write("counted", &counted));
    assert!(e.contains("section CPID #0 cannot be read"), "{e}");
    let mut twice = good.clone();
    // The second leaf's (function, index) made the first's.
    let first = p_count + 4;
    let (a, b) = (first, first + 24);
    let id = twice[a..a + 8].to_vec();
    twice[b..b + 8].copy_from_slice(&id);
    reframe(&mut twice);
    let e = refused_under_tcg(&dir, &k, &write("twice", &twice));
    assert!(e.contains("section CPID #0 cannot be read"), "{e}");
    // And the good one restores.
    let mut b = Vmm::start(&args(
        &k,
        "tcg",
        "null",
        &["-incoming", &format!("file:{file}")],
    ));
    let st = common::wait_or_kill(&mut b.child, Duration::from_secs(300), "the restored guest");
    assert_eq!(st.code(), Some(1));
}
