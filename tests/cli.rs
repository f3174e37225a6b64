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
            "socket,id=c0,path=/tmp/x,server=on,wait=off",
            "-mon",
            "chardev=c0,mode=telnet",
        ],
        "Parameter 'mode' does not accept value 'telnet'",
    );
    one_line_error(&["disk.img"], "disk.img: unexpected argument");
}

#[test]
fn order_errors_use_the_commands_messages() {
    // Machine properties may follow -accel (as on QEMU's command line) until the board is
    // built; after that they are out of phase, and the error says what to move where.
    last_line_error(
        &["-machine", "none", "-accel", "tcg", "-smp", "2"],
        "-smp 2: Invalid SMP CPUs 2",
    );
    last_line_error(
        &["-M", "microvm", "-device", "isa-debug-exit", "-m", "256M"],
        "-m 256M: 'machine-set' is not allowed in phase machine-init: it needs no-machine, \
         machine-created or accel-created; the machine is sized when it is built: give \
         -machine, -m, -smp and -cpu before the first -device",
    );
    last_line_error(
        &[
            "-M",
            "microvm",
            "-device",
            "isa-debug-exit",
            "-accel",
            "tcg",
        ],
        "-accel tcg: 'accel-set' is not allowed in phase machine-init: it needs machine-created; \
         give -accel before the first -device",
    );
    last_line_error(&["-cpu", "pentium9"], "unable to find CPU model 'pentium9'");
    last_line_error(
        &["-M", "microvm", "-accel", "tcg", "-cpu", "host"],
        "CPU model 'host' requires KVM",
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

/// Options in the orders QEMU users write them: the machine-sizing ones wait for the machine,
/// `-accel`s are fallbacks wherever they stand, what is read at the first reset (`-kernel`,
/// `-append`, `-serial`, `-no-reboot`, `-name`, `-uuid`) may follow `-device`, and a clean
/// run prints nothing on stderr.
#[test]
fn qemu_orders_run_and_stay_quiet() {
    let kernel = std::env::temp_dir().join(format!("keel-order-{}.elf", std::process::id()));
    std::fs::write(&kernel, keel_machine::DEMO_GUEST).unwrap();
    let k = kernel.to_str().unwrap();
    for args in [
        // -kernel after -device (QEMU's documentation and scripts do this all the time).
        vec![
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "128M",
            "-nodefaults",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            k,
            "-serial",
            "stdio",
        ],
        // -m and -smp before -M, -accel before -M, -accel fallbacks split by other options.
        vec![
            "-m",
            "64M",
            "-accel",
            "kvm",
            "-smp",
            "1",
            "-M",
            "microvm",
            "-S",
            "-accel",
            "tcg",
            "-no-reboot",
            "-kernel",
            k,
            "-name",
            "g",
            "-uuid",
            "12345678-9abc-def0-1234-56789abcdef0",
            "-cpu",
            "max",
        ],
    ] {
        let is_s = args.contains(&"-S");
        if is_s {
            let mut vmm = Vmm::start(&args);
            let mut c = vmm.qmp();
            assert_eq!(c.status(), "prelaunch");
            assert_eq!(
                c.ok("query-uuid", Value::Null),
                json!({"UUID": "12345678-9abc-def0-1234-56789abcdef0"})
            );
            let cpus = c.ok("query-cpus-fast", Value::Null);
            assert_eq!(cpus.as_array().unwrap().len(), 1);
            c.ok("cont", Value::Null);
            vmm.wait();
            let mut err = String::new();
            std::io::Read::read_to_string(&mut vmm.child.stderr.take().unwrap(), &mut err).unwrap();
            // A host without KVM gets QEMU's warning for the skipped -accel kvm; nothing else.
            assert!(err.lines().all(|l| l.contains("rejected")), "stderr: {err}");
        } else {
            let out = std::process::Command::new(BIN)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}");
            assert!(stdout.contains("running on tcg"), "{stdout}");
            assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{args:?}");
        }
    }
    std::fs::remove_file(&kernel).ok();
}

/// `-preconfig` with only backends waits in no-machine: `-serial` and `-chardev` never
/// create a machine.
#[test]
fn backends_alone_create_no_machine() {
    let mut vmm = Vmm::start(&[
        "-preconfig",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "null",
    ]);
    let mut c = vmm.qmp();
    assert_eq!(c.phase(), "no-machine");
    // The serial backend waits for the machine built later over QMP.
    c.ok(
        "machine-set",
        json!({"type": "microvm", "memory": 16 << 20}),
    );
    c.ok("accel-set", json!({"accel": "tcg"}));
    c.ok("machine-done", Value::Null);
    assert_eq!(c.status(), "prelaunch");
    c.ok("quit", Value::Null);
    vmm.wait();
}

/// `-pidfile` and `-daemonize` as libvirt's probe uses them: the parent exits 0 once the
/// monitor listens, the pid file names the daemon, which serves QMP until killed.
#[test]
fn daemonize_writes_the_pidfile_once_the_monitor_listens() {
    let dir = TempDir::new();
    let sock = dir.path("qmp.sock");
    let pidfile = dir.path("qmp.pid");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let status = std::process::Command::new(BIN)
        .args([
            "-S",
            "-no-user-config",
            "-nodefaults",
            "-nographic",
            "-machine",
            "none,accel=kvm:tcg",
            "-qmp",
            &qmp,
            "-pidfile",
        ])
        .arg(&pidfile)
        .arg("-daemonize")
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(sock.exists(), "the monitor listens before the parent exits");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut c = Client::new(std::os::unix::net::UnixStream::connect(&sock).unwrap());
    c.negotiate();
    assert_eq!(c.phase(), "machine-ready");
    // SAFETY: plain kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let start = std::time::Instant::now();
    // SAFETY: kill with signal 0 only checks for existence.
    while unsafe { libc::kill(pid, 0) } == 0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A monitor on an inherited socket (`-chardev socket,fd=N`): QEMU's Python `QEMUMachine`
/// passes one end of a socketpair this way.
#[test]
fn monitor_on_an_inherited_socket() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args([
        "-M",
        "none",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-chardev",
        &format!("socket,id=mon,fd={fd}"),
        "-mon",
        "chardev=mon,mode=control",
    ])
    .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe fcntl is called, on a descriptor
    // this process owns.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    let mut c = Client::new(ours);
    c.negotiate();
    assert_eq!(c.status(), "prelaunch");
    c.ok("quit", Value::Null);
    assert!(child.wait().unwrap().success());
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

/// `-accel tcg,PROP=VALUE`: the backend's properties reach it (`jit=off` runs the demo
/// guest on the interpreter alone, `thread=single` is QEMU's one-vCPU-at-a-time), and a
/// property tcg lacks or a bad value fails as QEMU's does: status 1, QEMU's text.
#[test]
fn accel_properties_reach_the_backend() {
    let (status, err) = run_to_end(&[
        "-M",
        "microvm",
        "-accel",
        "tcg,jit=off,thread=single",
        "-nodefaults",
        "-display",
        "none",
    ]);
    assert_eq!(status.code(), Some(0), "{err}");
    for (arg, text) in [
        ("tcg,foo=bar", "Property 'tcg-accel.foo' not found"),
        ("tcg,thread=bogus", "Invalid 'thread' setting bogus"),
    ] {
        last_line_error(&["-M", "microvm", "-accel", arg, "-display", "none"], text);
        // QEMU 7.2 prints the same text for the same option, where it is installed.
        if let Ok(out) = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm",
                "-accel",
                arg,
                "-display",
                "none",
                "-nodefaults",
            ])
            .output()
        {
            let qerr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{qerr}");
            assert!(qerr.contains(text), "QEMU: {qerr}");
        }
    }
}
