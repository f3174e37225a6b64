//! The template compiler: one block of decoded 64-bit guest instructions to one host
//! function `extern "sysv64" fn(cpu: *mut Cpu, ctx: *const Ctx) -> u64`.
//!
//! Host registers: r15 = the `Cpu`, r14 = the [`Ctx`]; rsi holds a memory operand's address
//! (linear, then host), rdi and rdx are temporaries of the address and TLB code, ax holds the
//! flags saved around the TLB compare (`lahf`/`seto`). Guest RAX, RCX and RDX run in host
//! RAX, RCX and RDX (instructions that use them implicitly — `mul`, shifts by CL — need
//! them there); other guest registers take host registers from a pool, per instruction.
//!
//! Every instruction is: address and TLB check (a miss jumps to a stub that leaves with RIP
//! at the instruction), loads of the guest registers it uses, the instruction itself with
//! host registers, stores of the registers it writes. The block's last instruction sets RIP
//! (branch target or fall-through). The function returns the number of instructions
//! retired, with `super::BAILED` when a stub left early.

use std::mem::offset_of;

use iced_x86::code_asm::*;
use iced_x86::{
    Code, ConditionCode, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};

use crate::cpu::{Cpu, fl};
use crate::insn::gpr;
use crate::mem::TLB_SIZE;

/// What the compiled code needs beyond the `Cpu` (filled by `super::run` per call).
#[repr(C)]
#[derive(Debug)]
pub struct Ctx {
    /// First entry of the data-read TLB.
    pub tlb_read: *const u8,
    /// First entry of the data-write TLB.
    pub tlb_write: *const u8,
    /// 1 for CPL 3 accesses (the user bit of a TLB tag), else 0.
    pub user: u64,
}

const CTX_TLB_READ: i32 = offset_of!(Ctx, tlb_read) as i32;
const CTX_TLB_WRITE: i32 = offset_of!(Ctx, tlb_write) as i32;
const CTX_USER: i32 = offset_of!(Ctx, user) as i32;
const GPR: i32 = offset_of!(Cpu, gpr) as i32;
const RIP: i32 = offset_of!(Cpu, rip) as i32;
const RFLAGS: i32 = offset_of!(Cpu, rflags) as i32;
const EBASE: i32 = offset_of!(Cpu, ebase) as i32;
const ARITH: i32 = fl::ARITH as i32;

/// Host registers by encoding number.
const H64: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];

/// Pool for guest registers other than RAX/RCX/RDX (not rsi/rdi/r14/r15/rsp).
const POOL: [u8; 8] = [8, 9, 10, 11, 3, 5, 12, 13];

/// The iced register for host register `h` (0..15) at `size` bytes.
fn sized(h: u8, size: u8) -> Register {
    use Register::*;
    const B: [Register; 16] = [
        AL, CL, DL, BL, SPL, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L, R14L, R15L,
    ];
    const W: [Register; 16] = [
        AX, CX, DX, BX, SP, BP, SI, DI, R8W, R9W, R10W, R11W, R12W, R13W, R14W, R15W,
    ];
    const D: [Register; 16] = [
        EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D,
    ];
    const Q: [Register; 16] = [
        RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15,
    ];
    let h = usize::from(h & 15);
    match size {
        1 => B[h],
        2 => W[h],
        4 => D[h],
        _ => Q[h],
    }
}

fn gslot(g: u8) -> i32 {
    GPR + 8 * i32::from(g)
}

type R<T> = Result<T, String>;

fn enc(e: IcedError) -> String {
    let _ = e;
    "encode".to_string()
}

/// Mnemonics compiled by re-encoding with host registers.
fn generic_ok(i: &Instruction) -> bool {
    use Mnemonic as M;
    matches!(
        i.mnemonic(),
        M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Lea
            | M::Add
            | M::Adc
            | M::Sub
            | M::Sbb
            | M::And
            | M::Or
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Mul
            | M::Imul
            | M::Shl
            | M::Shr
            | M::Sar
            | M::Rol
            | M::Ror
            | M::Shld
            | M::Shrd
            | M::Xchg
            | M::Bswap
            | M::Cdqe
            | M::Cqo
            | M::Cdq
            | M::Cwde
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Xadd
            | M::Cmpxchg
    ) || (i.condition_code() != ConditionCode::None && {
        let m = format!("{:?}", i.mnemonic());
        m.starts_with("Cmov") || m.starts_with("Set")
    })
}

struct Emit {
    a: CodeAssembler,
    /// (label, guest RIP, instructions retired before) of each bail-out stub.
    stubs: Vec<(CodeLabel, u64, u32)>,
    exit: CodeLabel,
    info: InstructionInfoFactory,
}

/// Compiles `insns` (one block, in order) for placement at host address `at`.
/// Also returns, for a block compiled only up to an unsupported instruction, its mnemonic.
pub fn compile(insns: &[Instruction], at: u64) -> R<(Vec<u8>, Option<String>)> {
    let n = insns.len();
    if n == 0 || n > 4096 {
        return Err("decode".into());
    }
    // The supported prefix: the block is compiled up to its first unsupported instruction,
    // where the code leaves with RIP at it (the interpreter runs it, as the start of a block
    // of its own). Nothing at all when the first instruction is unsupported.
    let mut upto = n;
    let mut why = None;
    for (k, i) in insns.iter().enumerate() {
        let last = k + 1 == n;
        let ok = match i.mnemonic() {
            Mnemonic::Nop => true,
            Mnemonic::Push | Mnemonic::Pop => {
                matches!(
                    i.code(),
                    Code::Push_r64 | Code::Pop_r64 | Code::Pushq_imm32 | Code::Pushq_imm8
                )
            }
            Mnemonic::Jmp => {
                last && matches!(i.code(), Code::Jmp_rel32_64 | Code::Jmp_rel8_64)
                    || last && i.code() == Code::Jmp_rm64 && i.op0_kind() == OpKind::Register
            }
            Mnemonic::Call => {
                last && i.code() == Code::Call_rel32_64
                    || last && i.code() == Code::Call_rm64 && i.op0_kind() == OpKind::Register
            }
            Mnemonic::Ret => last && i.code() == Code::Retnq,
            _ if i.is_jcc_short_or_near() => last,
            // `bt*` with a register bit offset address beyond their memory operand.
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => {
                i.op0_kind() == OpKind::Register || i.op1_kind() != OpKind::Register
            }
            // The moffs forms have no base register to put the host address in.
            _ if format!("{:?}", i.code()).contains("moffs") => false,
            _ => generic_ok(i),
        };
        if !ok {
            upto = k;
            why = Some(format!("{:?}", i.mnemonic()));
            break;
        }
    }
    if upto == 0 {
        return Err(why.unwrap_or_default());
    }
    let insns = &insns[..upto];
    let n = insns.len();
    let a = CodeAssembler::new(64).map_err(enc)?;
    let mut e = Emit {
        exit: CodeLabel::default(),
        a,
        stubs: Vec::new(),
        info: InstructionInfoFactory::new(),
    };
    e.exit = e.a.create_label();
    e.prologue().map_err(enc)?;
    for (k, i) in insns.iter().enumerate() {
        let last = k + 1 == n;
        let k32 = k as u32;
        match i.mnemonic() {
            Mnemonic::Nop => {}
            Mnemonic::Push => e.push(i, k32)?,
            Mnemonic::Pop => e.pop(i, k32)?,
            Mnemonic::Jmp if i.op0_kind() == OpKind::Register => e.jmp_reg(i)?,
            Mnemonic::Jmp => e.set_rip(i.near_branch_target()).map_err(enc)?,
            Mnemonic::Call if i.op0_kind() == OpKind::Register => {
                // The target is read before the push changes RSP (`call rsp`).
                let (g, _) = gpr(i.op0_register()).ok_or("reg")?;
                e.a.mov(r8, qword_ptr(r15 + gslot(g))).map_err(enc)?;
                e.push_value(None, i.next_ip(), i.ip(), k32)?;
                e.a.mov(qword_ptr(r15 + RIP), r8).map_err(enc)?;
            }
            Mnemonic::Call => {
                e.push_value(None, i.next_ip(), i.ip(), k32)?;
                e.set_rip(i.near_branch_target()).map_err(enc)?;
            }
            Mnemonic::Ret => e.ret(i, k32)?,
            _ if i.is_jcc_short_or_near() => e.jcc(i).map_err(enc)?,
            _ => e.generic(i, k32)?,
        }
        if last
            && !matches!(i.mnemonic(), Mnemonic::Jmp | Mnemonic::Call | Mnemonic::Ret)
            && !i.is_jcc_short_or_near()
        {
            e.set_rip(i.next_ip()).map_err(enc)?;
        }
    }
    e.a.mov(rax, n as u64).map_err(enc)?;
    e.a.jmp(e.exit).map_err(enc)?;
    e.epilogue().map_err(enc)?;
    let code = e.a.assemble(at).map_err(enc)?;
    Ok((code, why))
}

impl Emit {
    fn prologue(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r)?;
        }
        a.mov(r15, rdi)?;
        a.mov(r14, rsi)?;
        // Guest status flags into host EFLAGS: SF ZF AF PF CF through AH (`sahf`), OF by an
        // addition that overflows exactly when AL is 1 (cheaper than `popfq`; DF, TF and AC
        // are not touched).
        a.mov(rcx, qword_ptr(r15 + RFLAGS))?;
        a.mov(eax, ecx)?;
        a.shr(eax, 11)?;
        a.and(eax, 1)?;
        a.mov(ah, cl)?;
        a.add(al, 0x7f)?;
        a.sahf()
    }

    fn epilogue(&mut self) -> Result<(), IcedError> {
        let stubs = std::mem::take(&mut self.stubs);
        let a = &mut self.a;
        for (mut l, ip, k) in stubs {
            a.set_label(&mut l)?;
            // Flags were saved in AX by the TLB check.
            a.add(al, 0x7f)?;
            a.sahf()?;
            a.mov(rcx, ip)?;
            a.mov(qword_ptr(r15 + RIP), rcx)?;
            a.mov(rax, u64::from(k) | super::BAILED)?;
            a.jmp(self.exit)?;
        }
        a.set_label(&mut self.exit)?;
        // Host flags to the guest's RFLAGS (the retired count in RAX moves to R8).
        a.mov(r8, rax)?;
        a.lahf()?;
        a.seto(al)?;
        a.movzx(ecx, ah)?;
        a.and(ecx, (fl::ARITH & 0xff) as u32)?;
        a.movzx(eax, al)?;
        a.shl(eax, 11)?;
        a.or(ecx, eax)?;
        a.mov(rdx, qword_ptr(r15 + RFLAGS))?;
        a.and(rdx, !ARITH)?;
        a.or(rdx, rcx)?;
        a.mov(qword_ptr(r15 + RFLAGS), rdx)?;
        a.mov(rax, r8)?;
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r)?;
        }
        a.ret()
    }

    fn set_rip(&mut self, v: u64) -> Result<(), IcedError> {
        self.a.mov(rcx, v)?;
        self.a.mov(qword_ptr(r15 + RIP), rcx)
    }

    /// A new bail-out stub for the instruction at `ip`, `k` instructions into the block.
    fn stub(&mut self, ip: u64, k: u32) -> CodeLabel {
        let l = self.a.create_label();
        self.stubs.push((l, ip, k));
        l
    }

    /// Turns the linear address in rsi into the host address of `size` bytes through the
    /// `write` or read TLB, or leaves through a stub (RIP = `ip`, `k` retired). Flags are
    /// preserved.
    fn tlb(&mut self, size: u32, write: bool, ip: u64, k: u32) -> Result<(), IcedError> {
        let miss = self.stub(ip, k);
        let a = &mut self.a;
        a.lahf()?;
        a.seto(al)?;
        a.mov(rdx, rsi)?;
        a.shr(rdx, 12)?;
        a.and(edx, (TLB_SIZE - 1) as u32)?;
        a.lea(rdx, qword_ptr(rdx + rdx * 2))?;
        a.mov(
            rdi,
            qword_ptr(r14 + if write { CTX_TLB_WRITE } else { CTX_TLB_READ }),
        )?;
        a.lea(rdx, qword_ptr(rdi + rdx * 8))?;
        // The last byte's page with the user bit must equal the tag of the first byte's
        // entry: a miss, or an access that crosses into the next page.
        a.lea(rdi, qword_ptr(rsi + (size as i32 - 1)))?;
        a.and(rdi, -4096i32)?;
        a.or(rdi, qword_ptr(r14 + CTX_USER))?;
        a.cmp(rdi, qword_ptr(rdx))?;
        a.jne(miss)?;
        a.add(rsi, qword_ptr(rdx + 8))?;
        a.add(al, 0x7f)?;
        a.sahf()
    }

    /// Effective address of the memory operand of `i` into rsi (no flags touched).
    fn address(&mut self, i: &Instruction, with_segment: bool) -> R<()> {
        let a = &mut self.a;
        let base = i.memory_base();
        let index = i.memory_index();
        let disp = i.memory_displacement64();
        if base == Register::RIP {
            return a.mov(rsi, disp).map_err(enc);
        }
        let b64 = |r: Register| gpr(r).filter(|&(_, s)| s == 8).map(|(g, _)| g);
        match base {
            Register::None => a.mov(esi, 0u32).map_err(enc)?,
            r => {
                let g = b64(r).ok_or("addr32")?;
                a.mov(rsi, qword_ptr(r15 + gslot(g))).map_err(enc)?;
            }
        }
        let d = i32::try_from(disp as i64).map_err(|_| "disp")?;
        match index {
            Register::None => {
                if d != 0 {
                    a.lea(rsi, qword_ptr(rsi + d)).map_err(enc)?;
                }
            }
            r => {
                let g = b64(r).ok_or("addr32")?;
                a.mov(rdi, qword_ptr(r15 + gslot(g))).map_err(enc)?;
                a.lea(rsi, qword_ptr(rsi + rdi * i.memory_index_scale() + d))
                    .map_err(enc)?;
            }
        }
        if with_segment {
            let seg = match i.memory_segment() {
                Register::FS => Some(4),
                Register::GS => Some(5),
                _ => None,
            };
            if let Some(s) = seg {
                a.mov(rdi, qword_ptr(r15 + EBASE + 8 * s)).map_err(enc)?;
                a.lea(rsi, qword_ptr(rsi + rdi)).map_err(enc)?;
            }
        }
        Ok(())
    }

    /// An instruction that runs as itself on host registers (see the module doc).
    fn generic(&mut self, i: &Instruction, k: u32) -> R<()> {
        let mut map = [u8::MAX; 16];
        let mut next = 0usize;
        let mut host = |g: u8, map: &mut [u8; 16]| -> R<u8> {
            if map[usize::from(g)] == u8::MAX {
                map[usize::from(g)] = if g < 3 {
                    g
                } else {
                    let h = *POOL.get(next).ok_or("regs")?;
                    next += 1;
                    h
                };
            }
            Ok(map[usize::from(g)])
        };
        let mut out = *i;
        out.set_ip(0);
        let mut mem = false;
        for op in 0..i.op_count() {
            match i.op_kind(op) {
                OpKind::Register => {
                    let (g, size) = gpr(i.op_register(op)).ok_or("reg")?;
                    if g >= 16 {
                        return Err("highbyte".into());
                    }
                    let h = host(g, &mut map)?;
                    out.set_op_register(op, sized(h, size));
                }
                OpKind::Memory => mem = true,
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64 => {}
                _ => return Err("operand".into()),
            }
        }
        let info = self.info.info(i);
        let mut written = [false; 16];
        let (mbase, mindex) = (i.memory_base(), i.memory_index());
        for u in info.used_registers() {
            let Some((g, _)) = gpr(u.register()) else {
                continue;
            };
            if g >= 16 {
                return Err("highbyte".into());
            }
            let w = !matches!(u.access(), OpAccess::Read | OpAccess::CondRead);
            if map[usize::from(g)] == u8::MAX {
                // Not an explicit operand: the address, or an implicit register.
                let addr = mem && !w && (u.register() == mbase || u.register() == mindex);
                if addr {
                    continue;
                }
                if g >= 3 {
                    return Err("implicit".into());
                }
                host(g, &mut map)?;
            }
            written[usize::from(g)] |= w;
        }
        let mut access: Option<(u32, bool)> = None;
        let mems = info.used_memory();
        if mems.len() > 1 || (!mems.is_empty() && !mem) {
            return Err("implicit-mem".into());
        }
        if let Some(m) = mems.first() {
            let size = m.memory_size().size() as u32;
            if !matches!(size, 1 | 2 | 4 | 8) {
                return Err("memsize".into());
            }
            let write = !matches!(m.access(), OpAccess::Read | OpAccess::CondRead);
            access = Some((size, write));
        }
        if mem {
            let lea = i.mnemonic() == Mnemonic::Lea;
            if !lea && access.is_none() {
                return Err("memop".into());
            }
            self.address(i, !lea)?;
            if let Some((size, write)) = access {
                self.tlb(size, write, i.ip(), k).map_err(enc)?;
            }
            out.set_memory_base(Register::RSI);
            out.set_memory_index(Register::None);
            out.set_memory_index_scale(1);
            out.set_memory_displacement64(0);
            out.set_memory_displ_size(0);
            out.set_segment_prefix(Register::None);
        }
        for g in 0..16u8 {
            let h = map[usize::from(g)];
            if h != u8::MAX {
                self.a
                    .mov(H64[usize::from(h)], qword_ptr(r15 + gslot(g)))
                    .map_err(enc)?;
            }
        }
        self.a.add_instruction(out).map_err(enc)?;
        for g in 0..16u8 {
            let h = map[usize::from(g)];
            if h != u8::MAX && written[usize::from(g)] {
                self.a
                    .mov(qword_ptr(r15 + gslot(g)), H64[usize::from(h)])
                    .map_err(enc)?;
            }
        }
        Ok(())
    }

    /// Pushes guest register `reg` or, when `None`, the constant `imm` (64-bit).
    fn push_value(&mut self, reg: Option<u8>, imm: u64, ip: u64, k: u32) -> R<()> {
        const RSP: u8 = 4;
        self.a.mov(rsi, qword_ptr(r15 + gslot(RSP))).map_err(enc)?;
        self.a.lea(rsi, qword_ptr(rsi - 8)).map_err(enc)?;
        self.tlb(8, true, ip, k).map_err(enc)?;
        let a = &mut self.a;
        match reg {
            Some(g) => a.mov(rdi, qword_ptr(r15 + gslot(g))).map_err(enc)?,
            None => a.mov(rdi, imm).map_err(enc)?,
        }
        a.mov(qword_ptr(rsi), rdi).map_err(enc)?;
        a.mov(rdi, qword_ptr(r15 + gslot(RSP))).map_err(enc)?;
        a.lea(rdi, qword_ptr(rdi - 8)).map_err(enc)?;
        a.mov(qword_ptr(r15 + gslot(RSP)), rdi).map_err(enc)
    }

    fn push(&mut self, i: &Instruction, k: u32) -> R<()> {
        if i.code() == Code::Push_r64 {
            let (g, _) = gpr(i.op0_register()).ok_or("reg")?;
            self.push_value(Some(g), 0, i.ip(), k)
        } else {
            self.push_value(None, i.immediate(0), i.ip(), k)
        }
    }

    /// Pops 8 bytes into rdi (RSP updated).
    fn pop_rdi(&mut self, ip: u64, k: u32) -> R<()> {
        const RSP: u8 = 4;
        self.a.mov(rsi, qword_ptr(r15 + gslot(RSP))).map_err(enc)?;
        self.tlb(8, false, ip, k).map_err(enc)?;
        let a = &mut self.a;
        a.mov(rdi, qword_ptr(rsi)).map_err(enc)?;
        a.mov(rsi, qword_ptr(r15 + gslot(RSP))).map_err(enc)?;
        a.lea(rsi, qword_ptr(rsi + 8)).map_err(enc)?;
        a.mov(qword_ptr(r15 + gslot(RSP)), rsi).map_err(enc)
    }

    fn pop(&mut self, i: &Instruction, k: u32) -> R<()> {
        let (g, _) = gpr(i.op0_register()).ok_or("reg")?;
        self.pop_rdi(i.ip(), k)?;
        // After RSP: `pop rsp` loads the popped value.
        self.a.mov(qword_ptr(r15 + gslot(g)), rdi).map_err(enc)
    }

    /// `jmp r64`: RIP = the register.
    fn jmp_reg(&mut self, i: &Instruction) -> R<()> {
        let (g, _) = gpr(i.op0_register()).ok_or("reg")?;
        self.a.mov(rcx, qword_ptr(r15 + gslot(g))).map_err(enc)?;
        self.a.mov(qword_ptr(r15 + RIP), rcx).map_err(enc)
    }

    fn ret(&mut self, i: &Instruction, k: u32) -> R<()> {
        self.pop_rdi(i.ip(), k)?;
        self.a.mov(qword_ptr(r15 + RIP), rdi).map_err(enc)
    }

    /// RIP = the branch target if the guest condition holds, else the next instruction.
    fn jcc(&mut self, i: &Instruction) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(rcx, i.next_ip())?;
        a.mov(rdx, i.near_branch_target())?;
        match i.condition_code() {
            ConditionCode::o => a.cmovo(rcx, rdx)?,
            ConditionCode::no => a.cmovno(rcx, rdx)?,
            ConditionCode::b => a.cmovb(rcx, rdx)?,
            ConditionCode::ae => a.cmovae(rcx, rdx)?,
            ConditionCode::e => a.cmove(rcx, rdx)?,
            ConditionCode::ne => a.cmovne(rcx, rdx)?,
            ConditionCode::be => a.cmovbe(rcx, rdx)?,
            ConditionCode::a => a.cmova(rcx, rdx)?,
            ConditionCode::s => a.cmovs(rcx, rdx)?,
            ConditionCode::ns => a.cmovns(rcx, rdx)?,
            ConditionCode::p => a.cmovp(rcx, rdx)?,
            ConditionCode::np => a.cmovnp(rcx, rdx)?,
            ConditionCode::l => a.cmovl(rcx, rdx)?,
            ConditionCode::ge => a.cmovge(rcx, rdx)?,
            ConditionCode::le => a.cmovle(rcx, rdx)?,
            ConditionCode::g => a.cmovg(rcx, rdx)?,
            ConditionCode::None => a.mov(rcx, rdx)?,
        }
        a.mov(qword_ptr(r15 + RIP), rcx)
    }
}
