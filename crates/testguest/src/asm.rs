//! The guest skeleton: fixed memory layout, PVH entry stub, GDT/IDT/page tables, and the
//! small runtime every guest links (serial print helpers, hashing, exception handlers).

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, IcedError, Instruction};

use crate::{EntryState, GuestError, TestGuest};

/// The fixed guest-physical layout shared by all guests. Guests use absolute addresses, so
/// the text they print (exception RIPs, for instance) is the same on every backend.
pub mod layout {
    /// Where the image is loaded and where the PVH entry stub starts.
    pub const LOAD: u64 = 0x10_0000;
    /// Global descriptor table: null, code32 0x08, data 0x10, code64 0x18, data 0x20 (the
    /// SYSCALL stack segment), user code32 0x28, user data 0x30, user code64 0x38, 64-bit TSS
    /// 0x40 (two slots).
    pub const GDT: u64 = LOAD + 0x300;
    /// Pseudo-descriptor for `lgdt`.
    pub const GDTR: u64 = LOAD + 0x380;
    /// Pseudo-descriptor for `lidt`.
    pub const IDTR: u64 = LOAD + 0x390;
    /// 64-bit task state segment (RSP0 = [`STACK_TOP`], no I/O bitmap).
    pub const TSS: u64 = LOAD + 0x700;
    /// Runtime variables (see the constants below).
    pub const VARS: u64 = LOAD + 0x400;
    /// Non-zero: the exception handler resumes at this RIP (and clears it).
    pub const RESUME: u64 = VARS;
    /// Number of exceptions taken.
    pub const EXC_COUNT: u64 = VARS + 0x08;
    /// Vector of the last exception.
    pub const LAST_VECTOR: u64 = VARS + 0x10;
    /// Error code of the last exception (0 when the vector has none).
    pub const LAST_ERROR: u64 = VARS + 0x18;
    /// RIP pushed by the last exception.
    pub const LAST_RIP: u64 = VARS + 0x20;
    /// CR2 when the last exception was taken.
    pub const LAST_CR2: u64 = VARS + 0x28;
    /// Non-zero: a #PF inside [`PF_REGION`] is fixed (P, RW set, NX cleared) and retried.
    pub const PF_FIXUP: u64 = VARS + 0x30;
    /// Set by a resumed exception: `0x100 | vector | (resume_rip - fault_rip) << 16`.
    pub const EXC_MARK: u64 = VARS + 0x38;
    /// Non-zero: an exception with no [`RESUME`] (and no #PF fix-up) jumps here, in kernel
    /// mode on the exception stack (how user-mode guests end).
    pub const FINISH: u64 = VARS + 0x40;
    /// 32-bit guests: log2 of the PTE size of [`PT`] (2: 32-bit paging, 3: PAE) for the
    /// #PF fix-up.
    pub const PF_PTE_SHIFT: u64 = VARS + 0x48;
    /// RSP in the exception handler right after the CPU pushed its frame (64-bit guests):
    /// shows which stack (RSP0, IST) the CPU switched to.
    pub const LAST_RSP: u64 = VARS + 0x50;
    /// CS of the interrupted code, from the exception frame (64-bit guests).
    pub const LAST_CS: u64 = VARS + 0x58;
    /// The memory operand of memory-form op tests (one quadword).
    pub const MEMOP: u64 = VARS + 0x60;
    /// EFLAGS image the last exception pushed (RF, TF as the CPU saved them).
    pub const LAST_FLAGS: u64 = VARS + 0x68;
    /// DR6 when the last #DB was taken (the handler then writes 0 to DR6, clears TF and sets
    /// RF in the frame it returns through); 0 after other vectors.
    pub const LAST_DR6: u64 = VARS + 0x70;
    /// Kernel RSP saved while a case runs at CPL 3.
    pub const SAVED_RSP: u64 = VARS + 0x78;
    /// Top of the IST1 stack for guests that use it (the 4 KiB below it are reserved).
    pub const IST1_TOP: u64 = LOAD + 0x7_d000;
    /// 16 quadwords of scratch for op tests.
    pub const SCRATCH: u64 = VARS + 0x80;
    /// Register save area: rax..r15 then rflags (17 quadwords).
    pub const SAVE: u64 = VARS + 0x100;
    /// 64-bit interrupt descriptor table (256 gates).
    pub const IDT: u64 = LOAD + 0x1000;
    /// Level-4 page table.
    pub const PML4: u64 = LOAD + 0x2000;
    /// Page directory pointer table.
    pub const PDPT: u64 = LOAD + 0x3000;
    /// Page directory identity-mapping 0-1 GiB with 2 MiB pages.
    pub const PD0: u64 = LOAD + 0x4000;
    /// Page directory for 1-2 GiB (entry 0 points at [`PT`]).
    pub const PD1: u64 = LOAD + 0x5000;
    /// Page table of [`PF_REGION`] (4 KiB pages).
    pub const PT: u64 = LOAD + 0x6000;
    /// Initial stack pointer (the stack is the 4 KiB below it).
    pub const STACK_TOP: u64 = LOAD + 0x8000;
    /// Start of the main (32- or 64-bit) code.
    pub const CODE: u64 = LOAD + 0x8000;
    /// Space for code.
    pub const CODE_MAX: usize = 0x18000;
    /// Start of the guest's data (operand tables, buffers).
    pub const DATA: u64 = LOAD + 0x2_0000;
    /// Space for data.
    pub const DATA_MAX: usize = 0x6_0000;
    /// Start of the result records (zeroed RAM, not part of the image).
    pub const RESULTS: u64 = LOAD + 0x8_0000;
    /// Space for results.
    pub const RESULTS_MAX: usize = 0x6_0000;
    /// Virtual base of the 4 KiB-page region used by paging tests.
    pub const PF_REGION: u64 = 0x4000_0000;
    /// Physical backing of [`PF_REGION`].
    pub const PF_PHYS: u64 = 0x20_0000;
    /// Pages in [`PF_REGION`].
    pub const PF_PAGES: usize = 16;
    /// Code segment selectors.
    pub const SEL_CODE32: u16 = 0x08;
    /// Flat data selector.
    pub const SEL_DATA: u16 = 0x10;
    /// 64-bit code selector.
    pub const SEL_CODE64: u16 = 0x18;
    /// Kernel data selector that follows [`SEL_CODE64`] (SYSCALL's SS).
    pub const SEL_DATA64: u16 = 0x20;
    /// User (DPL 3) 32-bit code selector: the base of STAR's SYSRET field.
    pub const SEL_USER_CODE32: u16 = 0x28;
    /// User data selector (RPL 3 to load).
    pub const SEL_USER_DATA: u16 = 0x30;
    /// User 64-bit code selector (RPL 3 to load).
    pub const SEL_USER_CODE64: u16 = 0x38;
    /// Task state segment selector.
    pub const SEL_TSS: u16 = 0x40;
    /// Size of the GDT in bytes (`lgdt` limit + 1).
    pub const GDT_SIZE: u64 = 0x50;
}

use layout::*;

/// Page-table entry bits.
pub(crate) const PTE_P: u64 = 1;
pub(crate) const PTE_RW: u64 = 2;
pub(crate) const PTE_US: u64 = 4;
pub(crate) const PTE_PS: u64 = 0x80;
pub(crate) const PTE_NX: u64 = 1 << 63;

/// Exceptions that push an error code.
fn has_error_code(v: u32) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// FNV-style hash the guests compute over quadwords; [`hash_u64s`] is the host twin.
pub(crate) const HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;
pub(crate) const HASH_PRIME: u64 = 0x0000_0100_0000_01b3;

pub(crate) const HASH32_SEED: u32 = 0x811c_9dc5;
pub(crate) const HASH32_PRIME: u32 = 0x0100_0193;

/// The hash a 32-bit guest's `hash` routine computes over `words`.
pub fn hash_u32s(words: impl IntoIterator<Item = u32>) -> u32 {
    words
        .into_iter()
        .fold(HASH32_SEED, |h, w| (h ^ w).wrapping_mul(HASH32_PRIME))
}

/// The hash the guest's `hash` routine computes over `words`.
pub fn hash_u64s(words: impl IntoIterator<Item = u64>) -> u64 {
    words
        .into_iter()
        .fold(HASH_SEED, |h, w| (h ^ w).wrapping_mul(HASH_PRIME))
}

/// Execution mode of a guest's main code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 32-bit flat protected mode, paging off (the PVH entry mode itself).
    Protected32,
    /// 64-bit long mode, 4-level paging, CPL 0.
    Long64,
}

/// Page-table format a 32-bit guest builds (it turns paging on itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging32 {
    /// Two-level 32-bit paging, 4 KiB pages: the page directory at [`layout::PML4`], the
    /// identity map of 0-4 MiB in a page table at [`layout::PDPT`], [`layout::PF_REGION`] in
    /// [`layout::PT`].
    TwoLevel,
    /// PAE: PDPT at [`layout::PDPT`], 0-1 GiB identity-mapped with 2 MiB pages in
    /// [`layout::PD0`], [`layout::PF_REGION`] through [`layout::PD1`] and [`layout::PT`].
    Pae,
}

/// A guest under construction. `a` is the main code's assembler; the helpers below emit
/// calls into the runtime appended by [`Guest::finish`].
pub(crate) struct Guest {
    pub name: String,
    pub mode: Mode,
    pub a: CodeAssembler,
    pub putc: CodeLabel,
    pub puthex: CodeLabel,
    pub puts: CodeLabel,
    pub hash: CodeLabel,
    exit: CodeLabel,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    /// Data placed at [`layout::DATA`].
    pub data: Vec<u8>,
    /// Flags of the [`layout::PF_REGION`] PTEs (address bits are added).
    pub pt_flags: [u64; PF_PAGES],
    /// Text the guest is expected to print, built alongside the code.
    pub expect: String,
    /// False once something was printed whose value the builder cannot predict.
    pub predicted: bool,
    /// Extra IDT gates (vector, handler) beyond the 32 exception vectors (64-bit guests).
    pub gates: Vec<(u8, CodeLabel)>,
    /// The guest programs the 8259 PIC and 8254 PIT.
    pub uses_pic_pit: bool,
    /// Set the U/S bit in the identity map and the upper levels of [`layout::PF_REGION`]
    /// (user-mode guests); leaf PTEs of the region keep [`Guest::pt_flags`].
    pub user_pages: bool,
    /// 32-bit guests: the page tables to build (paging itself is enabled by the guest).
    pub paging32: Option<Paging32>,
}

pub(crate) type R<T = ()> = Result<T, IcedError>;

impl Guest {
    /// Starts a guest: segment reload, stack, IDT (64-bit), zeroed registers.
    pub fn new(name: &str, mode: Mode) -> R<Self> {
        let bits = match mode {
            Mode::Protected32 => 32,
            Mode::Long64 => 64,
        };
        let mut a = CodeAssembler::new(bits)?;
        let putc = a.create_label();
        let puthex = a.create_label();
        let puts = a.create_label();
        let hash = a.create_label();
        let exit = a.create_label();
        let mut g = Self {
            name: name.to_string(),
            mode,
            a,
            putc,
            puthex,
            puts,
            hash,
            exit,
            strings: Vec::new(),
            data: Vec::new(),
            pt_flags: [PTE_P | PTE_RW; PF_PAGES],
            expect: String::new(),
            predicted: true,
            gates: Vec::new(),
            uses_pic_pit: false,
            user_pages: false,
            paging32: None,
        };
        g.prologue()?;
        Ok(g)
    }

    fn prologue(&mut self) -> R {
        let a = &mut self.a;
        match self.mode {
            Mode::Long64 => {
                a.mov(eax, u32::from(SEL_DATA))?;
                a.mov(ds, ax)?;
                a.mov(es, ax)?;
                a.mov(ss, ax)?;
                a.mov(fs, ax)?;
                a.mov(gs, ax)?;
                a.mov(rsp, STACK_TOP)?;
                a.lidt(ptr(IDTR))?;
                for r in [
                    eax, ebx, ecx, edx, esi, edi, ebp, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d,
                ] {
                    a.xor(r, r)?;
                }
            }
            Mode::Protected32 => {
                a.lidt(ptr(IDTR as u32))?;
                for r in [eax, ebx, ecx, edx, esi, edi, ebp] {
                    a.xor(r, r)?;
                }
            }
        }
        Ok(())
    }

    /// Prints `s` (and adds it to the expected output).
    pub fn print(&mut self, s: &str) -> R {
        self.expect.push_str(s);
        self.emit_str(s)
    }

    /// Records that the output from here on is not predicted (register dumps).
    pub fn unpredicted(&mut self) {
        self.predicted = false;
    }

    /// Emits code printing `s` without touching the expected output.
    pub fn emit_str(&mut self, s: &str) -> R {
        let l = self.a.create_label();
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.strings.push((l, bytes));
        match self.mode {
            Mode::Long64 => {
                self.a.push(rsi)?;
                self.a.lea(rsi, ptr(l))?;
                self.a.call(self.puts)?;
                self.a.pop(rsi)?;
            }
            Mode::Protected32 => {
                // No RIP-relative addressing in 32-bit code: `call` over the inline string
                // pushes its address.
                let (_, bytes) = self.strings.pop().unwrap_or((l, Vec::new()));
                let mut after = self.a.create_label();
                self.a.push(esi)?;
                self.a.call(after)?;
                self.a.db(&bytes)?;
                self.a.set_label(&mut after)?;
                self.a.pop(esi)?;
                self.a.call(self.puts)?;
                self.a.pop(esi)?;
            }
        }
        Ok(())
    }

    /// Prints the quadword at `addr` as `digits` hex digits, masked with `mask`.
    pub fn print_hex_mem(&mut self, addr: u64, mask: u64, digits: u32) -> R {
        let a = &mut self.a;
        if self.mode == Mode::Protected32 {
            // 32-bit guests print the low dword (at most 8 digits).
            a.push(eax)?;
            a.push(ecx)?;
            a.mov(eax, dword_ptr(addr as u32))?;
            a.and(eax, mask as u32)?;
            a.mov(ecx, digits.clamp(1, 8))?;
            a.call(self.puthex)?;
            a.pop(ecx)?;
            a.pop(eax)?;
            return Ok(());
        }
        a.push(rax)?;
        a.push(rcx)?;
        a.mov(rax, qword_ptr(addr))?;
        a.mov(rcx, mask)?;
        a.and(rax, rcx)?;
        a.mov(ecx, digits.clamp(1, 16))?;
        a.call(self.puthex)?;
        a.pop(rcx)?;
        a.pop(rax)?;
        Ok(())
    }

    /// Prints `label` and the hash of `count` quadwords at `addr`, then a newline;
    /// `expected` is the value the host predicts (None: unknown here).
    pub fn print_hash(&mut self, label: &str, addr: u64, count: u64, expected: Option<u64>) -> R {
        self.emit_str(label)?;
        let a = &mut self.a;
        a.push(rsi)?;
        a.push(rcx)?;
        a.push(rax)?;
        a.mov(rsi, addr)?;
        a.mov(rcx, count)?;
        a.call(self.hash)?;
        a.mov(ecx, 16)?;
        a.call(self.puthex)?;
        a.pop(rax)?;
        a.pop(rcx)?;
        a.pop(rsi)?;
        self.emit_str("\n")?;
        match expected {
            Some(h) => self.expect.push_str(&format!("{label}{h:016x}\n")),
            None => self.predicted = false,
        }
        Ok(())
    }

    /// Stores all general registers and RFLAGS to [`layout::SAVE`] without changing them.
    pub fn save_regs(&mut self) -> R {
        let a = &mut self.a;
        let regs = [
            rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15,
        ];
        for (i, r) in regs.iter().enumerate() {
            a.mov(qword_ptr(SAVE + 8 * i as u64), *r)?;
        }
        a.pushfq()?;
        a.pop(rax)?;
        a.mov(qword_ptr(SAVE + 128), rax)?;
        a.mov(rax, qword_ptr(SAVE))?;
        Ok(())
    }

    /// Prints the registers saved by [`Guest::save_regs`] (RSP excluded), RFLAGS masked with
    /// `flags_mask`. Values are not predicted here.
    pub fn print_saved_regs(&mut self, flags_mask: u64) -> R {
        self.unpredicted();
        let names = [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ];
        for (i, n) in names.iter().enumerate() {
            if *n == "rsp" {
                continue;
            }
            self.emit_str(&format!("{n}="))?;
            self.print_hex_mem(SAVE + 8 * i as u64, u64::MAX, 16)?;
            self.emit_str(if i % 4 == 3 { "\n" } else { " " })?;
        }
        self.emit_str("rflags=")?;
        self.print_hex_mem(SAVE + 128, flags_mask, 8)?;
        self.emit_str("\n")?;
        Ok(())
    }

    /// Ends the guest: `out` of `code` to isa-debug-exit, then halts forever.
    pub fn exit(&mut self, code: u8) -> R {
        let a = &mut self.a;
        a.mov(eax, u32::from(code))?;
        a.jmp(self.exit)?;
        Ok(())
    }

    /// Emits the runtime routines and the strings.
    fn runtime(&mut self) -> R {
        match self.mode {
            Mode::Long64 => self.runtime64()?,
            Mode::Protected32 => self.runtime32()?,
        }
        let a = &mut self.a;
        for (mut l, bytes) in std::mem::take(&mut self.strings) {
            a.set_label(&mut l)?;
            a.db(&bytes)?;
        }
        Ok(())
    }

    fn runtime64(&mut self) -> R {
        let a = &mut self.a;
        // putc: al -> serial.
        a.set_label(&mut self.putc)?;
        a.push(rdx)?;
        a.mov(edx, u32::from(crate::SERIAL_PORT))?;
        a.out(dx, al)?;
        a.pop(rdx)?;
        a.ret()?;
        // puthex: rax value, ecx digits (1..=16).
        a.set_label(&mut self.puthex)?;
        a.push(rax)?;
        a.push(rbx)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(rbx, rax)?;
        a.mov(edx, ecx)?;
        a.mov(eax, 16)?;
        a.sub(eax, ecx)?;
        a.shl(eax, 2)?;
        a.mov(ecx, eax)?;
        a.shl(rbx, cl)?;
        a.mov(ecx, edx)?;
        let mut lp = a.create_label();
        let mut digit = a.create_label();
        a.set_label(&mut lp)?;
        a.rol(rbx, 4)?;
        a.mov(eax, ebx)?;
        a.and(eax, 15)?;
        a.cmp(eax, 10)?;
        a.jb(digit)?;
        a.add(eax, 39)?;
        a.set_label(&mut digit)?;
        a.add(eax, 48)?;
        a.call(self.putc)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rbx)?;
        a.pop(rax)?;
        a.ret()?;
        // puts: rsi -> NUL-terminated string.
        a.set_label(&mut self.puts)?;
        a.push(rax)?;
        a.push(rsi)?;
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut lp)?;
        a.mov(al, byte_ptr(rsi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.inc(rsi)?;
        a.jmp(lp)?;
        a.set_label(&mut done)?;
        a.pop(rsi)?;
        a.pop(rax)?;
        a.ret()?;
        // hash: rsi address, rcx quadwords -> rax.
        a.set_label(&mut self.hash)?;
        a.push(rsi)?;
        a.push(rcx)?;
        a.push(rbx)?;
        a.mov(rax, HASH_SEED)?;
        a.mov(rbx, HASH_PRIME)?;
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.test(rcx, rcx)?;
        a.jz(done)?;
        a.set_label(&mut lp)?;
        a.xor(rax, qword_ptr(rsi))?;
        a.imul_2(rax, rbx)?;
        a.add(rsi, 8)?;
        a.dec(rcx)?;
        a.jnz(lp)?;
        a.set_label(&mut done)?;
        a.pop(rbx)?;
        a.pop(rcx)?;
        a.pop(rsi)?;
        a.ret()?;
        // exit: al -> isa-debug-exit.
        a.set_label(&mut self.exit)?;
        a.mov(edx, u32::from(crate::DEBUG_EXIT_PORT))?;
        a.out(dx, al)?;
        let mut h = a.create_label();
        a.set_label(&mut h)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(h)?;
        Ok(())
    }

    fn runtime32(&mut self) -> R {
        let a = &mut self.a;
        a.set_label(&mut self.putc)?;
        a.push(edx)?;
        a.mov(edx, u32::from(crate::SERIAL_PORT))?;
        a.out(dx, al)?;
        a.pop(edx)?;
        a.ret()?;
        // puthex: eax value, ecx digits (1..=8).
        a.set_label(&mut self.puthex)?;
        a.push(eax)?;
        a.push(ebx)?;
        a.push(ecx)?;
        a.push(edx)?;
        a.mov(ebx, eax)?;
        a.mov(edx, ecx)?;
        a.mov(eax, 8)?;
        a.sub(eax, ecx)?;
        a.shl(eax, 2)?;
        a.mov(ecx, eax)?;
        a.shl(ebx, cl)?;
        a.mov(ecx, edx)?;
        let mut lp = a.create_label();
        let mut digit = a.create_label();
        a.set_label(&mut lp)?;
        a.rol(ebx, 4)?;
        a.mov(eax, ebx)?;
        a.and(eax, 15)?;
        a.cmp(eax, 10)?;
        a.jb(digit)?;
        a.add(eax, 39)?;
        a.set_label(&mut digit)?;
        a.add(eax, 48)?;
        a.call(self.putc)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.pop(edx)?;
        a.pop(ecx)?;
        a.pop(ebx)?;
        a.pop(eax)?;
        a.ret()?;
        a.set_label(&mut self.puts)?;
        a.push(eax)?;
        a.push(esi)?;
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut lp)?;
        a.mov(al, byte_ptr(esi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.inc(esi)?;
        a.jmp(lp)?;
        a.set_label(&mut done)?;
        a.pop(esi)?;
        a.pop(eax)?;
        a.ret()?;
        // hash: esi address, ecx dwords -> eax (FNV-1a-style over dwords, see hash_u32s).
        a.set_label(&mut self.hash)?;
        a.push(esi)?;
        a.push(ecx)?;
        a.mov(eax, HASH32_SEED)?;
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.test(ecx, ecx)?;
        a.jz(done)?;
        a.set_label(&mut lp)?;
        a.xor(eax, dword_ptr(esi))?;
        a.imul_3(eax, eax, HASH32_PRIME as i32)?;
        a.add(esi, 4)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.set_label(&mut done)?;
        a.pop(ecx)?;
        a.pop(esi)?;
        a.ret()?;
        a.set_label(&mut self.exit)?;
        a.mov(edx, u32::from(crate::DEBUG_EXIT_PORT))?;
        a.out(dx, al)?;
        let mut h = a.create_label();
        a.set_label(&mut h)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(h)?;
        Ok(())
    }

    /// Emits the exception stubs and the common handler; returns the 32 stub labels.
    fn exception_handlers(&mut self) -> R<Vec<CodeLabel>> {
        let mut stubs = Vec::with_capacity(32);
        let mut common = self.a.create_label();
        for v in 0..32u32 {
            let mut l = self.a.create_label();
            self.a.set_label(&mut l)?;
            if !has_error_code(v) {
                self.a.push(0)?;
            }
            self.a.push(v as i32)?;
            self.a.jmp(common)?;
            stubs.push(l);
        }
        let mut fatal = self.a.create_label();
        let mut ret = self.a.create_label();
        let mut noresume = self.a.create_label();
        {
            let a = &mut self.a;
            a.set_label(&mut common)?;
            // Frame: vector, error, rip, cs, rflags, rsp, ss; +16 after the two pushes.
            a.push(rax)?;
            a.push(rbx)?;
            a.mov(rax, qword_ptr(rsp + 16))?;
            a.mov(qword_ptr(LAST_VECTOR), rax)?;
            a.mov(rax, qword_ptr(rsp + 24))?;
            a.mov(qword_ptr(LAST_ERROR), rax)?;
            a.mov(rax, qword_ptr(rsp + 32))?;
            a.mov(qword_ptr(LAST_RIP), rax)?;
            a.mov(rax, cr2)?;
            a.mov(qword_ptr(LAST_CR2), rax)?;
            a.mov(rax, qword_ptr(rsp + 40))?;
            a.mov(qword_ptr(LAST_CS), rax)?;
            a.mov(rax, qword_ptr(rsp + 48))?;
            a.mov(qword_ptr(LAST_FLAGS), rax)?;
            let mut not_db = a.create_label();
            a.cmp(qword_ptr(rsp + 16), 1)?;
            a.jne(not_db)?;
            a.mov(rax, dr6)?;
            a.mov(qword_ptr(LAST_DR6), rax)?;
            a.xor(eax, eax)?;
            a.mov(dr6, rax)?;
            a.btr(qword_ptr(rsp + 48), 8)?;
            a.bts(qword_ptr(rsp + 48), 16)?;
            a.set_label(&mut not_db)?;
            // RSP before the stub's two pushes and our two: the CPU-pushed frame's base.
            a.lea(rax, qword_ptr(rsp + 32))?;
            a.mov(qword_ptr(LAST_RSP), rax)?;
            a.add(qword_ptr(EXC_COUNT), 1)?;
            a.mov(rax, qword_ptr(RESUME))?;
            a.test(rax, rax)?;
            a.jz(noresume)?;
            // EXC_MARK = 0x100 | vector | (resume - rip) << 16
            a.mov(rbx, rax)?;
            a.sub(rbx, qword_ptr(rsp + 32))?;
            a.shl(rbx, 16)?;
            a.or(rbx, qword_ptr(rsp + 16))?;
            a.or(rbx, 0x100)?;
            a.mov(qword_ptr(EXC_MARK), rbx)?;
            a.mov(qword_ptr(rsp + 32), rax)?;
            a.mov(qword_ptr(RESUME), 0)?;
            a.jmp(ret)?;
            a.set_label(&mut noresume)?;
            let mut not_finish = a.create_label();
            a.mov(rax, qword_ptr(FINISH))?;
            a.test(rax, rax)?;
            a.jz(not_finish)?;
            a.jmp(rax)?;
            a.set_label(&mut not_finish)?;
            a.cmp(qword_ptr(rsp + 16), 14)?;
            a.jne(fatal)?;
            a.cmp(qword_ptr(PF_FIXUP), 0)?;
            a.je(fatal)?;
            a.mov(rax, cr2)?;
            a.mov(rbx, PF_REGION)?;
            a.sub(rax, rbx)?;
            a.shr(rax, 12)?;
            a.cmp(rax, PF_PAGES as i32)?;
            a.jae(fatal)?;
            a.mov(rbx, PT)?;
            a.lea(rbx, qword_ptr(rbx + rax * 8))?;
            a.or(qword_ptr(rbx), (PTE_P | PTE_RW) as i32)?;
            a.btr(qword_ptr(rbx), 63)?;
            a.mov(rax, cr2)?;
            a.invlpg(byte_ptr(rax))?;
            a.set_label(&mut ret)?;
            a.pop(rbx)?;
            a.pop(rax)?;
            a.add(rsp, 16)?;
            a.iretq()?;
        }
        self.a.set_label(&mut fatal)?;
        self.emit_str("unexpected exception vector=")?;
        self.print_hex_mem(LAST_VECTOR, u64::MAX, 2)?;
        self.emit_str(" error=")?;
        self.print_hex_mem(LAST_ERROR, u64::MAX, 8)?;
        self.emit_str(" rip=")?;
        self.print_hex_mem(LAST_RIP, u64::MAX, 16)?;
        self.emit_str(" cr2=")?;
        self.print_hex_mem(LAST_CR2, u64::MAX, 16)?;
        self.emit_str("\n")?;
        self.exit(crate::EXIT_UNEXPECTED_EXCEPTION)?;
        Ok(stubs)
    }

    /// The 32-bit exception stubs and common handler (same contract as the 64-bit one:
    /// [`layout::RESUME`], [`layout::FINISH`], the #PF fix-up with [`layout::PF_PTE_SHIFT`]).
    fn exception_handlers32(&mut self) -> R<Vec<CodeLabel>> {
        let mut stubs = Vec::with_capacity(32);
        let mut common = self.a.create_label();
        for v in 0..32u32 {
            let mut l = self.a.create_label();
            self.a.set_label(&mut l)?;
            if !has_error_code(v) {
                self.a.push(0)?;
            }
            self.a.push(v as i32)?;
            self.a.jmp(common)?;
            stubs.push(l);
        }
        let mut fatal = self.a.create_label();
        let mut ret = self.a.create_label();
        let mut noresume = self.a.create_label();
        let mut not_finish = self.a.create_label();
        let mut pae = self.a.create_label();
        let mut fixed = self.a.create_label();
        let d = |addr: u64| dword_ptr(addr as u32);
        {
            let a = &mut self.a;
            a.set_label(&mut common)?;
            // Frame: vector, error, eip, cs, eflags; +8 after the two pushes.
            a.push(eax)?;
            a.push(ebx)?;
            for (var, off) in [(LAST_VECTOR, 8), (LAST_ERROR, 12), (LAST_RIP, 16)] {
                a.mov(eax, dword_ptr(esp + off))?;
                a.mov(d(var), eax)?;
                a.mov(d(var + 4), 0)?;
            }
            a.mov(eax, cr2)?;
            a.mov(d(LAST_CR2), eax)?;
            a.mov(d(LAST_CR2 + 4), 0)?;
            a.mov(eax, dword_ptr(esp + 24))?;
            a.mov(d(LAST_FLAGS), eax)?;
            a.mov(d(LAST_FLAGS + 4), 0)?;
            let mut not_db = a.create_label();
            a.cmp(dword_ptr(esp + 8), 1)?;
            a.jne(not_db)?;
            a.mov(eax, dr6)?;
            a.mov(d(LAST_DR6), eax)?;
            a.mov(d(LAST_DR6 + 4), 0)?;
            a.xor(eax, eax)?;
            a.mov(dr6, eax)?;
            a.btr(dword_ptr(esp + 24), 8)?;
            a.bts(dword_ptr(esp + 24), 16)?;
            a.set_label(&mut not_db)?;
            a.add(d(EXC_COUNT), 1)?;
            a.mov(eax, d(RESUME))?;
            a.test(eax, eax)?;
            a.jz(noresume)?;
            a.mov(ebx, eax)?;
            a.sub(ebx, dword_ptr(esp + 16))?;
            a.shl(ebx, 16)?;
            a.or(ebx, dword_ptr(esp + 8))?;
            a.or(ebx, 0x100)?;
            a.mov(d(EXC_MARK), ebx)?;
            a.mov(d(EXC_MARK + 4), 0)?;
            a.mov(dword_ptr(esp + 16), eax)?;
            a.mov(d(RESUME), 0)?;
            a.jmp(ret)?;
            a.set_label(&mut noresume)?;
            a.mov(eax, d(FINISH))?;
            a.test(eax, eax)?;
            a.jz(not_finish)?;
            a.jmp(eax)?;
            a.set_label(&mut not_finish)?;
            a.cmp(dword_ptr(esp + 8), 14)?;
            a.jne(fatal)?;
            a.cmp(d(PF_FIXUP), 0)?;
            a.je(fatal)?;
            a.mov(eax, cr2)?;
            a.sub(eax, PF_REGION as u32)?;
            a.shr(eax, 12)?;
            a.cmp(eax, PF_PAGES as i32)?;
            a.jae(fatal)?;
            a.cmp(d(PF_PTE_SHIFT), 3)?;
            a.je(pae)?;
            a.lea(ebx, dword_ptr(eax * 4 + PT as i32))?;
            a.or(dword_ptr(ebx), (PTE_P | PTE_RW) as i32)?;
            a.jmp(fixed)?;
            a.set_label(&mut pae)?;
            a.lea(ebx, dword_ptr(eax * 8 + PT as i32))?;
            a.or(dword_ptr(ebx), (PTE_P | PTE_RW) as i32)?;
            a.btr(dword_ptr(ebx + 4), 31)?;
            a.set_label(&mut fixed)?;
            a.mov(eax, cr2)?;
            a.invlpg(byte_ptr(eax))?;
            a.set_label(&mut ret)?;
            a.pop(ebx)?;
            a.pop(eax)?;
            a.add(esp, 8)?;
            a.iretd()?;
        }
        self.a.set_label(&mut fatal)?;
        self.emit_str("unexpected exception vector=")?;
        self.print_hex_mem(LAST_VECTOR, 0xff, 2)?;
        self.emit_str(" error=")?;
        self.print_hex_mem(LAST_ERROR, u64::MAX, 8)?;
        self.emit_str(" eip=")?;
        self.print_hex_mem(LAST_RIP, u64::MAX, 8)?;
        self.emit_str(" cr2=")?;
        self.print_hex_mem(LAST_CR2, u64::MAX, 8)?;
        self.emit_str("\n")?;
        self.exit(crate::EXIT_UNEXPECTED_EXCEPTION)?;
        Ok(stubs)
    }

    /// Assembles everything into a [`TestGuest`].
    pub fn finish(self) -> Result<TestGuest, GuestError> {
        let name = self.name.clone();
        self.finish_inner().map_err(|source| GuestError::Assemble {
            guest: name,
            source,
        })?
    }

    fn finish_inner(mut self) -> R<Result<TestGuest, GuestError>> {
        let stubs = match self.mode {
            Mode::Long64 => self.exception_handlers()?,
            Mode::Protected32 => self.exception_handlers32()?,
        };
        self.runtime()?;
        let res = self
            .a
            .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let code = res.inner.code_buffer.clone();
        let mut gate_ips: Vec<(u64, u64)> = Vec::with_capacity(stubs.len());
        for (v, s) in stubs.iter().enumerate() {
            gate_ips.push((v as u64, res.label_ip(s)?));
        }
        for (v, l) in &self.gates {
            gate_ips.push((u64::from(*v), res.label_ip(l)?));
        }
        let too_big = |what, size, max| {
            Ok(Err(GuestError::TooBig {
                guest: self.name.clone(),
                what,
                size,
                max,
            }))
        };
        if code.len() > CODE_MAX {
            return too_big("code", code.len(), CODE_MAX);
        }
        if self.data.len() > DATA_MAX {
            return too_big("data", self.data.len(), DATA_MAX);
        }
        let entry_code = entry_stub(self.mode, self.uses_pic_pit)?;

        let image_len = (DATA - LOAD) as usize + self.data.len();
        let mut img = vec![0u8; image_len];
        let put = |img: &mut Vec<u8>, addr: u64, bytes: &[u8]| {
            let off = (addr - LOAD) as usize;
            img[off..off + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut img, LOAD, &entry_code);
        // GDT (accessed bits preset: the CPU never writes descriptors back).
        let tss_lo =
            0x67 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40) | ((TSS >> 24) & 0xff) << 56;
        let gdt: [u64; 10] = [
            0,
            0x00cf_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
            tss_lo,
            TSS >> 32,
        ];
        let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        put(&mut img, GDT, &gdt_bytes);
        let mut gdtr = ((gdt_bytes.len() - 1) as u16).to_le_bytes().to_vec();
        gdtr.extend_from_slice(&GDT.to_le_bytes());
        put(&mut img, GDTR, &gdtr);
        // TSS: RSP0 at offset 4; I/O map base past the limit (no bitmap).
        put(&mut img, TSS + 4, &STACK_TOP.to_le_bytes());
        put(&mut img, TSS + 0x66, &0x68u16.to_le_bytes());
        let mut idtr = 0x0fffu16.to_le_bytes().to_vec();
        idtr.extend_from_slice(&IDT.to_le_bytes());
        put(&mut img, IDTR, &idtr);
        for &(v, ip) in &gate_ips {
            match self.mode {
                Mode::Long64 => {
                    let lo = (ip & 0xffff)
                        | (u64::from(SEL_CODE64) << 16)
                        | (0x8e00u64 << 32)
                        | ((ip >> 16) & 0xffff) << 48;
                    let hi = ip >> 32;
                    put(&mut img, IDT + 16 * v, &lo.to_le_bytes());
                    put(&mut img, IDT + 16 * v + 8, &hi.to_le_bytes());
                }
                Mode::Protected32 => {
                    let gate = (ip & 0xffff)
                        | (u64::from(SEL_CODE32) << 16)
                        | (0x8e00u64 << 32)
                        | ((ip >> 16) & 0xffff) << 48;
                    put(&mut img, IDT + 8 * v, &gate.to_le_bytes());
                }
            }
        }
        match self.paging32 {
            Some(Paging32::TwoLevel) if self.mode == Mode::Protected32 => {
                // PD[0] -> identity PT for 0-4 MiB; PD[256] (1 GiB) -> PT.
                put(
                    &mut img,
                    PML4,
                    &((PDPT | PTE_P | PTE_RW) as u32).to_le_bytes(),
                );
                put(
                    &mut img,
                    PML4 + 4 * 256,
                    &((PT | PTE_P | PTE_RW) as u32).to_le_bytes(),
                );
                for i in 0..1024u64 {
                    let e = ((i << 12) | PTE_P | PTE_RW) as u32;
                    put(&mut img, PDPT + 4 * i, &e.to_le_bytes());
                }
                for (i, f) in self.pt_flags.iter().enumerate() {
                    let e = ((PF_PHYS + 0x1000 * i as u64) | (f & 0xfff)) as u32;
                    put(&mut img, PT + 4 * i as u64, &e.to_le_bytes());
                }
            }
            Some(Paging32::Pae) if self.mode == Mode::Protected32 => {
                // PDPTEs have only P (RW/US are reserved there).
                put(&mut img, PDPT, &(PD0 | PTE_P).to_le_bytes());
                put(&mut img, PDPT + 8, &(PD1 | PTE_P).to_le_bytes());
                for i in 0..512u64 {
                    let e = (i << 21) | PTE_P | PTE_RW | PTE_PS;
                    put(&mut img, PD0 + 8 * i, &e.to_le_bytes());
                }
                put(&mut img, PD1, &(PT | PTE_P | PTE_RW).to_le_bytes());
                for (i, f) in self.pt_flags.iter().enumerate() {
                    let e = (PF_PHYS + 0x1000 * i as u64) | f;
                    put(&mut img, PT + 8 * i as u64, &e.to_le_bytes());
                }
            }
            _ => {}
        }
        if self.mode == Mode::Long64 {
            let u = if self.user_pages { PTE_US } else { 0 };
            put(&mut img, PML4, &(PDPT | PTE_P | PTE_RW | u).to_le_bytes());
            put(&mut img, PDPT, &(PD0 | PTE_P | PTE_RW | u).to_le_bytes());
            put(
                &mut img,
                PDPT + 8,
                &(PD1 | PTE_P | PTE_RW | u).to_le_bytes(),
            );
            for i in 0..512u64 {
                let e = (i << 21) | PTE_P | PTE_RW | PTE_PS | u;
                put(&mut img, PD0 + 8 * i, &e.to_le_bytes());
            }
            put(&mut img, PD1, &(PT | PTE_P | PTE_RW | u).to_le_bytes());
            for (i, f) in self.pt_flags.iter().enumerate() {
                let e = (PF_PHYS + 0x1000 * i as u64) | f;
                put(&mut img, PT + 8 * i as u64, &e.to_le_bytes());
            }
        }
        put(&mut img, CODE, &code);
        put(&mut img, DATA, &self.data);
        Ok(Ok(TestGuest {
            name: self.name,
            image: img,
            load_addr: LOAD,
            entry: EntryState::pvh(LOAD, 0),
            expected_serial: self.predicted.then_some(self.expect),
            expected_exit: crate::EXIT_OK,
            ends_in_triple_fault: false,
            results: None,
            instructions: None,
            uses_pic_pit: self.uses_pic_pit,
        }))
    }
}

/// The 32-bit PVH entry stub at [`layout::LOAD`]: own GDT, flat segments, stack, then either
/// the 32-bit main code or long mode (PAE, 4-level tables, EFER.LME|NXE, CR0.PG|WP).
///
/// With `virtual_wire`, the local APIC (if any) is enabled with LINT0 in ExtINT mode, the
/// state firmware leaves on a PC, so 8259 interrupts reach the CPU; without a local APIC the
/// two stores go to unassigned MMIO and are dropped.
fn entry_stub(mode: Mode, virtual_wire: bool) -> R<Vec<u8>> {
    let build = |reload_ip: u32| -> R<(Vec<u8>, CodeLabel, CodeAssembler)> {
        let mut a = CodeAssembler::new(32)?;
        let mut reload = a.create_label();
        a.cli()?;
        a.cld()?;
        a.lgdt(ptr(GDTR as u32))?;
        a.add_instruction(Instruction::with_far_branch(
            Code::Jmp_ptr1632,
            SEL_CODE32,
            reload_ip,
        )?)?;
        a.set_label(&mut reload)?;
        a.mov(eax, u32::from(SEL_DATA))?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(fs, ax)?;
        a.mov(gs, ax)?;
        a.mov(esp, STACK_TOP as u32)?;
        if virtual_wire {
            a.mov(dword_ptr(0xfee0_00f0u32), 0x1ff)?; // SVR: enabled, spurious vector 0xff
            a.mov(dword_ptr(0xfee0_0350u32), 0x700)?; // LVT LINT0: ExtINT, unmasked
        }
        match mode {
            Mode::Protected32 => {
                a.add_instruction(Instruction::with_far_branch(
                    Code::Jmp_ptr1632,
                    SEL_CODE32,
                    CODE as u32,
                )?)?;
            }
            Mode::Long64 => {
                a.mov(eax, 0x20u32)?; // CR4.PAE
                a.mov(cr4, eax)?;
                a.mov(eax, PML4 as u32)?;
                a.mov(cr3, eax)?;
                a.mov(ecx, 0xc000_0080u32)?; // EFER
                a.mov(eax, 0x900u32)?; // LME | NXE
                a.xor(edx, edx)?;
                a.wrmsr()?;
                a.mov(eax, 0x8001_0033u32)?; // PG | WP | NE | ET | MP | PE
                a.mov(cr0, eax)?;
                a.add_instruction(Instruction::with_far_branch(
                    Code::Jmp_ptr1632,
                    SEL_CODE64,
                    CODE as u32,
                )?)?;
            }
        }
        let res = a.assemble_options(LOAD, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        Ok((res.inner.code_buffer.clone(), reload, a))
    };
    // First pass learns where `reload` lands; the far jump has a fixed size.
    let (_, reload, mut a) = build(0)?;
    let res = a.assemble_options(LOAD, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let reload_ip = res.label_ip(&reload)? as u32;
    Ok(build(reload_ip)?.0)
}
