//! The sandbox end to end, against the `vmm` binary: on by default with a filter per thread
//! class (read back from `/proc`), libvirt's `-sandbox` line, `-sandbox off`, the Debian
//! guest doing virtio-blk I/O on `microvm` and hot plugging a virtio-blk-pci disk on `pc`
//! under tcg with the filters on, a small guest under kvm, and `-run-with user=nobody`.
//!
//! That a forbidden call is refused and named is proven per class in keel-sandbox's own
//! tests (`crates/sandbox/tests/filters.rs`); the binary has no hook to provoke one.
//! The Debian tests need `~/.cache/keel-guest/current` (or `$KEEL_GUEST_DIR`) and skip with
//! the reason otherwise; run them in release: `cargo test --release --test sandbox`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{TempDir, Vmm, run_to_end};
use serde_json::{Value, json};

/// libvirt's line for a QEMU that lists `sandbox` in `query-command-line-options`.
const LIBVIRT_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// One `/proc/PID/task/*/status` field per thread name (the last thread of a name wins).
fn thread_field(pid: u32, field: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        if let Some(v) = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
        {
            out.insert(comm.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether a thread of this name adds its class's filter to the baseline.
fn confined_class(name: &str) -> bool {
    name == "qmp-loop" || name.starts_with("vcpu") || name.starts_with("virtio-")
}

/// Waits until the threads named in `names` exist (`virtio-*`: any of that prefix) and, if
/// `sandboxed`, each thread of a confined class has installed its filter (a thread is named
/// before its first action, so it may show the baseline alone for a moment).
fn wait_threads(pid: u32, names: &[&str], sandboxed: bool) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = thread_field(pid, "Seccomp_filters");
        let have = |n: &str| {
            f.keys()
                .any(|k| k == n || (n.ends_with('*') && k.starts_with(&n[..n.len() - 1])))
        };
        let settled = !sandboxed || f.iter().all(|(k, v)| !confined_class(k) || v == "4");
        if names.iter().all(|n| have(n)) && settled {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "threads {names:?} never all appeared with their filters: {f:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn on_by_default_with_a_filter_per_thread_class() {
    let mut vmm = Vmm::start(&[
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-nodefaults",
        "-S",
        "-device",
        "virtio-rng-device",
    ]);
    let mut c = vmm.qmp();
    assert_eq!(c.status(), "prelaunch");
    let pid = vmm.child.id();
    let filters = wait_threads(pid, &["vmm", "qmp-loop", "vcpu0", "virtio-*"], true);
    // The baseline (and the clone3 answer) on every thread; vCPU, worker and monitor add
    // their own class's pair on top.
    for (name, n) in &filters {
        let want = if confined_class(name) { "4" } else { "2" };
        assert_eq!(n, want, "{name}: {filters:?}");
    }
    for (name, v) in thread_field(pid, "NoNewPrivs") {
        assert_eq!(v, "1", "{name}");
    }
    // The demo guest runs under them to its power-off.
    c.ok("cont", Value::Null);
    let st = vmm.wait();
    assert!(st.success(), "{st}");
}

#[test]
fn sandbox_off_installs_no_filter_but_keeps_no_new_privs() {
    let mut vmm = Vmm::start(&["-sandbox", "off", "-M", "microvm", "-accel", "tcg", "-S"]);
    let mut c = vmm.qmp();
    let pid = vmm.child.id();
    let filters = wait_threads(pid, &["vmm", "qmp-loop", "vcpu0"], false);
    assert!(filters.values().all(|n| n == "0"), "{filters:?}");
    for (name, v) in thread_field(pid, "NoNewPrivs") {
        assert_eq!(v, "1", "{name}");
    }
    c.ok("quit", Value::Null);
}

#[test]
fn libvirts_sandbox_line_is_listed_and_accepted() {
    let mut vmm = Vmm::start(&[
        "-machine",
        "none",
        "-nodefaults",
        "-sandbox",
        LIBVIRT_SANDBOX,
    ]);
    let mut c = vmm.qmp();
    let opts = c.ok("query-command-line-options", json!({"option": "sandbox"}));
    let names: Vec<&str> = opts[0]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "enable",
            "obsolete",
            "elevateprivileges",
            "spawn",
            "resourcecontrol"
        ]
    );
    assert_eq!(opts[0]["parameters"][0]["type"], "boolean");
    let filters = thread_field(vmm.child.id(), "Seccomp_filters");
    assert_eq!(
        filters.get("vmm").map(String::as_str),
        Some("2"),
        "{filters:?}"
    );
    c.ok("quit", Value::Null);
}

#[test]
fn bad_sandbox_and_user_options_say_what_is_wrong() {
    let (st, err) = run_to_end(&["-sandbox", "on,spawn=maybe"]);
    assert_eq!(st.code(), Some(1));
    assert!(
        err.contains(
            "-sandbox on,spawn=maybe: invalid argument for spawn: 'maybe' (allow or deny)"
        ),
        "{err}"
    );
    let (st, err) = run_to_end(&["-run-with", "user=keel-no-such-user"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("no such user 'keel-no-such-user'"), "{err}");
    let (st, err) = run_to_end(&["-sandbox", "on,bogus=1"]);
    assert_eq!(st.code(), Some(1));
    assert!(err.contains("Invalid parameter 'bogus'"), "{err}");
    let (st, out) = (run_to_end(&["-h"]).0, {
        let o = std::process::Command::new(common::BIN)
            .arg("-h")
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    });
    assert!(st.success());
    assert!(out.contains("Keel's sandbox is ON by default"), "{out}");
    assert!(out.contains("-run-with user=NAME|UID:GID"), "{out}");
}

/// As root: every thread becomes `nobody` in a new root before the guest runs, and the
/// guest still runs;
/// not as root: the option is refused before anything starts.
#[test]
fn run_with_user_nobody_drops_every_thread() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let (st, err) = run_to_end(&["-run-with", "user=nobody"]);
        assert_eq!(st.code(), Some(1));
        assert!(err.contains("changing the user needs root"), "{err}");
        eprintln!("checked the refusal only: not running as root");
        return;
    }
    let accel = if kvm_usable() { "kvm" } else { "tcg" };
    let dir = TempDir::new();
    let console = dir.path("console");
    let serial = format!("file:{}", console.display());
    let pidfile = dir.path("vmm.pid");
    let root = dir.path("root");
    std::fs::create_dir(&root).unwrap();
    let mut vmm = Vmm::start(&[
        "-accel",
        accel,
        "-nodefaults",
        "-S",
        "-serial",
        &serial,
        "-pidfile",
        pidfile.to_str().unwrap(),
        "-sandbox",
        LIBVIRT_SANDBOX,
        "-run-with",
        &format!("user=nobody,chroot={}", root.display()),
    ]);
    let mut c = vmm.qmp();
    let pid = vmm.child.id();
    // The pid file is opened before the drop and written once the command line ran.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
        if !text.is_empty() {
            assert_eq!(text.trim(), pid.to_string());
            break;
        }
        assert!(Instant::now() < deadline, "the pid file stays empty");
        std::thread::sleep(Duration::from_millis(5));
    }
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    let uid = String::from_utf8(nobody.stdout).unwrap().trim().to_owned();
    let uids = wait_threads(pid, &["vmm", "vcpu0", "qmp-loop"], true);
    assert!(!uids.is_empty());
    for (name, line) in thread_field(pid, "Uid") {
        let all: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(all, [uid.as_str(); 4], "{name}: {line}");
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root
    );
    for (name, groups) in thread_field(pid, "Groups") {
        assert!(
            !groups.split_whitespace().any(|g| g == "0"),
            "{name}: {groups}"
        );
    }
    c.ok("cont", Value::Null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("Hello from the Keel demo guest")
    {
        assert!(Instant::now() < deadline, "the guest never printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vmm.wait().success());
}

#[test]
fn a_small_guest_runs_under_kvm_with_the_sandbox_on() {
    if !kvm_usable() {
        eprintln!("skipped: /dev/kvm cannot be opened");
        return;
    }
    let dir = TempDir::new();
    let console = dir.path("console");
    let serial = format!("file:{}", console.display());
    let mut vmm = Vmm::start(&["-accel", "kvm", "-nodefaults", "-S", "-serial", &serial]);
    let mut c = vmm.qmp();
    let filters = wait_threads(vmm.child.id(), &["vcpu0"], true);
    assert_eq!(filters["vcpu0"], "4", "{filters:?}");
    c.ok("cont", Value::Null);
    assert!(vmm.wait().success());
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("Hello from the Keel demo guest, running on kvm"),
        "{text}"
    );
}

fn guest_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KEEL_GUEST_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/keel-guest/current"))
        })?;
    let ok = ["vmlinux", "bzImage", "initramfs-virtio.cpio.gz"]
        .iter()
        .all(|f| dir.join(f).is_file());
    if ok {
        Some(dir)
    } else {
        let why = "skipped: no guest (run scripts/build-guest.sh or set KEEL_GUEST_DIR)";
        assert!(
            std::env::var("KEEL_REQUIRE_GUEST").as_deref() != Ok("1"),
            "{why}"
        );
        eprintln!("{why}");
        None
    }
}

fn wait_console(path: &std::path::Path, needle: &str, vmm: &mut Vmm) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(st) = vmm.child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut e) = vmm.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("vmm exited ({st}) before {needle:?}: {err}\n{text}");
        }
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn debian_does_virtio_blk_io_under_tcg_with_the_sandbox_on() {
    let Some(g) = guest_dir() else { return };
    let dir = TempDir::new();
    let disk = dir.path("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..24].copy_from_slice(b"KEEL-SANDBOX-HOST-MARKER");
    std::fs::write(&disk, &image).unwrap();
    let console = dir.path("console");
    let append = format!(
        "console=ttyS0 quiet keel.mode=virtio-test tsc_early_khz={}",
        keel_tcg::guest_tsc_khz()
    );
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let serial = format!("file:{}", console.display());
    let kernel = g.join("vmlinux");
    let initrd = g.join("initramfs-virtio.cpio.gz");
    let mut vmm = Vmm::start(&[
        "-sandbox",
        LIBVIRT_SANDBOX,
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-m",
        "256M",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        &serial,
        "-append",
        &append,
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-drive",
        &drive,
        "-device",
        "virtio-blk-device,drive=d0",
        "-device",
        "virtio-rng-device",
    ]);
    let text = wait_console(&console, "KEEL-VIRTIO-TEST-DONE", &mut vmm);
    assert!(
        text.lines()
            .any(|l| l.starts_with("KEEL-VDA-TEXT KEEL-SANDBOX-HOST-MARKER")),
        "{text}"
    );
    assert!(text.contains("KEEL-VDA-WRITE OK"), "{text}");
    assert!(text.contains("KEEL-RNG "), "{text}");
    let st = vmm.wait();
    assert!(st.success(), "{st}");
    let image = std::fs::read(&disk).unwrap();
    let wrote = b"KEEL-GUEST-WROTE-THIS sector=8\n";
    assert_eq!(&image[8 * 512..8 * 512 + wrote.len()], wrote);
}

#[test]
fn debian_on_pc_hot_plugs_and_removes_virtio_blk_pci_with_the_sandbox_on() {
    let Some(g) = guest_dir() else { return };
    let dir = TempDir::new();
    let disk = dir.path("hp.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let console = dir.path("console");
    let serial = format!("file:{}", console.display());
    let blockdev = format!("driver=file,filename={},node-name=d0", disk.display());
    let kernel = g.join("bzImage");
    let initrd = g.join("initramfs-virtio.cpio.gz");
    let mut vmm = Vmm::start(&[
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "256M",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        &serial,
        "-append",
        "console=ttyS0 keel.mode=shell",
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-blockdev",
        &blockdev,
    ]);
    let mut c = vmm.qmp();
    wait_console(&console, "KEEL-GUEST-SHELL", &mut vmm);
    let filters = thread_field(vmm.child.id(), "Seccomp_filters");
    assert_eq!(
        filters.get("vcpu0").map(String::as_str),
        Some("4"),
        "{filters:?}"
    );
    c.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "d0", "id": "hd1"}),
    );
    wait_console(&console, "[vda] 8192 512-byte logical blocks", &mut vmm);
    c.ok("device_del", json!({"id": "hd1"}));
    c.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    loop {
        let ev = c.next_event();
        if ev["event"] == "DEVICE_DELETED" {
            assert_eq!(ev["data"]["device"], "hd1");
            break;
        }
    }
    assert_eq!(c.status(), "running");
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}

/// A guest's `isa-debug-exit` ends the process from its vCPU thread; the pid file is still
/// removed (by a thread whose filter allows it) and the status is the guest's.
#[test]
fn isa_debug_exit_from_a_vcpu_removes_the_pid_file() {
    let dir = TempDir::new();
    let guest = keel_testguest::hello(keel_testguest::Mode::Long64).unwrap();
    let kernel = dir.path("hello.elf");
    std::fs::write(&kernel, guest.pvh_elf()).unwrap();
    let pidfile = dir.path("vmm.pid");
    let mut vmm = Vmm::start(&[
        "-machine",
        "microvm",
        "-accel",
        "tcg",
        "-m",
        "32",
        "-nodefaults",
        "-S",
        "-kernel",
        kernel.to_str().unwrap(),
        "-pidfile",
        pidfile.to_str().unwrap(),
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]);
    let mut c = vmm.qmp();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "no pid file");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest ends the process at once; the reply may not come.
    c.send_raw(b"{\"execute\": \"cont\"}");
    let st = vmm.wait();
    let mut err = String::new();
    use std::io::Read;
    vmm.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(
        st.code(),
        Some((i32::from(keel_testguest::EXIT_OK) << 1) | 1),
        "{err}"
    );
    assert!(!err.contains("seccomp"), "{err}");
    assert!(!pidfile.exists(), "the pid file is left behind");
}

/// `-overcommit mem-lock=on` (libvirt's `<memoryBacking><locked/>`) locks memory from the
/// main thread under its filter.
#[test]
fn mem_lock_works_under_the_sandbox() {
    let mut vmm = Vmm::start(&[
        "-M",
        "microvm",
        "-accel",
        "tcg",
        "-m",
        "32",
        "-nodefaults",
        "-S",
        "-overcommit",
        "mem-lock=on",
    ]);
    let mut c = vmm.qmp();
    assert_eq!(c.status(), "prelaunch");
    let locked = thread_field(vmm.child.id(), "VmLck");
    assert!(
        locked.values().any(|v| v != "0 kB"),
        "nothing locked: {locked:?}"
    );
    c.ok("quit", Value::Null);
    assert!(vmm.wait().success());
}
