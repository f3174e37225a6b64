//! Live migration between two `vmm` processes through QEMU's commands: a guest that keeps
//! rewriting memory (plain and `rep stosq` stores) and prints a running sum of what it
//! reads back (keel-testguest's `counter_dirty`) is migrated with `migrate uri=unix:|tcp:`
//! while it runs, into a second process started with `-incoming` (or `-incoming defer` +
//! `migrate-incoming`), kvm and tcg both ways. Its serial output on the source up to the
//! switchover plus the destination's after it must be exactly an uninterrupted run's, and
//! `query-migrate` must show more than one dirty-log round with pages sent again. kvm cases
//! skip with the reason printed without a usable `/dev/kvm` (or with `KEEL_TEST_NO_KVM`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::{Client, PvhGuest as Guest, TempDir, Vmm, kvm_usable};
use serde_json::{Value, json};

/// Steps the guest counts, and how often it prints a line (40 bytes): long enough to be
/// migrated in the middle, with few enough lines (each is 40 exits under kvm).
const COUNT: u32 = 10_000;
const EVERY: u32 = 1;

fn guest() -> Guest {
    Guest::new(keel_testguest::counter_dirty(COUNT, EVERY).unwrap())
}

/// Pinned so that both accelerators build the same devices (see tests/snapshot.rs).
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

fn read(p: &std::path::Path) -> String {
    String::from_utf8(std::fs::read(p).unwrap_or_default()).unwrap()
}

/// A TCP port free right now on the loopback interface.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `query-migrate` until the migration ended; returns the last answer and whether
/// an `active` one with RAM numbers was seen on the way.
fn wait_migrated(q: &mut Client) -> (Value, bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_active = false;
    loop {
        let info = q.ok("query-migrate", Value::Null);
        match info["status"].as_str() {
            Some("completed" | "failed" | "cancelled") => return (info, seen_active),
            Some("active") if info["ram"]["total"].as_u64().is_some() => seen_active = true,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end: {info}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Migrates the running guest from `from` to `to` over `transport` (`unix` or `tcp`);
/// `defer` starts the destination with `-incoming defer` and gives the URI by
/// `migrate-incoming`.
fn live(from: &str, to: &str, transport: &str, defer: bool) {
    let g = guest();
    let uri = match transport {
        "unix" => format!("unix:{}", g.dir.path("mig.sock").display()),
        _ => format!("tcp:127.0.0.1:{}", free_port()),
    };
    let out_b = g.dir.path("after");
    let serial_b = format!("file:{}", out_b.display());
    let incoming = if defer { "defer" } else { uri.as_str() };
    let mut b = Vmm::start(&args(&g, to, &serial_b, &["-incoming", incoming]));
    let mut qb = b.qmp();
    if defer {
        assert_eq!(qb.status(), "inmigrate");
        qb.ok("migrate-incoming", json!({"uri": uri}));
    }
    assert_eq!(qb.status(), "inmigrate");

    let out_a = g.dir.path("before");
    let serial_a = format!("file:{}", out_a.display());
    let mut a = Vmm::start(&args(&g, from, &serial_a, &["-S"]));
    let mut q = a.qmp();
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    assert_eq!(
        q.ok("query-migrate-parameters", Value::Null),
        json!({"downtime-limit": 300, "max-bandwidth": 134217728})
    );
    q.ok("cont", Value::Null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&out_a).map(|m| m.len()).unwrap_or(0) < 4000 {
        assert!(Instant::now() < deadline, "the guest printed nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    q.ok("migrate", json!({"uri": uri}));
    let (info, _) = wait_migrated(&mut q);
    assert_eq!(info["status"], "completed", "{info}");
    let ram = &info["ram"];
    let total_pages = ram["total"].as_u64().unwrap() / 4096;
    let sent = ram["normal"].as_u64().unwrap() + ram["duplicate"].as_u64().unwrap();
    assert!(
        ram["dirty-sync-count"].as_u64().unwrap() >= 2,
        "one dirty-log round after the first copy, one at the stop: {info}"
    );
    assert!(
        sent > total_pages,
        "pages the running guest wrote were sent again: {info}"
    );
    assert_eq!(ram["remaining"], 0, "{info}");
    for k in ["total-time", "downtime", "setup-time"] {
        assert!(info[k].as_u64().is_some(), "{k}: {info}");
    }
    assert!(info["downtime"].as_u64() <= info["total-time"].as_u64());
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
        "{from} -> {to} over {transport}: the output around the migration differs from an \
         uninterrupted run ({} + {} bytes, want {})",
        before.len(),
        after.len(),
        g.want.len()
    );
}

#[test]
fn tcg_to_tcg_unix() {
    live("tcg", "tcg", "unix", false);
}

#[test]
fn tcg_to_tcg_tcp_deferred() {
    live("tcg", "tcg", "tcp", true);
}

#[test]
fn kvm_to_kvm_unix() {
    if kvm_usable() {
        live("kvm", "kvm", "unix", false);
    }
}

#[test]
fn kvm_to_kvm_tcp() {
    if kvm_usable() {
        live("kvm", "kvm", "tcp", false);
    }
}

#[test]
fn kvm_to_tcg_unix() {
    if kvm_usable() {
        live("kvm", "tcg", "unix", false);
    }
}

#[test]
fn kvm_to_tcg_tcp() {
    if kvm_usable() {
        live("kvm", "tcg", "tcp", false);
    }
}

#[test]
fn tcg_to_kvm_unix() {
    if kvm_usable() {
        live("tcg", "kvm", "unix", false);
    }
}

#[test]
fn tcg_to_kvm_tcp() {
    if kvm_usable() {
        live("tcg", "kvm", "tcp", true);
    }
}

/// The Debian guest (`scripts/build-guest.sh`) under tcg, migrated live mid-shell over a
/// unix socket while a shell loop keeps writing, with its virtio disk (the destination opens
/// the same image): the destination's shell answers and reads back what the source wrote to
/// the disk (page cache dropped first, so the read reaches the device). Skips with the
/// reason without the guest files (or fails with `KEEL_REQUIRE_GUEST=1`).
#[test]
fn debian_shell_migrated_live_with_its_disk() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let tmp = TempDir::new();
    let disk = tmp.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let vm = |extra: &[String], sock: &std::path::Path| {
        common::ShellVm::start(&kernel, &initrd, &disk, sock, extra)
    };
    let uri = format!("unix:{}", tmp.path("mig.sock").display());
    let sock_b = tmp.path("b.sock");
    let mut b = vm(&["-incoming".into(), uri.clone()], &sock_b);
    let mut qb = common::qmp_at(&sock_b);
    assert_eq!(qb.status(), "inmigrate");

    let sock_a = tmp.path("a.sock");
    let mut a = vm(&[], &sock_a);
    a.wait_for("KEEL-GUEST-SHELL");
    std::thread::sleep(Duration::from_millis(500));
    a.type_line(
        b"echo KEEL-DISK-DATA-$((6*7)) > /dev/vda; sync; \
              (i=0; while :; do i=$((i+1)); echo $i > /tmp/n; done) & echo WROTE-$((6*7))\n",
    );
    a.wait_for("WROTE-42");
    let mut q = common::qmp_at(&sock_a);
    q.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 30}),
    );
    q.ok("migrate", json!({ "uri": uri }));
    let (info, _) = wait_migrated(&mut q);
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
        b"kill %1; cat /tmp/n >/dev/null; echo 3 > /proc/sys/vm/drop_caches; \
              head -c 17 /dev/vda; echo; echo READ-$((2*2))\n",
    );
    let text = b.wait_for("READ-4");
    let after = &text[text.rfind("READ-$((2*2))").unwrap_or(0)..];
    assert!(
        after.contains("KEEL-DISK-DATA-42"),
        "read back after the migration:\n{after}"
    );
}

/// A source that was paused arrives paused (as QEMU: the destination runs only if the source
/// ran), and a second `migrate` while one runs, or of a migrated machine, is refused.
#[test]
fn paused_source_arrives_paused() {
    let g = guest();
    let uri = format!("unix:{}", g.dir.path("mig.sock").display());
    let mut b = Vmm::start(&args(&g, "tcg", "null", &["-incoming", &uri]));
    let mut qb = b.qmp();
    assert_eq!(qb.status(), "inmigrate");
    let mut a = Vmm::start(&args(&g, "tcg", "null", &["-S"]));
    let mut q = a.qmp();
    q.ok("migrate", json!({ "uri": uri }));
    let (info, _) = wait_migrated(&mut q);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(q.status(), "postmigrate");
    let e = q.err("migrate", json!({ "uri": uri }), "GenericError");
    assert!(e.contains("previous migration"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while qb.ok("query-migrate", Value::Null)["status"] != "completed" {
        assert!(Instant::now() < deadline, "the destination never completed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(qb.status(), "paused");
    qb.ok("cont", Value::Null);
    let st = wait_exit(&mut b, Duration::from_secs(300));
    assert_eq!(st.code(), Some(1), "the guest ran to its end after cont");
}
