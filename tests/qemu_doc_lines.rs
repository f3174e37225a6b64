//! QEMU command lines in the style of QEMU 7.2's documentation (the `qemu-system-x86_64`
//! man page, "Standard options", "Device URL Syntax", "Debug/Expert options" and the
//! "Invocation" pages of the system emulation manual), each run unchanged on QEMU 7.2
//! (`/usr/bin/qemu-system-x86_64`, or `KEEL_COMPAT_QEMU`) and on Keel. Every run is short:
//! `-S`, a few QMP commands over `-qmp stdio`, then `quit`. The exit status, the QMP
//! replies named by each case and a fragment of standard error are compared.
//!
//! Where Keel lacks what an option asks for, the case says so and checks Keel's own refusal
//! (exit status 1 and a message that says what to use instead) next to QEMU's acceptance.
//! Without QEMU installed the Keel half still runs and the test says what it skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The QEMU binary, if installed.
fn qemu() -> Option<String> {
    let q = std::env::var("KEEL_COMPAT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let found = Command::new(&q)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found.then_some(q)
}

/// What one run gave.
#[derive(Debug)]
struct Run {
    status: i32,
    /// The QMP replies (`return` or `error.desc`), in order, greeting and events left out.
    replies: Vec<Value>,
    stderr: String,
}

/// Runs `bin ARGS -qmp stdio`, sends `qmp_capabilities`, `cmds` and `quit`, and waits (10 s
/// at most).
fn run(bin: &str, args: &str, cmds: &[&str]) -> Run {
    let mut child = Command::new(bin)
        .args(args.split_whitespace())
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let mut text = String::from("{\"execute\":\"qmp_capabilities\"}\n");
        for c in cmds {
            text.push_str(c);
            text.push('\n');
        }
        text.push_str("{\"execute\":\"quit\"}\n");
        // A process that exits early (a refused line) closes its end: that is its answer.
        let _ = stdin.write_all(text.as_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{bin} {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let replies = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            if let Some(r) = v.get("return") {
                Some(r.clone())
            } else {
                v.pointer("/error/desc").cloned()
            }
        })
        .collect();
    Run {
        status: status.code().unwrap_or(-1),
        replies,
        stderr: err,
    }
}

/// One command line and what both programs must do with it.
struct Case {
    /// Where the line comes from.
    source: &'static str,
    /// The options, split at white space.
    args: &'static str,
    /// QMP commands sent after negotiation.
    qmp: &'static [&'static str],
    /// The exit status both give.
    status: i32,
    /// A fragment both write to standard error ("" for none required).
    stderr: &'static str,
    /// Whether the QMP replies must be equal (false where Keel's wording adds detail).
    same_replies: bool,
}

/// The lines run the same way on QEMU and Keel.
const SAME: &[Case] = &[
    Case {
        source: "man page, Standard options: -global driver.prop=value",
        args: "-M pc -nodefaults -display none -S -global isa-debug-exit.iobase=0x501 -device isa-debug-exit,id=d",
        qmp: &[r#"{"execute":"qom-get","arguments":{"path":"d","property":"iobase"}}"#],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, Standard options: -global driver=driver,property=property,value=value",
        args: "-M pc -nodefaults -display none -S -device virtio-rng-pci,id=r -global driver=virtio-rng-pci,property=acpi-index,value=7 -device virtio-rng-pci,id=s,acpi-index=3",
        qmp: &[
            r#"{"execute":"qom-get","arguments":{"path":"r","property":"acpi-index"}}"#,
            r#"{"execute":"qom-get","arguments":{"path":"s","property":"acpi-index"}}"#,
        ],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, -global: a property the device does not have",
        args: "-M pc -nodefaults -display none -S -global virtio-rng-pci.foo=1 -device virtio-rng-pci",
        qmp: &[],
        status: 1,
        stderr: "-device virtio-rng-pci: can't apply global virtio-rng-pci.foo=1: Property 'virtio-rng-pci.foo' not found",
        same_replies: true,
    },
    Case {
        source: "man page, -global: a driver no device type has",
        args: "-M pc -nodefaults -display none -S -global foo.bar=1",
        qmp: &[],
        status: 0,
        stderr: "warning: global foo.bar has invalid class name",
        same_replies: true,
    },
    Case {
        source: "libvirt's pc lines (-global kvm-pit.lost_tick_policy=delay, PIIX4_PM.disable_s3=1)",
        args: "-M pc -nodefaults -display none -S -global kvm-pit.lost_tick_policy=delay -global PIIX4_PM.disable_s3=1 -global PIIX4_PM.disable_s4=1",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "-global PIIX4_PM.acpi-root-pci-hotplug=off (QEMU's docs/pcie.txt, hot plug on pc)",
        args: "-M pc -nodefaults -display none -S -global PIIX4_PM.acpi-root-pci-hotplug=off",
        qmp: &[r#"{"execute":"device_add","arguments":{"driver":"virtio-rng-pci","id":"r"}}"#],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "-global on a hot-plugged device: a warning, the device is added",
        args: "-M pc -nodefaults -display none -S -global virtio-rng-pci.foo=1",
        qmp: &[
            r#"{"execute":"device_add","arguments":{"driver":"virtio-rng-pci","id":"r"}}"#,
            r#"{"execute":"qom-get","arguments":{"path":"r","property":"acpi-index"}}"#,
        ],
        status: 0,
        stderr: "warning: can't apply global virtio-rng-pci.foo=1: Property 'virtio-rng-pci.foo' not found",
        same_replies: true,
    },
    Case {
        source: "man page, Character device options: -serial chardev:name",
        args: "-M pc -nodefaults -display none -S -chardev null,id=c -serial chardev:c",
        qmp: &[r#"{"execute":"query-status"}"#],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, Character device options: -parallel none, -parallel null",
        args: "-M pc -nodefaults -display none -S -parallel none -parallel null -echr 20",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, -rtc: a base that is no date",
        args: "-M pc -nodefaults -display none -S -rtc base=foo",
        qmp: &[],
        status: 1,
        stderr: "invalid datetime format",
        same_replies: true,
    },
    Case {
        source: "man page, -rtc: clock=host|rt|vm only",
        args: "-M pc -nodefaults -display none -S -rtc base=localtime,clock=foo",
        qmp: &[],
        status: 1,
        stderr: "invalid option value 'foo'",
        same_replies: true,
    },
    Case {
        source: "man page, Standard options / Display options: -k, -vnc none, -no-hpet, -L",
        args: "-M pc -nodefaults -display none -S -k en-us -vnc none -no-hpet -L /tmp",
        qmp: &[r#"{"execute":"query-status"}"#],
        status: 0,
        stderr: "",
        same_replies: false,
    },
    Case {
        source: "man page, Standard options: -action, -watchdog-action",
        args: "-M pc -nodefaults -display none -S -action shutdown=pause,reboot=shutdown,panic=pause -watchdog-action pause",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, -m [size=]megs[,slots=n,maxmem=size] (maxmem equal to the size), -mem-prealloc",
        args: "-M pc -nodefaults -display none -S -m 256M,maxmem=256M -mem-prealloc",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, Debug/Expert options: -d item1,... -D logfile",
        args: "-M pc -nodefaults -display none -S -d guest_errors,unimp -D /dev/null",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, -object rng-random,id=id,filename=/dev/urandom; virtio-rng-pci,rng=",
        args: "-M pc -nodefaults -display none -S -object rng-random,id=r,filename=/dev/urandom -device virtio-rng-pci,rng=r -object rng-builtin,id=b -device virtio-rng-pci,rng=b",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "man page, -object rng-random: virtio-rng-device on microvm",
        args: "-M microvm -nodefaults -display none -S -object rng-random,id=r,filename=/dev/random -device virtio-rng-device,rng=r",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
    Case {
        source: "virtio-rng-pci,rng= naming no object",
        args: "-M pc -nodefaults -display none -S -device virtio-rng-pci,rng=nope",
        qmp: &[],
        status: 1,
        stderr: "Device 'nope' not found",
        same_replies: true,
    },
    Case {
        source: "man page, Block device options: -snapshot with -drive",
        args: "-M pc -nodefaults -display none -S -snapshot -drive file=/dev/null,if=none,id=d0,format=raw",
        qmp: &[],
        status: 0,
        stderr: "",
        same_replies: true,
    },
];

fn check(bin: &str, who: &str, c: &Case) -> Run {
    let r = run(bin, c.args, c.qmp);
    assert_eq!(
        r.status, c.status,
        "{who}: {} ({:?}): exit status; stderr: {}",
        c.source, c.args, r.stderr
    );
    assert!(
        r.stderr.contains(c.stderr),
        "{who}: {} ({:?}): stderr lacks {:?}: {}",
        c.source,
        c.args,
        c.stderr,
        r.stderr
    );
    r
}

#[test]
fn documented_lines_run_the_same_on_qemu_and_keel() {
    let qemu = qemu();
    if qemu.is_none() {
        eprintln!("QEMU not installed: only the Keel half runs");
    }
    for c in SAME {
        let k = check(common::BIN, "keel", c);
        if let Some(q) = &qemu {
            let q = check(q, "qemu", c);
            if c.same_replies {
                assert_eq!(
                    k.replies, q.replies,
                    "{} ({:?}): QMP replies",
                    c.source, c.args
                );
            }
        }
    }
}

/// Runs `bin ARGS` with `input` written to standard input in two parts half a second apart
/// (after the machine is up), and returns (status, standard output).
fn piped(bin: &str, args: &str, input: &[&[u8]]) -> (i32, Vec<u8>) {
    let mut child = Command::new(bin)
        .args(args.split_whitespace())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for part in input {
        std::thread::sleep(Duration::from_millis(500));
        let _ = stdin.write_all(part);
        let _ = stdin.flush();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{bin} {args} did not exit on C-a x");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    drop(stdin);
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    (status.code().unwrap_or(-1), out)
}

/// The man page's "Keys in the character backend multiplexer" (`-nographic`, `-serial
/// mon:stdio`): C-a h prints the help, C-a x ends the emulator with "QEMU: Terminated";
/// `-echr 0x14` makes the escape C-t. Output and status are byte for byte QEMU's.
#[test]
fn mux_escapes_on_stdio_are_qemus() {
    let lines: [(&str, &[&[u8]]); 2] = [
        (
            "-M pc -nodefaults -display none -S -serial mon:stdio",
            &[b"\x01h", b"\x01x"],
        ),
        (
            "-M pc -display none -vga none -S -nographic -echr 0x14",
            &[b"\x14h", b"\x14x"],
        ),
    ];
    let qemu = qemu();
    for (args, input) in lines {
        let (status, out) = piped(common::BIN, args, input);
        assert_eq!(status, 0, "{args}");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains(" h    print this help\n\r"),
            "{args}: {text:?}"
        );
        assert!(text.ends_with("QEMU: Terminated\n\r"), "{args}: {text:?}");
        if let Some(q) = &qemu {
            let (qs, qout) = piped(q, args, input);
            assert_eq!(
                (qs, String::from_utf8_lossy(&qout)),
                (status, text),
                "{args}"
            );
        }
    }
}

/// `-serial chardev:ID` carries COM1 to that chardev: the demo guest's greeting lands in
/// the chardev's file.
#[test]
fn serial_chardev_carries_com1() {
    let dir = common::TempDir::new();
    let file = dir.path("com1.txt");
    let chardev = format!("file,id=c,path={}", file.display());
    let (status, err) = common::run_to_end(&["-chardev", &chardev, "-serial", "chardev:c"]);
    assert!(status.success(), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("Hello from the Keel demo guest"), "{text:?}");
}

/// Runs the `rtc_date` test guest on microvm (with its RTC) under `bin` with `rtc` and the
/// environment `env`; returns the guest's line (`rtc CCYY-MM-DD hh:mm:ss`).
fn rtc_line(bin: &str, elf: &std::path::Path, rtc: &str, env: &[(&str, &str)]) -> String {
    let mut child = Command::new(bin)
        .args("-M microvm,rtc=on -m 32M -nodefaults -display none -serial stdio".split(' '))
        .args(["-rtc", rtc, "-kernel"])
        .arg(elf)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{bin} -rtc {rtc}: the guest did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{bin} -rtc {rtc}: {err}");
    eprintln!("{bin} -rtc {rtc} {env:?}: {}", out.trim_end());
    out.lines()
        .find(|l| l.starts_with("rtc "))
        .unwrap_or_else(|| panic!("{bin} -rtc {rtc}: no rtc line in {out:?} ({err})"))
        .to_owned()
}

/// UTC date and time of `secs` since the epoch, as the guest prints it.
fn civil(secs: i64) -> String {
    let d = keel_devices::RtcDateTime::from_unix(secs);
    format!(
        "rtc {:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        d.year, d.month, d.day, d.hour, d.minute, d.second
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Whether `line` shows a time in `[from, to]` (seconds since the epoch, as UTC).
fn shows_between(line: &str, from: i64, to: i64) -> bool {
    (from..=to).any(|t| civil(t) == line)
}

/// The man page's `-rtc base=utc|localtime|datetime`: a guest reading CMOS sees the date
/// given (and the clock running from it), or the host's local time, on Keel as on QEMU.
#[test]
fn rtc_base_sets_the_time_a_guest_reads_from_cmos() {
    let dir = common::TempDir::new();
    let elf = dir.path("rtc.elf");
    std::fs::write(&elf, keel_testguest::rtc_date().unwrap().pvh_elf()).unwrap();
    let base = 1_150_560_081; // 2006-06-17T16:01:21 UTC
    let zone = [("TZ", "UTC-05:30")]; // POSIX: local time is UTC + 5:30
    let mut bins = vec![common::BIN.to_owned()];
    bins.extend(qemu());
    for bin in &bins {
        let t0 = now();
        let line = rtc_line(
            bin,
            &elf,
            "base=2006-06-17T16:01:21,clock=host,driftfix=slew",
            &[],
        );
        let waited = now() - t0;
        assert!(
            shows_between(&line, base, base + waited + 1),
            "{bin}: {line} is not 2006-06-17 16:01:21 + {waited}s"
        );
        let line = rtc_line(bin, &elf, "base=2006-06-17", &[]);
        assert!(line.starts_with("rtc 2006-06-17 00:00:"), "{bin}: {line}");
        for (rtc, shift) in [("base=utc", 0), ("base=localtime", 5 * 3600 + 1800)] {
            let t0 = now();
            let line = rtc_line(bin, &elf, rtc, &zone);
            let t1 = now();
            assert!(
                shows_between(&line, t0 + shift, t1 + shift),
                "{bin} -rtc {rtc} (TZ=UTC-05:30): {line}, host UTC {}",
                civil(t0)
            );
        }
    }
}

/// What QEMU runs and Keel refuses because it lacks the feature: Keel exits 1 and says what
/// to do instead; QEMU's status is given.
const KEEL_REFUSES: &[(&str, &str, i32, &str)] = &[
    ("man page, -usb", "-usb", 0, "no USB controller"),
    (
        "man page, -machine usb=on",
        "-machine usb=on",
        0,
        "no USB controller",
    ),
    (
        "man page, -bios file",
        "-bios /nonexistent/bios.bin",
        1,
        "boots the guest with -kernel",
    ),
    (
        "man page, -m slots=,maxmem=",
        "-m size=256M,slots=2,maxmem=1G",
        0,
        "give the RAM size alone",
    ),
    ("man page, -s", "-s", 0, "no gdb stub"),
    ("man page, -gdb dev", "-gdb tcp::1234", 0, "no gdb stub"),
];

#[test]
fn missing_features_are_refused_with_what_to_use() {
    let qemu = qemu();
    for (source, opt, qemu_status, says) in KEEL_REFUSES {
        let args = format!("-M pc -nodefaults -display none -S {opt}");
        let k = run(common::BIN, &args, &[]);
        assert_eq!(k.status, 1, "{source}: keel {args}: {}", k.stderr);
        assert!(
            k.stderr.contains(says),
            "{source}: keel {args}: {}",
            k.stderr
        );
        assert_eq!(
            k.stderr.lines().count(),
            1,
            "{source}: one line: {}",
            k.stderr
        );
        if let Some(q) = &qemu {
            let r = run(q, &args, &[]);
            assert_eq!(
                r.status, *qemu_status,
                "{source}: qemu {args}: {}",
                r.stderr
            );
        }
    }
}

/// `-d help` (and an unknown item) print QEMU's list of log items and fail.
#[test]
fn log_items_help_is_qemus() {
    let out = |bin: &str, item: &str| {
        let o = Command::new(bin).args(["-d", item]).output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (status, text) = out(common::BIN, "help");
    assert_eq!(status, Some(1));
    assert!(text.starts_with("Log items (comma separated):\n"), "{text}");
    assert!(
        text.contains("\nguest_errors    log when the guest OS"),
        "{text}"
    );
    assert_eq!(out(common::BIN, "nosuchitem"), (status, text.clone()));
    if let Some(q) = qemu() {
        assert_eq!(out(&q, "help"), (status, text));
    }
}

/// `-action reboot=shutdown` (the man page's replacement for `-no-reboot`): a guest that
/// triple-faults ends the process instead of restarting forever, on QEMU as on Keel.
#[test]
fn action_reboot_shutdown_ends_a_resetting_guest() {
    let dir = common::TempDir::new();
    let elf = dir.path("tf.elf");
    std::fs::write(&elf, keel_testguest::triple_fault().unwrap().pvh_elf()).unwrap();
    let mut bins = vec![common::BIN.to_owned()];
    bins.extend(qemu());
    for bin in &bins {
        let mut child = Command::new(bin)
            .args("-M microvm -m 32M -nodefaults -display none -serial stdio".split(' '))
            .args(["-action", "reboot=shutdown", "-kernel"])
            .arg(&elf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = common::wait_or_kill(
            &mut child,
            Duration::from_secs(20),
            &format!("{bin} -action reboot=shutdown: the triple-faulting guest"),
        );
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(status.code(), Some(0), "{bin}");
        assert_eq!(
            out.matches("keel-testguest triplefault").count(),
            1,
            "{bin}: {out}"
        );
    }
}

/// The man page's `-snapshot` ("write to temporary files instead of disk image files") and
/// `-object rng-random,...` with `virtio-rng-device,rng=`: the Debian guest
/// (`keel.mode=virtio-test`, scripts/README.md) reads the host's marker from its disk,
/// writes its own at sector 8 and reads entropy; the image is unchanged afterwards. Needs
/// the guest (`scripts/build-guest.sh`); skips saying why without it. About 20 s under tcg.
#[test]
fn snapshot_discards_the_guests_disk_writes() {
    const HOST_MARKER: &[u8] = b"KEEL-HOST-MARKER 7f3a9c written by the host";
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let accel = std::env::var("KEEL_LINUX_ACCEL").unwrap_or_else(|_| "tcg".into());
    let dir = common::TempDir::new();
    let disk = dir.path("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..HOST_MARKER.len()].copy_from_slice(HOST_MARKER);
    std::fs::write(&disk, &image).unwrap();
    let append = format!(
        "console=ttyS0 quiet keel.mode=virtio-test tsc_early_khz={}",
        keel_tcg::guest_tsc_khz()
    );
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let mut child = Command::new(common::BIN)
        .args([
            "-M",
            "microvm",
            "-accel",
            &accel,
            "-m",
            "256M",
            "-nodefaults",
        ])
        .args([
            "-no-reboot",
            "-serial",
            "stdio",
            "-append",
            &append,
            "-kernel",
        ])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-snapshot", "-drive", &drive])
        .args(["-device", "virtio-blk-device,drive=d0,serial=keel0"])
        .args(["-object", "rng-random,id=rng0,filename=/dev/urandom"])
        .args(["-device", "virtio-rng-device,rng=rng0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().unwrap();
    assert!(
        text.contains("KEEL-VIRTIO-TEST-DONE"),
        "guest output:\n{text}"
    );
    assert!(text.contains("KEEL-VDA-WRITE OK"), "{text}");
    let rng = text
        .lines()
        .find_map(|l| l.strip_prefix("KEEL-RNG "))
        .unwrap_or_else(|| panic!("no KEEL-RNG line in\n{text}"));
    assert!(rng.trim().len() == 64, "{rng}");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        image,
        "-snapshot: the image changed"
    );
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The man page's `-mem-prealloc`: with it the guest's 256 MiB are resident as soon as the
/// machine is built (`-S`, nothing has run); without it they are not.
#[test]
fn mem_prealloc_makes_guest_ram_resident() {
    let mut rss = Vec::new();
    for extra in [&[][..], &["-mem-prealloc"][..]] {
        let mut args = vec![
            "-M",
            "pc",
            "-m",
            "256M",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ];
        args.extend_from_slice(extra);
        let mut vmm = common::Vmm::start(&args);
        let mut c = vmm.qmp();
        assert_eq!(c.status(), "prelaunch");
        rss.push(rss_kib(vmm.child.id()));
    }
    assert!(
        rss[0] < 128 << 10,
        "without -mem-prealloc: {} KiB resident",
        rss[0]
    );
    assert!(
        rss[1] >= 256 << 10,
        "with -mem-prealloc: {} KiB resident",
        rss[1]
    );
}
