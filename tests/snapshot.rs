//! Snapshots through QEMU's commands against the real binary: a guest that counts and
//! prints (keel-testguest's `counter`, booted with `-kernel`) is stopped mid-run, saved with
//! `migrate` to `file:`/`exec:`, and restored in a new process with `-incoming` (or
//! `-incoming defer` + `migrate-incoming`) on the same or the other accelerator; its serial
//! output before the save plus after the restore must be exactly an uninterrupted run's.
//! Corrupted, truncated and other-shape streams are refused and change nothing. kvm cases
//! skip with the reason printed without a usable `/dev/kvm` (or with `KEEL_TEST_NO_KVM`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{TempDir, Vmm};
use serde_json::{Value, json};

/// Lines the guest prints (40 bytes each): long enough to be stopped in the middle.
const COUNT: u32 = 40_000;

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

struct Guest {
    dir: TempDir,
    kernel: String,
    want: String,
}

fn guest() -> Guest {
    let dir = TempDir::new();
    let g = keel_testguest::counter(COUNT).unwrap();
    let kernel = dir.path("counter.elf");
    std::fs::write(&kernel, g.pvh_elf()).unwrap();
    Guest {
        kernel: kernel.display().to_string(),
        want: g.expected_serial.unwrap(),
        dir,
    }
}

/// The machine on both sides. microvm resolves some devices per accelerator (the RTC is
/// off under kvm, and tcg gives one vCPU no IOAPIC, hence the ACPI PM block instead of the
/// GED): across accelerators the machine must have the same devices, so they are pinned.
const MACHINE: &str = "microvm,rtc=on,acpi=off";

fn args<'a>(g: &'a Guest, accel: &'a str, serial: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "-machine",
        MACHINE,
        "-accel",
        accel,
        "-m",
        "32",
        "-kernel",
        &g.kernel,
        "-nodefaults",
        "-serial",
        serial,
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ];
    v.extend_from_slice(extra);
    v
}

fn wait_exit(v: &mut Vmm, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = v.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "the guest did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(p: &Path) -> String {
    String::from_utf8(std::fs::read(p).unwrap_or_default()).unwrap()
}

/// Runs the guest under `accel`, stops it mid-run and saves it to `uri`; returns the
/// serial output so far.
fn save(g: &Guest, accel: &str, uri: &str) -> String {
    let out = g.dir.path(&format!("before-{accel}"));
    let serial = format!("file:{}", out.display());
    let mut a = Vmm::start(&args(g, accel, &serial, &["-S"]));
    let mut q = a.qmp();
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    assert_eq!(
        q.ok("query-migrate-capabilities", Value::Null),
        json!([{"capability": "events", "state": true}])
    );
    assert_eq!(q.ok("query-migrate", Value::Null), json!({}));
    q.ok("cont", Value::Null);
    // Wait until the guest printed something, then stop it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) < 4000 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    q.ok("migrate", json!({"uri": uri}));
    let info = q.ok("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
    assert!(
        info["ram"]["duplicate"].as_u64().unwrap() > info["ram"]["normal"].as_u64().unwrap(),
        "zero pages are not written: {info}"
    );
    assert_eq!(q.status(), "postmigrate");
    let statuses: Vec<Value> = q
        .events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].clone())
        .collect();
    assert_eq!(
        statuses,
        [json!("setup"), json!("active"), json!("completed")]
    );
    assert!(q.events.iter().any(|e| e["event"] == "STOP"));
    drop(q);
    drop(a);
    let before = read(&out);
    assert!(
        !before.is_empty() && before.len() < g.want.len(),
        "the guest was not stopped mid-run ({} of {} bytes)",
        before.len(),
        g.want.len()
    );
    before
}

/// Restores `uri` under `accel` with `-incoming` and lets the guest finish.
fn restore(g: &Guest, accel: &str, uri: &str) -> String {
    let out = g.dir.path(&format!("after-{accel}"));
    let serial = format!("file:{}", out.display());
    let mut b = Vmm::start(&args(g, accel, &serial, &["-incoming", uri]));
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1), "isa-debug-exit status (0 << 1) | 1");
    read(&out)
}

fn cross(from: &str, to: &str) {
    let g = guest();
    let file = g.dir.path("snap");
    let uri = format!("file:{}", file.display());
    let before = save(&g, from, &uri);
    let after = restore(&g, to, &uri);
    assert!(
        format!("{before}{after}") == g.want,
        "{from} -> {to}: the output around the snapshot differs from an uninterrupted run \
         ({} + {} bytes, want {})",
        before.len(),
        after.len(),
        g.want.len()
    );
}

#[test]
fn tcg_to_tcg() {
    cross("tcg", "tcg");
}

#[test]
fn tcg_to_kvm() {
    if kvm_usable() {
        cross("tcg", "kvm");
    }
}

#[test]
fn kvm_to_tcg() {
    if kvm_usable() {
        cross("kvm", "tcg");
    }
}

#[test]
fn kvm_to_kvm() {
    if kvm_usable() {
        cross("kvm", "kvm");
    }
}

/// `exec:` both ways (a shell pipeline writes and reads the stream), and `-incoming defer`
/// with `migrate-incoming`: a corrupted, a truncated and a foreign-shape stream are refused
/// with the reason, the machine stays in `inmigrate`, and the good stream then restores.
#[test]
fn exec_defer_and_bad_streams() {
    let g = guest();
    let file = g.dir.path("snap.gz");
    let before = save(&g, "tcg", &format!("exec:gzip -c > {}", file.display()));
    let raw = g.dir.path("snap");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc {} > {}", file.display(), raw.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let good = std::fs::read(&raw).unwrap();
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x10;
    let bad = g.dir.path("corrupt");
    std::fs::write(&bad, &corrupt).unwrap();
    let short = g.dir.path("short");
    std::fs::write(&short, &good[..good.len() - 100]).unwrap();

    // Another shape first: the same stream into a 64 MiB machine.
    let out = g.dir.path("after-defer");
    let serial = format!("file:{}", out.display());
    let mut other = Vmm::start(&[
        "-machine",
        MACHINE,
        "-accel",
        "tcg",
        "-m",
        "64",
        "-kernel",
        &g.kernel,
        "-nodefaults",
        "-serial",
        "null",
        "-incoming",
        "defer",
    ]);
    let mut q = other.qmp();
    let e = q.err(
        "migrate-incoming",
        json!({"uri": format!("file:{}", raw.display())}),
        "GenericError",
    );
    assert!(
        e.contains("memory size 32 MiB, this machine has 64 MiB"),
        "{e}"
    );
    drop(q);
    drop(other);

    let mut b = Vmm::start(&args(&g, "tcg", &serial, &["-incoming", "defer"]));
    let mut q = b.qmp();
    assert_eq!(q.status(), "inmigrate");
    let e = q.err(
        "migrate-incoming",
        json!({"uri": format!("file:{}", bad.display())}),
        "GenericError",
    );
    assert!(e.contains("checksum mismatch"), "{e}");
    let e = q.err(
        "migrate-incoming",
        json!({"uri": format!("file:{}", short.display())}),
        "GenericError",
    );
    assert!(e.contains("truncated"), "{e}");
    assert_eq!(q.status(), "inmigrate");
    assert_eq!(
        q.ok("query-migrate", Value::Null)["status"],
        "failed",
        "a refused stream is a failed migration"
    );
    q.ok(
        "migrate-incoming",
        json!({"uri": format!("exec:gzip -dc {}", file.display())}),
    );
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1));
    let after = read(&out);
    assert!(format!("{before}{after}") == g.want, "exec/defer restore");
}

/// A guest saved while paused stays paused after the restore; `cont` runs it to the end.
#[test]
fn paused_at_save_is_paused_after_restore() {
    let g = guest();
    let out = g.dir.path("before");
    let serial = format!("file:{}", out.display());
    let file = g.dir.path("snap");
    let uri = format!("file:{}", file.display());
    let mut a = Vmm::start(&args(&g, "tcg", &serial, &["-S"]));
    let mut q = a.qmp();
    q.ok("migrate", json!({"uri": uri}));
    assert_eq!(q.status(), "postmigrate");
    drop(q);
    drop(a);
    let out2 = g.dir.path("after");
    let serial2 = format!("file:{}", out2.display());
    let mut b = Vmm::start(&args(&g, "tcg", &serial2, &["-incoming", &uri]));
    let mut q = b.qmp();
    assert_eq!(q.status(), "paused");
    q.ok("cont", Value::Null);
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1));
    assert!(read(&out2) == g.want);
}
