//! The command line against the real binary: order, errors, exit codes, monitors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Client, Guard, TempDir, Vmm, run_to_end};
use serde_json::{Value, json};

fn one_line_error(args: &[&str], expect: &str) {
    let (status, err) = run_to_end(args);
    assert_eq!(status.code(), Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(lines[0].starts_with("vmm: "), "{err}");
    assert!(lines[0].contains(expect), "{args:?}: {err}");
}

/// The last stderr line is the error; earlier lines may log defaults that were filled in.
fn last_line_error(args: &[&str], expect: &str) {
    let (status, err) = run_to_end(args);
    assert_eq!(status.code(), Some(1), "{args:?}: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("vmm: "), "{err}");
    assert!(last.contains(expect), "{args:?}: {err}");
}

#[test]
fn help_and_version() {
    for a in ["-h", "--help", "-help"] {
        let out = Command::new(BIN).arg(a).output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("-machine"));
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("vmm (keel) "));
    let out = Command::new(BIN)
        .args(["-machine", "help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("none"));
}

#[test]
fn bad_options_fail_on_one_line_without_side_effects() {
    let dir = TempDir::new();
    let sock = dir.path("never.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    // The monitor comes first but must not be opened: parsing fails before anything runs.
    one_line_error(&["-qmp", &qmp, "-bogus"], "-bogus: invalid option");
    assert!(!sock.exists());
    one_line_error(
        &["-qmp", &qmp, "-m", "lots"],
        "-m lots: invalid size 'lots'",
    );
    assert!(!sock.exists());
    one_line_error(&["--machine"], "--machine: requires an argument");
    one_line_error(&["-smp", "two"], "-smp two");
    one_line_error(&["-display", "gtk"], "-display gtk");
    one_line_error(&["-qmp", "pty"], "-qmp pty");
    one_line_error(
        &["-mon", "chardev=c0,mode=control"],
        "chardev \"c0\" not found",
    );
    one_line_error(
        &[
            "-chardev",
            "socket,id=c0,path=/tmp/x,server=on",
            "-mon",
            "chardev=c0",
        ],
        "mode=readline is not supported",
    );
    one_line_error(&["disk.img"], "disk.img: unexpected argument");
}

#[test]
fn order_errors_use_the_commands_messages() {
    last_line_error(
        &["-accel", "tcg", "-machine", "none"],
        "-machine none: the machine type is already 'microvm'; it cannot change once set",
    );
    // Machine properties may follow -accel (as on QEMU's command line) until the board is
    // built; after that they are out of phase.
    last_line_error(
        &["-machine", "none", "-accel", "tcg", "-smp", "2"],
        "-smp 2: Invalid SMP CPUs 2",
    );
    last_line_error(
        &["-M", "none", "-accel", "tcg", "-S", "-accel", "kvm"],
        "-accel kvm: 'accel-set' is not allowed in phase accel-created: it needs machine-created",
    );
    last_line_error(
        &["-machine", "none,pit=off"],
        "Property 'none-machine.pit' not found",
    );
    last_line_error(
        &["-machine", "microvm,hpet=on"],
        "Property 'microvm-machine.hpet' not found",
    );
    last_line_error(
        &["-machine", "microvm", "-kernel", "/nonexistent/vmlinux"],
        "could not open kernel file '/nonexistent/vmlinux'",
    );
    last_line_error(
        &["-machine", "none", "-smp", "4"],
        "max CPUs supported by machine 'none' is 1",
    );
    last_line_error(
        &["-machine", "none", "-kernel", "/vmlinuz"],
        "'kernel' is not accepted",
    );
}

#[test]
fn later_phase_options_advance_with_defaults_and_say_so() {
    // -device needs machine-init: machine, accelerator and board are made first (logged at
    // info level, so only with KEEL_LOG=info), then the machine refuses the device itself.
    let out = std::process::Command::new(common::BIN)
        .args(["-device", "no-such-device"])
        .env("KEEL_LOG", "info")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("using machine 'microvm'"), "{err}");
    assert!(err.contains("no accelerator was selected"), "{err}");
    assert!(err.contains("no-such-device"), "{err}");
    // Without it, only the error is printed: one line.
    let (status, err) = run_to_end(&["-device", "no-such-device"]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no-such-device"), "{err}");
}

#[test]
fn defaults_run_the_machine() {
    let mut vmm = Vmm::start(&["-M", "none", "-name", "guest0"]);
    let mut c = vmm.qmp();
    assert_eq!(c.phase(), "machine-ready");
    assert_eq!(c.status(), "running");
    assert_eq!(c.ok("query-name", Value::Null), json!({"name": "guest0"}));
    c.ok("quit", Value::Null);
    assert_eq!(vmm.wait().code(), Some(0));
}

#[test]
fn dash_s_stays_in_prelaunch_and_accel_fallbacks_are_logged() {
    let mut vmm = Vmm::start(&[
        "-M", "none", "-m", "64M", "--accel", "nope", "-accel", "tcg", "-S",
    ]);
    let mut c = vmm.qmp();
    assert_eq!(c.status(), "prelaunch");
    let accels = c.ok("query-accels", Value::Null);
    let tcg = accels
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "tcg")
        .unwrap();
    assert_eq!(tcg["selected"], true);
    c.ok("quit", Value::Null);
    vmm.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut vmm.child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("'nope' rejected"), "{err}");
}

#[test]
fn preconfig_without_machine_waits_for_pure_qmp() {
    let mut vmm = Vmm::start(&["-preconfig"]);
    let mut c = vmm.qmp();
    std::thread::sleep(Duration::from_millis(100));
    assert!(vmm.child.try_wait().unwrap().is_none(), "vmm did not wait");
    assert_eq!(c.phase(), "no-machine");
    assert_eq!(c.status(), "prelaunch");
    c.ok("machine-set", json!({"type": "none"}));
    c.ok("accel-set", json!({"accel": ["kvm", "tcg"]}));
    c.ok("machine-done", Value::Null);
    assert_eq!(c.next_event()["event"], "RESUME");
    assert_eq!(c.status(), "running");
}

#[test]
fn signal_ends_with_shutdown_event() {
    let mut vmm = Vmm::start_none(&[]);
    let mut c = vmm.qmp();
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    let r = unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0);
    let ev = c.next_event();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert_eq!(vmm.wait().code(), Some(0));
}

#[test]
fn chardev_and_mon() {
    let dir = TempDir::new();
    let sock = dir.path("mon.sock");
    let chardev = format!("socket,id=mon0,path={},server=on,wait=off", sock.display());
    let mut child = Guard::spawn(
        &[
            "-machine",
            "none",
            "-chardev",
            &chardev,
            "-mon",
            "chardev=mon0,mode=control",
            "-S",
        ],
        Stdio::null(),
        Stdio::null(),
    );
    let mut c = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break Client::new(s);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    c.negotiate();
    assert_eq!(c.status(), "prelaunch");
    c.ok("quit", Value::Null);
    assert!(child.wait().success());
}

#[test]
fn tcp_monitor() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let spec = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let mut child = Guard::spawn(
        &["-machine", "none", "-qmp", &spec],
        Stdio::null(),
        Stdio::null(),
    );
    let s = loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\""));
    w.write_all(b"{'execute':'qmp_capabilities'}{'execute':'quit'}")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": {}}\r\n");
    assert!(child.wait().success());
}

#[test]
fn stdio_monitor() {
    let mut child = Guard::spawn(
        &["-machine", "none", "-qmp", "stdio", "-S"],
        Stdio::piped(),
        Stdio::piped(),
    );
    let mut input = child.0.stdin.take().unwrap();
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let greeting: Value = serde_json::from_str(&line).unwrap();
    assert!(greeting["QMP"]["version"]["qemu"].is_object());
    input
        .write_all(b"{'execute':'qmp_capabilities'}\n{'execute':'query-status','id':7}\n")
        .unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["id"], 7);
    assert_eq!(r["return"]["status"], "prelaunch");
    input.write_all(b"{'execute':'quit'}\n").unwrap();
    assert!(child.wait().success());
}

#[test]
fn wait_on_blocks_until_a_client_connects() {
    let dir = TempDir::new();
    let sock = dir.path("w.sock");
    let spec = format!("unix:{},server=on", sock.display());
    let mut child = Guard::spawn(
        &["-qmp", &spec, "-machine", "none", "-S"],
        Stdio::null(),
        Stdio::null(),
    );
    let mut c = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break Client::new(s);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    c.negotiate();
    // The command line went on only after the connection: the machine is ready now.
    let mut phase = c.phase();
    for _ in 0..100 {
        if phase == "machine-ready" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        phase = c.phase();
    }
    assert_eq!(phase, "machine-ready");
    c.ok("quit", Value::Null);
    assert!(child.wait().success());
}

#[test]
fn no_arguments_boot_the_demo_guest_and_exit_zero() {
    // The README's run command: microvm, kvm with fallback to tcg, the built-in guest.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("Hello from the Keel demo guest, running on kvm")
            || stdout.contains("Hello from the Keel demo guest, running on tcg"),
        "{stdout}"
    );
}

#[test]
fn demo_guest_names_the_forced_accelerator() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["-M", "microvm", "-accel", "tcg", "-nographic"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("running on tcg"), "{stdout}");
}
