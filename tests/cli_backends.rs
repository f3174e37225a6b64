//! The options libvirt puts on a domain's command line, against the real binary with the
//! built-in demo guest (it prints a banner on COM1 and powers off): `-object`, `-add-fd`
//! with `/dev/fdset/N`, a user `isa-serial` after `-nodefaults`, `-chardev pty`,
//! `-no-shutdown`, and their errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, TempDir, Vmm, run_to_end};
use serde_json::{Value, json};

const BANNER: &str = "Hello from the Keel demo guest";

/// libvirt's domain line (as libvirt 9.0 writes it for a microvm) with the serial port's
/// file passed as fd 5 in fd set 0: the guest's output lands in that file, appended, and
/// the run is silent on stderr.
#[test]
fn libvirt_style_line_writes_the_serial_port_through_an_fd_set() {
    let dir = TempDir::new();
    let key = dir.path("master-key.aes");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let log = dir.path("serial.log");
    std::fs::write(&log, "before\n").unwrap();
    let file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let secret = json!({"qom-type": "secret", "id": "masterKey0", "format": "raw",
                        "file": key.to_str().unwrap()})
    .to_string();
    let ram = json!({"qom-type": "memory-backend-ram", "id": "microvm.ram", "size": 134217728})
        .to_string();
    let serial =
        json!({"driver": "isa-serial", "chardev": "charserial0", "id": "serial0", "index": 0})
            .to_string();
    let args = [
        "-name",
        "guest=t,debug-threads=on",
        "-object",
        &secret,
        "-machine",
        "microvm,usb=off,dump-guest-core=off,memory-backend=microvm.ram",
        "-accel",
        "tcg",
        "-cpu",
        "qemu64",
        "-m",
        "128",
        "-object",
        &ram,
        "-overcommit",
        "mem-lock=off",
        "-smp",
        "1,sockets=1,cores=1,threads=1",
        "-uuid",
        "5100b088-c9fc-4c6a-bc8b-d4dce2754530",
        "-display",
        "none",
        "-no-user-config",
        "-nodefaults",
        "-rtc",
        "base=utc",
        "-boot",
        "strict=on",
        "-add-fd",
        "set=0,fd=5,opaque=serial0-source",
        "-chardev",
        "file,id=charserial0,path=/dev/fdset/0,append=on",
        "-device",
        &serial,
        "-audiodev",
        r#"{"id":"audio1","driver":"none"}"#,
        "-msg",
        "timestamp=on",
    ];
    let raw = file.as_raw_fd();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only dup2 runs between fork and exec, on a descriptor the parent keeps open.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "", "a clean run is silent");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("before\n"), "not appended: {text:?}");
    assert!(text.contains(BANNER), "{text:?}");
    // -nodefaults: COM1 is the user's, so nothing reached standard output.
    assert!(!String::from_utf8_lossy(&out.stdout).contains(BANNER));
}

/// `-no-shutdown`: the guest's power-off is reported (SHUTDOWN by the guest, then STOP) and
/// the machine stays in the `shutdown` state until the client says what to do.
#[test]
fn no_shutdown_keeps_the_process_after_the_guest_powers_off() {
    let mut vmm = Vmm::start(&[
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-shutdown",
        "-S",
    ]);
    let mut c = vmm.qmp();
    c.ok("cont", Value::Null);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|e: &Value| e["event"] == "STOP") {
        assert!(
            Instant::now() < deadline,
            "no STOP after power-off: {seen:?}"
        );
        seen.push(c.next_event());
    }
    let names: Vec<&str> = seen.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["RESUME", "SHUTDOWN", "STOP"], "{seen:?}");
    assert_eq!(
        seen[1]["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    assert_eq!(c.status(), "shutdown");
    assert!(vmm.child.try_wait().unwrap().is_none(), "the process ended");
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

/// `-chardev pty`: QEMU's one line on standard output names the terminal, `query-chardev` reports
/// it, and the guest's output on the `isa-serial` behind it can be read there.
#[test]
fn pty_chardev_carries_the_serial_port() {
    let mut vmm = Vmm::start_with_stdout(
        &[
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-nodefaults",
            "-chardev",
            "pty,id=charserial0",
            "-device",
            "isa-serial,chardev=charserial0,id=serial0",
            // The process (the terminal's master) stays once the guest is off.
            "-no-shutdown",
            "-S",
        ],
        Stdio::piped(),
    );
    let mut stdout = BufReader::new(vmm.child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let path = line
        .strip_prefix("char device redirected to ")
        .and_then(|r| r.strip_suffix(" (label charserial0)\n"))
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();
    let mut c = vmm.qmp();
    let chardevs = c.ok("query-chardev", Value::Null);
    assert!(
        chardevs
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["label"] == "charserial0" && d["filename"] == format!("pty:{path}")),
        "{chardevs}"
    );
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    c.ok("cont", Value::Null);
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(BANNER) {
        let n = tty.read(&mut buf).unwrap();
        assert!(n > 0, "the pty closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

/// What goes wrong is said as QEMU says it, on one line naming the option.
#[test]
fn backend_errors_name_the_option() {
    for (args, expect) in [
        (
            vec!["-add-fd", "fd=99,set=1"],
            "vmm: -add-fd fd=99,set=1: fd is not valid or already in use",
        ),
        (
            vec!["-add-fd", "fd=1,set=1"],
            "vmm: -add-fd fd=1,set=1: fd cannot be a standard I/O stream",
        ),
        (
            vec!["-chardev", "file,id=c,path=/dev/fdset/4"],
            "vmm: -chardev file,id=c,path=/dev/fdset/4: Could not open '/dev/fdset/4': No such file or directory",
        ),
        (
            vec!["-object", "secret,data=x"],
            "vmm: -object secret,data=x: Parameter 'id' is missing",
        ),
        (
            vec!["-object", "memory-backend-ram,id=m"],
            "vmm: -object memory-backend-ram,id=m: Parameter 'size' is missing",
        ),
        (
            vec!["-object", "secret,id=s"],
            "Either 'file' or 'data' must be provided",
        ),
        (
            vec!["-overcommit", "mem-lock=maybe"],
            "vmm: -overcommit mem-lock=maybe: Parameter 'mem-lock' expects 'on' or 'off'",
        ),
        (
            vec!["-msg", "foo=on"],
            "vmm: -msg foo=on: Invalid parameter 'foo'",
        ),
        (
            vec!["-boot", "strict=maybe"],
            "Parameter 'boot.strict' expects 'on' or 'off'",
        ),
        (
            vec![
                "-machine",
                "microvm,memory-backend=m",
                "-m",
                "256",
                "-object",
                "memory-backend-ram,id=m,size=128M",
            ],
            "Size specified by -m option must match size of explicitly specified 'memory-backend' property",
        ),
    ] {
        let (status, err) = run_to_end(&args);
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(expect), "{args:?}: {err}");
    }
}

/// `-msg timestamp=on` puts QEMU's timestamp (`2026-12-06T17:29:40.123456Z `) before
/// error lines.
#[test]
fn msg_timestamp_prefixes_errors() {
    let (status, err) = run_to_end(&["-msg", "timestamp=on", "-device", "nope"]);
    assert_eq!(status.code(), Some(1), "{err}");
    let line = err.lines().last().unwrap();
    let (stamp, rest) = line.split_once(' ').unwrap();
    assert!(rest.starts_with("vmm: -device nope"), "{line}");
    let b = stamp.as_bytes();
    assert_eq!(b.len(), 27, "{stamp}");
    for (i, c) in b.iter().enumerate() {
        let want = match i {
            4 | 7 => b'-',
            10 => b'T',
            13 | 16 => b':',
            19 => b'.',
            26 => b'Z',
            _ => {
                assert!(c.is_ascii_digit(), "{stamp}");
                continue;
            }
        };
        assert_eq!(*c, want, "{stamp}");
    }
}

/// A user `isa-serial` is COM1 on `pc` as on `microvm` once `-nodefaults` left the board
/// none, and it is a peripheral with its id.
#[test]
fn user_isa_serial_is_com1_on_both_machines() {
    for machine in ["microvm", "pc"] {
        let dir = TempDir::new();
        let out = dir.path("com1.txt");
        let chardev = format!("file,id=c0,path={}", out.display());
        let mut vmm = Vmm::start(&[
            "-M",
            machine,
            "-accel",
            "tcg",
            "-nodefaults",
            "-chardev",
            &chardev,
            "-device",
            "isa-serial,chardev=c0,id=com1",
            "-no-shutdown",
        ]);
        let mut c = vmm.qmp();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains(BANNER)
        {
            assert!(Instant::now() < deadline, "{machine}: no banner on COM1");
            std::thread::sleep(Duration::from_millis(20));
        }
        let peripherals = c.ok("qom-list", json!({"path": "/machine/peripheral"}));
        assert!(
            peripherals
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "com1"),
            "{machine}: {peripherals}"
        );
        c.ok("quit", Value::Null);
        assert!(vmm.wait().success(), "{machine}");
    }
}

/// libvirt's `-blockdev` pair for a raw file disk, in JSON (a `file` node with
/// `auto-read-only` and `discard`, a `raw` node over it) and a virtio-blk-pci on the `raw`
/// node: the nodes are listed with their drivers, the device's node is the `raw` one, and
/// the `file` node cannot go while the `raw` node is over it.
#[test]
fn libvirt_blockdev_pair_in_json_backs_a_pci_disk() {
    let dir = TempDir::new();
    let img = dir.path("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let storage = json!({"driver": "file", "filename": img.to_str().unwrap(),
                         "node-name": "libvirt-1-storage", "auto-read-only": true,
                         "discard": "unmap"})
    .to_string();
    let format = json!({"node-name": "libvirt-1-format", "read-only": false, "driver": "raw",
                        "file": "libvirt-1-storage"})
    .to_string();
    let disk = json!({"driver": "virtio-blk-pci", "bus": "pci.0", "addr": "0x3",
                      "drive": "libvirt-1-format", "id": "virtio-disk0"})
    .to_string();
    let mut vmm = Vmm::start(&[
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-S",
        "-blockdev",
        &storage,
        "-blockdev",
        &format,
        "-device",
        &disk,
    ]);
    let mut c = vmm.qmp();
    let nodes = c.ok("query-named-block-nodes", Value::Null);
    let drv = |name: &str| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == name)
            .map(|n| n["drv"].clone())
    };
    assert_eq!(drv("libvirt-1-storage"), Some(json!("file")), "{nodes}");
    assert_eq!(drv("libvirt-1-format"), Some(json!("raw")), "{nodes}");
    let blocks = c.ok("query-block", Value::Null);
    assert_eq!(
        blocks[0]["inserted"]["node-name"], "libvirt-1-format",
        "{blocks}"
    );
    let e = c.cmd("blockdev-del", json!({"node-name": "libvirt-1-storage"}));
    assert_eq!(
        e["error"]["desc"], "Node libvirt-1-storage is in use",
        "{e}"
    );
}
