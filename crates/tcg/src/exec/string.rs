//! String instructions with every `rep` form. `rep movs` and `rep stos` with DF clear run
//! as bulk copies/fills per page; everything else runs element by element. A long `rep`
//! runs at most `BUDGET` elements per execution and then restarts itself, so interrupts
//! are taken between iterations as on hardware.

use iced_x86::{Mnemonic as M, OpKind};

use super::alu::{self, alu_op};
use super::operands::mask;
use crate::cpu::{Cpu, fl, sr};
use crate::exc::{Ex, Flow};
use crate::insn::{Insn, sreg};
use crate::mem::Access;

const BUDGET: u64 = 1 << 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Scas,
    Cmps,
    Ins,
    Outs,
}

/// Executes a (possibly repeated) string instruction.
pub fn string_op(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let (kind, esz) = match ins.mnemonic() {
        M::Movsb => (Kind::Movs, 1u8),
        M::Movsw => (Kind::Movs, 2),
        M::Movsd => (Kind::Movs, 4),
        M::Movsq => (Kind::Movs, 8),
        M::Stosb => (Kind::Stos, 1),
        M::Stosw => (Kind::Stos, 2),
        M::Stosd => (Kind::Stos, 4),
        M::Stosq => (Kind::Stos, 8),
        M::Lodsb => (Kind::Lods, 1),
        M::Lodsw => (Kind::Lods, 2),
        M::Lodsd => (Kind::Lods, 4),
        M::Lodsq => (Kind::Lods, 8),
        M::Scasb => (Kind::Scas, 1),
        M::Scasw => (Kind::Scas, 2),
        M::Scasd => (Kind::Scas, 4),
        M::Scasq => (Kind::Scas, 8),
        M::Cmpsb => (Kind::Cmps, 1),
        M::Cmpsw => (Kind::Cmps, 2),
        M::Cmpsd => (Kind::Cmps, 4),
        M::Cmpsq => (Kind::Cmps, 8),
        M::Insb => (Kind::Ins, 1),
        M::Insw => (Kind::Ins, 2),
        M::Insd => (Kind::Ins, 4),
        M::Outsb => (Kind::Outs, 1),
        M::Outsw => (Kind::Outs, 2),
        M::Outsd => (Kind::Outs, 4),
        _ => return Err(Ex::UD),
    };
    if matches!(kind, Kind::Ins | Kind::Outs) && !cpu.io_allowed() {
        let port = cpu.gpr[2] as u16;
        super::system::io_bitmap_check(cpu, port, esz)?;
    }
    let mut amask = u64::MAX;
    let mut src_seg = sr::DS;
    for k in 0..ins.op_count() {
        match ins.op_kind(k) {
            OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => amask = 0xffff,
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => {
                amask = 0xffff_ffff
            }
            _ => {}
        }
        if matches!(
            ins.op_kind(k),
            OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI
        ) {
            src_seg = sreg(ins.memory_segment()).unwrap_or(sr::DS);
        }
    }
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    let repne = ins.has_repne_prefix();
    let down = cpu.rflags & fl::DF != 0;
    let step = if down {
        0u64.wrapping_sub(u64::from(esz))
    } else {
        u64::from(esz)
    };
    let mut count = if rep { cpu.gpr[1] & amask } else { 1 };
    if count == 0 {
        return Ok(());
    }
    let mut budget = BUDGET;
    while count > 0 && budget > 0 {
        let si = cpu.gpr[6] & amask;
        let di = cpu.gpr[7] & amask;
        let src = cpu.ebase[src_seg].wrapping_add(si) & cpu.lin_mask;
        let dst = cpu.ebase[sr::ES].wrapping_add(di) & cpu.lin_mask;
        // Bulk paths.
        if rep && !down && (kind == Kind::Stos || kind == Kind::Movs) {
            let n = bulk(cpu, kind, esz, src, dst, count.min(budget))?;
            if n > 0 {
                let bytes = n * u64::from(esz);
                cpu.gpr[7] = (cpu.gpr[7] & !amask) | (di.wrapping_add(bytes) & amask);
                if kind == Kind::Movs {
                    cpu.gpr[6] = (cpu.gpr[6] & !amask) | (si.wrapping_add(bytes) & amask);
                }
                count -= n;
                budget = budget.saturating_sub(n);
                cpu.gpr[1] = (cpu.gpr[1] & !amask) | (count & amask);
                continue;
            }
        }
        let mut stop = false;
        match kind {
            Kind::Movs => {
                let v = cpu.rd_n(src, esz)?;
                cpu.wr_n(dst, esz, v)?;
                adv(cpu, 6, si, step, amask);
                adv(cpu, 7, di, step, amask);
            }
            Kind::Stos => {
                cpu.wr_n(dst, esz, cpu.gpr[0])?;
                adv(cpu, 7, di, step, amask);
            }
            Kind::Lods => {
                let v = cpu.rd_n(src, esz)?;
                cpu.wreg(0, esz, v);
                adv(cpu, 6, si, step, amask);
            }
            Kind::Scas => {
                let v = cpu.rd_n(dst, esz)?;
                let a = cpu.gpr[0] & mask(esz);
                alu_op(cpu, alu::CMP, esz, a, v);
                adv(cpu, 7, di, step, amask);
                stop = rep && (cpu.zf() == repne);
            }
            Kind::Cmps => {
                let a = cpu.rd_n(src, esz)?;
                let b = cpu.rd_n(dst, esz)?;
                alu_op(cpu, alu::CMP, esz, a, b);
                adv(cpu, 6, si, step, amask);
                adv(cpu, 7, di, step, amask);
                stop = rep && (cpu.zf() == repne);
            }
            Kind::Ins => {
                // Probe the destination first so a fault does not consume device data.
                cpu.translate(dst, Access::Write, cpu.mmu.user)?;
                let mut b = [0u8; 4];
                let port = keel_accel::PioAddress(cpu.gpr[2] as u16);
                cpu.mmu.phys.buses.pio_read(port, &mut b[..esz as usize]);
                cpu.wr_n(dst, esz, u64::from(u32::from_le_bytes(b)))?;
                adv(cpu, 7, di, step, amask);
            }
            Kind::Outs => {
                let v = cpu.rd_n(src, esz)?;
                let b = (v as u32).to_le_bytes();
                let port = keel_accel::PioAddress(cpu.gpr[2] as u16);
                cpu.mmu.phys.buses.pio_write(port, &b[..esz as usize]);
                adv(cpu, 6, si, step, amask);
            }
        }
        count -= 1;
        budget -= 1;
        if rep {
            cpu.gpr[1] = (cpu.gpr[1] & !amask) | (count & amask);
        }
        if stop {
            return Ok(());
        }
    }
    if count > 0 {
        // Budget used up: run the instruction again after checking for interrupts.
        cpu.rip = i.ip;
        return Err(Ex::EndBlock);
    }
    Ok(())
}

#[inline]
fn adv(cpu: &mut Cpu, r: usize, old: u64, step: u64, amask: u64) {
    cpu.gpr[r] = (cpu.gpr[r] & !amask) | (old.wrapping_add(step) & amask);
}

/// Copies or fills as many whole elements as fit in the current pages; 0 = use the slow path.
fn bulk(cpu: &mut Cpu, kind: Kind, esz: u8, src: u64, dst: u64, count: u64) -> Result<u64, Ex> {
    let e = u64::from(esz);
    let room_d = 4096 - (dst & 0xfff);
    let mut n = count.min(room_d / e);
    if kind == Kind::Movs {
        let room_s = 4096 - (src & 0xfff);
        n = n.min(room_s / e);
    }
    if n == 0 {
        return Ok(0);
    }
    let bytes = (n * e) as usize;
    if kind == Kind::Stos {
        let Some((h, g)) = cpu.host_span(dst, Access::Write)? else {
            return Ok(0);
        };
        let v = cpu.gpr[0].to_le_bytes();
        let pat = &v[..esz as usize];
        // SAFETY: `h` maps the rest of this guest page in live RAM; `bytes` stays inside it.
        let out = unsafe { std::slice::from_raw_parts_mut(h as *mut u8, bytes) };
        if esz == 1 {
            out.fill(pat[0]);
        } else {
            for c in out.chunks_exact_mut(esz as usize) {
                c.copy_from_slice(pat);
            }
        }
        cpu.mmu.phys.mark(g, bytes as u64);
        return Ok(n);
    }
    let Some((hs, _)) = cpu.host_span(src, Access::Read)? else {
        return Ok(0);
    };
    let Some((hd, gd)) = cpu.host_span(dst, Access::Write)? else {
        return Ok(0);
    };
    if hd > hs && hd < hs + bytes {
        // A forward overlapping copy replicates data: let the element loop do it exactly.
        return Ok(0);
    }
    // SAFETY: both spans lie within live guest RAM pages checked above; `copy` allows overlap.
    unsafe { std::ptr::copy(hs as *const u8, hd as *mut u8, bytes) };
    cpu.mmu.phys.mark(gd, bytes as u64);
    Ok(n)
}
