//! ACPI PCI hot plug on `-M pc` with the Debian guest of `scripts/build-guest.sh` in its
//! shell mode, through the `vmm` binary: QMP on a real socket, the guest's shell on the
//! serial port (stdin/stdout). One scenario, run on Keel and, when it is installed, on
//! QEMU 7.2 (`$QEMU`, default /usr/bin/qemu-system-x86_64) with the same command line; the
//! two transcripts (QMP answers, QMP events without timestamps, what the guest lists in
//! /sys/bus/pci/devices from slot 2 up) must be equal, and Keel's is checked on its own:
//!
//! 1. hot add of a virtio-blk-pci disk: the guest binds virtio_blk;
//! 2. limbo: the guest masks GPE 1 (`mask` in /sys/firmware/acpi/interrupts/gpe01);
//!    `device_del` twice (the second re-sends the request, no error), the device stays
//!    listed, no event; `unmask` fires the pending event, the guest ejects, and
//!    `DEVICE_DELETED` comes for `.../virtio-backend`, then for the device;
//! 3. function 0 last: functions 1 and 2 of slot 6 are staged (the guest sees nothing),
//!    function 0 exposes all three, a function 3 is refused with QEMU's message, and the
//!    eject of function 0 deletes every function (newest first, each with its pair);
//! 4. reset with a pending unplug (GPE masked): `system_reset` completes it (`RESET`, then
//!    the pair of `DEVICE_DELETED`);
//! 5. the guest boots again without the device; a guest reboot (`reboot -f`) with a pending
//!    unplug completes it the same way (`RESET` with `guest: true`);
//! 6. the virtio-pci interfaces as the guest sees them (IDs, BAR sizes and flags):
//!    transitional by default, `disable-legacy=on`, `disable-modern=on` (a virtio-rng and a
//!    virtio-blk disk the guest reads through Linux's legacy driver);
//! 7. `acpi-index`: Linux's `acpi_index` from the slot's `_DSM`, QEMU's refusal of a
//!    duplicate, nothing for a device without one.
//!
//! Linux runs under tcg (about 15 s on Keel). Skipped when the guest is missing, unless
//! `KEEL_REQUIRE_GUEST=1`: `cargo test --release --test pc_hotplug -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, Guard, TempDir};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(180);

fn guest_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KEEL_GUEST_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/keel-guest/current"))
        })?;
    let ok = ["bzImage", "initramfs-virtio.cpio.gz"]
        .iter()
        .all(|f| dir.join(f).is_file());
    if !ok {
        assert!(
            std::env::var_os("KEEL_REQUIRE_GUEST").is_none(),
            "KEEL_REQUIRE_GUEST=1 but no guest in {}",
            dir.display()
        );
        eprintln!(
            "skipped: no guest in {} (scripts/build-guest.sh)",
            dir.display()
        );
        return None;
    }
    Some(dir)
}

/// A VMM running the guest's shell.
struct Guest {
    _child: Guard,
    _dir: TempDir,
    console: Arc<Mutex<String>>,
    stdin: ChildStdin,
    qmp: Client,
    token: u32,
}

impl Guest {
    fn start(bin: &str, guest: &Path) -> Guest {
        let dir = TempDir::new();
        let sock = dir.path("qmp.sock");
        let img = dir.path("disk.img");
        std::fs::write(&img, vec![0u8; 4 << 20]).unwrap();
        let qmp = format!("unix:{},server=on,wait=off", sock.display());
        let blockdev = format!("driver=file,filename={},node-name=d0", img.display());
        let kernel = guest.join("bzImage");
        let initrd = guest.join("initramfs-virtio.cpio.gz");
        let mut child = Command::new(bin)
            .args(["-M", "pc", "-accel", "tcg", "-m", "256M", "-nodefaults"])
            .args(["-no-user-config", "-nographic", "-serial", "stdio"])
            .args(["-append", "console=ttyS0 keel.mode=shell"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-qmp", &qmp, "-blockdev", &blockdev])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let c = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let child = Guard(child);
        let started = Instant::now();
        let s = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{bin}: no QMP");
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut qmp = Client::new(s);
        qmp.reader
            .get_ref()
            .set_read_timeout(Some(TIMEOUT))
            .unwrap();
        qmp.negotiate();
        Guest {
            _child: child,
            _dir: dir,
            console,
            stdin,
            qmp,
            token: 0,
        }
    }

    fn text(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits for `needle` on the console after byte `from`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let started = Instant::now();
        loop {
            let text = self.text();
            if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + i + needle.len();
            }
            assert!(
                started.elapsed() < TIMEOUT,
                "no {needle:?} within {TIMEOUT:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `cmd` in the guest's shell; returns its output (and the echoed command line).
    fn sh(&mut self, cmd: &str) -> String {
        self.token += 1;
        let from = self.text().len();
        // The marker is split on the command line so that only the output matches it.
        let line = format!("{cmd}; echo KEEL-SH''-DONE-{}\n", self.token);
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let end = self.wait_for(&format!("KEEL-SH-DONE-{}", self.token), from);
        self.text()[from..end].to_owned()
    }

    /// The PCI functions the guest lists from slot 2 up (QEMU has an IDE function at 01.1).
    fn pci(&mut self) -> String {
        let out = self.sh("ls /sys/bus/pci/devices");
        let mut f: Vec<&str> = out
            .split_whitespace()
            .filter(|w| w.starts_with("0000:00:") && !w.starts_with("0000:00:01"))
            .filter(|w| !w.starts_with("0000:00:00"))
            .collect();
        f.sort_unstable();
        format!("guest pci: {}", f.join(" "))
    }

    fn cmd(&mut self, name: &str, args: Value) -> String {
        let mut r = self.qmp.cmd(name, args);
        if let Some(o) = r.as_object_mut() {
            o.remove("id");
        }
        format!("{name} -> {r}")
    }

    /// The next `n` events, without timestamps (a missing one fails with the console).
    fn events(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let qmp = &mut self.qmp;
                let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| qmp.next_event()))
                    .unwrap_or_else(|_| {
                        let text = self.text();
                        let tail = &text[text.len().saturating_sub(3000)..];
                        panic!("no QMP event within {TIMEOUT:?}; console:\n{tail}")
                    });
                format!("event {} {}", e["event"], e["data"])
            })
            .collect()
    }
}

/// The scenario of the module documentation; returns the transcript.
fn scenario(bin: &str, dir: &Path) -> Vec<String> {
    let mut g = Guest::start(bin, dir);
    let mut t = Vec::new();
    g.wait_for("KEEL-GUEST-SHELL", 0);
    t.push(g.pci());
    let gpe = "/sys/firmware/acpi/interrupts/gpe01";

    // 1. Hot add.
    let from = g.text().len();
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "d0", "id": "hd1"}),
    ));
    g.wait_for("[vda] 8192 512-byte logical blocks", from);
    t.push(g.pci());

    // 2. Limbo and its release.
    let out = g.sh(&format!("echo mask > {gpe}; cat {gpe}"));
    t.push(format!("masked: {}", out.contains("masked")));
    t.push(g.cmd("device_del", json!({"id": "hd1"})));
    t.push(g.cmd("device_del", json!({"id": "hd1"})));
    let out = g.sh(&format!("cat {gpe}"));
    t.push(format!("pending status: {}", out.contains("STS")));
    t.push(g.cmd("qom-list", json!({"path": "/machine/peripheral"})));
    t.push(g.pci());
    t.push(format!("events while masked: {:?}", g.qmp.events));
    g.sh(&format!("echo unmask > {gpe}"));
    t.extend(g.events(2));
    t.push(g.pci());

    // 3. Function 0 last.
    for (id, addr) in [("r1", "6.1"), ("r2", "6.2")] {
        t.push(g.cmd(
            "device_add",
            json!({"driver": "virtio-rng-pci", "id": id, "addr": addr}),
        ));
    }
    t.push(g.pci());
    let from = g.text().len();
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "r0", "addr": "6.0", "multifunction": "on"}),
    ));
    for f in 0..3 {
        g.wait_for(&format!("virtio-pci 0000:00:06.{f}: enabling device"), from);
    }
    t.push(g.pci());
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "r3", "addr": "6.3"}),
    ));
    t.push(g.cmd("device_del", json!({"id": "r0"})));
    t.extend(g.events(6));
    t.push(g.pci());

    // 4. Reset with a pending unplug.
    let from = g.text().len();
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "r5", "addr": "7"}),
    ));
    g.wait_for("virtio-pci 0000:00:07.0: enabling device", from);
    g.sh(&format!("echo mask > {gpe}"));
    t.push(g.cmd("device_del", json!({"id": "r5"})));
    let out = g.sh(&format!("cat {gpe}"));
    t.push(format!("pending status: {}", out.contains("STS")));
    let from = g.text().len();
    t.push(g.cmd("system_reset", Value::Null));
    t.extend(g.events(3));
    t.push(g.cmd("qom-list", json!({"path": "/machine/peripheral"})));

    // 5. The machine boots again; a guest reboot completes a pending unplug as well.
    g.wait_for("KEEL-GUEST-SHELL", from);
    t.push(g.pci());
    let from = g.text().len();
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "r6", "addr": "8"}),
    ));
    g.wait_for("virtio-pci 0000:00:08.0: enabling device", from);
    g.sh(&format!("echo mask > {gpe}"));
    t.push(g.cmd("device_del", json!({"id": "r6"})));
    let out = g.sh(&format!("cat {gpe}"));
    t.push(format!("pending status: {}", out.contains("STS")));
    // Events so far (QEMU's firmware resets the machine as it boots) are not compared.
    g.qmp.events.clear();
    let from = g.text().len();
    g.stdin.write_all(b"reboot -f\n").unwrap();
    g.stdin.flush().unwrap();
    t.extend(g.events(1));
    // QEMU's firmware resets the machine again as it starts, and those RESETs can come
    // between the two DEVICE_DELETED (QEMU emits them when the objects are freed).
    while t.iter().filter(|l| l.contains("DEVICE_DELETED")).count() < 12 {
        t.extend(g.events(1).into_iter().filter(|e| !e.contains("RESET")));
    }
    g.wait_for("KEEL-GUEST-SHELL", from);
    t.push(g.pci());

    // 6. The virtio-pci interfaces: transitional by default (legacy I/O BAR0, MSI-X BAR1,
    //    modern BAR4), modern only with disable-legacy=on (virtio 1.0 IDs), legacy only
    //    with disable-modern=on, which Linux drives through its legacy driver.
    let from = g.text().len();
    for (id, addr, extra) in [
        ("t1", "0a", json!({})),
        ("t2", "0b", json!({"disable-legacy": "on"})),
        ("t3", "0c", json!({"disable-modern": true})),
    ] {
        let mut args = json!({"driver": "virtio-rng-pci", "id": id, "addr": addr});
        for (k, v) in extra.as_object().unwrap() {
            args[k] = v.clone();
        }
        t.push(g.cmd("device_add", args));
        g.wait_for(
            &format!("virtio-pci 0000:00:{addr}.0: enabling device"),
            from,
        );
    }
    let from = g.text().len();
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "t4", "drive": "d0", "addr": "0d",
               "disable-modern": true}),
    ));
    g.wait_for("[vda] 8192 512-byte logical blocks", from);
    for addr in ["0a", "0b", "0c", "0d"] {
        let d = format!("/sys/bus/pci/devices/0000:00:{addr}.0");
        let out = g.sh(&format!(
            "cd {d}; echo IDS $(cat vendor device subsystem_device revision) \
             $(while read s e f; do [ $((s)) = 0 ] || echo $((e - s + 1)):$f; done < resource) \
             $(basename $(readlink driver)); cd /"
        ));
        let ids = out.lines().find(|l| l.starts_with("IDS ")).unwrap_or("");
        t.push(format!("{addr}: {ids}"));
    }
    let out = g.sh("dd if=/dev/vda bs=512 count=1 2>/dev/null | wc -c");
    t.push(format!("legacy disk read: {}", out.contains("\n512")));
    t.push(format!(
        "legacy driver: {}",
        g.text()
            .matches("virtio_pci: leaving for legacy driver")
            .count()
    ));

    // 7. acpi-index: the guest reads it through the slot's _DSM (Linux's acpi_index and
    //    label); unique on the machine; none without it.
    let from = g.text().len();
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "a1", "addr": "0e", "acpi-index": 5}),
    ));
    t.push(g.cmd(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "a2", "addr": "0f", "acpi-index": 5}),
    ));
    g.wait_for("virtio-pci 0000:00:0e.0: enabling device", from);
    let out = g.sh(
        "echo IDX $(cat /sys/bus/pci/devices/0000:00:0e.0/acpi_index) \
         $(ls /sys/bus/pci/devices/0000:00:0a.0/ | grep -c -e acpi_index -e label)",
    );
    let idx = out.lines().find(|l| l.starts_with("IDX ")).unwrap_or("");
    t.push(format!("acpi_index, labels without an index: {idx}"));
    t.push(g.cmd("quit", Value::Null));
    t
}

#[test]
fn pc_hot_plug_limbo_function_zero_last_and_reset_as_qemu() {
    let Some(dir) = guest_dir() else {
        return;
    };
    let keel = scenario(common::BIN, &dir);
    eprintln!("Keel:\n{}", keel.join("\n"));
    let backend = |id: &str| {
        format!("event \"DEVICE_DELETED\" {{\"path\":\"/machine/peripheral/{id}/virtio-backend\"}}")
    };
    let device = |id: &str| {
        format!(
            "event \"DEVICE_DELETED\" {{\"device\":\"{id}\",\"path\":\"/machine/peripheral/{id}\"}}"
        )
    };
    let ok = |c: &str| format!("{c} -> {{\"return\":{{}}}}");
    let want: Vec<String> = vec![
        "guest pci: ".into(),
        ok("device_add"),
        "guest pci: 0000:00:02.0".into(),
        "masked: true".into(),
        ok("device_del"),
        ok("device_del"),
        "pending status: true".into(),
        "qom-list -> {\"return\":[{\"name\":\"type\",\"type\":\"string\"},{\"name\":\"hd1\",\"type\":\"child<virtio-blk-pci>\"}]}".into(),
        "guest pci: 0000:00:02.0".into(),
        "events while masked: []".into(),
        backend("hd1"),
        device("hd1"),
        "guest pci: ".into(),
        ok("device_add"),
        ok("device_add"),
        "guest pci: ".into(),
        ok("device_add"),
        "guest pci: 0000:00:06.0 0000:00:06.1 0000:00:06.2".into(),
        "device_add -> {\"error\":{\"class\":\"GenericError\",\"desc\":\"PCI: slot 6 function 0 already occupied by virtio-rng-pci, new func virtio-rng-pci cannot be exposed to guest.\"}}".into(),
        ok("device_del"),
        backend("r0"),
        device("r0"),
        backend("r2"),
        device("r2"),
        backend("r1"),
        device("r1"),
        "guest pci: ".into(),
        ok("device_add"),
        ok("device_del"),
        "pending status: true".into(),
        ok("system_reset"),
        "event \"RESET\" {\"guest\":false,\"reason\":\"host-qmp-system-reset\"}".into(),
        backend("r5"),
        device("r5"),
        "qom-list -> {\"return\":[{\"name\":\"type\",\"type\":\"string\"}]}".into(),
        "guest pci: ".into(),
        ok("device_add"),
        ok("device_del"),
        "pending status: true".into(),
        "event \"RESET\" {\"guest\":true,\"reason\":\"guest-reset\"}".into(),
        backend("r6"),
        device("r6"),
        "guest pci: ".into(),
        ok("device_add"),
        ok("device_add"),
        ok("device_add"),
        ok("device_add"),
        "0a: IDS 0x1af4 0x1005 0x0004 0x00 32:0x0000000000040101 4096:0x0000000000040200 16384:0x000000000014220c virtio-pci".into(),
        "0b: IDS 0x1af4 0x1044 0x1100 0x01 4096:0x0000000000040200 16384:0x000000000014220c virtio-pci".into(),
        "0c: IDS 0x1af4 0x1005 0x0004 0x00 32:0x0000000000040101 4096:0x0000000000040200 virtio-pci".into(),
        "0d: IDS 0x1af4 0x1001 0x0002 0x00 128:0x0000000000040101 4096:0x0000000000040200 virtio-pci".into(),
        "legacy disk read: true".into(),
        "legacy driver: 2".into(),
        ok("device_add"),
        "device_add -> {\"error\":{\"class\":\"GenericError\",\"desc\":\"a PCI device with acpi-index = 5 already exist\"}}".into(),
        "acpi_index, labels without an index: IDX 5 0".into(),
        ok("quit"),
    ];
    assert_eq!(keel, want);
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "/usr/bin/qemu-system-x86_64".into());
    if !Path::new(&qemu).is_file() {
        eprintln!("note: no QEMU at {qemu}; Keel checked alone");
        return;
    }
    let reference = scenario(&qemu, &dir);
    assert_eq!(keel, reference, "Keel and QEMU differ");
}
