//! QEMU's tests/qtest/qmp-test.c cases and the QMP spec's edge cases, against the real
//! binary over a real unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{Client, Vmm};
use serde_json::{Value, json};

/// M1-M11 with their expected desc; `None` desc means "any", as qmp-test checks only the
/// class. After each, `{'execute':'no-such-cmd'}` must give CommandNotFound.
const MALFORMED: [(&[u8], &str, Option<&str>); 11] = [
    (
        b"{]\n",
        "GenericError",
        Some("JSON parse error, expecting value"),
    ),
    (b"{\xff", "GenericError", None),
    (b"{\x01", "GenericError", None),
    (b"{'bad \xff", "GenericError", None),
    (b"{'execute': 'nonexistent', 'id':'\n", "GenericError", None),
    (b"%p\n", "GenericError", Some("JSON parse error, stray '%'")),
    (
        b"null\n",
        "GenericError",
        Some("QMP input must be a JSON object"),
    ),
    (
        b"{}\n",
        "GenericError",
        Some("QMP input lacks member 'execute'"),
    ),
    (
        b"{ 'execute': true }\n",
        "GenericError",
        Some("QMP input member 'execute' must be a string"),
    ),
    (
        b"{ 'execute': 'no-such-cmd', 'arguments': [] }\n",
        "GenericError",
        Some("QMP input member 'arguments' must be an object"),
    ),
    (
        b"{ 'execute': 'no-such-cmd', 'extra': true }\n",
        "GenericError",
        Some("QMP input member 'extra' is unexpected"),
    ),
];

fn assert_recovered(c: &mut Client, negotiated: bool) {
    let r = c.request("{'execute':'no-such-cmd'}\n");
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    let want = if negotiated {
        "The command no-such-cmd has not been found"
    } else {
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    };
    assert_eq!(r["error"]["desc"], want);
}

fn malformed(c: &mut Client, negotiated: bool) {
    for (i, (input, class, desc)) in MALFORMED.iter().enumerate() {
        c.send_raw(input);
        let r = c.recv();
        assert_eq!(r["error"]["class"], *class, "M{}: {r}", i + 1);
        if let Some(d) = desc {
            assert_eq!(r["error"]["desc"], *d, "M{}", i + 1);
        }
        // M5: a request that did not parse never echoes its id.
        assert!(r.get("id").is_none(), "M{}: {r}", i + 1);
        assert_recovered(c, negotiated);
    }
}

fn is_version_info(v: &Value) {
    for k in ["major", "minor", "micro"] {
        assert!(v["qemu"][k].is_u64(), "{v}");
    }
    assert!(v["package"].as_str().unwrap().starts_with("keel "), "{v}");
}

#[test]
fn qmp_protocol_p1_to_p9() {
    for preconfig in [false, true] {
        let mut vmm = if preconfig {
            Vmm::start_none(&["-preconfig"])
        } else {
            Vmm::start_none(&[])
        };
        let mut c = vmm.connect();
        // P1
        is_version_info(&c.greeting["QMP"]["version"]);
        assert!(c.greeting["QMP"]["capabilities"].is_array());
        // P2
        let r = c.request("{ 'execute': 'query-version' }");
        assert_eq!(r["error"]["class"], "CommandNotFound");
        // P3
        malformed(&mut c, false);
        // P4
        assert_eq!(
            c.request("{ 'execute': 'qmp_capabilities' }"),
            json!({"return": {}})
        );
        // P5
        let r = c.request("{ 'execute': 'qmp_capabilities' }");
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "Capabilities negotiation is already complete, command ignored"
        );
        // P6
        let r = c.request("{ 'execute': 'query-version' }");
        is_version_info(&r["return"]);
        // P7
        malformed(&mut c, true);
        // P8
        let r = c.request("{ 'execute': 'query-name', 'id': 'cookie#1' }");
        assert!(r["return"].is_object());
        assert_eq!(r["id"], "cookie#1");
        // P9
        let r = c.request("{ 'execute': 'human-monitor-command', 'id': 2 }");
        assert_eq!(r["error"]["class"], "GenericError");
        assert_eq!(r["error"]["desc"], "Parameter 'command-line' is missing");
        assert_eq!(r["id"], 2);
        assert!(r["id"].is_u64());
    }
}

/// qmp-test's `oob` cases O1-O4 (O5/O6 need a blocking command; the keel-qmp crate's
/// tests/oob.rs covers them), plus the OOB-capable yank commands.
#[test]
fn qmp_oob_o1_to_o4() {
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.connect();
    // O1
    assert_eq!(c.greeting["QMP"]["capabilities"][0], "oob");
    // O2
    let r = c.request(
        "{ 'execute': 'qmp_capabilities', 'arguments': { 'enable': [ 'cap-does-not-exist' ] } }",
    );
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'null' does not accept value 'cap-does-not-exist'"
    );
    // O3
    let r = c.request("{ 'execute': 'qmp_capabilities', 'arguments': { 'enable': [ 'oob' ] } }");
    assert_eq!(r, json!({"return": {}}));
    // O4
    let r = c.request("{ 'exec-oob': 'query-cpus-fast' }");
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(
        r["error"]["desc"],
        "The command query-cpus-fast does not support OOB"
    );
    let r = c.request("{ 'exec-oob': 'query-yank', 'id': 1 }");
    assert_eq!(r, json!({"return": [], "id": 1}));
    let r = c.request("{ 'exec-oob': 'yank', 'arguments': { 'instances': [] }, 'id': 2 }");
    assert_eq!(r, json!({"return": {}, "id": 2}));
    let r = c.request(
        "{ 'exec-oob': 'yank', 'arguments': { 'instances': [ { 'type': 'migration' } ] } }",
    );
    assert_eq!(r["error"]["class"], "DeviceNotFound");
    // In-band use is unchanged.
    let r = c.request("{ 'execute': 'query-yank', 'id': 3 }");
    assert_eq!(r, json!({"return": [], "id": 3}));
    // query-qmp-schema marks them allow-oob.
    let r = c.request("{ 'execute': 'query-qmp-schema' }");
    let schema = r["return"].as_array().unwrap();
    let find = |n: &str| schema.iter().find(|e| e["name"] == n).unwrap();
    assert_eq!(find("yank")["allow-oob"], true);
    assert_eq!(find("query-yank")["allow-oob"], true);
    assert!(find("query-cpus-fast").get("allow-oob").is_none());
}

#[test]
fn qmp_preconfig_c1_to_c7() {
    let mut vmm = Vmm::start_none(&["-preconfig"]);
    let mut c = vmm.qmp();
    // C1
    assert!(c.ok("query-commands", Value::Null).is_array());
    // C2
    c.err("query-cpus-fast", Value::Null, "OutOfPhase");
    // C3
    assert_eq!(c.status(), "prelaunch");
    // C4
    c.ok("x-exit-preconfig", Value::Null);
    assert_eq!(c.next_event()["event"], "RESUME");
    // C5
    assert_eq!(c.status(), "running");
    // C6
    let d = c.err("x-exit-preconfig", Value::Null, "OutOfPhase");
    assert!(
        d.contains("permitted only before machine initialization"),
        "{d}"
    );
    // C7
    assert!(c.ok("query-cpus-fast", Value::Null).is_array());
}

#[test]
fn missing_any_argument() {
    let mut vmm = Vmm::start_none(&["-S"]);
    let mut c = vmm.qmp();
    let d = c.err("device_add", json!({"id": "x"}), "GenericError");
    assert_eq!(d, "Parameter 'driver' is missing");
    let d = c.err("machine-done", json!({"bogus": 1}), "OutOfPhase");
    assert!(d.starts_with("'machine-done' is not allowed in phase machine-ready"));
    let d = c.err(
        "human-monitor-command",
        json!({"command-line": "info status", "cpu-index": "x"}),
        "GenericError",
    );
    assert_eq!(
        d,
        "Invalid parameter type for 'cpu-index', expected: integer"
    );
    let d = c.err(
        "human-monitor-command",
        json!({"command-line": "info status", "foo": 1}),
        "GenericError",
    );
    assert_eq!(d, "Parameter 'foo' is unexpected");
}

#[test]
fn ids_of_every_json_type_are_echoed() {
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.qmp();
    for id in [
        json!(1),
        json!(-7),
        json!(1.5),
        json!("s"),
        json!(true),
        json!(null),
        json!([1, {"a": "b"}]),
        json!({"x": [null]}),
        json!(18446744073709551615u64),
    ] {
        let req = json!({"execute": "query-status", "id": id});
        let r = c.request(&req.to_string());
        assert_eq!(r["id"], id);
        let req = json!({"execute": "nope", "id": id});
        let r = c.request(&req.to_string());
        assert_eq!(r["id"], id);
        assert_eq!(r["error"]["class"], "CommandNotFound");
    }
    // Check errors carry the id too (qmp-test O6: `{ 'id': 'err-2' }`).
    let r = c.request("{ 'id': 'err-2' }");
    assert_eq!(r["id"], "err-2");
    assert_eq!(r["error"]["desc"], "QMP input lacks member 'execute'");
}

#[test]
fn wire_format_is_exact() {
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.connect();
    c.send_raw(b"{\"execute\": \"qmp_capabilities\"}");
    assert_eq!(c.read_raw_line(), "{\"return\": {}}\r\n");
    c.send_raw("{\"execute\": \"query-name\", \"id\": \"é\"}".as_bytes());
    assert_eq!(
        c.read_raw_line(),
        "{\"return\": {}, \"id\": \"\\u00E9\"}\r\n"
    );
    c.send_raw(b"{'execute': 'query-status', 'id': 'it''s'}");
    // A bad request in single quotes (two adjacent strings) is one error, then recovery.
    let r = c.recv();
    assert_eq!(r["error"]["class"], "GenericError");
    let r = c.request("{'execute': 'query-name', 'id': 'it\\'s'}");
    assert_eq!(r["id"], "it's");
}

#[test]
fn split_and_batched_requests_are_answered_in_order() {
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.qmp();
    // One byte per write.
    let req = b"{'execute': 'query-phase', 'id': 'split'}";
    for b in req {
        c.send_raw(&[*b]);
        std::thread::sleep(Duration::from_micros(200));
    }
    let r = c.recv();
    assert_eq!(r["id"], "split");
    assert_eq!(r["return"]["phase"], "machine-ready");
    // Many in one write, with garbage in between.
    let mut batch = String::new();
    for i in 0..50 {
        batch.push_str(&format!("{{'execute': 'query-status', 'id': {i}}}"));
        if i == 25 {
            batch.push('\x01');
        }
    }
    c.send_raw(batch.as_bytes());
    for i in 0..50 {
        let r = c.recv();
        if i == 26 {
            // The stray control character is answered in its place.
            assert_eq!(r["error"]["class"], "GenericError", "{r}");
            let r = c.recv();
            assert_eq!(r["id"], 26);
        } else {
            assert_eq!(r["id"], i, "{r}");
        }
    }
}

#[test]
fn bounds_are_errors_not_crashes() {
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.qmp();
    // 1025 open brackets: one nesting error; the closing brackets that follow are each
    // a stray ']' (as QEMU answers them); then the connection still works.
    c.send_raw(&[b'['; 1025]);
    let r = c.recv();
    assert_eq!(r["error"]["desc"], "JSON nesting depth limit exceeded");
    c.send_raw(b"\xff");
    let r = c.recv();
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(c.status(), "running");
    // Deep but legal nesting inside arguments is validated, not trusted.
    let deep = format!(
        "{{'execute': 'query-status', 'arguments': {{'x': {}1{}}}}}",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let r = c.request(&deep);
    assert_eq!(r["error"]["desc"], "Parameter 'x' is unexpected");
}

#[test]
fn unix_socket_is_private() {
    let mut vmm = Vmm::start_none(&[]);
    let _c = vmm.connect();
    let mode = std::fs::metadata(&vmm.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn several_clients_each_negotiate_and_all_get_events() {
    let mut vmm = Vmm::start_none(&["-S"]);
    let mut a = vmm.qmp();
    let mut b = vmm.qmp();
    let mut silent = vmm.connect(); // never negotiates
    // A command from a negotiating client does not reach the others' negotiation.
    let r = silent.request("{'execute': 'query-status'}");
    assert_eq!(r["error"]["class"], "CommandNotFound");
    a.ok("cont", Value::Null);
    assert_eq!(a.next_event()["event"], "RESUME");
    let ev = b.next_event();
    assert_eq!(ev["event"], "RESUME");
    assert!(ev["timestamp"]["seconds"].as_i64().unwrap() > 0);
    let us = ev["timestamp"]["microseconds"].as_i64().unwrap();
    assert!((0..1_000_000).contains(&us));
    b.ok("stop", Value::Null);
    assert_eq!(b.next_event()["event"], "STOP");
    assert_eq!(a.next_event()["event"], "STOP");
    // The client still in negotiation got nothing: its next line is its own reply.
    let r = silent.request("{'execute': 'qmp_capabilities', 'id': 'late'}");
    assert_eq!(r["id"], "late");
    assert!(silent.events.is_empty());
    // Now it gets events too.
    a.ok("cont", Value::Null);
    assert_eq!(silent.next_event()["event"], "RESUME");
    // quit: reply first, then SHUTDOWN to everyone, then the connection closes.
    let r = a.cmd("quit", Value::Null);
    assert_eq!(r, json!({"return": {}}));
    for c in [&mut a, &mut b, &mut silent] {
        let ev = loop {
            let ev = c.next_event();
            if ev["event"] == "SHUTDOWN" {
                break ev;
            }
        };
        assert_eq!(
            ev["data"],
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
    }
    assert!(vmm.wait().success());
    assert!(!vmm.sock.exists(), "socket left behind");
}

#[test]
fn run_state_commands_and_events() {
    let mut vmm = Vmm::start_none(&["-S"]);
    let mut c = vmm.qmp();
    assert_eq!(c.status(), "prelaunch");
    let hmp = c.ok(
        "human-monitor-command",
        json!({"command-line": "info status"}),
    );
    assert_eq!(hmp, "VM status: paused (prelaunch)\r\n");
    // stop before the first cont changes nothing and emits nothing.
    c.ok("stop", Value::Null);
    assert_eq!(c.status(), "prelaunch");
    c.ok("cont", Value::Null);
    assert_eq!(c.next_event()["event"], "RESUME");
    assert_eq!(
        c.ok("query-status", Value::Null),
        json!({"running": true, "singlestep": false, "status": "running"})
    );
    c.ok("stop", Value::Null);
    assert_eq!(c.next_event()["event"], "STOP");
    assert_eq!(
        c.ok(
            "human-monitor-command",
            json!({"command-line": "info status"})
        ),
        "VM status: paused\r\n"
    );
    c.ok("system_reset", Value::Null);
    let ev = c.next_event();
    assert_eq!(ev["event"], "RESET");
    assert_eq!(ev["data"]["reason"], "host-qmp-system-reset");
    let v = c.ok(
        "human-monitor-command",
        json!({"command-line": "info version"}),
    );
    assert!(v.as_str().unwrap().starts_with("7.2.0 (keel "), "{v}");
    // The none machine has no vCPU: QEMU's answer.
    let r = c.ok(
        "human-monitor-command",
        json!({"command-line": "info registers"}),
    );
    assert_eq!(r, "No CPU available\r\n");
    assert!(c.events.is_empty());
}

#[test]
fn introspection() {
    let mut vmm = Vmm::start_none(&["-preconfig"]);
    let mut c = vmm.qmp();
    let cmds = c.ok("query-commands", Value::Null);
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "query-name",
        "query-status",
        "query-phase",
        "query-machines",
        "query-accels",
        "machine-set",
        "accel-set",
        "machine-init",
        "machine-done",
        "x-exit-preconfig",
        "cont",
        "stop",
        "quit",
        "query-cpus-fast",
        "human-monitor-command",
    ] {
        assert!(names.contains(&n), "{n} missing");
    }
    let dev = cmds
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "device_add")
        .unwrap();
    assert_eq!(dev["phases"], json!(["machine-init", "machine-ready"]));
    // query-qmp-schema: every referenced type is defined, every entity well formed.
    let schema = c.ok("query-qmp-schema", Value::Null);
    let list = schema.as_array().unwrap();
    let defined: std::collections::HashSet<&str> =
        list.iter().map(|e| e["name"].as_str().unwrap()).collect();
    let refs = |e: &Value| -> Vec<String> {
        let mut v = Vec::new();
        for k in ["arg-type", "ret-type", "element-type"] {
            if let Some(s) = e[k].as_str() {
                v.push(s.to_owned());
            }
        }
        if let Some(ms) = e["members"].as_array() {
            for m in ms {
                if let Some(t) = m["type"].as_str() {
                    v.push(t.to_owned());
                }
            }
        }
        v
    };
    for e in list {
        let meta = e["meta-type"].as_str().unwrap();
        assert!(
            [
                "builtin",
                "enum",
                "array",
                "object",
                "alternate",
                "command",
                "event"
            ]
            .contains(&meta),
            "{e}"
        );
        for r in refs(e) {
            assert!(
                defined.contains(r.as_str()),
                "{} refers to undefined {r}",
                e["name"]
            );
        }
    }
    let hmc = list
        .iter()
        .find(|e| e["name"] == "human-monitor-command")
        .unwrap();
    assert_eq!(hmc["meta-type"], "command");
    assert_eq!(hmc["ret-type"], "str");
    let machines = c.ok("query-machines", Value::Null);
    let default: Vec<&Value> = machines
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["is-default"] == true)
        .collect();
    assert_eq!(default.len(), 1);
    assert_eq!(default[0]["name"], "microvm");
    let accels = c.ok("query-accels", Value::Null);
    assert!(
        accels
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "tcg" && a["available"] == true)
    );
}

#[test]
fn pure_qmp_configuration_with_accel_fallback() {
    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    assert_eq!(c.phase(), "no-machine");
    let d = c.err(
        "machine-set",
        json!({"type": "microvm", "memory": 268435456, "hpet": "on"}),
        "GenericError",
    );
    assert_eq!(d, "Property 'microvm-machine.hpet' not found");
    let d = c.err("machine-set", json!({"type": "q35"}), "GenericError");
    assert!(d.contains("unsupported machine type 'q35'"), "{d}");
    assert_eq!(c.phase(), "no-machine");
    c.ok("machine-set", json!({"type": "none"}));
    c.ok("machine-set", json!({"cpus": 1}));
    let d = c.err("machine-set", json!({"pit": "off"}), "GenericError");
    assert_eq!(d, "Property 'none-machine.pit' not found");
    let d = c.err("machine-set", json!({"type": "microvm"}), "GenericError");
    assert!(d.contains("cannot change"), "{d}");
    let d = c.err(
        "accel-set",
        json!({"accel": ["hvf", "whpx"]}),
        "GenericError",
    );
    assert!(d.contains("hvf: no accelerator of that name"), "{d}");
    assert_eq!(c.phase(), "machine-created");
    let r = c.ok("accel-set", json!({"accel": ["hvf", "tcg"]}));
    assert_eq!(r["accel"], "tcg");
    assert_eq!(r["rejected"][0]["accel"], "hvf");
    let accels = c.ok("query-accels", Value::Null);
    assert!(
        accels
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "tcg" && a["selected"] == true)
    );
    assert_eq!(c.ok("query-kvm", Value::Null)["enabled"], false);
    c.ok("machine-init", Value::Null);
    let d = c.err(
        "device_add",
        json!({"driver": "virtio-rng-device"}),
        "GenericError",
    );
    assert!(d.contains("bus found"), "{d}");
    c.ok("machine-done", Value::Null);
    assert_eq!(c.phase(), "machine-ready");
    assert_eq!(c.status(), "prelaunch");
    assert!(c.events.is_empty());
}

#[test]
fn kvm_is_chosen_where_dev_kvm_opens() {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let mut vmm = Vmm::start(&["-preconfig", "-machine", "none"]);
    let mut c = vmm.qmp();
    // -preconfig with a machine stops once the accelerator exists (default: kvm, tcg).
    assert_eq!(c.phase(), "accel-created");
    let info = c.ok("query-kvm", Value::Null);
    assert_eq!(info, json!({"enabled": kvm, "present": kvm}));
}

#[test]
fn missing_any_arg_qom_set() {
    // qmp-test "missing-any-arg": a missing argument of type 'any' is still missing.
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.qmp();
    let d = c.err(
        "qom-set",
        json!({"path": "/machine", "property": "rtc-time"}),
        "GenericError",
    );
    assert_eq!(d, "Parameter 'value' is missing");
    let d = c.err(
        "qom-set",
        json!({"path": "/machine", "property": "rtc-time", "value": 1}),
        "GenericError",
    );
    assert_eq!(d, "Property 'none-machine.rtc-time' not found");
    c.err(
        "qom-set",
        json!({"path": "/nowhere", "property": "x", "value": 1}),
        "DeviceNotFound",
    );
}

#[test]
fn embedding_api_without_json() {
    use vmm::commands::*;
    let v = vmm::Vmm::new();
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = ran.clone();
    v.on_machine_ready(Box::new(move || {
        r.store(true, std::sync::atomic::Ordering::SeqCst)
    }));
    let events = v.events().subscribe();
    let e = v.execute(Cont {}).unwrap_err();
    assert_eq!(e.class(), keel_qmp::ErrorClass::OutOfPhase);
    v.execute(MachineSet {
        type_name: Some("none".into()),
        ..Default::default()
    })
    .unwrap();
    let choice = v
        .execute(AccelSet {
            accel: AccelList::Many(vec!["nope".into(), "tcg".into()]),
        })
        .unwrap();
    assert_eq!(choice.accel, "tcg");
    assert_eq!(choice.rejected[0].accel, "nope");
    v.set_autostart(false);
    v.execute(MachineDone {}).unwrap();
    assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(
        v.execute(QueryPhase {}).unwrap().phase,
        keel_phase::Phase::MachineReady
    );
    v.execute(Cont {}).unwrap();
    assert_eq!(events.try_recv().unwrap().name, "RESUME");
    assert!(v.execute(QueryStatus {}).unwrap().running);
}

#[test]
fn hmp_info_commands_answer_as_qemu() {
    // A real (paused) machine with two vCPUs under the interpreter.
    let mut vmm = Vmm::start(&[
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
        "-name",
        "keel-hmp",
        "-S",
    ]);
    let mut c = vmm.qmp();
    let hmp = |c: &mut common::Client, line: &str| {
        c.ok("human-monitor-command", json!({ "command-line": line }))
    };
    assert_eq!(hmp(&mut c, "info name"), "keel-hmp\r\n");
    let kvm = c.ok("query-kvm", Value::Null);
    let want = match (kvm["present"].as_bool(), kvm["enabled"].as_bool()) {
        (Some(true), Some(true)) => "kvm support: enabled\r\n",
        (Some(true), _) => "kvm support: disabled\r\n",
        _ => "kvm support: not compiled\r\n",
    };
    assert_eq!(hmp(&mut c, "info kvm"), want);
    assert_eq!(kvm["enabled"], false, "tcg was asked for");
    // One line per vCPU with the thread query-cpus-fast reports; the first is current.
    let cpus = c.ok("query-cpus-fast", Value::Null);
    let lines: Vec<String> = cpus
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, cpu)| {
            format!(
                "{} CPU #{}: thread_id={}\r\n",
                if i == 0 { '*' } else { ' ' },
                cpu["cpu-index"],
                cpu["thread-id"]
            )
        })
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(hmp(&mut c, "info cpus"), lines.concat());
    let mtree = hmp(&mut c, "info mtree");
    assert!(
        mtree
            .as_str()
            .unwrap()
            .starts_with("address-space: I/O\r\n"),
        "{mtree}"
    );
    // An HMP command Keel does not have: QEMU's answer for an unknown one.
    assert_eq!(
        hmp(&mut c, "info balloon"),
        "unknown command: 'info balloon'\r\n"
    );
}
