//! Descriptors passed over QMP (`SCM_RIGHTS`): `getfd`, `closefd`, `add-fd`, `remove-fd`,
//! `query-fdsets`, as libvirt uses them, compared with QEMU 7.2 on the same exchange
//! (descriptor numbers differ between the two processes and are masked).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// Runs `requests` (each with a descriptor of /dev/null attached or not) on `program`'s
/// monitor and returns the replies with descriptor numbers masked.
fn exchange(program: &str, requests: &[(&str, bool)]) -> Vec<String> {
    let dir = common::TempDir::new();
    let sock = dir.path("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let child = Command::new(program)
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
        .args(["-qmp", &qmp])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = common::Guard(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(Instant::now() < deadline, "{program}: no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut out = Vec::new();
    let all = [("{\"execute\":\"qmp_capabilities\"}", false)]
        .into_iter()
        .chain(requests.iter().copied());
    for (req, with_fd) in all {
        let bytes = format!("{req}\n");
        if with_fd {
            common::send_with_fd(&s, bytes.as_bytes(), null.as_raw_fd());
        } else {
            use std::io::Write;
            (&s).write_all(bytes.as_bytes()).unwrap();
        }
        line.clear();
        r.read_line(&mut line).unwrap();
        let mut v: Value = serde_json::from_str(&line).unwrap();
        mask_fds(&mut v);
        out.push(format!("{req} -> {v}"));
    }
    use std::io::Write;
    (&s).write_all(b"{\"execute\":\"quit\"}\n").unwrap();
    let _ = child.wait();
    out
}

fn mask_fds(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "fd" && x.is_number() {
                    *x = Value::from("N");
                } else {
                    mask_fds(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(mask_fds),
        _ => {}
    }
}

const SCENARIO: &[(&str, bool)] = &[
    (r#"{"execute":"getfd","arguments":{"fdname":"a"}}"#, false),
    (r#"{"execute":"getfd","arguments":{"fdname":"1a"}}"#, true),
    (r#"{"execute":"getfd","arguments":{"fdname":"a"}}"#, true),
    (r#"{"execute":"getfd","arguments":{"fdname":"a"}}"#, true),
    (r#"{"execute":"closefd","arguments":{"fdname":"a"}}"#, false),
    (r#"{"execute":"closefd","arguments":{"fdname":"a"}}"#, false),
    (r#"{"execute":"add-fd"}"#, false),
    (r#"{"execute":"add-fd","arguments":{"fdset-id":-1}}"#, true),
    (
        r#"{"execute":"add-fd","arguments":{"opaque":"hello"}}"#,
        true,
    ),
    (r#"{"execute":"add-fd","arguments":{"fdset-id":5}}"#, true),
    (
        r#"{"execute":"add-fd","arguments":{"fdset-id":5,"opaque":"x"}}"#,
        true,
    ),
    (r#"{"execute":"add-fd"}"#, true),
    (r#"{"execute":"query-fdsets"}"#, false),
    (
        r#"{"execute":"remove-fd","arguments":{"fdset-id":9}}"#,
        false,
    ),
    (
        r#"{"execute":"remove-fd","arguments":{"fdset-id":5,"fd":99}}"#,
        false,
    ),
    (
        r#"{"execute":"remove-fd","arguments":{"fdset-id":0}}"#,
        false,
    ),
    (r#"{"execute":"query-fdsets"}"#, false),
    // A descriptor sent with a request that takes none stays for the next one.
    (r#"{"execute":"getfd","arguments":{"fdname":"b"}}"#, false),
    (r#"{"execute":"query-name"}"#, true),
    (r#"{"execute":"getfd","arguments":{"fdname":"c"}}"#, false),
    (r#"{"execute":"getfd","arguments":{"fdname":"d"}}"#, false),
];

#[test]
fn passed_descriptors_are_kept_named_and_in_fd_sets_as_qemu() {
    let keel = exchange(common::BIN, SCENARIO);
    let text = keel.join("\n");
    // What must hold whatever QEMU says.
    for expected in [
        r#"{"execute":"getfd","arguments":{"fdname":"a"}} -> {"error":{"class":"GenericError","desc":"No file descriptor supplied via SCM_RIGHTS"}}"#,
        r#"{"execute":"getfd","arguments":{"fdname":"1a"}} -> {"error":{"class":"GenericError","desc":"Parameter 'fdname' expects a name not starting with a digit"}}"#,
        r#"{"execute":"closefd","arguments":{"fdname":"a"}} -> {"error":{"class":"GenericError","desc":"File descriptor named 'a' not found"}}"#,
        r#"{"execute":"add-fd","arguments":{"opaque":"hello"}} -> {"return":{"fd":"N","fdset-id":0}}"#,
        r#"{"execute":"add-fd"} -> {"return":{"fd":"N","fdset-id":1}}"#,
        r#"{"execute":"query-fdsets"} -> {"return":[{"fds":[{"fd":"N"},{"fd":"N","opaque":"x"}],"fdset-id":5},{"fds":[{"fd":"N"}],"fdset-id":1},{"fds":[{"fd":"N","opaque":"hello"}],"fdset-id":0}]}"#,
        r#"{"execute":"remove-fd","arguments":{"fdset-id":5,"fd":99}} -> {"error":{"class":"GenericError","desc":"File descriptor named 'fdset-id:5, fd:99' not found"}}"#,
        r#"{"execute":"getfd","arguments":{"fdname":"c"}} -> {"return":{}}"#,
    ] {
        assert!(text.contains(expected), "missing: {expected}\nin:\n{text}");
    }
    if Path::new(QEMU).exists() {
        let qemu = exchange(QEMU, SCENARIO);
        assert_eq!(keel, qemu, "Keel vs QEMU 7.2");
    } else {
        eprintln!(
            "QEMU 7.2 not installed: the exchange is checked against the expected lines only"
        );
    }
}
