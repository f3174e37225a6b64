//! System instructions: segment loads, far transfers, iret, interrupt and exception
//! delivery, control registers, MSRs, SYSCALL/SYSRET, port I/O, CPUID.
//!
//! Not modelled (raise #GP or #UD, documented in the crate docs): hardware task switching
//! (task gates, far jumps to TSS descriptors, iret with NT set), call gates, SYSENTER/SYSEXIT,
//! segment limit checks on data accesses.

use iced_x86::{Mnemonic as M, OpKind};

use super::operands::{ea, mask, op_size, rd_op, wr_op};
use crate::cpu::{Cpu, Seg, Shadow, fl, sr};
use crate::exc::{Ex, Flow, NO_ERR, vec};
use crate::insn::{Insn, gpr};
use crate::regs::{cr0, cr4, dr, efer};

// ---------------------------------------------------------------------------------------
// Descriptors

/// Reads the 8-byte descriptor for `sel` from the GDT or LDT; #GP(sel) outside the table.
pub fn read_desc(cpu: &mut Cpu, sel: u16) -> Result<(u64, u64), Ex> {
    let idx = u64::from(sel & !7);
    let (base, limit) = if sel & 4 != 0 {
        if cpu.ldtr.attr & (1 << 16) != 0 || !cpu.ldtr.present() {
            return Err(Ex::gp(u32::from(sel & !3)));
        }
        (cpu.ldtr.base, u64::from(cpu.ldtr.limit))
    } else {
        (cpu.gdt.0, u64::from(cpu.gdt.1))
    };
    if idx + 7 > limit {
        return Err(Ex::gp(u32::from(sel & !3)));
    }
    let a = base.wrapping_add(idx);
    let d = cpu.rd_as::<8>(a, false)?;
    Ok((d, a))
}

/// Decodes a descriptor into a segment cache value.
pub fn desc_to_seg(sel: u16, d: u64) -> Seg {
    let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    let mut limit = ((d & 0xffff) | (((d >> 48) & 0xf) << 16)) as u32;
    if d & (1 << 55) != 0 {
        limit = (limit << 12) | 0xfff;
    }
    let attr = (((d >> 40) & 0xff) | (((d >> 52) & 0xf) << 12)) as u32;
    Seg {
        selector: sel,
        base,
        limit,
        attr,
    }
}

fn set_accessed(cpu: &mut Cpu, d: u64, a: u64) -> Flow {
    if d & (1 << 40) == 0 {
        cpu.wr_as::<1>(a.wrapping_add(5), (d >> 40) | 1, false)?;
    }
    Ok(())
}

/// `mov sreg, r/m`, `pop sreg`, `lds`-family: loads a data or stack segment.
pub fn mov_to_sreg(cpu: &mut Cpu, s: usize, sel: u16) -> Flow {
    if s == sr::CS {
        return Err(Ex::UD);
    }
    load_data_seg(cpu, s, sel)?;
    if s == sr::SS {
        cpu.shadow = Shadow::MovSs;
        return Err(Ex::EndBlock);
    }
    Ok(())
}

/// Loads a data segment register with protected-mode checks.
pub fn load_data_seg(cpu: &mut Cpu, s: usize, sel: u16) -> Flow {
    if !cpu.protected() || cpu.vm86() {
        let vm86 = cpu.vm86();
        let seg = &mut cpu.seg[s];
        seg.selector = sel;
        seg.base = u64::from(sel) << 4;
        if vm86 {
            seg.limit = 0xffff;
            seg.attr = 0xf3;
        }
        cpu.refresh_mode();
        return Ok(());
    }
    let rpl = (sel & 3) as u8;
    if sel & !3 == 0 {
        if s == sr::SS && !(cpu.code64() && rpl == cpu.cpl) {
            return Err(Ex::gp(0));
        }
        cpu.seg[s] = Seg {
            selector: sel,
            base: 0,
            limit: 0,
            attr: 1 << 16,
        };
        if s == sr::SS {
            cpu.seg[s].attr |= u32::from(cpu.cpl) << 5 | 0x93;
        }
        cpu.refresh_mode();
        return Ok(());
    }
    let (d, a) = read_desc(cpu, sel)?;
    let seg = desc_to_seg(sel, d);
    let ty = seg.attr & 0xf;
    let code = ty & 8 != 0;
    let dpl = seg.dpl();
    let err = u32::from(sel & !3);
    if seg.attr & 0x10 == 0 {
        return Err(Ex::gp(err));
    }
    if s == sr::SS {
        if code || ty & 2 == 0 || rpl != cpu.cpl || dpl != cpu.cpl {
            return Err(Ex::gp(err));
        }
        if !seg.present() {
            return Err(Ex::ss(err));
        }
    } else {
        if code && ty & 2 == 0 {
            return Err(Ex::gp(err));
        }
        let conforming_code = code && ty & 4 != 0;
        if !conforming_code && (dpl < cpu.cpl || dpl < rpl) {
            return Err(Ex::gp(err));
        }
        if !seg.present() {
            return Err(Ex::np(err));
        }
    }
    set_accessed(cpu, d, a)?;
    cpu.seg[s] = seg;
    cpu.seg[s].attr |= 1;
    cpu.refresh_mode();
    Ok(())
}

fn set_cs(cpu: &mut Cpu, seg: Seg, cpl: u8) {
    cpu.seg[sr::CS] = seg;
    cpu.seg[sr::CS].selector = (seg.selector & !3) | u16::from(cpl);
    cpu.cpl = cpl;
    cpu.refresh_mode();
}

/// Checks a code-segment target for a same-privilege far jmp/call/ret; returns the segment.
fn code_target(cpu: &mut Cpu, sel: u16, for_ret: bool) -> Result<Seg, Ex> {
    let err = u32::from(sel & !3);
    if sel & !3 == 0 {
        return Err(Ex::gp(0));
    }
    let (d, a) = read_desc(cpu, sel)?;
    let seg = desc_to_seg(sel, d);
    if seg.attr & 0x18 != 0x18 {
        // System descriptors (call gates, TSS) are not modelled.
        return Err(Ex::gp(err));
    }
    let rpl = (sel & 3) as u8;
    let conforming = seg.attr & 4 != 0;
    if !for_ret {
        if conforming {
            if seg.dpl() > cpu.cpl {
                return Err(Ex::gp(err));
            }
        } else if rpl > cpu.cpl || seg.dpl() != cpu.cpl {
            return Err(Ex::gp(err));
        }
    } else if rpl < cpu.cpl || (conforming && seg.dpl() > rpl) || (!conforming && seg.dpl() != rpl)
    {
        return Err(Ex::gp(err));
    }
    if !seg.present() {
        return Err(Ex::np(err));
    }
    if cpu.long_mode() && seg.l() && seg.db() {
        return Err(Ex::gp(err));
    }
    set_accessed(cpu, d, a)?;
    Ok(seg)
}

fn real_cs(cpu: &mut Cpu, sel: u16) {
    let vm86 = cpu.vm86();
    let cs = &mut cpu.seg[sr::CS];
    cs.selector = sel;
    cs.base = u64::from(sel) << 4;
    if vm86 {
        cs.attr = 0xfb;
        cs.limit = 0xffff;
    }
    cpu.refresh_mode();
}

fn far_op_size(i: &Insn, cpu: &Cpu) -> u8 {
    match i.instr.code().op_code().operand_size() {
        16 => 2,
        32 => 4,
        64 => 8,
        _ => {
            if cpu.bitness() == 16 {
                2
            } else {
                4
            }
        }
    }
}

/// Far jmp.
pub fn far_jmp(cpu: &mut Cpu, sel: u16, off: u64, i: &Insn) -> Flow {
    let os = match i.instr.op_kind(0) {
        OpKind::FarBranch16 => 2,
        OpKind::FarBranch32 => 4,
        _ => match i.instr.memory_size().size() {
            4 => 2,
            6 => 4,
            _ => 8,
        },
    };
    let off = off & mask(os);
    if !cpu.protected() || cpu.vm86() {
        real_cs(cpu, sel);
        cpu.rip = off;
        return Err(Ex::EndBlock);
    }
    let seg = code_target(cpu, sel, false)?;
    let cpl = cpu.cpl;
    set_cs(cpu, seg, cpl);
    cpu.rip = off;
    Err(Ex::EndBlock)
}

/// Far call (same privilege; call gates are not modelled).
pub fn far_call(cpu: &mut Cpu, sel: u16, off: u64, i: &Insn) -> Flow {
    let os = match i.instr.op_kind(0) {
        OpKind::FarBranch16 => 2,
        OpKind::FarBranch32 => 4,
        _ => match i.instr.memory_size().size() {
            4 => 2,
            6 => 4,
            _ => 8,
        },
    };
    let old_cs = u64::from(cpu.seg[sr::CS].selector);
    let old_sp = cpu.gpr[4];
    if !cpu.protected() || cpu.vm86() {
        cpu.push(os, old_cs)?;
        if let Err(e) = cpu.push(os, i.next_ip) {
            cpu.gpr[4] = old_sp;
            return Err(e);
        }
        real_cs(cpu, sel);
        cpu.rip = off & mask(os);
        return Err(Ex::EndBlock);
    }
    let seg = code_target(cpu, sel, false)?;
    cpu.push(os, old_cs)?;
    if let Err(e) = cpu.push(os, i.next_ip) {
        cpu.gpr[4] = old_sp;
        return Err(e);
    }
    let cpl = cpu.cpl;
    set_cs(cpu, seg, cpl);
    cpu.rip = off & mask(os);
    Err(Ex::EndBlock)
}

/// Far return (`retf [imm16]`), including return to an outer privilege level.
pub fn far_ret(cpu: &mut Cpu, i: &Insn) -> Flow {
    let os = far_op_size(i, cpu);
    let imm = if i.instr.op_count() == 1 {
        i.instr.immediate(0)
    } else {
        0
    };
    let o = u64::from(os);
    let rip = cpu.peek(0, os)?;
    let sel = cpu.peek(o, os)? as u16;
    if !cpu.protected() || cpu.vm86() {
        cpu.add_sp(2 * o + imm);
        real_cs(cpu, sel);
        cpu.rip = rip;
        return Err(Ex::EndBlock);
    }
    let seg = code_target(cpu, sel, true)?;
    let rpl = (sel & 3) as u8;
    if rpl > cpu.cpl {
        let rsp = cpu.peek(2 * o + imm, os)?;
        let ss = cpu.peek(3 * o + imm, os)? as u16;
        set_cs(cpu, seg, rpl);
        load_data_seg(cpu, sr::SS, ss)?;
        cpu.gpr[4] = rsp.wrapping_add(imm);
        null_outer_segments(cpu);
    } else {
        cpu.add_sp(2 * o + imm);
        set_cs(cpu, seg, rpl);
    }
    cpu.rip = rip;
    Err(Ex::EndBlock)
}

fn null_outer_segments(cpu: &mut Cpu) {
    for s in [sr::ES, sr::DS, sr::FS, sr::GS] {
        let seg = cpu.seg[s];
        let code_conf = seg.attr & 0x1c == 0x1c;
        if !code_conf && seg.dpl() < cpu.cpl && seg.attr & (1 << 16) == 0 {
            cpu.seg[s].selector = 0;
            cpu.seg[s].attr |= 1 << 16;
            cpu.seg[s].attr &= !0x80;
        }
    }
    cpu.refresh_mode();
}

/// Applies popf/iret flag-update privilege rules to `new` (full width value).
fn merge_flags(cpu: &Cpu, new: u64, size: u8) -> u64 {
    let old = cpu.flags();
    let mut changeable = fl::ARITH | fl::TF | fl::DF | fl::NT | fl::AC | fl::ID;
    let iopl = ((old >> 12) & 3) as u8;
    if cpu.cpl == 0 || !cpu.protected() {
        changeable |= fl::IOPL;
    }
    if cpu.cpl <= iopl || !cpu.protected() {
        changeable |= fl::IF;
    }
    if size == 2 {
        changeable &= 0xffff;
    }
    (old & !changeable) | (new & changeable)
}

/// pushf/pushfd/pushfq.
pub fn pushf(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.vm86() && (cpu.rflags >> 12) & 3 != 3 {
        return Err(Ex::gp(0));
    }
    let os = push_os(cpu, i);
    let f = cpu.flags() & !(fl::VM | fl::RF);
    cpu.push(os, f & mask(os))
}

fn push_os(cpu: &Cpu, i: &Insn) -> u8 {
    match i.instr.code().op_code().operand_size() {
        16 => 2,
        32 => 4,
        64 => 8,
        _ => match cpu.bitness() {
            64 => 8,
            32 => 4,
            _ => 2,
        },
    }
}

/// popf/popfd/popfq.
pub fn popf(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.vm86() && (cpu.rflags >> 12) & 3 != 3 {
        return Err(Ex::gp(0));
    }
    let os = push_os(cpu, i);
    let v = cpu.pop(os)?;
    let nf = merge_flags(cpu, v, os);
    let vm = cpu.rflags & fl::VM;
    cpu.set_rflags((nf & !fl::VM & !fl::RF) | vm);
    Err(Ex::EndBlock)
}

/// RF as `iret` loads it from the image `f` (32- and 64-bit forms; `popf` never does): a
/// debug handler returns with RF set so that the instruction breakpoint it returns to does
/// not fire again.
fn iret_rf(f: u64, os: u8) -> u64 {
    if os >= 4 { f & fl::RF } else { 0 }
}

/// iret / iretd / iretq.
pub fn iret(cpu: &mut Cpu, i: &Insn) -> Flow {
    // IRET ends NMI blocking (SDM 6.7.1).
    cpu.nmi_blocked = false;
    let os: u8 = match i.instr.mnemonic() {
        M::Iretq => 8,
        M::Iretd => 4,
        _ => 2,
    };
    let o = u64::from(os);
    if !cpu.protected() {
        let rip = cpu.peek(0, os)?;
        let cs = cpu.peek(o, os)? as u16;
        let f = cpu.peek(2 * o, os)?;
        cpu.add_sp(3 * o);
        real_cs(cpu, cs);
        let nf = merge_flags(cpu, f, os) | iret_rf(f, os);
        cpu.set_rflags(nf);
        cpu.rip = rip;
        return Err(Ex::EndBlock);
    }
    if cpu.vm86() {
        if (cpu.rflags >> 12) & 3 != 3 {
            return Err(Ex::gp(0));
        }
        let rip = cpu.peek(0, os)?;
        let cs = cpu.peek(o, os)? as u16;
        let f = cpu.peek(2 * o, os)?;
        cpu.add_sp(3 * o);
        real_cs(cpu, cs);
        let keep = fl::IOPL | fl::VM;
        let nf = (cpu.flags() & keep) | (f & !keep & fl::WRITABLE);
        cpu.set_rflags(nf | fl::VM);
        cpu.rip = rip;
        return Err(Ex::EndBlock);
    }
    if cpu.rflags & fl::NT != 0 && !cpu.long_mode() {
        // Task return: hardware task switching is not modelled.
        return Err(Ex::gp(0));
    }
    let rip = cpu.peek(0, os)?;
    let sel = cpu.peek(o, os)? as u16;
    let f = cpu.peek(2 * o, os)?;
    if os == 4 && f & fl::VM != 0 && cpu.cpl == 0 && !cpu.long_mode() {
        // Return to virtual-8086 mode.
        let esp = cpu.peek(3 * o, 4)?;
        let ss = cpu.peek(4 * o, 4)? as u16;
        let es = cpu.peek(5 * o, 4)? as u16;
        let ds = cpu.peek(6 * o, 4)? as u16;
        let fs = cpu.peek(7 * o, 4)? as u16;
        let gs = cpu.peek(8 * o, 4)? as u16;
        cpu.set_rflags(f);
        for (s, v) in [
            (sr::ES, es),
            (sr::DS, ds),
            (sr::FS, fs),
            (sr::GS, gs),
            (sr::SS, ss),
        ] {
            cpu.seg[s] = Seg {
                selector: v,
                base: u64::from(v) << 4,
                limit: 0xffff,
                attr: 0xf3,
            };
        }
        cpu.seg[sr::CS] = Seg {
            selector: sel,
            base: u64::from(sel) << 4,
            limit: 0xffff,
            attr: 0xfb,
        };
        cpu.gpr[4] = esp;
        cpu.refresh_mode();
        cpu.rip = rip & 0xffff;
        return Err(Ex::EndBlock);
    }
    let seg = code_target(cpu, sel, true)?;
    let rpl = (sel & 3) as u8;
    let nf = merge_flags(cpu, f, os) | iret_rf(f, os);
    if rpl > cpu.cpl || cpu.code64() {
        let rsp = cpu.peek(3 * o, os)?;
        let ss = cpu.peek(4 * o, os)? as u16;
        let outer = rpl > cpu.cpl;
        set_cs(cpu, seg, rpl);
        load_data_seg(cpu, sr::SS, ss)?;
        cpu.gpr[4] = rsp & mask(os);
        if outer {
            null_outer_segments(cpu);
        }
    } else {
        cpu.add_sp(3 * o);
        set_cs(cpu, seg, rpl);
    }
    cpu.set_rflags(nf);
    cpu.rip = rip
        & if cpu.code64() {
            u64::MAX
        } else {
            mask(os.min(4))
        };
    // NMI blocking would end here; interrupts may now be taken.
    Err(Ex::EndBlock)
}

// ---------------------------------------------------------------------------------------
// Interrupt and exception delivery

fn push_on(cpu: &mut Cpu, sp: &mut u64, spmask: u64, base: u64, size: u8, v: u64) -> Flow {
    *sp = sp.wrapping_sub(u64::from(size)) & spmask;
    let lin = base.wrapping_add(*sp) & cpu.lin_mask_for_delivery();
    match size {
        2 => cpu.wr_as::<2>(lin, v, false),
        4 => cpu.wr_as::<4>(lin, v, false),
        _ => cpu.wr_as::<8>(lin, v, false),
    }
}

impl Cpu {
    fn lin_mask_for_delivery(&self) -> u64 {
        if self.long_mode() {
            u64::MAX
        } else {
            0xffff_ffff
        }
    }
}

/// Delivers interrupt/exception `v`. `soft` = int n/int3/into (gate DPL is checked against CPL,
/// RIP already points after the instruction). `ext` = external interrupt (sets EXT in errors).
/// `rf` = a fault-class exception (other than an instruction breakpoint): the EFLAGS image
/// pushed has RF set, so that the handler's `iret` does not hit an instruction breakpoint
/// again. On success RIP/CS/stack/flags are those of the handler.
pub fn deliver(cpu: &mut Cpu, v: u8, error: Option<u32>, soft: bool, ext: bool, rf: bool) -> Flow {
    let rf = if rf { fl::RF } else { 0 };
    let extb = u32::from(ext && !soft);
    let gate_err = u32::from(v) * 8 + 2 + extb;
    cpu.halted = false;
    if !cpu.protected() {
        // Real mode: IVT.
        let a = cpu.idt.0.wrapping_add(u64::from(v) * 4);
        if u64::from(v) * 4 + 3 > u64::from(cpu.idt.1) {
            return Err(Ex::gp(gate_err));
        }
        let ent = cpu.rd_as::<4>(a & 0xffff_ffff, false)?;
        let f = cpu.flags() | rf;
        let cs = u64::from(cpu.seg[sr::CS].selector);
        let ip = cpu.rip;
        cpu.push(2, f & 0xffff)?;
        cpu.push(2, cs)?;
        cpu.push(2, ip & 0xffff)?;
        real_cs(cpu, (ent >> 16) as u16);
        cpu.rip = ent & 0xffff;
        cpu.rflags &= !(fl::IF | fl::TF | fl::AC | fl::RF);
        return Ok(());
    }
    let long = cpu.long_mode();
    let gsize: u64 = if long { 16 } else { 8 };
    if u64::from(v) * gsize + gsize - 1 > u64::from(cpu.idt.1) {
        return Err(Ex::gp(gate_err));
    }
    let ga = cpu.idt.0.wrapping_add(u64::from(v) * gsize);
    let lo = cpu.rd_as::<8>(ga, false)?;
    let hi = if long {
        cpu.rd_as::<8>(ga.wrapping_add(8), false)?
    } else {
        0
    };
    let ty = ((lo >> 40) & 0xf) as u8;
    let gdpl = ((lo >> 45) & 3) as u8;
    let present = lo & (1 << 47) != 0;
    let valid = if long {
        ty == 0xe || ty == 0xf
    } else {
        matches!(ty, 0x6 | 0x7 | 0xe | 0xf)
    };
    if !valid {
        // Task gates (type 5) are not modelled.
        return Err(Ex::gp(gate_err));
    }
    if soft && gdpl < cpu.cpl {
        return Err(Ex::gp(u32::from(v) * 8 + 2));
    }
    if !present {
        return Err(Ex::np(gate_err));
    }
    let trap = ty & 1 != 0;
    let gate32 = ty & 8 != 0;
    let sel = ((lo >> 16) & 0xffff) as u16;
    let mut off = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
    if long {
        off |= hi << 32;
    }
    if sel & !3 == 0 {
        return Err(Ex::gp(extb));
    }
    let (d, _) = read_desc(cpu, sel).map_err(|_| Ex::gp(u32::from(sel & !3) + extb))?;
    let cseg = desc_to_seg(sel, d);
    if cseg.attr & 0x18 != 0x18 || cseg.dpl() > cpu.cpl {
        return Err(Ex::gp(u32::from(sel & !3) + extb));
    }
    if !cseg.present() {
        return Err(Ex::np(u32::from(sel & !3) + extb));
    }
    if long && (!cseg.l() || cseg.db()) {
        return Err(Ex::gp(u32::from(sel & !3) + extb));
    }
    let conforming = cseg.attr & 4 != 0;
    let new_cpl = if conforming { cpu.cpl } else { cseg.dpl() };
    let old_flags = cpu.flags() | rf;
    let old_cs = u64::from(cpu.seg[sr::CS].selector);
    let old_ss = u64::from(cpu.seg[sr::SS].selector);
    let old_rsp = cpu.gpr[4];
    let ret_ip = cpu.rip;
    let from_vm86 = cpu.vm86();
    if from_vm86 && new_cpl != 0 {
        return Err(Ex::gp(u32::from(sel & !3) + extb));
    }
    if long {
        let ist = (lo >> 32) & 7;
        let mut sp = if ist != 0 {
            cpu.rd_as::<8>(cpu.tr.base.wrapping_add(0x24 + (ist - 1) * 8), false)?
        } else if new_cpl < cpu.cpl {
            cpu.rd_as::<8>(cpu.tr.base.wrapping_add(4 + u64::from(new_cpl) * 8), false)?
        } else {
            cpu.gpr[4]
        };
        sp &= !0xf;
        let m = u64::MAX;
        push_on(cpu, &mut sp, m, 0, 8, old_ss)?;
        push_on(cpu, &mut sp, m, 0, 8, old_rsp)?;
        push_on(cpu, &mut sp, m, 0, 8, old_flags)?;
        push_on(cpu, &mut sp, m, 0, 8, old_cs)?;
        push_on(cpu, &mut sp, m, 0, 8, ret_ip)?;
        if let Some(e) = error {
            push_on(cpu, &mut sp, m, 0, 8, u64::from(e))?;
        }
        if new_cpl < cpu.cpl {
            cpu.seg[sr::SS] = Seg {
                selector: u16::from(new_cpl),
                base: 0,
                limit: 0,
                attr: (1 << 16) | 0x93 | u32::from(new_cpl) << 5,
            };
        }
        cpu.gpr[4] = sp;
        set_cs(cpu, cseg, new_cpl);
        cpu.rip = off;
    } else {
        let gsz: u8 = if gate32 { 4 } else { 2 };
        let (mut sp, ssbase, spmask, new_ss) = if new_cpl < cpu.cpl {
            // Stack from the 32-bit TSS.
            let esp =
                cpu.rd_as::<4>(cpu.tr.base.wrapping_add(4 + u64::from(new_cpl) * 8), false)?;
            let ss =
                cpu.rd_as::<2>(cpu.tr.base.wrapping_add(8 + u64::from(new_cpl) * 8), false)? as u16;
            if ss & !3 == 0 {
                return Err(Ex::ts(extb));
            }
            let (sd, _) = read_desc(cpu, ss).map_err(|_| Ex::ts(u32::from(ss & !3) + extb))?;
            let sseg = desc_to_seg(ss, sd);
            if !sseg.present() {
                return Err(Ex::ss(u32::from(ss & !3) + extb));
            }
            let m = if sseg.db() { 0xffff_ffff } else { 0xffff };
            (esp, sseg.base, m, Some(sseg))
        } else {
            (cpu.gpr[4], cpu.seg[sr::SS].base, cpu.sp_mask, None)
        };
        if new_ss.is_some() {
            if from_vm86 {
                for s in [sr::GS, sr::FS, sr::DS, sr::ES] {
                    let v = u64::from(cpu.seg[s].selector);
                    push_on(cpu, &mut sp, spmask, ssbase, gsz, v)?;
                }
            }
            push_on(cpu, &mut sp, spmask, ssbase, gsz, old_ss)?;
            push_on(cpu, &mut sp, spmask, ssbase, gsz, old_rsp)?;
        }
        push_on(cpu, &mut sp, spmask, ssbase, gsz, old_flags)?;
        push_on(cpu, &mut sp, spmask, ssbase, gsz, old_cs)?;
        push_on(cpu, &mut sp, spmask, ssbase, gsz, ret_ip)?;
        if let Some(e) = error {
            push_on(cpu, &mut sp, spmask, ssbase, gsz, u64::from(e))?;
        }
        if let Some(ss) = new_ss {
            cpu.seg[sr::SS] = ss;
            cpu.seg[sr::SS].attr |= 1;
            cpu.gpr[4] = sp;
        } else {
            cpu.gpr[4] = (cpu.gpr[4] & !spmask) | sp;
        }
        if from_vm86 {
            for s in [sr::GS, sr::FS, sr::DS, sr::ES] {
                cpu.seg[s] = Seg {
                    selector: 0,
                    base: 0,
                    limit: 0,
                    attr: 1 << 16,
                };
            }
        }
        cpu.rflags &= !fl::VM;
        set_cs(cpu, cseg, new_cpl);
        cpu.rip = if gate32 {
            off & 0xffff_ffff
        } else {
            off & 0xffff
        };
    }
    cpu.flush_flags();
    cpu.rflags &= !(fl::TF | fl::NT | fl::RF | fl::VM);
    if !trap {
        cpu.rflags &= !fl::IF;
    }
    cpu.refresh_mode();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Control registers

/// Applies a CR0/CR3/CR4/EFER change to the MMU and mode.
pub fn update_paging(cpu: &mut Cpu) {
    cpu.mmu.configure(cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer);
    cpu.refresh_mode();
}

/// #GP(0) when the control registers `cr0v`/`cr3v`/`cr4v` select PAE paging (outside long
/// mode) and a present PDPTE at `cr3v` has a reserved bit set: the CR write that loads the
/// PDPTEs faults, as on Intel CPUs.
fn pae_pdptes_check(cpu: &Cpu, cr0v: u64, cr3v: u64, cr4v: u64) -> Flow {
    let pae = cr0v & cr0::PG != 0
        && cr0v & cr0::PE != 0
        && cr4v & cr4::PAE != 0
        && cpu.efer & efer::LMA == 0;
    if pae && cpu.mmu.load_pdptes(cr3v).is_none() {
        return Err(Ex::gp(0));
    }
    Ok(())
}

/// Writes CR`n` with architectural checks.
pub fn write_cr(cpu: &mut Cpu, n: u8, v: u64) -> Flow {
    match n {
        0 => {
            let v = (v | cr0::ET) & 0xffff_ffff;
            if v & cr0::PG != 0 && v & cr0::PE == 0 {
                return Err(Ex::gp(0));
            }
            if v & cr0::NW != 0 && v & cr0::CD == 0 {
                return Err(Ex::gp(0));
            }
            let was_pg = cpu.cr0 & cr0::PG != 0;
            let pg = v & cr0::PG != 0;
            if pg && !was_pg && cpu.efer & efer::LME != 0 {
                if cpu.cr4 & cr4::PAE == 0 {
                    return Err(Ex::gp(0));
                }
                cpu.efer |= efer::LMA;
            }
            if !pg && was_pg && cpu.long_mode() {
                if cpu.code64() {
                    return Err(Ex::gp(0));
                }
                cpu.efer &= !efer::LMA;
            }
            pae_pdptes_check(cpu, v, cpu.cr3, cpu.cr4)?;
            cpu.cr0 = v;
            update_paging(cpu);
        }
        2 => cpu.cr2 = v,
        3 => {
            let v = if cpu.long_mode() {
                v & 0x000f_ffff_ffff_ffff
            } else {
                v & 0xffff_ffff
            };
            pae_pdptes_check(cpu, cpu.cr0, v, cpu.cr4)?;
            cpu.cr3 = v;
            update_paging(cpu);
        }
        4 => {
            if cpu.long_mode() && v & cr4::PAE == 0 {
                return Err(Ex::gp(0));
            }
            // Reserved / unsupported bits: VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT
            // and FSGSBASE are accepted (stored); others #GP, among them SMEP and SMAP, which
            // CPUID does not advertise (leaf 7 is empty), as on a CPU without them.
            let ok = 0x7ff | cr4::FSGSBASE;
            if v & !ok != 0 {
                return Err(Ex::gp(0));
            }
            pae_pdptes_check(cpu, cpu.cr0, cpu.cr3, v)?;
            cpu.cr4 = v;
            update_paging(cpu);
        }
        8 => cpu.cr8 = v & 0xf,
        _ => return Err(Ex::UD),
    }
    Ok(())
}

/// `mov crN/drN, reg`.
pub fn mov_to_crdr(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.cpl != 0 || cpu.vm86() {
        return Err(Ex::gp(0));
    }
    let r = i.instr.op_register(0) as u32;
    let src = gpr(i.instr.op_register(1)).map_or(0, |(x, _)| cpu.gpr[x as usize]);
    let src = if cpu.code64() { src } else { src & 0xffff_ffff };
    let cr_base = iced_x86::Register::CR0 as u32;
    let dr_base = iced_x86::Register::DR0 as u32;
    if (cr_base..cr_base + 16).contains(&r) {
        write_cr(cpu, (r - cr_base) as u8, src)?;
        return Err(Ex::EndBlock);
    }
    let n = debug_reg(cpu, r - dr_base)?;
    match n {
        0..=3 => cpu.dr[n] = src,
        6 => {
            if src >> 32 != 0 {
                return Err(Ex::gp(0));
            }
            cpu.dr[6] = (src & dr::DR6_WRITABLE) | dr::DR6_FIXED1;
        }
        _ => {
            if src >> 32 != 0 {
                return Err(Ex::gp(0));
            }
            cpu.dr[7] = (src & dr::DR7_WRITABLE) | dr::DR7_FIXED1;
        }
    }
    cpu.debug_regs_changed();
    // Breakpoints and single-stepping are looked at between blocks.
    Err(Ex::EndBlock)
}

/// Checks a `mov` to or from DR`n` (after the CPL check): #UD for DR8-15, and for DR4/DR5
/// with CR4.DE set (without it they are DR6/DR7); #DB with DR6.BD when DR7.GD is set (GD is
/// cleared so that the handler can use the registers). Returns the register meant.
fn debug_reg(cpu: &mut Cpu, n: u32) -> Result<usize, Ex> {
    let n = match n {
        0..=3 | 6 | 7 => n as usize,
        4 | 5 if cpu.cr4 & cr4::DE == 0 => n as usize + 2,
        _ => return Err(Ex::UD),
    };
    if cpu.dr[7] & dr::GD != 0 {
        cpu.dr[6] = (cpu.dr[6] & !dr::B_MASK) | dr::BD;
        cpu.dr[7] &= !dr::GD;
        return Err(Ex::Fault {
            vector: vec::DB,
            error: NO_ERR,
        });
    }
    Ok(n)
}

/// `mov reg, crN/drN`.
pub fn mov_from_crdr(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.cpl != 0 || cpu.vm86() {
        return Err(Ex::gp(0));
    }
    let r = i.instr.op_register(1) as u32;
    let cr_base = iced_x86::Register::CR0 as u32;
    let dr_base = iced_x86::Register::DR0 as u32;
    let v = if (cr_base..cr_base + 16).contains(&r) {
        match r - cr_base {
            0 => cpu.cr0,
            2 => cpu.cr2,
            3 => cpu.cr3,
            4 => cpu.cr4,
            8 => cpu.cr8,
            _ => return Err(Ex::UD),
        }
    } else {
        cpu.dr[debug_reg(cpu, r - dr_base)?]
    };
    let (x, _) = gpr(i.instr.op_register(0)).ok_or(Ex::UD)?;
    let v = if cpu.code64() { v } else { v & 0xffff_ffff };
    cpu.gpr[x as usize] = v;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// MSRs

/// MSR numbers.
pub mod msr {
    /// TSC.
    pub const TSC: u32 = 0x10;
    /// APIC base.
    pub const APIC_BASE: u32 = 0x1b;
    /// TSC deadline (local APIC timer).
    pub const TSC_DEADLINE: u32 = 0x6e0;
    /// Microcode revision (reads zero).
    pub const UCODE_REV: u32 = 0x8b;
    /// SYSENTER CS (then ESP, EIP).
    pub const SYSENTER_CS: u32 = 0x174;
    /// SYSENTER EIP, the last of the three SYSENTER MSRs.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// Misc enable.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// PAT.
    pub const PAT: u32 = 0x277;
    /// EFER.
    pub const EFER: u32 = 0xc000_0080;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SFMASK.
    pub const SFMASK: u32 = 0xc000_0084;
    /// FS base.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// GS base.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// Kernel GS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// TSC_AUX.
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// Reads an MSR; `None` = #GP.
pub fn read_msr(cpu: &Cpu, n: u32) -> Option<u64> {
    Some(match n {
        msr::TSC => tsc(cpu),
        msr::APIC_BASE => cpu.msr.apic_base,
        msr::UCODE_REV => 0,
        msr::TSC_DEADLINE => match &cpu.lapic {
            Some(l) if l.has_tsc_deadline() => l.tsc_deadline(),
            _ => return None,
        },
        msr::SYSENTER_CS..=msr::SYSENTER_EIP => cpu.msr.sysenter[(n - msr::SYSENTER_CS) as usize],
        msr::MISC_ENABLE => cpu.msr.misc_enable,
        msr::PAT => cpu.msr.pat,
        msr::EFER => cpu.efer,
        msr::STAR => cpu.msr.star,
        msr::LSTAR => cpu.msr.lstar,
        msr::CSTAR => cpu.msr.cstar,
        msr::SFMASK => cpu.msr.sfmask,
        msr::FS_BASE => cpu.seg[sr::FS].base,
        msr::GS_BASE => cpu.seg[sr::GS].base,
        msr::KERNEL_GS_BASE => cpu.msr.kernel_gs_base,
        msr::TSC_AUX => cpu.msr.tsc_aux,
        _ => return None,
    })
}

fn canonical(v: u64) -> bool {
    let t = (v as i64) >> 47;
    t == 0 || t == -1
}

/// Writes an MSR; `Err` = #GP.
pub fn write_msr(cpu: &mut Cpu, n: u32, v: u64) -> Flow {
    match n {
        msr::TSC => cpu.msr.tsc_offset = v.wrapping_sub(tsc(cpu).wrapping_sub(cpu.msr.tsc_offset)),
        msr::TSC_DEADLINE => match &cpu.lapic {
            Some(l) if l.has_tsc_deadline() => l.set_tsc_deadline(v, tsc(cpu)),
            _ => return Err(Ex::gp(0)),
        },
        msr::APIC_BASE => match &cpu.lapic {
            Some(l) => {
                l.set_apic_base(v);
                cpu.msr.apic_base = l.apic_base();
            }
            None => cpu.msr.apic_base = v & !0x6ff,
        },
        msr::SYSENTER_CS..=msr::SYSENTER_EIP => {
            cpu.msr.sysenter[(n - msr::SYSENTER_CS) as usize] = v
        }
        msr::MISC_ENABLE => cpu.msr.misc_enable = v,
        msr::PAT => cpu.msr.pat = v,
        msr::EFER => {
            let allowed = efer::SCE | efer::LME | efer::NXE;
            if v & !(allowed | efer::LMA) != 0 {
                return Err(Ex::gp(0));
            }
            if cpu.cr0 & cr0::PG != 0 && (v ^ cpu.efer) & efer::LME != 0 {
                return Err(Ex::gp(0));
            }
            cpu.efer = (v & allowed) | (cpu.efer & efer::LMA);
            update_paging(cpu);
        }
        msr::STAR => cpu.msr.star = v,
        msr::LSTAR | msr::CSTAR if !canonical(v) => return Err(Ex::gp(0)),
        msr::LSTAR => cpu.msr.lstar = v,
        msr::CSTAR => cpu.msr.cstar = v,
        msr::SFMASK => cpu.msr.sfmask = v & 0xffff_ffff,
        msr::FS_BASE | msr::GS_BASE | msr::KERNEL_GS_BASE if !canonical(v) => {
            return Err(Ex::gp(0));
        }
        msr::FS_BASE => {
            cpu.seg[sr::FS].base = v;
            cpu.refresh_mode();
        }
        msr::GS_BASE => {
            cpu.seg[sr::GS].base = v;
            cpu.refresh_mode();
        }
        msr::KERNEL_GS_BASE => cpu.msr.kernel_gs_base = v,
        msr::TSC_AUX => cpu.msr.tsc_aux = v & 0xffff_ffff,
        _ => return Err(Ex::gp(0)),
    }
    Ok(())
}

/// The time-stamp counter: the host's TSC plus the guest's offset (WRMSR to IA32_TSC).
pub fn tsc(cpu: &Cpu) -> u64 {
    crate::time::host_tsc().wrapping_add(cpu.msr.tsc_offset)
}

// ---------------------------------------------------------------------------------------
// Port I/O

/// Checks the TSS I/O permission bitmap (called when CPL > IOPL or in vm86).
pub fn io_bitmap_check(cpu: &mut Cpu, port: u16, size: u8) -> Flow {
    // Only a 32/64-bit available/busy TSS has a bitmap.
    let ty = cpu.tr.attr & 0xf;
    if !cpu.protected() || (ty != 9 && ty != 0xb) || cpu.tr.limit < 0x67 {
        return Err(Ex::gp(0));
    }
    let base = cpu.rd_as::<2>(cpu.tr.base.wrapping_add(0x66), false)?;
    let byte = base + u64::from(port / 8);
    if byte + 1 > u64::from(cpu.tr.limit) {
        return Err(Ex::gp(0));
    }
    let w = cpu.rd_as::<2>(cpu.tr.base.wrapping_add(byte), false)?;
    let bits = ((1u64 << size) - 1) << (port % 8);
    if w & bits != 0 {
        return Err(Ex::gp(0));
    }
    Ok(())
}

/// in / out.
pub fn in_out(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    let is_in = ins.mnemonic() == M::In;
    let (port_k, reg_k) = if is_in { (1, 0) } else { (0, 1) };
    let port = if ins.op_kind(port_k) == OpKind::Register {
        cpu.gpr[2] as u16
    } else {
        u16::from(ins.immediate8())
    };
    let size = op_size(i, reg_k);
    if !cpu.io_allowed() {
        io_bitmap_check(cpu, port, size)?;
    }
    let pa = keel_accel::PioAddress(port);
    if is_in {
        let mut b = [0u8; 4];
        cpu.mmu.phys.buses.pio_read(pa, &mut b[..size as usize]);
        cpu.wreg(0, size, u64::from(u32::from_le_bytes(b)));
        Ok(())
    } else {
        let v = (cpu.gpr[0] as u32).to_le_bytes();
        cpu.mmu.phys.buses.pio_write(pa, &v[..size as usize]);
        Err(Ex::EndBlock)
    }
}

// ---------------------------------------------------------------------------------------
// The rest

fn need_cpl0(cpu: &Cpu) -> Flow {
    if cpu.cpl != 0 || (cpu.vm86() && cpu.protected()) {
        Err(Ex::gp(0))
    } else {
        Ok(())
    }
}

const NOT_MINE: Ex = Ex::Fault {
    vector: 0xff,
    error: NO_ERR,
};

/// System instructions; `None` when `i` is not one of them.
pub fn exec_system(cpu: &mut Cpu, i: &Insn) -> Option<Flow> {
    match sys(cpu, i) {
        Err(NOT_MINE) => None,
        r => Some(r),
    }
}

fn sys(cpu: &mut Cpu, i: &Insn) -> Flow {
    let ins = &i.instr;
    match ins.mnemonic() {
        M::Cli => {
            if cpu.protected() && u64::from(cpu.cpl) > (cpu.rflags >> 12) & 3 {
                return Err(Ex::gp(0));
            }
            cpu.rflags &= !fl::IF;
            Ok(())
        }
        M::Sti => {
            if cpu.protected() && u64::from(cpu.cpl) > (cpu.rflags >> 12) & 3 {
                return Err(Ex::gp(0));
            }
            if cpu.rflags & fl::IF == 0 {
                cpu.rflags |= fl::IF;
                cpu.shadow = Shadow::Active;
            }
            Err(Ex::EndBlock)
        }
        M::Hlt => need_cpl0(cpu).and(Err(Ex::Halt)),
        M::Cpuid => {
            let (a, b, c, d) = cpu
                .cpuid
                .query(cpu.gpr[0] as u32, cpu.gpr[1] as u32, cpu.index);
            cpu.gpr[0] = u64::from(a);
            cpu.gpr[3] = u64::from(b);
            cpu.gpr[1] = u64::from(c);
            cpu.gpr[2] = u64::from(d);
            Ok(())
        }
        M::Rdtsc | M::Rdtscp => {
            let t = tsc(cpu);
            cpu.gpr[0] = t & 0xffff_ffff;
            cpu.gpr[2] = t >> 32;
            if ins.mnemonic() == M::Rdtscp {
                cpu.gpr[1] = cpu.msr.tsc_aux;
            }
            Ok(())
        }
        M::Rdmsr => need_cpl0(cpu).and_then(|_| match read_msr(cpu, cpu.gpr[1] as u32) {
            Some(v) => {
                cpu.gpr[0] = v & 0xffff_ffff;
                cpu.gpr[2] = v >> 32;
                Ok(())
            }
            None => Err(Ex::gp(0)),
        }),
        M::Wrmsr => need_cpl0(cpu).and_then(|_| {
            let v = (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32);
            write_msr(cpu, cpu.gpr[1] as u32, v)?;
            Err(Ex::EndBlock)
        }),
        M::Lgdt | M::Lidt => need_cpl0(cpu).and_then(|_| {
            let a = ea(cpu, i);
            let lim = cpu.rd::<2>(a)? as u16;
            let base = if cpu.code64() {
                cpu.rd::<8>(a.wrapping_add(2))?
            } else {
                let b = cpu.rd::<4>(a.wrapping_add(2) & cpu.lin_mask)?;
                if i.size == 2 || ins.code().op_code().operand_size() == 16 {
                    b & 0xff_ffff
                } else {
                    b
                }
            };
            if ins.mnemonic() == M::Lgdt {
                cpu.gdt = (base, lim);
            } else {
                cpu.idt = (base, lim);
            }
            Ok(())
        }),
        M::Sgdt | M::Sidt => {
            let a = ea(cpu, i);
            let (base, lim) = if ins.mnemonic() == M::Sgdt {
                cpu.gdt
            } else {
                cpu.idt
            };
            cpu.wr::<2>(a, u64::from(lim)).and_then(|_| {
                if cpu.code64() {
                    cpu.wr::<8>(a.wrapping_add(2), base)
                } else {
                    cpu.wr::<4>(a.wrapping_add(2) & cpu.lin_mask, base & 0xffff_ffff)
                }
            })
        }
        M::Lldt => need_cpl0(cpu).and_then(|_| {
            let sel = rd_op(cpu, i, 0, 2)? as u16;
            if sel & !3 == 0 {
                cpu.ldtr = Seg {
                    selector: sel,
                    attr: 1 << 16,
                    ..Seg::default()
                };
                return Ok(());
            }
            if sel & 4 != 0 {
                return Err(Ex::gp(u32::from(sel & !3)));
            }
            let (d, a) = read_desc(cpu, sel)?;
            let mut s = desc_to_seg(sel, d);
            if s.attr & 0x1f != 2 {
                return Err(Ex::gp(u32::from(sel & !3)));
            }
            if !s.present() {
                return Err(Ex::np(u32::from(sel & !3)));
            }
            if cpu.long_mode() {
                let hi = cpu.rd_as::<8>(a.wrapping_add(8), false)?;
                s.base |= (hi & 0xffff_ffff) << 32;
            }
            cpu.ldtr = s;
            Ok(())
        }),
        M::Ltr => need_cpl0(cpu).and_then(|_| {
            let sel = rd_op(cpu, i, 0, 2)? as u16;
            if sel & !3 == 0 || sel & 4 != 0 {
                return Err(Ex::gp(u32::from(sel & !3)));
            }
            let (d, a) = read_desc(cpu, sel)?;
            let mut s = desc_to_seg(sel, d);
            let ty = s.attr & 0x1f;
            if ty != 9 && ty != 1 {
                return Err(Ex::gp(u32::from(sel & !3)));
            }
            if !s.present() {
                return Err(Ex::np(u32::from(sel & !3)));
            }
            if cpu.long_mode() {
                let hi = cpu.rd_as::<8>(a.wrapping_add(8), false)?;
                s.base |= (hi & 0xffff_ffff) << 32;
            }
            // Mark busy in the descriptor and the cache.
            cpu.wr_as::<1>(a.wrapping_add(5), (d >> 40) | 2, false)?;
            s.attr |= 2;
            cpu.tr = s;
            Ok(())
        }),
        M::Sldt | M::Str => {
            let v = if ins.mnemonic() == M::Sldt {
                cpu.ldtr.selector
            } else {
                cpu.tr.selector
            };
            let sz = if ins.op_kind(0) == OpKind::Memory {
                2
            } else {
                op_size(i, 0)
            };
            wr_op(cpu, i, 0, sz, u64::from(v))
        }
        M::Smsw => {
            let sz = if ins.op_kind(0) == OpKind::Memory {
                2
            } else {
                op_size(i, 0)
            };
            wr_op(cpu, i, 0, sz, cpu.cr0 & mask(sz))
        }
        M::Lmsw => need_cpl0(cpu).and_then(|_| {
            let v = rd_op(cpu, i, 0, 2)?;
            // LMSW can set PE but not clear it.
            let n = (cpu.cr0 & !0xe) | (v & 0xf) | (cpu.cr0 & 1);
            write_cr(cpu, 0, n)?;
            Err(Ex::EndBlock)
        }),
        M::Clts => need_cpl0(cpu).map(|_| cpu.cr0 &= !cr0::TS),
        M::Invlpg => need_cpl0(cpu).map(|_| {
            let a = ea(cpu, i);
            cpu.mmu.flush_page(a);
        }),
        M::Wbinvd | M::Invd => need_cpl0(cpu),
        M::Swapgs => {
            if !cpu.code64() {
                return Err(Ex::UD);
            }
            need_cpl0(cpu).map(|_| {
                std::mem::swap(&mut cpu.seg[sr::GS].base, &mut cpu.msr.kernel_gs_base);
                cpu.refresh_mode();
            })
        }
        M::Rdfsbase | M::Rdgsbase | M::Wrfsbase | M::Wrgsbase => {
            if cpu.cr4 & cr4::FSGSBASE == 0 || !cpu.code64() {
                return Err(Ex::UD);
            }
            let s = if matches!(ins.mnemonic(), M::Rdfsbase | M::Wrfsbase) {
                sr::FS
            } else {
                sr::GS
            };
            let sz = op_size(i, 0);
            if matches!(ins.mnemonic(), M::Rdfsbase | M::Rdgsbase) {
                wr_op(cpu, i, 0, sz, cpu.seg[s].base)
            } else {
                let v = rd_op(cpu, i, 0, sz)?;
                if !canonical(v) {
                    return Err(Ex::gp(0));
                }
                cpu.seg[s].base = v;
                cpu.refresh_mode();
                Ok(())
            }
        }
        M::Syscall => syscall(cpu, i),
        M::Sysret | M::Sysretq => sysret(cpu, i),
        M::Lar | M::Lsl => lar_lsl(cpu, i),
        M::Verr | M::Verw => verr(cpu, i),
        M::Lss | M::Lds | M::Les | M::Lfs | M::Lgs => {
            let s = match ins.mnemonic() {
                M::Lss => sr::SS,
                M::Lds => sr::DS,
                M::Les => sr::ES,
                M::Lfs => sr::FS,
                _ => sr::GS,
            };
            let sz = op_size(i, 0);
            let a = ea(cpu, i);
            let off = cpu.rd_n(a, sz)?;
            let sel = cpu.rd::<2>(a.wrapping_add(u64::from(sz)) & cpu.lin_mask)? as u16;
            match mov_to_sreg(cpu, s, sel) {
                Ok(()) | Err(Ex::EndBlock) => {}
                Err(e) => return Err(e),
            }
            // Only `mov ss` and `pop ss` open an interrupt/debug shadow, `lss` does not.
            cpu.shadow = Shadow::None;
            wr_op(cpu, i, 0, sz, off)?;
            if s == sr::SS {
                Err(Ex::EndBlock)
            } else {
                Ok(())
            }
        }
        M::Arpl => {
            let d = rd_op(cpu, i, 0, 2)?;
            let s = rd_op(cpu, i, 1, 2)?;
            if d & 3 < s & 3 {
                wr_op(cpu, i, 0, 2, (d & !3) | (s & 3))?;
                cpu.set_flag(fl::ZF, true);
            } else {
                cpu.set_flag(fl::ZF, false);
            }
            Ok(())
        }
        M::Xgetbv
        | M::Xsetbv
        | M::Sysenter
        | M::Sysexit
        | M::Rdpmc
        | M::Invpcid
        | M::Rdrand
        | M::Rdseed
        | M::Monitor
        | M::Mwait
        | M::Vmcall
        | M::Vmmcall => Err(Ex::UD),
        M::Rsm => Err(Ex::UD),
        _ => Err(NOT_MINE),
    }
}

fn syscall(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.efer & efer::SCE == 0 || !cpu.long_mode() {
        // Legacy-mode SYSCALL (AMD) is not modelled.
        return Err(Ex::UD);
    }
    let star = cpu.msr.star;
    let sel = ((star >> 32) & 0xfffc) as u16;
    let f = cpu.flags();
    cpu.gpr[1] = i.next_ip;
    cpu.gpr[11] = f & !fl::RF;
    let target = if cpu.code64() {
        cpu.msr.lstar
    } else {
        cpu.msr.cstar
    };
    cpu.seg[sr::CS] = Seg {
        selector: sel,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xa09b, // present, DPL0, code, L, G
    };
    cpu.seg[sr::SS] = Seg {
        selector: sel + 8,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xc093,
    };
    cpu.cpl = 0;
    cpu.set_rflags(f & !cpu.msr.sfmask & !fl::RF);
    cpu.refresh_mode();
    cpu.rip = target;
    Err(Ex::EndBlock)
}

fn sysret(cpu: &mut Cpu, i: &Insn) -> Flow {
    if cpu.efer & efer::SCE == 0 || !cpu.long_mode() {
        return Err(Ex::UD);
    }
    if cpu.cpl != 0 {
        return Err(Ex::gp(0));
    }
    let base = ((cpu.msr.star >> 48) & 0xffff) as u16;
    let to64 = i.instr.mnemonic() == M::Sysretq || i.instr.code().op_code().operand_size() == 64;
    let rip = if to64 {
        cpu.gpr[1]
    } else {
        cpu.gpr[1] & 0xffff_ffff
    };
    if to64 && !canonical(rip) {
        return Err(Ex::gp(0));
    }
    if to64 {
        cpu.seg[sr::CS] = Seg {
            selector: base.wrapping_add(16) | 3,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xa0fb,
        };
    } else {
        cpu.seg[sr::CS] = Seg {
            selector: base | 3,
            base: 0,
            limit: 0xffff_ffff,
            attr: 0xc0fb,
        };
    }
    cpu.seg[sr::SS] = Seg {
        selector: base.wrapping_add(8) | 3,
        base: 0,
        limit: 0xffff_ffff,
        attr: 0xc0f3,
    };
    cpu.cpl = 3;
    let f = cpu.gpr[11];
    cpu.set_rflags((f & !fl::RF & !fl::VM) | fl::FIXED1);
    cpu.refresh_mode();
    cpu.rip = rip;
    Err(Ex::EndBlock)
}

fn lar_lsl(cpu: &mut Cpu, i: &Insn) -> Flow {
    if !cpu.protected() || cpu.vm86() {
        return Err(Ex::UD);
    }
    let sel = rd_op(cpu, i, 1, 2)? as u16;
    let res = (|| -> Result<Option<Seg>, Ex> {
        if sel & !3 == 0 {
            return Ok(None);
        }
        let (d, _) = match read_desc(cpu, sel) {
            Ok(x) => x,
            Err(_) => return Ok(None),
        };
        let s = desc_to_seg(sel, d);
        let ty = s.attr & 0x1f;
        let sys_ok = match i.instr.mnemonic() {
            M::Lar => matches!(ty, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc),
            _ => matches!(ty, 1 | 2 | 3 | 9 | 0xb),
        };
        let sys_ok = if cpu.long_mode() {
            sys_ok && matches!(ty, 2 | 9 | 0xb | 0xc)
        } else {
            sys_ok
        };
        if s.attr & 0x10 == 0 && !sys_ok {
            return Ok(None);
        }
        let conforming_code = s.attr & 0x1c == 0x1c;
        if !conforming_code && (s.dpl() < cpu.cpl || s.dpl() < (sel & 3) as u8) {
            return Ok(None);
        }
        Ok(Some(s))
    })()?;
    match res {
        Some(s) => {
            let sz = op_size(i, 0);
            let v = if i.instr.mnemonic() == M::Lar {
                u64::from(s.attr & 0xf0ff) << 8
            } else {
                u64::from(s.limit)
            };
            wr_op(cpu, i, 0, sz, v)?;
            cpu.set_flag(fl::ZF, true);
        }
        None => cpu.set_flag(fl::ZF, false),
    }
    Ok(())
}

fn verr(cpu: &mut Cpu, i: &Insn) -> Flow {
    if !cpu.protected() || cpu.vm86() {
        return Err(Ex::UD);
    }
    let sel = rd_op(cpu, i, 0, 2)? as u16;
    let mut ok = false;
    if sel & !3 != 0
        && let Ok((d, _)) = read_desc(cpu, sel)
    {
        let s = desc_to_seg(sel, d);
        let code = s.attr & 8 != 0;
        let conforming_code = s.attr & 0x1c == 0x1c;
        let priv_ok = conforming_code || (s.dpl() >= cpu.cpl && s.dpl() >= (sel & 3) as u8);
        ok = s.attr & 0x10 != 0
            && priv_ok
            && if i.instr.mnemonic() == M::Verr {
                !code || s.attr & 2 != 0
            } else {
                !code && s.attr & 2 != 0
            };
    }
    cpu.set_flag(fl::ZF, ok);
    Ok(())
}

/// Exception class for double-fault detection.
pub fn contributory(v: u8) -> bool {
    matches!(v, vec::DE | vec::TS | vec::NP | vec::SS | vec::GP)
}
