//! A virtio-pci device's `virtio-backend` child in QOM on `-M pc`, against QEMU 7.2.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, TempDir, Vmm};
use serde_json::{Value, json};

/// What `qom-list` and `qom-get` say of each virtio-pci device's `virtio-backend` child on
/// `-M pc`: its entry in the device's list and its type.
fn backend_children(c: &mut Client, ids: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let path = format!("/machine/peripheral/{id}");
        let list = c.ok("qom-list", json!({ "path": path }));
        let entry: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "virtio-backend")
            .map(|p| format!("{}: {}", p["name"], p["type"]))
            .collect();
        let child = format!("{path}/virtio-backend");
        let ty = c.ok("qom-get", json!({ "path": child, "property": "type" }));
        let link = c.ok(
            "qom-get",
            json!({ "path": path, "property": "virtio-backend" }),
        );
        out.push(format!("{id}: {entry:?} type {ty} link {link}"));
    }
    out
}

/// A virtio-pci device's `virtio-backend` child in QOM, as QEMU 7.2 shows it on `-M pc`
/// (`qom-list /machine/peripheral/ID` has `child<virtio-rng-device>` and so on, the child
/// path reads back its type). Compared with `$QEMU` (default /usr/bin/qemu-system-x86_64)
/// when it is installed.
#[test]
fn virtio_pci_backend_child_in_qom_as_qemu() {
    let args = [
        "-S",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-device",
        "virtio-rng-pci,id=r0",
        "-device",
        "virtio-serial-pci,id=vs",
    ];
    let ids = ["r0", "vs"];
    let mut vmm = Vmm::start(&args);
    let mut c = vmm.qmp();
    let keel = backend_children(&mut c, &ids);
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
    assert_eq!(
        keel[0],
        r#"r0: ["\"virtio-backend\": \"child<virtio-rng-device>\""] type "virtio-rng-device" link "/machine/peripheral/r0/virtio-backend""#
    );
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "/usr/bin/qemu-system-x86_64".into());
    if !std::path::Path::new(&qemu).is_file() {
        eprintln!("note: no QEMU at {qemu}; Keel checked alone");
        return;
    }
    let dir = TempDir::new();
    let sock = dir.path("qemu.sock");
    let spec = format!("unix:{},server=on,wait=off", sock.display());
    let mut child = Command::new(&qemu)
        .args(["-qmp", &spec])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "QEMU made no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut q = Client::from_path(&sock);
    q.negotiate();
    let reference = backend_children(&mut q, &ids);
    q.ok("quit", Value::Null);
    let _ = child.wait();
    assert_eq!(keel, reference, "Keel and QEMU differ");
}
