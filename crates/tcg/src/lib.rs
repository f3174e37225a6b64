//! Interpreting x86 backend (tcg) for the keel accelerator seam.
//!
//! An x86 interpreter that stands in for KVM: 16-bit real mode, 32-bit protected mode (paging
//! off, 2-level and PAE paging) and 64-bit long mode with 4-level paging, with the system
//! architecture Linux needs (IDT delivery with IST, TSS stacks, SYSCALL/SYSRET, MSRs) and the
//! 8259 PIC / 8254 PIT (plus local APICs and an IOAPIC with several vCPUs) of `platform`.
//!
//! Speed comes from the techniques that took Bochs and QEMU from tens to hundreds of MIPS: decoded
//! blocks cached per guest-physical page and mode (`decode`), invalidated on writes to the
//! page (self-modifying code and DMA, see [`TcgVm::invalidate_range`]); one handler per
//! instruction form chosen at translation time; lazy flags (`cpu::CcOp`); a software TLB
//! with host pointers (`mem`); chaining between blocks (across pages only while the fetch
//! TLB still maps the target page); bulk `rep movs` /
//! `rep stos`. Chained blocks look at kicks, pending interrupts and timers every 32 blocks
//! rather than after each one (bounding their latency to a few thousand guest
//! instructions); `jcc` handlers are chosen per condition, and a block-ending compare or
//! counter update (`cmp`/`test`, `add`/`sub`/logic, `inc`/`dec`) runs with its `jcc` as one
//! entry; loads and stores keep only the TLB hit inline.
//!
//! On x86-64 hosts, blocks of 64-bit code that ran 2000 times are compiled to host code
//! (`jit`): integer instructions run as themselves on host registers, memory operands hit
//! the software TLB inline, and anything else (a TLB miss, MMIO, a code-page write, an
//! unsupported instruction) returns to the interpreter before the instruction, so faults,
//! self-modifying code and `icount` stay exactly as interpreted. `-accel tcg,jit=off` (or
//! `KEEL_TCG_JIT=off` in the environment) turns the tier off; `KEEL_TCG_JIT_THRESHOLD=<runs>` sets when a block is compiled (0: at its
//! first run, which the differential tests use).
//!
//! Entry points: [`TcgAccel`] (the `Accelerator`), [`TcgVm`], [`TcgVcpu`].
//!
//! # Module layers
//! The modules form a tree whose imports are a DAG: a module uses only modules of lower
//! layers (and its own submodules), never one of its own layer above it or a higher one.
//! 1. leaves, no imports from this crate: `exc` (exceptions and `Flow`), `regs` (control
//!    register and EFER bits), `cpuid`, `time` (host TSC), `platform` (PIC, PIT, local APIC,
//!    IOAPIC device models);
//! 2. `mem`: physical memory, page walker, software TLB (uses `regs`, `cpuid`);
//! 3. `cpu`: architectural state, lazy flags, linear memory access through the TLB;
//! 4. `insn`: the pre-decoded instruction record, handler type and micro-op record;
//! 5. `exec`: instruction semantics, itself layered (see its module doc): `operands` (the
//!    leaf) → `alu` → groups (`arith`, `system` → `string`, `x87`, `sse`) → `handlers`,
//!    `generic` → `select`, `dead_flags` → `uops`, `cmp_jcc`;
//! 6. `jit`: the compiling tier for hot 64-bit blocks (uses `cpu`, `mem`, `insn`);
//! 7. `decode`: translation into cached blocks (chooses handlers through `exec`; a block
//!    holds its `jit` slot);
//! 8. `vm`: the accelerator, VM and vCPU loop; the public API is re-exported from here.
//!
//! # Instruction coverage
//!
//! Implemented (all operand sizes and addressing forms iced-x86 decodes for them):
//! * integer: mov movzx movsx movsxd lea xchg xadd cmpxchg cmpxchg8b cmpxchg16b push pop
//!   pusha popa pushf popf add or adc sbb and sub xor cmp test inc dec neg not mul imul
//!   (1/2/3 operands) div idiv (#DE) rol ror rcl rcr shl sal shr sar shld shrd bt bts btr btc
//!   bsf bsr tzcnt (runs as bsf) lzcnt (bsr unless ABM is advertised) popcnt bswap movbe
//!   cbw cwde cdqe cwd cdq cqo cmovcc setcc lahf sahf xlat clc stc cmc cld std
//!   daa das aaa aas aam aad enter leave nop (all multi-byte forms) endbr32/64 pause
//!   prefetch* lfence mfence sfence clflush(opt) ud0/ud1/ud2 (#UD);
//! * control: jmp jcc jcxz/jecxz/jrcxz loop/loope/loopne call ret (near, far, with imm)
//!   iret/iretd/iretq int n int3 int1 into hlt;
//! * strings: movs stos lods scas cmps ins outs in every size with rep/repe/repne
//!   (`rep movs`/`rep stos` forward: bulk per page);
//! * system: mov to/from CR0/2/3/4/8 and DR0-7, lgdt lidt sgdt sidt lldt sldt ltr str
//!   lmsw smsw clts invlpg wbinvd invd swapgs syscall sysret cpuid rdtsc rdtscp rdmsr wrmsr
//!   (EFER STAR LSTAR CSTAR SFMASK FS/GS/KERNEL_GS base TSC TSC_AUX APIC_BASE PAT
//!   MISC_ENABLE SYSENTER_*; microcode revision reads 0; others #GP) lar lsl verr verw arpl
//!   lds les lfs lgs lss mov/push/pop sreg in out cli sti rd/wr fs/gs base (with CR4.FSGSBASE);
//! * x87: fninit fnstcw fldcw fnstsw fnclex fld fst fstp fild fist fistp fisttp fadd/fsub/
//!   fsubr/fmul/fdiv/fdivr (+p, +i) fchs fabs fsqrt frndint fscale fprem fprem1 fxch fld1
//!   fldz fldpi fldl2e fldl2t fldlg2 fldln2 f2xm1 fyl2x fsin fcos fptan fpatan fsincos
//!   fxtract fcom/fcomp/fcompp fucom* fcomi* fucomi* fcmovcc ftst fxam ffree fnop
//!   fincstp fdecstp fnstenv fldenv fwait emms fxsave fxrstor (64-bit forms too); values
//!   are held as f64;
//! * SSE/SSE2: movaps movups movapd movupd movdqa movdqu movss movsd movq movd movlps
//!   movhps movlpd movhpd movhlps movlhps movnt* movmskps movmskpd pmovmskb maskmovdqu
//!   pxor por pand pandn xorps/pd andps/pd andnps/pd orps/pd padd{b,w,d,q} psub{b,w,d,q}
//!   padd/psub{s,us}{b,w} pmullw pmulhw pmulhuw pmuludq pmaddwd pavgb pavgw pminub pmaxub
//!   pminsw pmaxsw psadbw pcmpeq{b,w,d} pcmpgt{b,w,d} psll/psrl/psra (xmm and imm) pslldq
//!   psrldq pshufd pshuflw pshufhw punpck{l,h}{bw,wd,dq,qdq} packsswb packssdw packuswb
//!   shufps shufpd unpck{l,h}{ps,pd} pinsrw pextrw add/sub/mul/div/sqrt/min/max/cmp
//!   {ss,sd,ps,pd} comiss comisd ucomiss ucomisd cvtsi2ss cvtsi2sd cvtss2sd cvtsd2ss
//!   cvt(t)ss2si cvt(t)sd2si cvtdq2ps cvtdq2pd cvt(t)ps2dq cvt(t)pd2dq cvtps2pd cvtpd2ps
//!   rcpps rcpss rsqrtps rsqrtss ldmxcsr stmxcsr.
//!
//! Raise #UD: MMX register forms (MMX is not advertised), SSE3 and later, AVX (VEX/EVEX are
//! not decoded), xgetbv/xsetbv/xsave*, sysenter/sysexit, rdrand/rdseed, rdpmc, invpcid,
//! monitor/mwait, vmcall/vmmcall, rsm, and anything iced-x86 does not decode. Legacy-mode
//! SYSCALL/SYSRET (outside long mode) raise #UD as on Intel.
//!
//! # Exceptions
//! * Debug: EFLAGS.TF single-step traps (after the instruction that ran with TF set, so not
//!   after the `popf`/`iret` that sets it), DR0-3 instruction breakpoints (faults; RF
//!   suppresses one, `iret` loads RF, faults push RF set) and data breakpoints (traps; R/W
//!   write or read/write, LEN 1/2/4/8), DR6 B0-B3/BS/BD, DR7.GD, `int1`, the `mov ss`/`pop ss`
//!   shadow that holds debug traps back one instruction. With TF, RF, a DR7 enable or a held
//!   trap, the vCPU loop runs one instruction at a time (`vm`); otherwise it pays one test per
//!   trip through its loop. I/O breakpoints (R/W = 2) are not modelled.
//! * Page walks check reserved bits at every level (address bits from
//!   `cpuid::MAXPHYADDR` up, XD while EFER.NXE is clear, PS where it is reserved, the
//!   large-page reserved ranges, PDPTE bits checked with #GP when CR0/CR3/CR4 loads them) and
//!   report #PF error codes with P, W, U, RSVD and I/D. SMEP and SMAP are not advertised;
//!   setting their CR4 bits raises #GP.
//! * BOUND (#BR), INTO (#OF), ARPL; in 64-bit mode INTO and BOUND are #UD and 63 is MOVSXD.
//!
//! # Not modelled
//! Hardware task switching (task gates, TSS far jumps, iret with NT) and call gates raise
//! #GP; segment limits are not checked on data accesses; global pages are flushed with
//! everything else;
//! SIMD floating-point exceptions are never raised (MXCSR flags are set for scalar ops and
//! conversions), packed ops do not update MXCSR flags; x87 precision is f64.
//!
//! # Several vCPUs
//! With more than one vCPU ([`ApicMode`]) each vCPU has a local APIC and the VM an IOAPIC
//! (`platform::lapic`, `platform::ioapic`); application processors start through
//! INIT/SIPI. The vCPUs run on their own host threads but interpret one at a time under the
//! VM's execution lock (see `vm`), so LOCK-prefixed instructions and page-table A/D updates
//! stay atomic with respect to the other vCPUs without host atomics in the hot paths.

#![deny(missing_docs)]

mod cpu;
mod cpuid;
mod decode;
mod exc;
mod exec;
mod insn;
mod jit;
mod mem;
mod platform;
mod probe;
mod regs;
mod time;
mod vm;

pub use cpuid::CpuidConfig;
pub use probe::TcgProbe;
pub use time::guest_tsc_khz;
pub use vm::{ApicMode, TcgAccel, TcgVcpu, TcgVm};
