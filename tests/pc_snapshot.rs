//! Snapshots of the `pc` machine through QEMU's commands against the real binary: the
//! counting guest (keel-testguest's `counter`, PVH-booted with `-kernel`) on `-M pc` with a
//! virtio-rng-pci function is stopped mid-run, saved with `migrate` to `file:` and restored
//! in a new process with `-incoming` on the same or the other accelerator; its serial output
//! before the save plus after the restore must be exactly an uninterrupted run's. A stream
//! from a `pc` with another device set is refused naming the PCI address, and the process
//! ends with status 1 as QEMU 7.2's (the right machine then restores the stream). The same guest is
//! migrated live over `unix:` across accelerators, and the Debian guest with a
//! virtio-blk-pci disk is saved and restored, and migrated live, at its shell. kvm cases
//! skip with the reason printed without a usable `/dev/kvm` (or with `KEEL_TEST_NO_KVM`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{PvhGuest as Guest, TempDir, Vmm, kvm_usable};
use serde_json::{Value, json};

/// Lines the guest prints (40 bytes each): long enough to be stopped in the middle.
const COUNT: u32 = 40_000;

fn guest() -> Guest {
    Guest::new(keel_testguest::counter(COUNT).unwrap())
}

/// `-M pc` with a PCI device besides the onboard ones (`devices`: `-device` values).
fn args<'a>(
    g: &'a Guest,
    accel: &'a str,
    serial: &'a str,
    devices: &[&'a str],
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "-M",
        "pc",
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
    for d in devices {
        v.extend_from_slice(&["-device", d]);
    }
    v.extend_from_slice(extra);
    v
}

const RNG: &str = "virtio-rng-pci,id=rng0";

/// Waits for the guest to finish (the VMM to exit), killing it past `limit`.
fn wait_exit(v: &mut Vmm, limit: Duration) -> ExitStatus {
    common::wait_or_kill(&mut v.child, limit, "the guest")
}

fn read(p: &Path) -> String {
    String::from_utf8(std::fs::read(p).unwrap_or_default()).unwrap()
}

/// Runs the guest under `accel`, stops it mid-run and saves it to `uri`; returns the
/// serial output so far.
fn save(g: &Guest, accel: &str, uri: &str) -> String {
    let out = g.dir.path(&format!("before-{accel}"));
    let serial = format!("file:{}", out.display());
    let mut a = Vmm::start(&args(g, accel, &serial, &[RNG], &["-S"]));
    let mut q = a.qmp();
    q.ok("cont", Value::Null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) < 4000 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    q.ok("migrate", json!({"uri": uri}));
    let info = q.ok("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{info}");
    assert!(info["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(q.status(), "postmigrate");
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
    let mut b = Vmm::start(&args(g, accel, &serial, &[RNG], &["-incoming", uri]));
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
        "pc {from} -> {to}: the output around the snapshot differs from an uninterrupted run \
         ({} + {} bytes, want {})",
        before.len(),
        after.len(),
        g.want.len()
    );
}

#[test]
fn pc_tcg_to_tcg() {
    cross("tcg", "tcg");
}

#[test]
fn pc_tcg_to_kvm() {
    if kvm_usable() {
        cross("tcg", "kvm");
    }
}

#[test]
fn pc_kvm_to_tcg() {
    if kvm_usable() {
        cross("kvm", "tcg");
    }
}

#[test]
fn pc_kvm_to_kvm() {
    if kvm_usable() {
        cross("kvm", "kvm");
    }
}

/// Live migration of the running `pc` over `unix:` from `from` to `to`: the guest
/// (keel-testguest's `counter_dirty`, which writes RAM as it counts and reads it back)
/// keeps running while its RAM is copied, the pages it wrote meanwhile are sent again, and
/// the output before and after is exactly an uninterrupted run's.
fn live(from: &str, to: &str) {
    let g = Guest::new(keel_testguest::counter_dirty(10_000, 1).unwrap());
    let uri = format!("unix:{}", g.dir.path("mig.sock").display());
    let out_b = g.dir.path("after");
    let serial_b = format!("file:{}", out_b.display());
    let mut b = Vmm::start(&args(&g, to, &serial_b, &[RNG], &["-incoming", &uri]));
    let mut qb = b.qmp();
    assert_eq!(qb.status(), "inmigrate");
    let out_a = g.dir.path("before");
    let serial_a = format!("file:{}", out_a.display());
    let mut a = Vmm::start(&args(&g, from, &serial_a, &[RNG], &["-S"]));
    let mut q = a.qmp();
    q.ok("cont", Value::Null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out_a).map(|m| m.len()).unwrap_or(0) < 4000 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    q.ok("migrate", json!({"uri": uri}));
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = q.ok("query-migrate", Value::Null);
        if matches!(
            info["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end: {info}"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(info["status"], "completed", "{info}");
    let ram = &info["ram"];
    let total_pages = ram["total"].as_u64().unwrap() / 4096;
    let sent = ram["normal"].as_u64().unwrap() + ram["duplicate"].as_u64().unwrap();
    assert!(ram["dirty-sync-count"].as_u64().unwrap() >= 2, "{info}");
    assert!(
        sent > total_pages,
        "pages written meanwhile were sent again: {info}"
    );
    assert_eq!(q.status(), "postmigrate");
    drop(q);
    drop(a);
    drop(qb);
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1), "isa-debug-exit status (0 << 1) | 1");
    let before = read(&out_a);
    let after = read(&out_b);
    assert!(
        !before.is_empty() && !after.is_empty(),
        "the guest was not migrated mid-run ({} + {} bytes)",
        before.len(),
        after.len()
    );
    assert!(
        format!("{before}{after}") == g.want,
        "pc {from} -> {to} live: the output differs from an uninterrupted run"
    );
}

#[test]
fn pc_live_tcg_to_tcg() {
    live("tcg", "tcg");
}

#[test]
fn pc_live_kvm_to_tcg() {
    if kvm_usable() {
        live("kvm", "tcg");
    }
}

#[test]
fn pc_live_tcg_to_kvm() {
    if kvm_usable() {
        live("tcg", "kvm");
    }
}

/// QEMU's rule: the destination has the source's devices. A stream of a `pc` with a
/// virtio-rng-pci at 02.0 is refused by a `pc` without it, by one with a virtio-blk-pci
/// there, and by one with a second function; each refusal names the address and ends the
/// process with status 1 (as QEMU 7.2's failed load), and a machine with the right devices
/// takes the stream.
#[test]
fn pc_stream_with_other_devices_is_refused_by_address() {
    let g = guest();
    let file = g.dir.path("snap");
    let uri = format!("file:{}", file.display());
    let before = save(&g, "tcg", &uri);
    let disk = g.dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let cases: [(&[&str], &str); 3] = [
        (
            &[],
            "PCI function 1af4:1005 at 02.0, this machine has nothing at 02.0",
        ),
        (
            &["-drive", &drive, "-device", "virtio-blk-pci,drive=d0"],
            "PCI function 1af4:1005 at 02.0, this machine has 1af4:1001 at 02.0",
        ),
        (
            &["-device", RNG, "-device", "virtio-rng-pci,id=rng1"],
            "PCI function nothing at 03.0, this machine has 1af4:1005 at 03.0",
        ),
    ];
    for (devices, want) in cases {
        let mut a = vec![
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "32",
            "-kernel",
            &g.kernel,
            "-nodefaults",
            "-serial",
            "null",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-incoming",
            "defer",
        ];
        a.extend_from_slice(devices);
        let mut v = Vmm::start(&a);
        let mut q = v.qmp();
        // As QEMU 7.2, a stream that cannot be loaded ends the process with status 1.
        q.ok("migrate-incoming", json!({"uri": &uri}));
        let st = wait_exit(&mut v, Duration::from_secs(30));
        let e = v.post_mortem();
        assert_eq!(st.code(), Some(1), "{e}");
        assert!(
            e.contains("vmm: load of migration failed: ") && e.contains(want),
            "{want}: {e}"
        );
        assert!(e.contains("-device"), "the refusal says what to do: {e}");
    }
    // A file that cannot be opened is the command's error; the machine then takes the
    // right stream and finishes the run.
    let out = g.dir.path("after");
    let serial = format!("file:{}", out.display());
    let mut b = Vmm::start(&args(&g, "tcg", &serial, &[RNG], &["-incoming", "defer"]));
    let mut q = b.qmp();
    let e = q.err(
        "migrate-incoming",
        json!({"uri": format!("file:{}", g.dir.path("nothing-here").display())}),
        "GenericError",
    );
    assert!(!e.is_empty());
    assert_eq!(q.status(), "inmigrate");
    q.ok("migrate-incoming", json!({"uri": &uri}));
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1));
    assert!(format!("{before}{}", read(&out)) == g.want);
}

/// The Debian guest (`scripts/build-guest.sh`) on `-M pc -accel tcg` with its disk on a
/// virtio-blk-pci function: started on `machine`, the shell writes a file in its RAM
/// (tmpfs) and data to the disk.
fn debian_pc(
    kernel: &Path,
    initrd: &Path,
    disk: &Path,
    sock: &Path,
    extra: &[String],
) -> common::ShellVm {
    common::ShellVm::start_on("pc", "virtio-blk-pci", kernel, initrd, disk, sock, extra)
}

/// The shell writes a file in tmpfs and to its virtio-blk-pci disk, is saved with `migrate`
/// to a file and restored in a new process with `-incoming`: the restored shell answers,
/// the file is there, and the guest reads the disk data back through the device (page
/// cache dropped first). Skips with the reason without the guest files (or fails with
/// `KEEL_REQUIRE_GUEST=1`).
#[test]
fn debian_pc_shell_saved_and_restored_with_its_disk() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let tmp = TempDir::new();
    let disk = tmp.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock_a = tmp.path("a.sock");
    let mut a = debian_pc(&kernel, &initrd, &disk, &sock_a, &[]);
    a.wait_for("KEEL-GUEST-SHELL");
    std::thread::sleep(Duration::from_millis(500));
    a.type_line(
        b"echo KEEL-FILE-$((3*5)) > /tmp/f; echo KEEL-DISK-DATA-$((6*7)) > /dev/vda; sync; \
          echo WROTE-$((6*7))\n",
    );
    a.wait_for("WROTE-42");
    let snap = tmp.path("snap");
    let mut q = common::qmp_at(&sock_a);
    q.ok(
        "migrate",
        json!({"uri": format!("file:{}", snap.display())}),
    );
    assert_eq!(q.ok("query-migrate", Value::Null)["status"], "completed");
    drop(q);
    drop(a);

    let sock_b = tmp.path("b.sock");
    let mut b = debian_pc(
        &kernel,
        &initrd,
        &disk,
        &sock_b,
        &["-incoming".into(), format!("file:{}", snap.display())],
    );
    let mut q = common::qmp_at(&sock_b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while q.status() != "running" {
        assert!(Instant::now() < deadline, "the restored guest does not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    b.type_line(
        b"cat /tmp/f; echo 3 > /proc/sys/vm/drop_caches; head -c 17 /dev/vda; echo; \
          echo READ-$((2*2))\n",
    );
    let text = b.wait_for("READ-4");
    let after = &text[text.rfind("READ-$((2*2))").unwrap_or(0)..];
    assert!(
        after.contains("KEEL-FILE-15"),
        "the file after restore:\n{after}"
    );
    assert!(
        after.contains("KEEL-DISK-DATA-42"),
        "read back after restore:\n{after}"
    );
}

/// The same guest migrated live over a unix socket while a shell loop keeps writing to
/// tmpfs (so pages are dirtied during the copy): the destination's shell answers, and reads
/// back the file and what the source wrote to the disk.
#[test]
fn debian_pc_shell_migrated_live_with_its_disk() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let tmp = TempDir::new();
    let disk = tmp.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let uri = format!("unix:{}", tmp.path("mig.sock").display());
    let sock_b = tmp.path("b.sock");
    let mut b = debian_pc(
        &kernel,
        &initrd,
        &disk,
        &sock_b,
        &["-incoming".into(), uri.clone()],
    );
    let mut qb = common::qmp_at(&sock_b);
    assert_eq!(qb.status(), "inmigrate");

    let sock_a = tmp.path("a.sock");
    let mut a = debian_pc(&kernel, &initrd, &disk, &sock_a, &[]);
    a.wait_for("KEEL-GUEST-SHELL");
    std::thread::sleep(Duration::from_millis(500));
    a.type_line(
        b"echo KEEL-FILE-$((3*5)) > /tmp/f; echo KEEL-DISK-DATA-$((6*7)) > /dev/vda; sync; \
          (i=0; while :; do i=$((i+1)); echo $i > /tmp/n; done) & echo WROTE-$((6*7))\n",
    );
    a.wait_for("WROTE-42");
    let mut q = common::qmp_at(&sock_a);
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30}),
    );
    q.ok("migrate", json!({ "uri": uri }));
    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = q.ok("query-migrate", Value::Null);
        if matches!(
            info["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end: {info}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(info["status"], "completed", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 2,
        "{info}"
    );
    assert_eq!(q.status(), "postmigrate");
    drop(q);
    drop(a);

    let deadline = Instant::now() + Duration::from_secs(60);
    while qb.status() != "running" {
        assert!(Instant::now() < deadline, "the migrated guest does not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(qb.ok("query-migrate", Value::Null)["status"], "completed");
    b.type_line(
        b"kill %1; cat /tmp/f; echo 3 > /proc/sys/vm/drop_caches; head -c 17 /dev/vda; echo; \
          echo READ-$((2*2))\n",
    );
    let text = b.wait_for("READ-4");
    let after = &text[text.rfind("READ-$((2*2))").unwrap_or(0)..];
    assert!(
        after.contains("KEEL-FILE-15"),
        "after the migration:\n{after}"
    );
    assert!(
        after.contains("KEEL-DISK-DATA-42"),
        "read back after the migration:\n{after}"
    );
}

/// A device hot-plugged into the running source (`device_add`) is given as `-device` on
/// the destination, as QEMU requires: the stream restores, the function is where it was
/// with its configuration as the source's guest left it (`query-pci` the same on both
/// sides: the guest never placed its BARs, so none decodes, although the destination's
/// cold plug had placed them), and the guest finishes its run.
#[test]
fn pc_hot_plugged_device_restores_into_a_cold_plugged_one() {
    let g = guest();
    let file = g.dir.path("snap");
    let uri = format!("file:{}", file.display());
    let out = g.dir.path("before");
    let serial = format!("file:{}", out.display());
    let mut a = Vmm::start(&args(&g, "tcg", &serial, &[], &["-S"]));
    let mut q = a.qmp();
    q.ok("cont", Value::Null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) < 4000 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    q.ok(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng0"}),
    );
    let pci_before = q.ok("query-pci", Value::Null);
    q.ok("migrate", json!({"uri": &uri}));
    drop(q);
    drop(a);
    let before = read(&out);
    let hot = &pci_before[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["qdev_id"] == "rng0")
        .cloned()
        .unwrap();
    assert_eq!(hot["slot"], 2, "{pci_before}");
    assert_eq!(hot["regions"], json!([]), "{pci_before}");

    let out2 = g.dir.path("after");
    let serial2 = format!("file:{}", out2.display());
    let mut b = Vmm::start(&args(
        &g,
        "tcg",
        &serial2,
        &[RNG],
        &["-S", "-incoming", "defer"],
    ));
    let mut q = b.qmp();
    let cold = q.ok("query-pci", Value::Null);
    assert_ne!(cold, pci_before, "the cold plug placed the BARs");
    q.ok("migrate-incoming", json!({"uri": &uri}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while q.status() == "inmigrate" {
        assert!(Instant::now() < deadline, "the restore did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(q.ok("query-pci", Value::Null), pci_before);
    q.ok("cont", Value::Null);
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1));
    assert!(format!("{before}{}", read(&out2)) == g.want);
}
