//! The Debian guest from `scripts/build-guest.sh` with `keel.mode=virtio-test`: it reads a
//! string the host put on a virtio-blk disk, writes one back, reads entropy from
//! virtio-rng and prints on hvc0 (see scripts/README.md for the markers).
//!
//! Needs `$KEEL_GUEST_DIR` or `~/.cache/keel-guest/current` with `vmlinux` (or `bzImage`)
//! and `initramfs-virtio.cpio.gz`; without them the test prints why and passes, unless
//! `KEEL_REQUIRE_GUEST=1`. `KEEL_LINUX_ACCEL` picks the accelerator (default `tcg`).
//! Each test takes 10-30 s under tcg: `cargo test -p vmm --test linux_virtio -- --nocapture`.
//! The virtio-net tests (microvm, and `pc` with a legacy virtio-net-pci) also need
//! `unshare -n` and /dev/net/tun (they skip otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TempDir;

const HOST_MARKER: &[u8] = b"KEEL-HOST-MARKER 7f3a9c written by the host";
const GUEST_WROTE: &[u8] = b"KEEL-GUEST-WROTE-THIS sector=8\n";

/// The part of the command line both guests share: microvm, 256 MiB, serial on stdio, no
/// reboot, the kernel, its initramfs and command line.
fn guest_args(
    accel: &str,
    append: &str,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
) -> Vec<std::ffi::OsString> {
    machine_args("microvm", accel, append, kernel, initrd)
}

/// [`guest_args`] on another machine type.
fn machine_args(
    machine: &str,
    accel: &str,
    append: &str,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "-M",
        machine,
        "-accel",
        accel,
        "-m",
        "256M",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-append",
        append,
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.extend([
        "-kernel".into(),
        kernel.into(),
        "-initrd".into(),
        initrd.into(),
    ]);
    args
}

#[test]
fn linux_guest_uses_virtio_blk_rng_and_console() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let accel = std::env::var("KEEL_LINUX_ACCEL").unwrap_or_else(|_| "tcg".into());
    let dir = TempDir::new();
    let disk = dir.path("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..HOST_MARKER.len()].copy_from_slice(HOST_MARKER);
    std::fs::write(&disk, &image).unwrap();
    let hvc0 = dir.path("hvc0.out");
    let append = format!(
        "console=ttyS0 quiet keel.mode=virtio-test tsc_early_khz={}",
        keel_tcg::guest_tsc_khz()
    );
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let chardev = format!("file,id=c0,path={}", hvc0.display());
    let mut child = Command::new(common::BIN)
        .args(guest_args(&accel, &append, &kernel, &initrd))
        .args([
            "-drive",
            &drive,
            "-device",
            "virtio-blk-device,drive=d0,serial=keel0",
        ])
        .args(["-device", "virtio-rng-device"])
        .args(["-device", "virtio-serial-device", "-chardev", &chardev])
        .args(["-device", "virtconsole,chardev=c0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = out.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if out.lock().unwrap().contains("KEEL-VIRTIO-TEST-DONE") {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give the guest a moment to power off, then make sure the process is gone.
    let end = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let text = out.lock().unwrap().clone();
    assert!(
        text.contains("KEEL-VIRTIO-TEST-DONE"),
        "guest output:\n{text}"
    );

    // virtio-blk: the guest read the host's string and wrote its own at sector 8.
    let shown = String::from_utf8_lossy(HOST_MARKER).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("KEEL-VDA-TEXT") && l.contains(&shown)),
        "{text}"
    );
    assert!(text.contains("KEEL-VDA-WRITE OK"), "{text}");
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(&image[8 * 512..8 * 512 + GUEST_WROTE.len()], GUEST_WROTE);
    // virtio-rng: 64 hex digits.
    let rng = text
        .lines()
        .find_map(|l| l.strip_prefix("KEEL-RNG "))
        .unwrap_or_else(|| panic!("no KEEL-RNG line in\n{text}"));
    assert!(
        rng.trim().len() == 64 && rng.trim().chars().all(|c| c.is_ascii_hexdigit()),
        "{rng}"
    );
    // virtio-console: hvc0 output reached the chardev file.
    assert!(text.contains("KEEL-HVC0 OK"), "{text}");
    let hvc = std::fs::read_to_string(&hvc0).unwrap_or_default();
    assert!(
        hvc.contains("KEEL-HVC0-HELLO from the guest"),
        "hvc0: {hvc:?}"
    );
}

/// virtio-net: the guest configures eth0 and pings the host end of a tap the VMM opens,
/// all inside a network namespace of the test's own (`unshare -n`), so no host interface
/// is touched. Skips with the reason when namespaces or /dev/net/tun are not usable.
#[test]
fn linux_guest_pings_the_host_over_virtio_net() {
    ping_over_virtio_net("microvm", "virtio-net-device");
}

/// The same on `-M pc` with a legacy virtio-net-pci (`disable-modern=on`: the I/O BAR0
/// alone, as QEMU offers it): Linux's driver negotiates without `VERSION_1`, so frames carry
/// the 10-byte legacy header both ways.
#[test]
fn linux_guest_pings_the_host_over_legacy_virtio_net_pci() {
    let text = ping_over_virtio_net("pc", "virtio-net-pci,disable-modern=on");
    assert!(
        text.contains("1af4:1000 class=0x020000 subsys=0x1af4:0x0001")
            || text.contains("0x1af4:0x1000 class=0x020000 subsys=0x1af4:0x0001"),
        "the guest saw no transitional virtio-net function:\n{text}"
    );
}

/// Boots the guest on `machine` with a `device` on a tap; the guest configures eth0 and
/// pings the host end. Returns the guest's output (empty when skipped).
fn ping_over_virtio_net(machine: &str, device: &str) -> String {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return String::new();
    };
    let unshare = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok();
    if !unshare || !tun {
        eprintln!("skipped: needs 'unshare -n' and /dev/net/tun (unshare: {unshare}, tun: {tun})");
        return String::new();
    }
    let accel = std::env::var("KEEL_LINUX_ACCEL").unwrap_or_else(|_| "tcg".into());
    let append = format!(
        "console=ttyS0 quiet keel.mode=virtio-test tsc_early_khz={} \
         keel.ip=10.0.9.2/24 keel.ping=10.0.9.1",
        keel_tcg::guest_tsc_khz()
    );
    // Inside the namespace: start the VMM (it creates the tap), give the host end an
    // address once the interface exists, and wait for the VMM.
    let script = r#"
        "$@" &
        pid=$!
        i=0
        while ! ip link show keeltap0 >/dev/null 2>&1; do
            i=$((i + 1)); [ $i -gt 200 ] && break; sleep 0.05
        done
        ip addr add 10.0.9.1/24 dev keeltap0 && ip link set keeltap0 up
        wait $pid
    "#;
    let mut child = Command::new("unshare")
        .args(["-n", "sh", "-c", script, "sh", common::BIN])
        .args(machine_args(machine, &accel, &append, &kernel, &initrd))
        .args([
            "-netdev",
            "tap,id=n0,ifname=keeltap0,script=no,downscript=no",
        ])
        .args([
            "-device",
            &format!("{device},netdev=n0,mac=52:54:00:12:34:58"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
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
        text.contains("KEEL-NET-UP 10.0.9.2/24"),
        "guest output:\n{text}"
    );
    assert!(
        text.contains("KEEL-PING OK 10.0.9.1"),
        "guest output:\n{text}"
    );
    text
}
