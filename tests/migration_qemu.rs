//! What a migration looks like from outside, Keel against QEMU 7.2 in the same test: the
//! `MIGRATION` events (with `STOP`/`RESUME` where they fall), `query-status` and
//! `query-migrate` after `migrate` to `fd:` (a socketpair, a pipe whose reader is gone, a
//! name nobody passed) with the guest running or stopped; and an incoming stream that
//! cannot be loaded, with `-incoming fd:N` and with `-incoming defer` + `migrate-incoming`:
//! both end the process with status 1 and `PROGRAM: load of migration failed: REASON`.
//! QEMU runs a microvm without a kernel, Keel keel-testguest's `counter`; QEMU's half of a
//! comparison is skipped (with the reason printed) without `/usr/bin/qemu-system-x86_64`.
//!
//! A guest migrated live over the socketpair resumes in a new Keel from the bytes that
//! went through it (`-incoming fd:N`), its serial output continuing where it stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, PvhGuest as Guest, TempDir};
use serde_json::{Value, json};

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const COUNT: u32 = 40_000;

fn qemu_present() -> bool {
    let there = Path::new(QEMU).exists();
    if !there {
        eprintln!("skipping the QEMU half: {QEMU} is missing");
    }
    there
}

fn guest() -> Guest {
    Guest::new(keel_testguest::counter(COUNT).unwrap())
}

fn args(g: &Guest, program: &str, serial: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["-machine", "microvm,rtc=on,acpi=off", "-accel", "tcg", "-m"]
        .map(String::from)
        .to_vec();
    if program == QEMU {
        v.extend(["64M", "-nodefaults", "-display", "none"].map(String::from));
    } else {
        v.extend(["32", "-nodefaults", "-kernel", &g.kernel, "-serial", serial].map(String::from));
        v.extend(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"].map(String::from));
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// A process with a QMP socket, stderr piped; killed when dropped.
struct Emu {
    child: Child,
    client: Option<Client>,
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program ARGS` with a QMP socket and descriptors `fds` (from, to) inherited;
/// with `connect`, negotiates and turns on the `events` capability.
fn start(program: &str, args: &[String], dir: &TempDir, fds: &[(i32, i32)], connect: bool) -> Emu {
    use std::os::unix::process::CommandExt;
    let sock = dir.path(&format!("qmp-{}.sock", args.len()));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(program);
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let fds = fds.to_vec();
    // SAFETY: between fork and exec only dup2, which is async-signal-safe, puts each
    // descriptor at its number (without close-on-exec) in the child.
    unsafe {
        cmd.pre_exec(move || {
            for &(from, to) in &fds {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    if !connect {
        return Emu {
            child,
            client: None,
        };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("{program} exited with {st}: {err}");
        }
        assert!(Instant::now() < deadline, "{program}: no QMP socket");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut client = Client::new(stream);
    client.negotiate();
    client.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    Emu {
        child,
        client: Some(client),
    }
}

/// The events a comparison looks at: `MIGRATION` (by status), `STOP`, `RESUME`.
fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e["event"].as_str()? {
            "MIGRATION" => Some(format!("MIGRATION:{}", e["data"]["status"].as_str()?)),
            n @ ("STOP" | "RESUME") => Some(n.to_owned()),
            _ => None,
        })
        .collect()
}

/// Where `migrate` writes in a scenario.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// One end of a socketpair, passed with `getfd`; the other end is read to its end.
    Socket,
    /// The write end of a pipe whose read end is closed.
    ClosedPipe,
    /// `fd:` with a name nobody passed.
    Unknown,
}

/// What one emulator showed.
#[derive(Debug, PartialEq)]
struct Seen {
    reply: Value,
    events: Vec<String>,
    status: String,
    migration: String,
    /// The members of the final `query-migrate` (and of its `ram`).
    fields: Vec<String>,
}

/// The member names of a `query-migrate` answer, `ram`'s as `ram.NAME`.
fn fields(info: &Value) -> Vec<String> {
    let mut v: Vec<String> = info.as_object().unwrap().keys().cloned().collect();
    if let Some(ram) = info["ram"].as_object() {
        v.extend(ram.keys().map(|k| format!("ram.{k}")));
    }
    v.sort();
    v
}

/// Runs `migrate uri=fd:m` on `program`, the guest running or (`stop` first) stopped;
/// returns what was seen and the bytes read from the socketpair.
fn source(program: &str, g: &Guest, target: Target, stopped: bool) -> (Seen, Vec<u8>) {
    let serial = format!("file:{}", g.dir.path("before").display());
    let mut e = start(program, &args(g, program, &serial, &[]), &g.dir, &[], true);
    let q = e.client.as_mut().unwrap();
    if program != QEMU {
        // Keel's guest prints before it is migrated mid-run.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(g.dir.path("before")).map_or(0, |m| m.len()) < 4000 {
            assert!(Instant::now() < deadline, "the guest printed nothing");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if stopped {
        q.ok("stop", Value::Null);
    }
    let mut reader = None;
    match target {
        Target::Socket => {
            let (a, mut b) = UnixStream::pair().unwrap();
            let r = q.cmd_with_fd("getfd", json!({"fdname": "m"}), a.as_raw_fd());
            assert_eq!(r, json!({"return": {}}));
            drop(a);
            reader = Some(std::thread::spawn(move || {
                let mut v = Vec::new();
                b.read_to_end(&mut v).unwrap();
                v
            }));
        }
        Target::ClosedPipe => {
            let (r, w) = pipe();
            drop(r);
            let reply = q.cmd_with_fd("getfd", json!({"fdname": "m"}), w.as_raw_fd());
            assert_eq!(reply, json!({"return": {}}));
        }
        Target::Unknown => {}
    }
    let uri = if target == Target::Unknown {
        "fd:nothing"
    } else {
        "fd:m"
    };
    let reply = q.cmd("migrate", json!({"uri": uri}));
    let deadline = Instant::now() + Duration::from_secs(60);
    let migration = loop {
        let m = q.ok("query-migrate", Value::Null);
        let s = m["status"].as_str().unwrap_or_default().to_owned();
        if matches!(s.as_str(), "completed" | "failed" | "cancelled") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{program}: the migration does not end: {m}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = q.status();
    let fields = fields(&q.ok("query-migrate", Value::Null));
    // Events sent before the last reply were read with it; a short wait for stragglers.
    std::thread::sleep(Duration::from_millis(200));
    q.ok("query-version", Value::Null);
    let events = names(&q.events);
    drop(e);
    let bytes = reader.map(|t| t.join().unwrap()).unwrap_or_default();
    let reply = match reply.get("return") {
        Some(_) => json!("ok"),
        None => reply["error"]["desc"].clone(),
    };
    (
        Seen {
            reply,
            events,
            status,
            migration,
            fields,
        },
        bytes,
    )
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two new descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

/// The run states, events and `query-migrate` status (and its members) of `migrate` to
/// `fd:` are QEMU 7.2's: running → `STOP` after `active` → `postmigrate`; a write failure before the
/// switchover leaves the guest as it was (running or paused) with `failed`; a name nobody
/// passed fails at once, with QEMU's message.
#[test]
fn source_states_and_events_are_qemus() {
    let want = |events: &[&str], status: &str, migration: &str| {
        (
            events.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            status.to_owned(),
            migration.to_owned(),
        )
    };
    let cases = [
        (
            Target::Socket,
            false,
            want(
                &[
                    "MIGRATION:setup",
                    "MIGRATION:active",
                    "STOP",
                    "MIGRATION:completed",
                ],
                "postmigrate",
                "completed",
            ),
        ),
        (
            Target::Socket,
            true,
            want(
                &[
                    "STOP",
                    "MIGRATION:setup",
                    "MIGRATION:active",
                    "MIGRATION:completed",
                ],
                "postmigrate",
                "completed",
            ),
        ),
        (
            Target::ClosedPipe,
            false,
            want(
                &["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"],
                "running",
                "failed",
            ),
        ),
        (
            Target::ClosedPipe,
            true,
            want(
                &[
                    "STOP",
                    "MIGRATION:setup",
                    "MIGRATION:active",
                    "MIGRATION:failed",
                ],
                "paused",
                "failed",
            ),
        ),
        (
            Target::Unknown,
            false,
            want(
                &["MIGRATION:setup", "MIGRATION:failed"],
                "running",
                "failed",
            ),
        ),
    ];
    let qemu = qemu_present();
    for (target, stopped, (events, status, migration)) in cases {
        let g = guest();
        let what = format!("{target:?}, stopped {stopped}");
        let (keel, _) = source(common::BIN, &g, target, stopped);
        assert_eq!(
            (&keel.events, &keel.status, &keel.migration),
            (&events, &status, &migration),
            "Keel, {what}: {keel:?}"
        );
        if qemu {
            let (q, _) = source(QEMU, &g, target, stopped);
            assert_eq!(keel, q, "Keel vs QEMU 7.2, {what}");
        }
    }
}

/// `migrate` to a socket passed with `getfd` while the guest runs is a live migration
/// (as QEMU's over any descriptor); the stream restores in a new Keel with
/// `-incoming fd:N` and the guest's output continues exactly.
#[test]
fn fd_socket_migrates_live_and_restores() {
    let g = guest();
    let (seen, bytes) = source(common::BIN, &g, Target::Socket, false);
    assert_eq!(seen.migration, "completed");
    assert!(
        bytes.starts_with(b"KEELLIVE"),
        "a live stream went through the socket"
    );
    let before = String::from_utf8(std::fs::read(g.dir.path("before")).unwrap()).unwrap();
    let file = g.dir.path("stream");
    std::fs::write(&file, &bytes).unwrap();
    let f = std::fs::File::open(&file).unwrap();
    let out = g.dir.path("after");
    let serial = format!("file:{}", out.display());
    let a = args(&g, common::BIN, &serial, &["-incoming", "fd:7"]);
    let mut e = start(common::BIN, &a, &g.dir, &[(f.as_raw_fd(), 7)], false);
    let st = common::wait_or_kill(&mut e.child, Duration::from_secs(300), "the restored guest");
    assert_eq!(st.code(), Some(1), "isa-debug-exit status (0 << 1) | 1");
    let after = String::from_utf8(std::fs::read(&out).unwrap()).unwrap();
    assert!(
        format!("{before}{after}") == g.want,
        "the output around the live migration differs from an uninterrupted run ({} + {} \
         bytes, want {})",
        before.len(),
        after.len(),
        g.want.len()
    );
}

/// A stream of the emulator's own, truncated: saved to a file passed with `getfd`.
fn truncated_stream(program: &str, g: &Guest) -> std::path::PathBuf {
    let mut e = start(
        program,
        &args(g, program, "null", &["-S"]),
        &g.dir,
        &[],
        true,
    );
    let path = g.dir.path(&format!("stream-{}", program.len()));
    let f = std::fs::File::create(&path).unwrap();
    let q = e.client.as_mut().unwrap();
    let r = q.cmd_with_fd("getfd", json!({"fdname": "f"}), f.as_raw_fd());
    assert_eq!(r, json!({"return": {}}));
    q.ok("migrate", json!({"uri": "fd:f"}));
    let deadline = Instant::now() + Duration::from_secs(30);
    while q.ok("query-migrate", Value::Null)["status"] != "completed" {
        assert!(
            Instant::now() < deadline,
            "{program}: the save does not complete"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(e);
    let data = std::fs::read(&path).unwrap();
    assert!(
        data.len() > 4096,
        "{program}: a stream of {} bytes",
        data.len()
    );
    std::fs::write(&path, &data[..data.len() / 2]).unwrap();
    path
}

/// How a process that failed to load ended: its exit status, the tail of its last
/// stderr line after `PROGRAM: `, and the events a client saw.
fn load_failure(program: &str, g: &Guest, defer: bool) -> (Option<i32>, String, Vec<String>) {
    let stream = truncated_stream(program, g);
    let f = std::fs::File::open(&stream).unwrap();
    let (incoming, fds) = if defer {
        ("defer", vec![])
    } else {
        ("fd:7", vec![(f.as_raw_fd(), 7)])
    };
    let a = args(g, program, "null", &["-incoming", incoming]);
    let mut e = start(program, &a, &g.dir, &fds, defer);
    let mut events = Vec::new();
    if let Some(q) = e.client.as_mut() {
        assert_eq!(q.status(), "inmigrate");
        let r = q.cmd_with_fd("getfd", json!({"fdname": "in"}), f.as_raw_fd());
        assert_eq!(r, json!({"return": {}}));
        q.ok("migrate-incoming", json!({"uri": "fd:in"}));
        // The events until the connection closes.
        let _ = q
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)));
        loop {
            let mut line = String::new();
            match std::io::BufRead::read_line(&mut q.reader, &mut line) {
                Ok(n) if n > 0 => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        q.events.push(v);
                    }
                }
                _ => break,
            }
        }
        events = names(&q.events);
    }
    let st = common::wait_or_kill(&mut e.child, Duration::from_secs(30), program);
    let mut err = String::new();
    e.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let last = err.lines().last().unwrap_or_default().to_owned();
    let name = Path::new(program).file_name().unwrap().to_str().unwrap();
    let tail = last
        .strip_prefix(&format!("{name}: "))
        .unwrap_or_else(|| panic!("{program}: the last line names the program: {err}"))
        .to_owned();
    (st.code(), tail, events)
}

/// An incoming stream that cannot be loaded ends the process as QEMU 7.2's: status 1,
/// `PROGRAM: load of migration failed: REASON` (Keel's reason names what is wrong), and
/// with `-incoming defer` + `migrate-incoming` the client sees `setup`, `active`, `failed`
/// first (and no `SHUTDOWN`).
#[test]
fn failed_incoming_exits_as_qemu() {
    let g = guest();
    let qemu = qemu_present();
    for defer in [false, true] {
        let (code, line, events) = load_failure(common::BIN, &g, defer);
        assert_eq!(code, Some(1), "Keel, defer {defer}: {line}");
        assert!(
            line.starts_with("load of migration failed: ") && line.contains("truncated"),
            "Keel, defer {defer}: {line}"
        );
        if defer {
            assert_eq!(
                events,
                ["MIGRATION:setup", "MIGRATION:active", "MIGRATION:failed"],
                "Keel"
            );
        }
        if qemu {
            let (q_code, q_line, q_events) = load_failure(QEMU, &g, defer);
            assert_eq!(code, q_code, "Keel vs QEMU 7.2 exit status, defer {defer}");
            assert!(
                q_line.starts_with("load of migration failed: "),
                "QEMU 7.2: {q_line}"
            );
            assert_eq!(events, q_events, "Keel vs QEMU 7.2 events, defer {defer}");
        }
    }
}
