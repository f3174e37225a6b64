//! Guest MIPS of the interpreter in 64-bit mode on a register loop, a memory loop and the
//! multiply-subtract loop of Linux's multi-precision code.
//!
//! Run: `cargo bench -p keel-tcg --bench mips`. Prints MIPS for one long run of each loop,
//! then lets criterion measure (its throughput line, in Melem/s, is MIPS as well).
//!
//! `MIPS_N=<iterations>` changes the loop count of the long run (of the register loop; the
//! others run as many instructions), `MIPS_LOOP=<name>` runs one loop only and `MIPS_ONLY=1`
//! skips criterion: e.g. run the bench binary under `valgrind --tool=callgrind` with two values of
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

/// Limbs per call of the multiply-subtract loop.
const MPI_LIMBS: u32 = 32;

/// The inner loop of Linux 6.1's `mpihelp_submul_1` as Debian's gcc compiles it (portable
/// `umul_ppmm`: four `imul`, shifts, `cmp`/`cmovae`/`setb`/`adc` carries; 37 instructions
/// per limb), called `n` times over 32 limbs. RSA and DH self-tests spend about a third of
/// the Debian guest's boot here (guest-RIP samples of a boot).
fn mpi_loop(n: u32) -> Vec<u8> {
    asm(64, CODE, |a| {
        let mut outer = a.create_label();
        let mut first = a.create_label();
        let mut next = a.create_label();
        a.mov(r15d, n).unwrap();
        a.set_label(&mut outer).unwrap();
        // res_ptr, s1_ptr, size, s2_limb as the C function receives them.
        a.mov(edi, 0x31_0000u32).unwrap();
        a.mov(esi, 0x30_0000u32).unwrap();
        a.mov(edx, MPI_LIMBS).unwrap();
        a.mov(rcx, 0x9e37_79b9_7f4a_7c15u64).unwrap();
        a.neg(edx).unwrap();
        a.mov(r10, rcx).unwrap();
        a.mov(r11, rdi).unwrap();
        a.movsxd(rax, edx).unwrap();
        a.shr(r10, 32).unwrap();
        a.mov(r9d, ecx).unwrap();
        a.mov(r8, rax).unwrap();
        a.mov(r12, rax).unwrap();
        a.mov(rbp, 0x1_0000_0000u64).unwrap();
        a.mov(rbx, rsi).unwrap();
        a.xor(esi, esi).unwrap();
        a.jmp(first).unwrap();
        a.set_label(&mut next).unwrap();
        a.movsxd(rax, r8d).unwrap();
        a.set_label(&mut first).unwrap();
        a.sub(rax, r12).unwrap();
        a.mov(rcx, qword_ptr(rbx + rax * 8)).unwrap();
        a.lea(rdi, qword_ptr(rax * 8)).unwrap();
        a.mov(rdx, rcx).unwrap();
        a.mov(ecx, ecx).unwrap();
        a.shr(rdx, 32).unwrap();
        a.mov(rax, rcx).unwrap();
        a.imul_2(rax, r9).unwrap();
        a.mov(r13, rdx).unwrap();
        a.imul_2(r13, r9).unwrap();
        a.imul_2(rcx, r10).unwrap();
        a.imul_2(rdx, r10).unwrap();
        a.mov(r14, rax).unwrap();
        a.mov(eax, eax).unwrap();
        a.shr(r14, 32).unwrap();
        a.add(rcx, r13).unwrap();
        a.add(rcx, r14).unwrap();
        a.mov(r14, rdx).unwrap();
        a.add(rdx, rbp).unwrap();
        a.cmp(rcx, r13).unwrap();
        a.mov(r13, rcx).unwrap();
        a.cmovae(rdx, r14).unwrap();
        a.add(rax, rsi).unwrap();
        a.shl(r13, 32).unwrap();
        a.add(rax, r13).unwrap();
        a.cmp(rax, rsi).unwrap();
        a.setb(sil).unwrap();
        a.add(rdi, r11).unwrap();
        a.shr(rcx, 32).unwrap();
        a.mov(r13, qword_ptr(rdi)).unwrap();
        a.movzx(esi, sil).unwrap();
        a.sub(r13, rax).unwrap();
        a.adc(rsi, rcx).unwrap();
        a.mov(qword_ptr(rdi), r13).unwrap();
        a.add(rsi, rdx).unwrap();
        a.add(r8d, 1).unwrap();
        a.jne(next).unwrap();
        a.dec(r15d).unwrap();
        a.jnz(outer).unwrap();
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
        (
            "mpi_loop",
            mpi_loop as fn(u32) -> Vec<u8>,
            37 * u64::from(MPI_LIMBS),
        ),
    ] {
        if std::env::var("MIPS_LOOP").is_ok_and(|l| l != name) {
            continue;
        }
        let n = std::env::var("MIPS_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50_000_000u32)
            / (per as u32 / 3).max(1);
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
        let small = 2_000_000u32 / (per as u32 / 3).max(1);
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
