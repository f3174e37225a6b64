//! `-device help` and `-device DRIVER,help` answer as QEMU 7.2 does for the types both
//! offer: same heading per type, same name/bus/alias, same property syntax. Compared with
//! QEMU where it is installed (`KEEL_COMPAT_QEMU` or `qemu-system-x86_64`), else the shape
//! alone is checked and the comparison is skipped with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (type name → (heading, `name "X", bus B[, alias "A"]`)) from a `-device help` text.
fn entries(text: &str) -> HashMap<String, (String, String)> {
    let mut heading = String::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(h) = line.strip_suffix(" devices:") {
            heading = h.to_owned();
        } else if let Some(rest) = line.strip_prefix("name \"") {
            let name = rest.split('"').next().unwrap().to_owned();
            let core: Vec<&str> = line
                .split(", ")
                .filter(|p| !p.starts_with("desc ") && *p != "no-user")
                .collect();
            out.insert(name, (heading.clone(), core.join(", ")));
        }
    }
    out
}

fn qemu() -> Option<String> {
    let bin = std::env::var("KEEL_COMPAT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    match Command::new(&bin).arg("-version").output() {
        Ok(o) if o.status.success() => Some(bin),
        _ => {
            eprintln!("skipped the comparison: {bin} is not installed");
            None
        }
    }
}

#[test]
fn device_help_lists_what_qemu_lists_for_the_same_types() {
    let (code, text, err) = run(common::BIN, &["-device", "help"]);
    assert_eq!(code, 0, "{err}");
    let keel = entries(&text);
    for name in [
        "virtio-blk-pci",
        "virtio-blk-device",
        "isa-debug-exit",
        "virtconsole",
    ] {
        assert!(keel.contains_key(name), "{name} missing from\n{text}");
    }
    assert!(keel["virtio-blk-pci"].1.ends_with("alias \"virtio-blk\""));
    // Anywhere on the line, before anything runs.
    let (code, again, _) = run(common::BIN, &["-M", "pc", "-m", "64", "-device", "?"]);
    assert_eq!((code, again.as_str()), (0, text.as_str()));
    let Some(q) = qemu() else { return };
    let (qcode, qtext, _) = run(&q, &["-device", "help"]);
    assert_eq!(qcode, 0);
    let theirs = entries(&qtext);
    for (name, ours) in &keel {
        let Some(t) = theirs.get(name) else {
            panic!("QEMU has no device type {name}");
        };
        assert_eq!(ours, t, "{name}");
    }
}

#[test]
fn driver_help_lists_properties_in_qemu_syntax() {
    let (code, text, err) = run(common::BIN, &["-device", "virtio-blk,help"]);
    assert_eq!(code, 0, "{err}");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("virtio-blk-pci options:"));
    let props: Vec<(&str, &str)> = lines
        .map(|l| {
            let l = l.strip_prefix("  ").unwrap();
            let decl = l.split_whitespace().next().unwrap();
            decl.split_once('=').unwrap()
        })
        .collect();
    assert!(props.windows(2).all(|w| w[0].0 < w[1].0), "sorted: {text}");
    assert!(props.contains(&("drive", "<str>")), "{text}");
    let (code, _, err) = run(common::BIN, &["-device", "nope,help"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("vmm: -device nope,help: 'nope' is not a valid device model name"),
        "{err}"
    );
    let Some(q) = qemu() else { return };
    let (_, qtext, _) = run(&q, &["-device", "virtio-blk-pci,help"]);
    // Each property Keel offers is one QEMU has, with the same type where QEMU's is a
    // plain scalar (QEMU's addr is an int32 "slot.fn", Keel's a string of the same syntax).
    // Keel's own additions, not in QEMU: `read-only` exposes the disk read-only from the
    // device side (QEMU only has it on the drive).
    const KEEL_ONLY: &[&str] = &["read-only"];
    for (name, ty) in props.into_iter().filter(|(n, _)| !KEEL_ONLY.contains(n)) {
        let theirs = qtext
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("QEMU's virtio-blk-pci has no {name}:\n{qtext}"));
        if name != "addr" && name != "drive" {
            assert!(theirs.starts_with(ty), "{name}: Keel {ty}, QEMU {theirs}");
        }
    }
}

/// QEMU's x86 aliases create the PCI type: `-device virtio-rng` and `device_add
/// virtio-blk` on `pc` make a `virtio-rng-pci` / `virtio-blk-pci`, listed under their real
/// type name.
#[test]
fn aliases_create_the_pci_type() {
    let dir = common::TempDir::new();
    let img = dir.path("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},if=none,format=raw,id=d0", img.display());
    let mut vmm = common::Vmm::start(&[
        "-S",
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-drive",
        &drive,
        "-device",
        "virtio-rng,id=rng0",
    ]);
    let mut c = vmm.qmp();
    c.ok(
        "device_add",
        serde_json::json!({"driver": "virtio-blk", "drive": "d0", "id": "disk0"}),
    );
    let pci = c.ok("query-pci", serde_json::Value::Null);
    let ids: Vec<(String, u64)> = pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["qdev_id"].as_str().unwrap().to_owned(),
                d["id"]["device"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(ids.contains(&("rng0".into(), 0x1005)), "{ids:?}");
    assert!(ids.contains(&("disk0".into(), 0x1001)), "{ids:?}");
    for (id, ty) in [("rng0", "virtio-rng-pci"), ("disk0", "virtio-blk-pci")] {
        let got = c.ok(
            "qom-get",
            serde_json::json!({"path": format!("/machine/peripheral/{id}"), "property": "type"}),
        );
        assert_eq!(got, ty);
    }
}
