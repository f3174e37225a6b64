//! libvirt 9.0's probe and domain-start requests against the binary: every reply is a
//! success or an error libvirt tolerates, with the shapes QEMU 7.2 gives. Where
//! `qemu-system-x86_64` is installed the same requests go to QEMU and the reply shapes (keys
//! and JSON types, not values) are compared.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, Vmm};
use serde_json::{Value, json};

/// libvirt 9.0's probe, in its order (`virQEMUCapsInitQMPMonitor`), with the error classes
/// it tolerates for each (empty: it must succeed).
fn probe() -> Vec<(Value, &'static [&'static str])> {
    let q = |name: &str, args: Value| {
        if args.is_null() {
            json!({"execute": name})
        } else {
            json!({"execute": name, "arguments": args})
        }
    };
    vec![
        (q("query-version", Value::Null), &[]),
        (q("query-target", Value::Null), &[]),
        (q("query-qmp-schema", Value::Null), &[]),
        (q("query-commands", Value::Null), &[]),
        (q("query-kvm", Value::Null), &[]),
        (q("qom-list-types", Value::Null), &[]),
        (q("qom-list-types", json!({"implements": "accel"})), &[]),
        (
            q(
                "qom-list-types",
                json!({"implements": "machine", "abstract": true}),
            ),
            &[],
        ),
        (
            q(
                "device-list-properties",
                json!({"typename": "virtio-blk-pci"}),
            ),
            &["DeviceNotFound"],
        ),
        (
            q(
                "device-list-properties",
                json!({"typename": "virtio-blk-device"}),
            ),
            &["DeviceNotFound"],
        ),
        (
            q(
                "qom-list-properties",
                json!({"typename": "memory-backend-file"}),
            ),
            &[],
        ),
        (
            q(
                "qom-list-properties",
                json!({"typename": "memory-backend-memfd"}),
            ),
            &[],
        ),
        (
            q("qom-list-properties", json!({"typename": "max-x86_64-cpu"})),
            &[],
        ),
        (
            q("qom-list-properties", json!({"typename": "none-machine"})),
            &[],
        ),
        (q("query-machines", Value::Null), &[]),
        (q("query-cpu-definitions", Value::Null), &[]),
        (q("query-tpm-models", Value::Null), &["CommandNotFound"]),
        (q("query-tpm-types", Value::Null), &["CommandNotFound"]),
        (q("query-command-line-options", Value::Null), &[]),
        (q("query-migrate-capabilities", Value::Null), &[]),
        (q("query-sev-capabilities", Value::Null), &["GenericError"]),
        (q("query-sgx-capabilities", Value::Null), &["GenericError"]),
        (
            q(
                "query-cpu-model-expansion",
                json!({"type": "static", "model": {"name": "max"}}),
            ),
            &[],
        ),
        (
            q(
                "query-cpu-model-expansion",
                json!({"type": "full", "model": {"name": "max"}}),
            ),
            &[],
        ),
        (q("query-iothreads", Value::Null), &[]),
        (q("query-named-block-nodes", json!({"flat": true})), &[]),
        (q("query-block", Value::Null), &[]),
        (q("query-blockstats", Value::Null), &[]),
        (q("query-stats-schemas", Value::Null), &[]),
        (q("query-stats", json!({"target": "vm"})), &[]),
        (q("query-dirty-rate", Value::Null), &[]),
        (q("query-chardev", Value::Null), &[]),
        (
            q(
                "set-action",
                json!({"shutdown": "poweroff", "reboot": "reset", "panic": "pause"}),
            ),
            &[],
        ),
        (q("qom-list", json!({"path": "/machine/peripheral"})), &[]),
        (
            q("human-monitor-command", json!({"command-line": "help"})),
            &[],
        ),
        (
            q(
                "human-monitor-command",
                json!({"command-line": "info status"}),
            ),
            &[],
        ),
        (
            q(
                "human-monitor-command",
                json!({"command-line": "info qtree"}),
            ),
            &[],
        ),
        (
            q(
                "human-monitor-command",
                json!({"command-line": "info mtree"}),
            ),
            &[],
        ),
    ]
}

/// A value's shape: object keys with their shapes, an array's first element, else the type.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => json!([a.first().map(shape).unwrap_or(Value::Null)]),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => Value::Null,
    }
}

/// Differences where Keel's reply has a key QEMU's has with another type (keys only one
/// side has are reported, not failed: Keel answers what it has).
fn compare(keel: &Value, qemu: &Value, path: &str, out: &mut Vec<String>) {
    match (keel, qemu) {
        (Value::Object(k), Value::Object(q)) => {
            for (key, kv) in k {
                match q.get(key) {
                    Some(qv) => compare(kv, qv, &format!("{path}.{key}"), out),
                    None => println!("  note: {path}.{key} only in Keel"),
                }
            }
        }
        (Value::Array(k), Value::Array(q)) => {
            if let (Some(k), Some(q)) = (k.first(), q.first()) {
                compare(k, q, &format!("{path}[0]"), out);
            }
        }
        (Value::Null, _) | (_, Value::Null) => {}
        (k, q) if k == q => {}
        (k, q) => out.push(format!("{path}: Keel {k}, QEMU {q}")),
    }
}

struct Peer {
    child: std::process::Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    _dir: TempDir,
}

impl Peer {
    fn start(args: &[&str]) -> Option<Peer> {
        let dir = TempDir::new();
        let sock = dir.path("qemu.sock");
        let spec = format!("unix:{},server=on,wait=off", sock.display());
        let child = Command::new("qemu-system-x86_64")
            .args(args)
            .args(["-qmp", &spec])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut p = Peer {
            child,
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            _dir: dir,
        };
        p.line();
        p.send(&json!({"execute": "qmp_capabilities"}));
        Some(p)
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap()
    }

    fn send(&mut self, req: &Value) -> Value {
        writeln!(self.writer, "{req}").unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu(args: &[&str]) -> Option<Peer> {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipping the QEMU comparison: qemu-system-x86_64 is not installed");
        return None;
    }
    let p = Peer::start(args);
    if p.is_none() {
        println!("skipping the QEMU comparison: qemu-system-x86_64 did not start");
    }
    p
}

fn keel_send(c: &mut common::Client, req: &Value) -> Value {
    c.request(&req.to_string())
}

fn check_and_compare(c: &mut common::Client, peer: &mut Option<Peer>, reqs: Vec<(Value, &[&str])>) {
    let mut bad = Vec::new();
    for (req, tolerated) in reqs {
        let r = keel_send(c, &req);
        if let Some(e) = r.get("error") {
            let class = e["class"].as_str().unwrap_or("");
            assert!(
                tolerated.contains(&class),
                "{req}: libvirt does not tolerate {r}"
            );
            continue;
        }
        assert!(r.get("return").is_some(), "{req}: {r}");
        if let Some(p) = peer.as_mut() {
            let q = p.send(&req);
            if let Some(qr) = q.get("return") {
                let mut diffs = Vec::new();
                compare(
                    &shape(&r["return"]),
                    &shape(qr),
                    &req["execute"].to_string(),
                    &mut diffs,
                );
                if !diffs.is_empty() {
                    bad.push(format!("{req}: {diffs:?}"));
                }
            } else {
                println!("  note: QEMU answered {req} with {q}");
            }
        }
    }
    assert!(
        bad.is_empty(),
        "reply shapes differ from QEMU's:\n{}",
        bad.join("\n")
    );
}

#[test]
fn libvirt_probe_sequence() {
    let args = [
        "-S",
        "-no-user-config",
        "-nodefaults",
        "-machine",
        "none,accel=tcg",
        "-display",
        "none",
    ];
    let mut vmm = Vmm::start(&args);
    let mut c = vmm.qmp();
    let mut peer = qemu(&args);
    check_and_compare(&mut c, &mut peer, probe());

    // What each new command says, beyond its shape.
    assert_eq!(c.ok("query-target", Value::Null), json!({"arch": "x86_64"}));
    let accels = c.ok("qom-list-types", json!({"implements": "accel"}));
    assert!(
        accels
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "tcg-accel"),
        "{accels}"
    );
    let machines = c.ok("qom-list-types", json!({"implements": "machine"}));
    for (name, parent) in [
        ("none-machine", "machine"),
        ("microvm-machine", "x86-machine"),
    ] {
        assert!(
            machines
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == name && t["parent"] == parent),
            "{machines}"
        );
    }
    assert_eq!(
        c.ok(
            "qom-list-properties",
            json!({"typename": "memory-backend-file"})
        ),
        json!([])
    );
    c.err(
        "qom-list-properties",
        json!({"typename": "nosuch"}),
        "DeviceNotFound",
    );
    let m = c.ok("query-machines", Value::Null);
    let microvm = m
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "microvm")
        .unwrap();
    // QEMU's default: libvirt resolves it against its own CPU map, which has no `max`.
    assert_eq!(microvm["default-cpu-type"], "qemu64-x86_64-cpu");
    let defs = c.ok("query-cpu-definitions", Value::Null);
    let qemu64 = defs
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "qemu64")
        .unwrap();
    // Truthful: what QEMU's qemu64 has and Keel's model lacks is listed as unavailable.
    assert!(qemu64["unavailable-features"].is_array(), "{qemu64}");
    assert_eq!(microvm["default-ram-id"], "microvm.ram");
    let exp = c.ok(
        "query-cpu-model-expansion",
        json!({"type": "static", "model": {"name": "max"}}),
    );
    assert_eq!(exp["model"]["name"], "base");
    assert_eq!(exp["model"]["props"]["sse2"], true);
    assert_eq!(exp["model"]["props"]["lm"], true);
    assert_eq!(exp["model"]["props"]["avx512f"], false);
    let full = json!({"type": "full", "model": {"name": "base", "props": exp["model"]["props"]}});
    assert_eq!(
        c.ok("query-cpu-model-expansion", full)["model"]["props"]["sse2"],
        true
    );
    let d = c.err(
        "query-cpu-model-expansion",
        json!({"type": "full", "model": {"name": "nosuch"}}),
        "GenericError",
    );
    assert_eq!(d, "CPU model 'nosuch' not found");
    assert_eq!(
        c.err("query-sev-capabilities", Value::Null, "GenericError"),
        "KVM not enabled"
    );
    assert_eq!(
        c.err("query-sgx-capabilities", Value::Null, "GenericError"),
        "SGX is not enabled in KVM"
    );
    // `events` (the MIGRATION event) is the capability libvirt sets at start; the others
    // are QEMU's names Keel does not have.
    assert_eq!(
        c.ok("query-migrate-capabilities", Value::Null),
        json!([{"capability": "events", "state": false}])
    );
    c.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    assert_eq!(
        c.ok("query-migrate-capabilities", Value::Null),
        json!([{"capability": "events", "state": true}])
    );
    let d = c.err(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "xbzrle", "state": true}]}),
        "GenericError",
    );
    assert!(d.contains("'xbzrle'"), "{d}");
    c.err("query-tpm-models", Value::Null, "CommandNotFound");
    let d = c.err(
        "blockdev-del",
        json!({"node-name": "nosuch"}),
        "GenericError",
    );
    assert_eq!(d, "Failed to find node with node-name='nosuch'");
    let chardevs = c.ok("query-chardev", Value::Null);
    assert_eq!(chardevs[0]["label"], "compat_monitor0", "{chardevs}");
    let help = c.ok("human-monitor-command", json!({"command-line": "help"}));
    assert!(
        help.as_str()
            .unwrap()
            .contains("info [subcommand] -- show various information")
    );
    let unknown = c.ok("human-monitor-command", json!({"command-line": "nosuch"}));
    assert_eq!(unknown, "unknown command: 'nosuch'\r\n");
    let regs = c.ok(
        "human-monitor-command",
        json!({"command-line": "info registers"}),
    );
    assert_eq!(regs, "No CPU available\r\n");
    c.ok("quit", Value::Null);
}

#[test]
fn domain_start_requests_on_microvm() {
    let dir = TempDir::new();
    let image = dir.path("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let blockdev = format!("driver=file,filename={},node-name=d0", image.display());
    let args = [
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "microvm,accel=tcg",
        "-smp",
        "2",
        "-m",
        "256",
        "-serial",
        "null",
        "-blockdev",
        &blockdev,
        "-device",
        "virtio-blk-device,drive=d0,id=vd0",
    ];
    let mut vmm = Vmm::start(&args);
    let mut c = vmm.qmp();
    let mut peer = qemu(&args);
    let q = |name: &str, args: Value| json!({"execute": name, "arguments": args});
    let reqs: Vec<(Value, &[&str])> = vec![
        (json!({"execute": "query-cpus-fast"}), &[]),
        (json!({"execute": "query-block"}), &[]),
        (json!({"execute": "query-named-block-nodes"}), &[]),
        (json!({"execute": "query-chardev"}), &[]),
        (q("qom-list", json!({"path": "/machine/peripheral"})), &[]),
        (
            q(
                "qom-get",
                json!({"path": "/machine/unattached/device[0]", "property": "sse2"}),
            ),
            &[],
        ),
        (
            q(
                "human-monitor-command",
                json!({"command-line": "info cpus"}),
            ),
            &[],
        ),
    ];
    check_and_compare(&mut c, &mut peer, reqs);

    let cpus = c.ok("query-cpus-fast", Value::Null);
    for (i, cpu) in cpus.as_array().unwrap().iter().enumerate() {
        assert!(cpu["thread-id"].as_i64().unwrap() > 0, "{cpu}");
        assert_eq!(
            cpu["props"],
            json!({"core-id": i, "thread-id": 0, "socket-id": 0})
        );
    }
    let path = cpus[0]["qom-path"].as_str().unwrap().to_owned();
    let props = c.ok("qom-list", json!({"path": path}));
    assert!(
        props
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "sse2" && p["type"] == "bool")
    );
    assert_eq!(
        c.ok("qom-get", json!({"path": path, "property": "sse2"})),
        true
    );
    assert_eq!(
        c.ok("qom-get", json!({"path": path, "property": "avx512f"})),
        false
    );
    let block = c.ok("query-block", Value::Null);
    assert_eq!(block[0]["qdev"], "vd0");
    assert_eq!(block[0]["inserted"]["node-name"], "d0");
    assert_eq!(
        c.err("blockdev-del", json!({"node-name": "d0"}), "GenericError"),
        "Node d0 is in use"
    );
    let chardevs = c.ok("query-chardev", Value::Null);
    assert!(
        chardevs
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["label"] == "serial0" && d["filename"] == "null")
    );
    let regs = c.ok(
        "human-monitor-command",
        json!({"command-line": "info registers"}),
    );
    assert!(
        regs.as_str().unwrap().starts_with("\r\nCPU#0\r\n"),
        "{regs}"
    );
    assert!(regs.as_str().unwrap().contains("CR0="), "{regs}");
    let qtree = c.ok(
        "human-monitor-command",
        json!({"command-line": "info qtree"}),
    );
    assert!(
        qtree
            .as_str()
            .unwrap()
            .contains("dev: virtio-blk-device, id \"vd0\""),
        "{qtree}"
    );
    c.ok("quit", Value::Null);
}
