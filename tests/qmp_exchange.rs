//! A recorded QMP exchange, replayed against the binary and compared byte for byte: the
//! introspection answers (`query-qmp-schema`, `query-commands`), the queries, every
//! command's error for an unknown and for missing arguments (out of phase and in phase),
//! and the lifecycle up to `quit`. Timestamps are masked. Replies must match in place;
//! events must match as a sequence (another thread may write one after the next reply).
//!
//! Re-record (only when a reply is meant to change): `KEEL_QMP_RECORD=1 cargo test -p vmm
//! --test qmp_exchange`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, Write};
use std::time::Duration;

use common::{Client, Vmm};
use serde_json::{Value, json};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/qmp-exchange.txt"
);

/// Requests whose replies depend on whether `/dev/kvm` opens on the host.
const HOST_DEPENDENT: [&str; 3] = ["query-accels", "query-kvm", "info kvm"];

fn kvm_here() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Replaces the digits of `"seconds": N, "microseconds": M` with zeros.
fn mask_timestamp(line: &str) -> String {
    let key = "\"timestamp\": {";
    let Some(at) = line.find(key) else {
        return line.to_owned();
    };
    let start = at + key.len();
    let end = start + line[start..].find('}').unwrap();
    let masked: String = line[start..end]
        .split(", ")
        .map(|kv| {
            let (k, _) = kv.split_once(": ").unwrap();
            format!("{k}: 0")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("{}{}{}", &line[..start], masked, &line[end..])
}

/// Reads one raw line without its CRLF; `None` at end of stream.
fn read_line(c: &mut Client) -> Option<String> {
    let mut line = String::new();
    match c.reader.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => {
            assert!(line.ends_with("\r\n"), "not CRLF-terminated: {line:?}");
            Some(mask_timestamp(line.trim_end_matches("\r\n")))
        }
        Err(e) => panic!("read failed: {e}"),
    }
}

fn is_event(line: &str) -> bool {
    line.starts_with("{\"timestamp\"") || line.starts_with("{\"event\"")
}

/// Sends `req` and reads up to its reply; returns (events seen, reply), or what went
/// wrong with the connection.
fn exchange(c: &mut Client, req: &str) -> Result<(Vec<String>, String), String> {
    c.writer
        .write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("sending failed: {e}"))?;
    let mut events = Vec::new();
    loop {
        let line = read_line(c).ok_or("connection closed before the reply")?;
        if is_event(&line) {
            events.push(line);
        } else {
            return Ok((events, line));
        }
    }
}

/// The sessions: the command line and the requests.
fn script(schema: &[Value], commands: &[String]) -> Vec<(Vec<&'static str>, Vec<String>)> {
    // Commands with a required argument, from the schema.
    let arg_type = |name: &str| -> Option<&Value> {
        let cmd = schema
            .iter()
            .find(|e| e["meta-type"] == "command" && e["name"] == name)?;
        schema.iter().find(|e| e["name"] == cmd["arg-type"])
    };
    let needs_args = |name: &str| {
        arg_type(name).is_some_and(|t| {
            t["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m.get("default").is_none()))
        })
    };
    // The required members with a value of their type, and one unknown member.
    let with_unknown = |name: &str| {
        let mut args = serde_json::Map::new();
        let members = arg_type(name).and_then(|t| t["members"].as_array().cloned());
        for m in members.unwrap_or_default() {
            if m.get("default").is_some() {
                continue;
            }
            let v = match m["type"].as_str().unwrap() {
                "str" => json!("x"),
                "int" | "size" => json!(1),
                "bool" => json!(true),
                t if t.starts_with('[') => json!([]),
                _ => json!("x"),
            };
            args.insert(m["name"].as_str().unwrap().to_owned(), v);
        }
        args.insert("x-no-such-arg".to_owned(), json!(1));
        Value::Object(args)
    };
    let sweep = || {
        let mut out = Vec::new();
        for name in commands {
            out.push(json!({"execute": name, "arguments": with_unknown(name)}).to_string());
            if needs_args(name) {
                out.push(json!({"execute": name, "arguments": {}}).to_string());
            }
        }
        out
    };
    let q = |name: &str| json!({"execute": name}).to_string();
    let a = |name: &str, args: Value| json!({"execute": name, "arguments": args}).to_string();
    let hmp = |line: &str| a("human-monitor-command", json!({"command-line": line}));

    let mut s1 = vec![
        q("query-status"),
        q("qmp_capabilities"),
        q("qmp_capabilities"),
        q("query-qmp-schema"),
        q("query-commands"),
        q("query-version"),
        q("query-machines"),
        q("query-accels"),
        q("query-kvm"),
        q("query-status"),
        q("query-phase"),
        q("query-name"),
        q("query-yank"),
        q("no-such-command"),
        "{\"execute\": \"query-name\", \"id\": [1, {\"a\": null}]}".to_owned(),
    ];
    s1.extend(sweep());
    s1.extend([
        a("machine-set", json!({"type": "no-such-machine"})),
        a("machine-set", json!({"type": "none", "memory": 1048576})),
        q("query-phase"),
        a("accel-set", json!({"accel": ["no-such-accel", "tcg"]})),
        q("query-accels"),
        q("query-phase"),
        q("machine-init"),
        q("query-phase"),
        a("device_add", json!({"driver": "no-such-device"})),
        a(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "d0", "filename": "/nonexistent"}),
        ),
        a("netdev_add", json!({"type": "user", "id": "n0"})),
        a(
            "netdev_add",
            json!({"type": "tap", "id": "n0", "script": "/bin/true"}),
        ),
        a(
            "chardev-add",
            json!({"id": "c0", "backend": {"type": "null", "data": {}}}),
        ),
        a(
            "chardev-add",
            json!({"id": "c0", "backend": {"type": "socket", "data": {}}}),
        ),
        q("machine-done"),
        q("x-exit-preconfig"),
        q("query-phase"),
        q("query-status"),
        q("query-cpus-fast"),
    ]);
    s1.extend(sweep());
    s1.extend([
        q("stop"),
        q("query-status"),
        q("cont"),
        q("query-status"),
        q("stop"),
        hmp("info status"),
        q("system_reset"),
        q("system_powerdown"),
        hmp("info version"),
        hmp("info kvm"),
        hmp("info cpus"),
        hmp("info name"),
        hmp("info registers"),
        a("qom-list", json!({"path": "/machine"})),
        a("qom-get", json!({"path": "/machine", "property": "type"})),
        a(
            "qom-set",
            json!({"path": "/machine", "property": "no-such", "value": 1}),
        ),
        a("qom-list-types", json!({})),
        a("qom-list-types", json!({"abstract": true})),
        q("x-query-device-tree"),
        a("yank", json!({"instances": []})),
        a(
            "yank",
            json!({"instances": [{"type": "chardev", "id": "c0"}]}),
        ),
        "{\"exec-oob\": \"query-yank\", \"id\": \"oob\"}".to_owned(),
        q("quit"),
    ]);
    let s2 = vec![
        q("qmp_capabilities"),
        q("query-status"),
        q("query-name"),
        hmp("info name"),
        q("query-machines"),
        a(
            "device-list-properties",
            json!({"typename": "no-such-type"}),
        ),
        q("system_powerdown"),
        q("quit"),
    ];
    vec![
        (vec!["-preconfig"], s1),
        (
            vec![
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-name",
                "rec",
            ],
            s2,
        ),
    ]
}

/// Runs one session; returns its transcript lines.
fn run_session(args: &[&str], requests: &[String]) -> Vec<String> {
    let mut vmm = Vmm::start(args);
    let mut c = vmm.connect();
    let mut out = vec![format!("# session: {}", args.join(" "))];
    out.push(format!("< {}", mask_timestamp(&c.greeting.to_string())));
    for req in requests {
        let (events, reply) =
            exchange(&mut c, req).unwrap_or_else(|e| panic!("{e} at {req}; {}", vmm.post_mortem()));
        out.push(format!("> {req}"));
        out.extend(events.into_iter().map(|e| format!("! {e}")));
        out.push(format!("< {reply}"));
    }
    // What follows `quit`'s reply (SHUTDOWN) up to the end of the stream.
    c.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    while let Some(line) = read_line(&mut c) {
        out.push(format!("! {line}"));
    }
    assert!(vmm.wait().success());
    out
}

fn record() -> String {
    // The sweep's command list and required arguments come from the binary itself.
    let mut vmm = Vmm::start(&["-preconfig"]);
    let mut c = vmm.qmp();
    let schema = c.ok("query-qmp-schema", Value::Null);
    let cmds = c.ok("query-commands", Value::Null);
    drop(c);
    drop(vmm);
    let names: Vec<String> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .filter(|n| !["quit", "qmp_capabilities"].contains(&n.as_str()))
        .collect();
    let mut out = vec![
        "# Recorded QMP exchange (see tests/qmp_exchange.rs); timestamps masked.".to_owned(),
        format!("# kvm: {}", kvm_here()),
    ];
    for (args, requests) in script(schema.as_array().unwrap(), &names) {
        out.extend(run_session(&args, &requests));
    }
    out.join("\n") + "\n"
}

#[test]
fn recorded_exchange_is_replayed_byte_for_byte() {
    if std::env::var_os("KEEL_QMP_RECORD").is_some() {
        std::fs::write(FIXTURE, record()).unwrap();
        return;
    }
    let fixture = std::fs::read_to_string(FIXTURE).unwrap();
    let recorded_kvm = fixture
        .lines()
        .any(|l| l == format!("# kvm: {}", kvm_here()));
    // Split into sessions; replay each and compare.
    let mut sessions: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for line in fixture.lines() {
        if let Some(args) = line.strip_prefix("# session: ") {
            sessions.push((args.split(' ').map(str::to_owned).collect(), Vec::new()));
        } else if let Some(s) = sessions.last_mut() {
            s.1.push(line.to_owned());
        }
    }
    assert_eq!(sessions.len(), 2);
    for (args, expected) in sessions {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let requests: Vec<String> = expected
            .iter()
            .filter_map(|l| l.strip_prefix("> ").map(str::to_owned))
            .collect();
        let got = run_session(&args, &requests);
        let got = &got[1..];
        // Replies in place; events as a sequence of their own.
        let split = |lines: &[String]| {
            let mut replies = Vec::new();
            let mut events = Vec::new();
            let mut last_req = String::new();
            for l in lines {
                if let Some(r) = l.strip_prefix("> ") {
                    last_req = r.to_owned();
                } else if let Some(e) = l.strip_prefix("! ") {
                    events.push(e.to_owned());
                } else {
                    replies.push((last_req.clone(), l.clone()));
                }
            }
            (replies, events)
        };
        let (want_replies, want_events) = split(&expected);
        let (got_replies, got_events) = split(got);
        assert_eq!(want_replies.len(), got_replies.len());
        for ((req, want), (_, got)) in want_replies.iter().zip(&got_replies) {
            if !recorded_kvm && HOST_DEPENDENT.iter().any(|h| req.contains(h)) {
                continue;
            }
            assert_eq!(want, got, "reply to {req} differs");
        }
        assert_eq!(want_events, got_events, "events differ ({args:?})");
    }
}
