//! Guest MIPS of Keel's interpreter (tcg) on a register loop and a memory loop, and of
//! `qemu-system-x86_64 -M microvm -accel tcg` on the same PVH guests in the same run, with
//! the ratio. `harness = false`: run with `cargo bench -p keel-testguest --bench tcg_mips`.
//!
//! Environment: `KEEL_BENCH_ITERS` (loop iterations under tcg, default 50,000,000),
//! `KEEL_BENCH_QEMU_ITERS` (iterations under QEMU, default 1,000,000,000: its JIT needs
//! seconds of work to rise above process start-up noise), `KEEL_BENCH_RUNS` (repetitions,
//! best is reported, default 3), `KEEL_BENCH_NO_QEMU=1` to skip QEMU.
//!
//! MIPS = loop instructions / wall time. For in-process tcg the time is the vCPU loop only;
//! for QEMU and for Keel's `vmm` binary (`$KEEL_VMM` or `vmm` in the target directory, run
//! with QEMU's command line and `-accel tcg`) it is the process wall time minus the median
//! wall time of the same guest with 1,000 iterations (start-up and shutdown), so that
//! process start-up and shutdown cancel out of the ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_testguest::{Mode, TestGuest};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn check_output(what: &str, guest: &TestGuest, serial: &str) {
    if let Some(want) = &guest.expected_serial
        && serial != want
    {
        eprintln!(
            "WARNING: {what}: {} printed {serial:?}, expected {want:?}",
            guest.name
        );
    }
}

/// Best-of-`runs` vCPU-loop time under tcg.
fn tcg_time(guest: &TestGuest, runs: u64) -> Option<Duration> {
    let accel = common::tcg();
    let mut best: Option<Duration> = None;
    for _ in 0..runs {
        let o = common::run(accel.as_ref(), guest, Duration::from_secs(600));
        check_output("tcg", guest, &o.serial);
        if o.end != common::End::Exit(0) {
            eprintln!("tcg run of {} ended {:?}", guest.name, o.end);
            return None;
        }
        best = Some(best.map_or(o.elapsed, |b| b.min(o.elapsed)));
    }
    best
}

fn qemu_available() -> bool {
    std::env::var_os("KEEL_BENCH_NO_QEMU").is_none()
        && Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

/// Wall time of one `program` process (QEMU or Keel's vmm, same command line) booting
/// `guest` as a PVH ELF.
fn process_once(program: &Path, guest: &TestGuest, dir: &Path) -> Option<Duration> {
    let path = dir.join(format!("{}.elf", guest.name));
    std::fs::write(&path, guest.pvh_elf()).ok()?;
    let start = Instant::now();
    let out = Command::new(program)
        .args([
            "-M",
            "microvm",
            "-accel",
            "tcg",
            "-m",
            "32M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&path)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let t = start.elapsed();
    let serial = String::from_utf8_lossy(&out.stdout);
    check_output(&program.display().to_string(), guest, &serial);
    // isa-debug-exit with value 0 ends QEMU with status 1.
    (out.status.code() == Some(1)).then_some(t)
}

/// Best process time for `guest` minus the median start-up cost (`small`), per §2.1.
fn process_time(
    program: &Path,
    guest: &TestGuest,
    small: &TestGuest,
    runs: u64,
) -> Option<Duration> {
    let dir = std::env::temp_dir().join(format!("keel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let mut base: Vec<Duration> = (0..3)
        .filter_map(|_| process_once(program, small, &dir))
        .collect();
    base.sort();
    let startup = *base.get(base.len() / 2)?;
    let best = (0..runs)
        .filter_map(|_| process_once(program, guest, &dir))
        .min()?;
    let _ = std::fs::remove_dir_all(&dir);
    // Less than twice the start-up time is mostly noise: report nothing rather than a
    // made-up number.
    (best > startup * 2).then(|| best - startup)
}

/// Keel's `vmm` binary: `$KEEL_VMM`, or `vmm` in this bench's target directory.
fn vmm_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_VMM") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("vmm");
    p.exists().then_some(p)
}

fn mips(insns: u64, t: Duration) -> f64 {
    insns as f64 / t.as_secs_f64().max(1e-9) / 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either.
    let iters = env_u64("KEEL_BENCH_ITERS", 50_000_000);
    let qemu_iters = env_u64("KEEL_BENCH_QEMU_ITERS", 1_000_000_000).min(u64::from(u32::MAX));
    let runs = env_u64("KEEL_BENCH_RUNS", 3).max(1);
    let qemu = qemu_available();
    if !qemu {
        println!("qemu-system-x86_64 not found (or KEEL_BENCH_NO_QEMU set): tcg only");
    }
    let vmm = vmm_binary();
    match &vmm {
        Some(v) => println!("vmm binary: {} (same command line as QEMU)", v.display()),
        None => println!("no vmm binary (build -p vmm --release or set KEEL_VMM): in-process only"),
    }
    println!(
        "iterations per loop: {iters} (in-process tcg and vmm), {qemu_iters} (qemu), best of {runs} runs"
    );
    println!(
        "{:<12} {:>14} {:>10} {:>10} {:>10} {:>8}",
        "guest", "instructions", "keel MIPS", "vmm MIPS", "qemu MIPS", "ratio"
    );
    type Build = fn(Mode, u64) -> Result<TestGuest, keel_testguest::GuestError>;
    let loops: [(Build, Mode); 4] = [
        (keel_testguest::reg_loop, Mode::Long64),
        (keel_testguest::mem_loop, Mode::Long64),
        (keel_testguest::reg_loop, Mode::Protected32),
        (keel_testguest::mem_loop, Mode::Protected32),
    ];
    for (build, mode) in loops {
        let guest = build(mode, iters).unwrap();
        let small = build(mode, 1000).unwrap();
        let insns = guest.instructions.unwrap_or(0);
        let keel = tcg_time(&guest, runs).map(|t| mips(insns, t));
        let v = vmm
            .as_deref()
            .and_then(|p| process_time(p, &guest, &small, runs))
            .map(|t| mips(insns, t));
        let q = if qemu {
            let big = build(mode, qemu_iters).unwrap();
            let qinsns = big.instructions.unwrap_or(0);
            process_time(Path::new("qemu-system-x86_64"), &big, &small, runs)
                .map(|t| mips(qinsns, t))
        } else {
            None
        };
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |m| format!("{m:.1}"));
        let ratio = match (keel, q) {
            (Some(k), Some(q)) if q > 0.0 => format!("{:.3}", k / q),
            _ => "-".to_string(),
        };
        println!(
            "{:<12} {:>14} {:>10} {:>10} {:>10} {:>8}",
            guest.name,
            insns,
            fmt(keel),
            fmt(v),
            fmt(q),
            ratio
        );
    }
    println!(
        "ratio = keel MIPS (in-process vCPU loop) / qemu MIPS; vmm = the vmm binary measured like qemu (process time minus start-up). QEMU TCG is a JIT (2.1-2.7 G insn/s measured on a tight loop on this kind of host)"
    );
}
