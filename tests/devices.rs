//! The device model through the real binary: the pure-QMP flow of the qdev issue
//! (machine-set microvm, accel-set, machine-init, cold `device_add`, machine-done, hot plug
//! refused, `device_del` and error cases), the same devices from the command line giving
//! the same tree, and `isa-debug-exit` ending the process with the guest's status.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, TempDir, Vmm};
use serde_json::{Value, json};

/// A raw disk image with a known first sector.
fn disk(dir: &TempDir) -> String {
    let p = dir.path("disk.img");
    let mut data = vec![0u8; 1 << 20];
    data[..16].copy_from_slice(b"keel-disk-marker");
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

/// The devices of `x-query-device-tree` by id: (bus, path, hotplugged, unplug-state).
fn user_devices(tree: &Value) -> Vec<(String, String, String, bool, String)> {
    let mut v = Vec::new();
    for bus in tree.as_array().unwrap() {
        for d in bus["devices"].as_array().unwrap() {
            if let Some(id) = d["id"].as_str() {
                v.push((
                    id.to_owned(),
                    d["bus"].as_str().unwrap().to_owned(),
                    d["path"].as_str().unwrap().to_owned(),
                    d["hotplugged"].as_bool().unwrap(),
                    d["unplug-state"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    v.sort();
    v
}

fn peripherals(c: &mut Client) -> Vec<String> {
    let list = c.ok("qom-list", json!({"path": "/machine/peripheral"}));
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"].as_str().unwrap_or("").starts_with("child<"))
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// Brings a `-preconfig` VMM through the pure-QMP flow; returns the device tree.
fn pure_qmp(c: &mut Client, image: &str) -> Value {
    // Backends exist from no-machine on.
    assert_eq!(c.phase(), "no-machine");
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "filename": image, "node-name": "d0"}),
    );
    let d = c.err(
        "blockdev-add",
        json!({"driver": "file", "filename": image, "node-name": "d0"}),
        "GenericError",
    );
    assert!(d.contains("'d0'"), "{d}");
    c.ok("machine-set", json!({"type": "microvm"}));
    c.ok("accel-set", json!({"accel": "tcg"}));

    // Too early for devices: refused, nothing moves.
    let d = c.err(
        "device_add",
        json!({"driver": "virtio-rng-device"}),
        "OutOfPhase",
    );
    assert!(d.contains("machine-init"), "{d}");
    assert_eq!(c.phase(), "accel-created");

    c.ok("machine-init", Value::Null);
    assert_eq!(c.phase(), "machine-init");

    // Cold plug.
    c.ok(
        "device_add",
        json!({"driver": "isa-debug-exit", "id": "dbg", "iobase": 0xf4, "iosize": 4}),
    );
    c.ok(
        "device_add",
        json!({"driver": "virtio-rng-device", "id": "rng0"}),
    );
    c.ok(
        "device_add",
        json!({"driver": "virtio-blk-device", "id": "disk0", "drive": "d0", "serial": "abc"}),
    );

    // Errors name what is wrong and create nothing.
    let before = peripherals(c);
    for (args, names) in [
        // An id in use.
        (json!({"driver": "virtio-rng-device", "id": "rng0"}), "rng0"),
        (
            json!({"driver": "no-such-device", "id": "x1"}),
            "no-such-device",
        ),
        // Ports past the end of the I/O space.
        (
            json!({"driver": "isa-debug-exit", "id": "x2", "iobase": 0xfffe, "iosize": 8}),
            "iosize",
        ),
        (
            json!({"driver": "virtio-rng-device", "id": "x3", "colour": "red"}),
            "colour",
        ),
        (
            json!({"driver": "virtio-blk-device", "id": "x4", "drive": "nope"}),
            "nope",
        ),
        (json!({"driver": "virtio-blk-device", "id": "x5"}), "drive"),
        (
            json!({"driver": "isa-serial", "id": "x6", "index": 9}),
            "ISA serial ports",
        ),
    ] {
        let d = c.err("device_add", args, "GenericError");
        assert!(d.contains(names), "{d}");
    }
    let d = c.err("device_del", json!({"id": "nope"}), "DeviceNotFound");
    assert!(d.contains("nope"), "{d}");
    assert_eq!(peripherals(c), before);
    assert_eq!(before, ["dbg", "disk0", "rng0"]);

    // A device deleted in machine-init goes at once (with DEVICE_DELETED), and its id and
    // slot are free again.
    c.ok(
        "device_add",
        json!({"driver": "virtio-rng-device", "id": "tmp"}),
    );
    c.ok("device_del", json!({"id": "tmp"}));
    let ev = c.next_event();
    assert_eq!(ev["event"], "DEVICE_DELETED");
    assert_eq!(
        ev["data"],
        json!({"device": "tmp", "path": "/machine/peripheral/tmp"})
    );
    assert_eq!(peripherals(c), before);

    c.ok("machine-done", Value::Null);
    assert_eq!(c.phase(), "machine-ready");

    // Hot plug on microvm's virtio-mmio buses: refused as QEMU does.
    let d = c.err(
        "device_add",
        json!({"driver": "virtio-blk-device", "id": "disk1", "drive": "d0"}),
        "GenericError",
    );
    assert!(d.contains("does not support hotplugging"), "{d}");
    assert!(d.starts_with("Bus 'virtio-mmio-bus."), "{d}");
    let d = c.err(
        "device_add",
        json!({"driver": "isa-debug-exit", "id": "dbg2", "iobase": 0x600}),
        "GenericError",
    );
    assert_eq!(d, "Bus 'isa.0' does not support hotplugging");
    let d = c.err("device_del", json!({"id": "dbg"}), "GenericError");
    assert!(d.contains("does not support hotplugging"), "{d}");
    let d = c.err("device_del", json!({"id": "nope"}), "DeviceNotFound");
    assert_eq!(d, "Device 'nope' not found");
    assert_eq!(peripherals(c), before);

    // Out of phase: refused, phase and status unchanged.
    let status = c.status();
    for (cmd, args) in [
        ("machine-init", Value::Null),
        ("machine-set", json!({"type": "microvm"})),
        ("accel-set", json!({"accel": "tcg"})),
        ("machine-done", Value::Null),
    ] {
        c.err(cmd, args, "OutOfPhase");
        assert_eq!(c.phase(), "machine-ready");
        assert_eq!(c.status(), status);
    }

    // Introspection.
    assert_eq!(
        c.ok(
            "qom-get",
            json!({"path": "/machine/peripheral/dbg", "property": "iobase"})
        ),
        json!(0xf4)
    );
    assert_eq!(
        c.ok("qom-get", json!({"path": "dbg", "property": "hotplugged"})),
        json!(false)
    );
    let types = c.ok("qom-list-types", Value::Null);
    for t in [
        "isa-debug-exit",
        "virtio-blk-device",
        "virtio-net-device",
        "virtio-rng-device",
        "virtconsole",
    ] {
        assert!(
            types.as_array().unwrap().iter().any(|x| x["name"] == t),
            "{t} missing from {types}"
        );
    }
    let props = c.ok(
        "device-list-properties",
        json!({"typename": "virtio-blk-device"}),
    );
    assert!(
        props
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "drive")
    );
    c.err(
        "device-list-properties",
        json!({"typename": "nope"}),
        "DeviceNotFound",
    );

    let tree = c.ok("x-query-device-tree", Value::Null);
    assert_eq!(
        user_devices(&tree),
        [
            (
                "dbg".into(),
                "isa.0".into(),
                "/machine/peripheral/dbg".into(),
                false,
                "none".into()
            ),
            (
                "disk0".into(),
                "virtio-mmio-bus.1".into(),
                "/machine/peripheral/disk0".into(),
                false,
                "none".into()
            ),
            (
                "rng0".into(),
                "virtio-mmio-bus.0".into(),
                "/machine/peripheral/rng0".into(),
                false,
                "none".into()
            ),
        ]
    );
    // Onboard devices are there, under /machine/unattached, and cannot be removed.
    let isa = tree
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "isa.0")
        .unwrap();
    let serial = isa["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "isa-serial")
        .unwrap();
    assert_eq!(serial["onboard"], true);
    let path = serial["path"].as_str().unwrap().to_owned();
    assert!(path.starts_with("/machine/unattached/device["), "{path}");
    c.err("device_del", json!({"id": path}), "GenericError");
    tree
}

#[test]
fn pure_qmp_flow_and_command_line_give_the_same_tree() {
    let dir = TempDir::new();
    let image = disk(&dir);

    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    let qmp_tree = pure_qmp(&mut c, &image);
    assert!(
        c.events.iter().all(|e| e["event"] != "DEVICE_DELETED"),
        "{:?}",
        c.events
    );
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());

    let blockdev = format!("driver=file,filename={image},node-name=d0");
    let mut vmm = Vmm::start(&[
        "-S",
        "-machine",
        "microvm",
        "-accel",
        "tcg",
        "-blockdev",
        &blockdev,
        "-device",
        "isa-debug-exit,id=dbg,iobase=0xf4,iosize=0x4",
        "-device",
        "virtio-rng-device,id=rng0",
        "-device",
        "virtio-blk-device,id=disk0,drive=d0,serial=abc",
    ]);
    let mut c = vmm.qmp();
    assert_eq!(c.phase(), "machine-ready");
    let cli_tree = c.ok("x-query-device-tree", Value::Null);
    assert_eq!(cli_tree, qmp_tree);
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());

    // The -drive shorthand reaches the same backend.
    let drive = format!("file={image},if=none,id=d0,format=raw");
    let mut vmm = Vmm::start(&[
        "-S",
        "-machine",
        "microvm",
        "-accel",
        "tcg",
        "-drive",
        &drive,
        "-device",
        "isa-debug-exit,id=dbg,iobase=0xf4,iosize=0x4",
        "-device",
        "virtio-rng-device,id=rng0",
        "-device",
        "virtio-blk-device,id=disk0,drive=d0,serial=abc",
    ]);
    let mut c = vmm.qmp();
    assert_eq!(c.ok("x-query-device-tree", Value::Null), qmp_tree);
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

#[test]
fn command_line_errors_name_the_option() {
    let (st, err) = common::run_to_end(&[
        "-machine",
        "microvm",
        "-accel",
        "tcg",
        "-device",
        "virtio-blk-device,drive=missing",
    ]);
    assert!(!st.success());
    assert!(
        err.contains("-device virtio-blk-device,drive=missing"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
    let (st, err) = common::run_to_end(&["-netdev", "vde,id=n0"]);
    assert!(!st.success());
    assert!(err.contains("netdev type 'vde' is not supported"), "{err}");
}

#[test]
fn backends_and_devices_on_the_none_machine() {
    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    c.ok(
        "chardev-add",
        json!({"id": "c0", "backend": {"type": "null", "data": {}}}),
    );
    c.err(
        "chardev-add",
        json!({"id": "c0", "backend": {"type": "null", "data": {}}}),
        "GenericError",
    );
    c.ok(
        "netdev_add",
        json!({"type": "tap", "id": "n0", "ifname": "keeltap0", "script": "no", "downscript": "no"}),
    );
    let d = c.err(
        "netdev_add",
        json!({"type": "tap", "id": "n1", "ifname": "t", "script": "/etc/qemu-ifup"}),
        "GenericError",
    );
    assert!(d.contains("script"), "{d}");
    c.ok("machine-set", json!({"type": "none"}));
    c.ok("accel-set", json!({"accel": "tcg"}));
    c.ok("machine-init", Value::Null);
    let d = c.err(
        "device_add",
        json!({"driver": "virtio-rng-device"}),
        "GenericError",
    );
    assert!(d.contains("bus found"), "{d}");
    assert_eq!(c.ok("x-query-device-tree", Value::Null), json!([]));
    c.ok("machine-done", Value::Null);
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

/// Runs a PVH test guest that ends with `out 0xf4, 0`; the process must exit with
/// `(0 << 1) | 1` = 1 and the guest's serial text on standard output.
fn debug_exit_on(accel: &str) {
    let dir = TempDir::new();
    let guest = keel_testguest::hello(keel_testguest::Mode::Long64).unwrap();
    let kernel = dir.path("hello.elf");
    std::fs::write(&kernel, guest.pvh_elf()).unwrap();
    let kernel = kernel.display().to_string();
    let mut child = Command::new(common::BIN)
        .args([
            "-machine",
            "microvm",
            "-accel",
            accel,
            "-m",
            "32",
            "-kernel",
            &kernel,
            "-nodefaults",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the guest did not exit through isa-debug-exit under {accel}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        status.code(),
        Some((i32::from(keel_testguest::EXIT_OK) << 1) | 1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("Hello from keel-testguest"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
}

#[test]
fn isa_debug_exit_ends_the_process_tcg() {
    debug_exit_on("tcg");
}

#[test]
fn isa_debug_exit_ends_the_process_kvm() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm is not usable here");
        return;
    }
    debug_exit_on("kvm");
}

#[test]
fn virtconsole_sits_on_the_virtio_serial_device_bus() {
    let dir = TempDir::new();
    let out = dir.path("hvc0.out").display().to_string();
    let chardev = format!("file,id=c0,path={out}");
    let mut vmm = Vmm::start(&[
        "-S",
        "-machine",
        "microvm",
        "-accel",
        "tcg",
        "-chardev",
        &chardev,
        "-chardev",
        "null,id=c1",
        "-device",
        "virtio-serial-device,id=vs",
        "-device",
        "virtconsole,chardev=c0,id=con0",
    ]);
    let mut c = vmm.qmp();
    let tree = c.ok("x-query-device-tree", Value::Null);
    let bus = tree
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "vs.0")
        .unwrap_or_else(|| panic!("no port bus in {tree}"));
    assert_eq!(bus["type"], "virtio-serial-bus");
    assert_eq!(bus["path"], "/machine/peripheral/vs/vs.0");
    assert_eq!(bus["devices"][0]["id"], "con0");
    // The chardev file is opened when the port is realized.
    assert!(std::path::Path::new(&out).exists());
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());

    // One port per device (keel-virtio's console is single-port); an unknown chardev is named.
    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    c.ok(
        "chardev-add",
        json!({"id": "c1", "backend": {"type": "null", "data": {}}}),
    );
    c.ok("machine-set", json!({"type": "microvm"}));
    c.ok("accel-set", json!({"accel": "tcg"}));
    c.ok("machine-init", Value::Null);
    let d = c.err(
        "device_add",
        json!({"driver": "virtconsole", "chardev": "c1"}),
        "GenericError",
    );
    assert!(d.contains("virtio-serial-bus"), "{d}");
    c.ok("device_add", json!({"driver": "virtio-serial-device"}));
    let d = c.err(
        "device_add",
        json!({"driver": "virtconsole", "chardev": "nope"}),
        "GenericError",
    );
    assert!(d.contains("'nope'"), "{d}");
    c.ok(
        "device_add",
        json!({"driver": "virtconsole", "chardev": "c1"}),
    );
    c.err(
        "device_add",
        json!({"driver": "virtconsole", "chardev": "c1"}),
        "GenericError",
    );
    let tree = c.ok("x-query-device-tree", Value::Null);
    assert!(
        tree.as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "virtio-serial-bus.0" && b["devices"][0]["type"] == "virtconsole"),
        "{tree}"
    );
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

/// virtio-net on a tap the VMM opens itself, inside a network namespace of its own
/// (`unshare -n`), so the host's interfaces are never touched. Skips with the reason when
/// namespaces or /dev/net/tun are not usable here.
#[test]
fn virtio_net_realizes_on_a_tap_in_a_private_namespace() {
    let usable = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok();
    if !usable || !tun {
        eprintln!("skipped: needs 'unshare -n' and /dev/net/tun (unshare: {usable}, tun: {tun})");
        return;
    }
    let dir = TempDir::new();
    let sock = dir.path("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut child = Command::new("unshare")
        .args([
            "-n",
            common::BIN,
            "-qmp",
            &qmp,
            "-S",
            "-M",
            "microvm",
            "-accel",
            "tcg",
        ])
        .args([
            "-netdev",
            "tap,id=n0,ifname=keeltap0,script=no,downscript=no",
        ])
        .args([
            "-device",
            "virtio-net-device,id=nic0,netdev=n0,mac=52:54:00:12:34:57",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            break Client::new(s);
        }
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("vmm exited ({st}): {err}");
        }
        assert!(Instant::now() < deadline, "no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    };
    c.negotiate();
    assert_eq!(c.phase(), "machine-ready");
    let tree = c.ok("x-query-device-tree", Value::Null);
    let nic = user_devices(&tree);
    assert_eq!(nic.len(), 1);
    assert_eq!(nic[0].0, "nic0");
    assert_eq!(
        c.ok("qom-get", json!({"path": "nic0", "property": "mac"})),
        json!("52:54:00:12:34:57")
    );
    c.ok("quit", Value::Null);
    assert!(child.wait().unwrap().success());

    // A bad MAC fails the realize and names it.
    let (st, err) = common::run_to_end(&[
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-netdev",
        "tap,id=n0,ifname=keeltap1,script=no,downscript=no",
        "-device",
        "virtio-net-device,netdev=n0,mac=01:00:00:00:00:01",
    ]);
    assert!(!st.success());
    assert!(err.contains("01:00:00:00:00:01"), "{err}");
}

/// One writer per image unless every device says `share-rw=on` (QEMU's rule); the claim
/// goes with the device.
#[test]
fn a_drive_has_one_writer_unless_shared() {
    let dir = TempDir::new();
    let image = disk(&dir);
    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    c.ok(
        "blockdev-add",
        json!({"driver": "file", "filename": image, "node-name": "d0"}),
    );
    c.ok(
        "machine-set",
        json!({"type": "microvm", "memory": 32 << 20}),
    );
    c.ok("accel-set", json!({"accel": "tcg"}));
    c.ok("machine-init", Value::Null);
    c.ok(
        "device_add",
        json!({"driver": "virtio-blk-device", "id": "a", "drive": "d0"}),
    );
    for args in [
        json!({"driver": "virtio-blk-device", "id": "b", "drive": "d0"}),
        // A reader still excludes a writer that does not share.
        json!({"driver": "virtio-blk-device", "id": "b", "drive": "d0", "read-only": true}),
        // Sharing must be agreed by both.
        json!({"driver": "virtio-blk-device", "id": "b", "drive": "d0", "share-rw": true}),
    ] {
        let d = c.err("device_add", args, "GenericError");
        assert!(
            d.contains("Drive 'd0' is already in use by another device"),
            "{d}"
        );
    }
    assert!(!peripherals(&mut c).contains(&"b".to_owned()));
    // Gone with the device: another writer may take it.
    c.ok("device_del", json!({"id": "a"}));
    c.ok(
        "device_add",
        json!({"driver": "virtio-blk-device", "id": "s1", "drive": "d0", "share-rw": true}),
    );
    c.ok(
        "device_add",
        json!({"driver": "virtio-blk-device", "id": "s2", "drive": "d0", "share-rw": true}),
    );
    c.ok("quit", Value::Null);
    vmm.wait();
}

/// Errors that used to mislead now say what is wrong, in QEMU's words where QEMU has them.
#[test]
fn hostile_inputs_get_messages_that_say_what_is_wrong() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["-m", "1T"],
            "cannot set up guest memory 'microvm.ram': 1 TiB requested",
        ),
        (
            &["-kernel", "/tmp"],
            "could not open kernel file '/tmp': Is a directory",
        ),
        (&["-kernel", "/dev/zero"], "'/dev/zero': not a regular file"),
        (
            &["-kernel", "/nonexistent/k"],
            "'/nonexistent/k': No such file or directory",
        ),
        (
            &["-chardev", "file,id=c0,path=/nonexistent/dir/out"],
            "Could not open '/nonexistent/dir/out': No such file or directory",
        ),
    ];
    for (args, want) in cases {
        let (st, err) = common::run_to_end(args);
        assert_eq!(st.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}

/// `-M pc` from the command line: the onboard functions and cold virtio-pci devices in
/// `query-pci` (QEMU's shape) and `info pci`, `pci.0` in the device tree with hot plug, and
/// a hot `device_add` before the guest runs accepted on `pci.0` but refused on `isa.0`.
#[test]
fn pc_machine_reports_its_pci_functions() {
    let dir = TempDir::new();
    let img = disk(&dir);
    let drive = format!("file={img},if=none,format=raw,id=d0");
    let mut vmm = Vmm::start(&[
        "-S",
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-drive",
        &drive,
        "-chardev",
        "null,id=c1",
        "-device",
        "virtio-blk-pci,drive=d0,id=disk0",
        "-device",
        "virtio-serial-pci,id=vs,addr=04",
        "-device",
        "virtconsole,chardev=c1,id=con0",
    ]);
    let mut c = vmm.qmp();
    let pci = c.ok("query-pci", Value::Null);
    let devs = pci[0]["devices"].as_array().unwrap();
    let at: Vec<(u64, u64, u64, u64, &str)> = devs
        .iter()
        .map(|d| {
            (
                d["slot"].as_u64().unwrap(),
                d["function"].as_u64().unwrap(),
                d["id"]["vendor"].as_u64().unwrap(),
                d["id"]["device"].as_u64().unwrap(),
                d["qdev_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        at,
        [
            (0, 0, 0x8086, 0x1237, ""),
            (1, 0, 0x8086, 0x7000, ""),
            (1, 3, 0x8086, 0x7113, ""),
            (2, 0, 0x1af4, 0x1001, "disk0"),
            (4, 0, 0x1af4, 0x1003, "vs"),
        ]
    );
    assert_eq!(devs[3]["class_info"]["desc"], "SCSI controller");
    // Transitional virtio-pci: BAR0 is the legacy I/O header, BAR4 the 64-bit modern BAR.
    assert_eq!(devs[3]["regions"][0]["type"], "io");
    assert_eq!(devs[3]["regions"][2]["mem_type_64"], true);
    let text = c.ok("human-monitor-command", json!({"command-line": "info pci"}));
    let text = text.as_str().unwrap();
    assert!(text.contains("  Bus  0, device   4, function 0:\r\n    Communication controller: PCI device 1af4:1003\r\n"), "{text}");
    assert!(text.contains("      id \"disk0\"\r\n"), "{text}");
    let tree = c.ok("x-query-device-tree", Value::Null);
    let bus = tree
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "pci.0")
        .unwrap_or_else(|| panic!("no pci.0 in {tree}"));
    assert_eq!(bus["hotpluggable"], true);
    assert!(tree.as_array().unwrap().iter().any(|b| b["name"] == "vs.0"));
    // Machine-ready (under -S): pci.0 hot-plugs, isa.0 does not.
    c.ok(
        "device_add",
        json!({"driver": "virtio-rng-pci", "id": "rng0", "addr": "06.0"}),
    );
    let e = c.err(
        "device_add",
        json!({"driver": "isa-debug-exit", "id": "dbg"}),
        "GenericError",
    );
    assert!(e.contains("isa.0"), "{e}");
    let pci = c.ok("query-pci", Value::Null);
    assert!(
        pci[0]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["slot"] == 6 && d["qdev_id"] == "rng0"),
        "{pci}"
    );
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

/// `netdev_add type=user` over QMP: the network starts at once (its `hostfwd` port listens
/// before any device uses it, as in QEMU), QEMU's option errors, and HMP's `hostfwd_add`
/// and `hostfwd_remove` on it. Skips without libslirp.
#[test]
fn netdev_add_user_listens_at_once_and_takes_hmp_hostfwd() {
    if !std::path::Path::new("/usr/lib/x86_64-linux-gnu/libslirp.so.0").exists() {
        eprintln!("skipped: libslirp.so.0 is not installed");
        return;
    }
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    let hmp = |c: &mut Client, line: &str| {
        c.ok("human-monitor-command", json!({"command-line": line}))
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        hmp(&mut c, "hostfwd_add tcp::1-:2"),
        "user mode network stack not in use\r\n"
    );
    let p1 = free();
    let rule = format!("tcp:127.0.0.1:{p1}-:22");
    c.ok(
        "netdev_add",
        json!({"type": "user", "id": "u0", "net": "192.168.76.0/24", "restrict": false,
               "hostfwd": [{"str": rule}]}),
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", p1)).is_ok());
    // The same port again: QEMU's message, with the host's reason.
    let d = c.err(
        "netdev_add",
        json!({"type": "user", "id": "u1", "hostfwd": [{"str": rule}]}),
        "GenericError",
    );
    assert!(
        d.starts_with(&format!("Could not set up host forwarding rule '{rule}'")),
        "{d}"
    );
    for (args, want) in [
        (
            json!({"type": "user", "id": "u1", "dhcpstart": "10.0.2.2"}),
            "DHCP must be different from host and DNS",
        ),
        (
            json!({"type": "user", "id": "u1", "hostfwd": [{"str": "tcp:22"}]}),
            "Invalid host forwarding rule 'tcp:22' (Missing : separator)",
        ),
        (
            json!({"type": "user", "id": "u1", "ifname": "t0"}),
            "Parameter 'ifname' is unexpected for type=user",
        ),
        (
            json!({"type": "user", "id": "u0"}),
            "Duplicate netdev ID 'u0'",
        ),
    ] {
        assert_eq!(c.err("netdev_add", args, "GenericError"), want);
    }
    let p2 = free();
    assert_eq!(
        hmp(&mut c, &format!("hostfwd_add u0 tcp:127.0.0.1:{p2}-:80")),
        ""
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", p2)).is_ok());
    assert_eq!(
        hmp(&mut c, &format!("hostfwd_remove tcp:127.0.0.1:{p2}")),
        format!("host forwarding rule for tcp:127.0.0.1:{p2} removed\r\n")
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", p2)).is_err());
    assert_eq!(
        hmp(&mut c, "hostfwd_add nosuch tcp::1-:2"),
        "unrecognized netdev id 'nosuch'\r\n"
    );
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}
