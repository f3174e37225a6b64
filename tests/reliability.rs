//! Reliability under abuse, end to end against the `vmm` binary: what a guest was told is
//! on disk is on disk even when the process is killed mid-write, and hostile kernel images
//! end in a message and an exit status, never a panic or a hang.
//!
//! The guest test boots the Debian reference guest of `scripts/build-guest.sh` under the
//! interpreter (skipped with the reason when it is missing, a failure with
//! `KEEL_REQUIRE_GUEST=1`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TempDir;

/// The record the guest writes to sector `n`, padded by `dd conv=sync` to 512 bytes.
fn record(n: u32) -> String {
    format!("KEEL-REC {n:08}\n")
}

/// Waits until `out` holds `what` after byte `from`; returns the end of the match.
fn wait_for(out: &Mutex<String>, what: &str, from: usize, deadline: Instant) -> usize {
    loop {
        {
            let text = out.lock().unwrap();
            if let Some(at) = text.get(from..).and_then(|t| t.find(what)) {
                return from + at + what.len();
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} from the guest; console:\n{text}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest writes numbered records to its virtio-blk disk, one sector each, with an
/// `fsync` after each one, and says `SYNCED n` when `fsync` returned. The host kills the
/// VMM with SIGKILL in the middle of that stream. Every record the guest saw synced must be
/// in the image file afterwards, byte for byte: a completed write or flush is never held
/// only in the VMM's memory.
#[test]
fn synced_writes_survive_sigkill_during_writes() {
    let Some((kernel, initrd)) = common::debian_guest("initramfs-virtio.cpio.gz") else {
        return;
    };
    let dir = TempDir::new();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let append = format!(
        "console=ttyS0 quiet keel.mode=shell tsc_early_khz={}",
        keel_tcg::guest_tsc_khz()
    );
    let mut child = Command::new(common::BIN)
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "256M",
            "-nodefaults",
        ])
        .args(["-serial", "stdio", "-append", &append])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-drive", &drive, "-device", "virtio-blk-device,drive=d0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let out = Arc::new(Mutex::new(String::new()));
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
    let deadline = Instant::now() + Duration::from_secs(400);
    let at = wait_for(&out, "KEEL-GUEST-SHELL", 0, deadline);
    let at = wait_for(&out, "# ", at, deadline);
    // 400 records at most; the host kills the VMM long before the loop ends.
    stdin
        .write_all(
            b"i=1; while [ $i -le 400 ]; do printf 'KEEL-REC %08d\\n' $i | \
              dd of=/dev/vda bs=512 seek=$i conv=notrunc,sync,fsync 2>/dev/null \
              && echo SYNCED $i; i=$((i+1)); done\n",
        )
        .unwrap();
    wait_for(&out, "SYNCED 25\r\n", at, deadline);
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    let text = out.lock().unwrap().clone();
    let synced: Vec<u32> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SYNCED "))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let last = *synced.iter().max().unwrap();
    assert!(last >= 25, "{text}");
    assert!(last < 400, "the loop ended before the kill: {text}");
    let image = std::fs::read(&disk).unwrap();
    for n in 1..=last {
        let want = record(n);
        let at = n as usize * 512;
        let got = &image[at..at + 512];
        assert_eq!(
            &got[..want.len()],
            want.as_bytes(),
            "sector {n}: the guest saw it synced (last synced {last}), the image has {:?}",
            String::from_utf8_lossy(&got[..want.len()])
        );
        assert!(got[want.len()..].iter().all(|&b| b == 0), "sector {n}");
    }
    eprintln!("killed after {last} synced records; all {last} in the image");
}

/// One crafted kernel: run it, return (exit code or None when it had to be killed, stderr).
fn run_kernel(dir: &TempDir, name: &str, bytes: &[u8]) -> (Option<i32>, String) {
    let path = dir.path(name);
    std::fs::write(&path, bytes).unwrap();
    let mut child = Command::new(common::BIN)
        .args(["-M", "microvm", "-accel", "tcg", "-m", "64M", "-nodefaults"])
        .args(["-no-reboot", "-display", "none", "-kernel"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            // A mutated entry point may leave the guest spinning: the guest's business,
            // not a VMM failure, as long as the process still answers a kill.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (code, err)
}

/// Crafted ELF images (the built-in demo guest with its header and program-header fields
/// set to extreme values, and truncated at every structure boundary) end in one of: the
/// guest runs (status 0 or killed after a timeout because a mutated entry point spins), or
/// status 1 with one `vmm:` line saying what is wrong. Never a panic, a signal death, or
/// a message that is more than one line.
#[test]
fn crafted_elf_kernels_end_in_a_message_never_a_panic() {
    let base = keel_machine::DEMO_GUEST;
    assert_eq!(&base[..4], b"\x7fELF");
    let phoff = u64::from_le_bytes(base[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(base[56..58].try_into().unwrap()) as usize;
    // (offset, width) of every field worth breaking.
    let mut fields: Vec<(usize, usize)> = vec![(24, 8), (32, 8), (54, 2), (56, 2), (4, 1), (18, 2)];
    for i in 0..phnum {
        let o = phoff + i * 56;
        fields.extend([(o, 4), (o + 8, 8), (o + 24, 8), (o + 32, 8), (o + 40, 8)]);
    }
    let dir = TempDir::new();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (off, width) in fields {
        for value in [0u64, u64::MAX, 0x7fff_ffff_ffff_f000, 0xffff_ffff_ffff_f000] {
            let mut b = base.to_vec();
            b[off..off + width].copy_from_slice(&value.to_le_bytes()[..width]);
            cases.push((format!("field {off:#x}/{width} = {value:#x}"), b));
        }
    }
    for len in [
        0,
        3,
        16,
        63,
        64,
        phoff + 55,
        phoff + phnum * 56,
        base.len() / 2,
    ] {
        cases.push((
            format!("truncated to {len}"),
            base[..len.min(base.len())].to_vec(),
        ));
    }
    let mut refused = 0;
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let (code, err) = run_kernel(&dir, &format!("k{i}"), bytes);
        assert!(!err.contains("panicked"), "{what}: {err}");
        match code {
            Some(0) | None => {}
            Some(1) => {
                refused += 1;
                assert!(err.starts_with("vmm: "), "{what}: {err:?}");
                assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err:?}");
            }
            other => panic!("{what}: exit {other:?} (a signal?), stderr {err:?}"),
        }
    }
    eprintln!(
        "{} crafted ELF images, {refused} refused with a message",
        cases.len()
    );
    assert!(
        refused > cases.len() / 3,
        "most crafted images must be refused"
    );
}
