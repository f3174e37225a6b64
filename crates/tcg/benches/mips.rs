//! Guest MIPS of the interpreter on a register loop and a memory loop in 64-bit mode.
//!
//! Run: `cargo bench -p keel-tcg --bench mips`. Prints MIPS for one long run of each loop,
//! then lets criterion measure (its throughput line, in Melem/s, is MIPS as well).
//!
//! `MIPS_N=<iterations>` changes the loop count of the long run and `MIPS_ONLY=1` skips
//! criterion: e.g. run the bench binary under `valgrind --tool=callgrind` with two values of
//! `MIPS_N` and divide the difference in host instructions by the difference in guest ones.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use iced_x86::code_asm::*;
use keel_accel::VcpuExit;

/// add/dec/jnz: 3 instructions per iteration.
fn reg_loop(n: u32) -> Vec<u8> {
    asm(64, CODE, |a| {
        let mut lp = a.create_label();
        a.mov(ecx, n).unwrap();
        a.mov(ebx, 3u32).unwrap();
        a.set_label(&mut lp).unwrap();
        a.add(rax, rbx).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(lp).unwrap();
        a.hlt().unwrap();
    })
}

/// load/add/store/dec/jnz: 5 instructions per iteration.
fn mem_loop(n: u32) -> Vec<u8> {
    asm(64, CODE, |a| {
        let mut lp = a.create_label();
        a.mov(ecx, n).unwrap();
        a.mov(edi, 0x20_0000u32).unwrap();
        a.set_label(&mut lp).unwrap();
        a.mov(rax, qword_ptr(rdi)).unwrap();
        a.add(rax, rcx).unwrap();
        a.mov(qword_ptr(rdi), rax).unwrap();
        a.dec(rcx).unwrap();
        a.jnz(lp).unwrap();
        a.hlt().unwrap();
    })
}

/// CPU time of this thread: robust against other processes on a shared host.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs a guest to its `hlt`: (instructions, wall time, thread CPU time).
fn run_guest(code: &[u8]) -> (u64, Duration, Duration) {
    let mut h = Harness::new(64);
    h.long_mode(code);
    let t = Instant::now();
    let c = thread_cpu();
    assert_eq!(h.run(), VcpuExit::Halted);
    (h.vcpu.icount(), t.elapsed(), thread_cpu() - c)
}

fn bench(c: &mut Criterion) {
    for (name, f, per) in [
        ("reg_loop", reg_loop as fn(u32) -> Vec<u8>, 3u64),
        ("mem_loop", mem_loop as fn(u32) -> Vec<u8>, 5u64),
    ] {
        let n = std::env::var("MIPS_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50_000_000u32);
        let (insns, wall, cpu) = run_guest(&f(n));
        assert!(insns >= u64::from(n) * per);
        println!(
            "{name}: {insns} guest instructions: {:.0} MIPS per CPU second ({:.3} s CPU), {:.0} MIPS wall ({:.3} s)",
            insns as f64 / cpu.as_secs_f64() / 1e6,
            cpu.as_secs_f64(),
            insns as f64 / wall.as_secs_f64() / 1e6,
            wall.as_secs_f64(),
        );
        if std::env::var_os("MIPS_ONLY").is_some() {
            continue;
        }
        let small = 2_000_000u32;
        let code = f(small);
        let mut g = c.benchmark_group("tcg_mips");
        g.throughput(Throughput::Elements(u64::from(small) * per));
        g.sample_size(10);
        g.bench_function(name, |b| b.iter(|| run_guest(&code)));
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
