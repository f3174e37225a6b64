//! Snapshots through QEMU's commands against the real binary: a guest that counts and
//! prints (keel-testguest's `counter`, booted with `-kernel`) is stopped mid-run, saved with
//! `migrate` to `file:`/`exec:`, and restored in a new process with `-incoming` (or
//! `-incoming defer` + `migrate-incoming`) on the same or the other accelerator; its serial
//! output before the save plus after the restore must be exactly an uninterrupted run's.
//! Corrupted, truncated and other-shape streams are refused and change nothing. kvm cases
//! skip with the reason printed without a usable `/dev/kvm` (or with `KEEL_TEST_NO_KVM`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::AsRawFd;
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
    // `exec:` runs a shell, which only works without the sandbox.
    let extra: &[&str] = if uri.starts_with("exec:") {
        &["-S", "-sandbox", "off"]
    } else {
        &["-S"]
    };
    let mut a = Vmm::start(&args(g, accel, &serial, extra));
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
    // `fd:NAME`: the file is opened here and passed with `getfd`, as libvirt's save does.
    let _target = uri.strip_prefix("fd:").map(|name| {
        let f = std::fs::File::create(g.dir.path("fd-snap")).unwrap();
        let r = q.cmd_with_fd("getfd", json!({"fdname": name}), f.as_raw_fd());
        assert_eq!(r, json!({"return": {}}));
        f
    });
    q.ok("migrate", json!({"uri": uri}));
    // To `fd:` the running guest migrates live (as QEMU): `migrate` returns at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let info = q.ok("query-migrate", Value::Null);
        if info["status"] != "setup" && info["status"] != "active" {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the migration does not end: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
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

/// libvirt's way: `virsh save` passes an open file with `getfd` and migrates to
/// `fd:NAME` (the guest runs, so live, as QEMU: the file holds a live stream, which
/// `-incoming` recognises by its first bytes); `virsh restore` starts the VMM with the file as an inherited descriptor N
/// and `-incoming fd:N`. A name `getfd` never kept is refused with QEMU's message.
#[test]
fn fd_uris_as_libvirt_save_and_restore_use_them() {
    use std::os::unix::process::CommandExt;
    let g = guest();
    let before = save(&g, "tcg", "fd:migrate");
    let out = g.dir.path("after-fd");
    let serial = format!("file:{}", out.display());
    let file = std::fs::File::open(g.dir.path("fd-snap")).unwrap();
    let raw = file.as_raw_fd();
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(args(&g, "tcg", &serial, &["-incoming", "fd:7"]));
    // SAFETY: between fork and exec only dup2, which is async-signal-safe, puts the
    // file at descriptor 7 (without close-on-exec) in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = common::Guard(cmd.spawn().unwrap());
    let st = child.wait_for(Duration::from_secs(300));
    assert_eq!(st.code(), Some(1), "isa-debug-exit status (0 << 1) | 1");
    let after = read(&out);
    assert!(
        format!("{before}{after}") == g.want,
        "fd: save and restore: the output differs from an uninterrupted run"
    );
    // A name nobody passed.
    let mut v = Vmm::start(&args(&g, "tcg", "null", &["-S"]));
    let mut q = v.qmp();
    let e = q.err("migrate", json!({"uri": "fd:nothing"}), "GenericError");
    assert_eq!(e, "File descriptor named 'nothing' has not been found");
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
/// with `migrate-incoming`: a corrupted, a truncated and a foreign-shape stream end the
/// process with status 1 and the reason, as QEMU 7.2 (`tests/migration_qemu.rs` compares),
/// and the good stream restores.
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

    // Another shape first: the same stream into a 64 MiB machine. Under the sandbox
    // `exec:` is refused with what to do, and the process goes on.
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
        json!({"uri": format!("exec:gzip -dc {}", file.display())}),
        "GenericError",
    );
    assert!(e.contains("run with '-sandbox off'"), "{e}");
    assert_eq!(q.status(), "inmigrate");
    // As QEMU 7.2, a stream that cannot be loaded ends the process with status 1.
    q.ok(
        "migrate-incoming",
        json!({"uri": format!("file:{}", raw.display())}),
    );
    let st = wait_exit(&mut other, Duration::from_secs(30));
    let why = other.post_mortem();
    assert_eq!(st.code(), Some(1), "{why}");
    assert!(
        why.contains("vmm: load of migration failed: ")
            && why.contains("memory size 32 MiB, this machine has 64 MiB"),
        "{why}"
    );
    drop(q);
    drop(other);
    for (stream, reason) in [(&bad, "checksum mismatch"), (&short, "truncated")] {
        let uri = format!("file:{}", stream.display());
        let mut v = Vmm::start(&args(&g, "tcg", "null", &["-incoming", &uri]));
        let st = wait_exit(&mut v, Duration::from_secs(30));
        let why = v.post_mortem();
        assert_eq!(st.code(), Some(1), "{why}");
        assert!(
            why.contains("vmm: load of migration failed: ") && why.contains(reason),
            "{why}"
        );
    }

    let out = g.dir.path("after-defer");
    let serial = format!("file:{}", out.display());
    let mut b = Vmm::start(&args(
        &g,
        "tcg",
        &serial,
        &["-incoming", "defer", "-sandbox", "off"],
    ));
    let mut q = b.qmp();
    assert_eq!(q.status(), "inmigrate");
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
    // As QEMU 7.2: a machine left in postmigrate is not saved again.
    let e = q.err("migrate", json!({"uri": uri}), "GenericError");
    assert_eq!(
        e,
        "Can't migrate the vm that was paused due to previous migration"
    );
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

/// The Debian guest (`scripts/build-guest.sh`) under tcg, saved at its shell after it wrote
/// to its virtio disk, and restored: the restored shell answers, and the guest reads the
/// data back from the disk (its page cache dropped first, so the read reaches the device).
/// Skips with the reason without the guest files (or fails with `KEEL_REQUIRE_GUEST=1`).
#[test]
fn debian_shell_saved_and_restored_with_its_disk() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let tmp = TempDir::new();
    let disk = tmp.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vm = |extra: &[String], sock: &Path| {
        common::ShellVm::start(&kernel, &initrd, &disk, sock, extra)
    };
    let sock_a = tmp.path("a.sock");
    let mut a = vm(&[], &sock_a);
    a.wait_for("KEEL-GUEST-SHELL");
    std::thread::sleep(Duration::from_millis(500));
    a.type_line(b"echo KEEL-DISK-DATA-$((6*7)) > /dev/vda; sync; echo WROTE-$((6*7))\n");
    a.wait_for("WROTE-42");
    let snap = tmp.path("snap");
    let mut q = common::qmp_at(&sock_a);
    q.ok(
        "migrate",
        json!({"uri": format!("file:{}", snap.display())}),
    );
    drop(q);
    drop(a);
    assert!(
        String::from_utf8_lossy(&std::fs::read(&disk).unwrap()).starts_with("KEEL-DISK-DATA-42"),
        "the write reached the disk image before the save"
    );

    let sock_b = tmp.path("b.sock");
    let mut b = vm(
        &["-incoming".into(), format!("file:{}", snap.display())],
        &sock_b,
    );
    let mut q = common::qmp_at(&sock_b);
    let deadline = Instant::now() + Duration::from_secs(60);
    while q.status() != "running" {
        assert!(Instant::now() < deadline, "the restored guest does not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    b.type_line(
        b"echo 3 > /proc/sys/vm/drop_caches; head -c 17 /dev/vda; echo; echo READ-$((2*2))\n",
    );
    let text = b.wait_for("READ-4");
    let after = &text[text.rfind("READ-$((2*2))").unwrap_or(0)..];
    assert!(
        after.contains("KEEL-DISK-DATA-42"),
        "read back after restore:\n{after}"
    );
}
