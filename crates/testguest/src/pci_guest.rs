//! [`pci`]: a guest that looks at the PCI bus of QEMU's `pc` the way a driver does.

use iced_x86::code_asm::*;

use crate::asm::{Guest, Mode, R, layout};
use crate::guests::build;
use crate::{GuestError, TestGuest};

/// The guest's variables (zeroed by the guest, past its image).
const V: u64 = layout::RESULTS;
const V_PRINT: u64 = V;
const V_ORIG: u64 = V + 0x08;
const V_MASK: u64 = V + 0x10;
const V_ORIG_HI: u64 = V + 0x18;
const V_MASK_HI: u64 = V + 0x20;
const V_CMD: u64 = V + 0x28;
const V_HDR: u64 = V + 0x30;
const V_STS: u64 = V + 0x38;
/// devfn of the virtio-rng function driven through MSI-X (u64::MAX: none found).
const V_TARGET: u64 = V + 0x40;
const V_MSIX_CAP: u64 = V + 0x48;
const V_COMMON: u64 = V + 0x50;
const V_NOTIFY: u64 = V + 0x58;
const V_NMULT: u64 = V + 0x60;
const V_TABLE: u64 = V + 0x68;
const V_PBA: u64 = V + 0x70;
const V_IRQS: u64 = V + 0x78;
const V_QSIZE: u64 = V + 0x80;
const V_TMP: u64 = V + 0x90;
const V_NOFF: u64 = V + 0x98;
const V_FLAG: u64 = V + 0xa0;
const V_BAR_LOW: u64 = V + 0xa8;
/// The split virtqueue: descriptor table, available and used rings, and the buffer.
const DESC: u64 = V + 0x1000;
const AVAIL: u64 = V + 0x2000;
const USED: u64 = V + 0x3000;
const BUF: u64 = V + 0x4000;
const BUF_LEN: u32 = 16;
const V_END: u64 = V + 0x5000;

/// The page directory for 3-4 GiB is the first page of the guest's data; the second one
/// maps the gigabyte of a BAR above 4 GiB.
const PD_HIGH: u64 = layout::DATA + 0x1000;

/// The interrupt vector the MSI-X entry names.
const MSIX_VECTOR: u32 = 0x40;
/// The local APIC (identity-mapped through the page directory the guest adds for 3-4 GiB).
const LAPIC: u64 = 0xfee0_0000;
/// Polling budget while the device works (QEMU answers from its main loop).
const SPINS: u32 = 50_000_000;

/// Emits `mov [V_PRINT], rax` and prints it as `digits` hex digits.
fn show(g: &mut Guest, digits: u32) -> R {
    g.a.mov(qword_ptr(V_PRINT), rax)?;
    g.print_hex_mem(V_PRINT, u64::MAX, digits)
}

/// Prints the quadword at `addr` as `digits` hex digits (after `label`).
fn show_mem(g: &mut Guest, label: &str, addr: u64, digits: u32) -> R {
    g.emit_str(label)?;
    g.print_hex_mem(addr, u64::MAX, digits)
}

/// The config-space routines: `cfg_rd` (ecx = register -> eax, the dword holding it),
/// `cfg_wr` (ecx = register, eax = dword) and `cfg_wr16` (ecx = register, ax = word), all
/// for the function whose devfn is in r12, on bus 0, through 0xCF8/0xCFC. They clobber edx.
struct Cfg {
    rd: CodeLabel,
    wr: CodeLabel,
    wr16: CodeLabel,
    bar_base: CodeLabel,
    /// rax = an address: when it is above 4 GiB, its gigabyte is identity-mapped through
    /// the second page directory (one such gigabyte at a time).
    map_high: CodeLabel,
}

fn cfg_routines(a: &mut CodeAssembler) -> R<Cfg> {
    let mut rd = a.create_label();
    let mut wr = a.create_label();
    let mut wr16 = a.create_label();
    let mut bar_base = a.create_label();
    let mut map_high = a.create_label();
    let mut over = a.create_label();
    a.jmp(over)?;
    // Selects the register: 0x80000000 | devfn << 8 | (ecx & 0xfc).
    let select = |a: &mut CodeAssembler| -> R {
        a.push(rax)?;
        a.mov(eax, r12d)?;
        a.shl(eax, 8)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(edx, ecx)?;
        a.and(edx, 0xfc)?;
        a.or(eax, edx)?;
        a.mov(edx, 0xcf8)?;
        a.out(dx, eax)?;
        a.pop(rax)
    };
    a.set_label(&mut rd)?;
    select(a)?;
    a.mov(edx, 0xcfc)?;
    a.in_(eax, dx)?;
    a.ret()?;
    a.set_label(&mut wr)?;
    select(a)?;
    a.mov(edx, 0xcfc)?;
    a.out(dx, eax)?;
    a.ret()?;
    a.set_label(&mut wr16)?;
    select(a)?;
    a.mov(edx, ecx)?;
    a.and(edx, 2)?;
    a.add(edx, 0xcfc)?;
    a.out(dx, ax)?;
    a.ret()?;
    // bar_base: ebx = BAR index -> rax = its address (I/O, 32- or 64-bit memory).
    a.set_label(&mut bar_base)?;
    {
        let mut io = a.create_label();
        let mut m32 = a.create_label();
        let mut done = a.create_label();
        a.push(rcx)?;
        a.push(rdx)?;
        a.lea(ecx, dword_ptr(rbx * 4 + 0x10))?;
        a.call(rd)?;
        a.mov(qword_ptr(V_BAR_LOW), rax)?;
        a.test(al, 1)?;
        a.jnz(io)?;
        a.mov(edx, eax)?;
        a.and(edx, 6)?;
        a.cmp(edx, 4)?;
        a.jne(m32)?;
        a.add(ecx, 4)?;
        a.call(rd)?;
        a.shl(rax, 32)?;
        a.or(rax, qword_ptr(V_BAR_LOW))?;
        a.and(rax, -16)?;
        a.jmp(done)?;
        a.set_label(&mut m32)?;
        a.and(eax, -16)?;
        a.jmp(done)?;
        a.set_label(&mut io)?;
        a.and(eax, -4)?;
        a.set_label(&mut done)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.ret()?;
    }
    a.set_label(&mut map_high)?;
    {
        let mut done = a.create_label();
        let mut lp = a.create_label();
        a.push(rcx)?;
        a.push(rdx)?;
        a.push(rdi)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 32)?;
        a.jz(done)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 30)?;
        a.cmp(rdx, 512)?;
        a.jae(done)?;
        a.mov(rcx, rdx)?;
        a.shl(rcx, 30)?;
        a.or(rcx, 0x9b)?;
        a.mov(rdi, PD_HIGH)?;
        a.mov(edx, 512)?;
        a.set_label(&mut lp)?;
        a.mov(qword_ptr(rdi), rcx)?;
        a.add(rcx, 0x20_0000)?;
        a.add(rdi, 8)?;
        a.dec(edx)?;
        a.jnz(lp)?;
        a.mov(rdx, rax)?;
        a.shr(rdx, 30)?;
        a.mov(rcx, PD_HIGH | 3)?;
        a.mov(rdi, layout::PDPT)?;
        a.mov(qword_ptr(rdi + rdx * 8), rcx)?;
        a.mov(rcx, cr3)?;
        a.mov(cr3, rcx)?;
        a.set_label(&mut done)?;
        a.pop(rdi)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.ret()?;
    }
    a.set_label(&mut over)?;
    Ok(Cfg {
        rd,
        wr,
        wr16,
        bar_base,
        map_high,
    })
}

/// Config read of register `reg` of the current function into eax.
fn rd(a: &mut CodeAssembler, c: &Cfg, reg: u32) -> R {
    a.mov(ecx, reg)?;
    a.call(c.rd)
}

/// Prints (eax >> shift) & mask as `digits` hex digits after `label`; eax is kept.
fn field(g: &mut Guest, label: &str, shift: u32, mask: u32, digits: u32) -> R {
    g.emit_str(label)?;
    g.a.push(rax)?;
    if shift > 0 {
        g.a.shr(eax, shift)?;
    }
    g.a.and(eax, mask)?;
    show(g, digits)?;
    g.a.pop(rax)
}

/// A PCI scan and an MSI-X round trip on QEMU's `pc`, to compare Keel's PCI with QEMU 7.2's
/// byte for byte (the output is not predicted here: the test runs it on both).
///
/// 1. Scans bus 0 through 0xCF8/0xCFC: every slot's function 0 and, when its header type
///    has the multifunction bit, functions 1-7. For each function it prints slot.fn,
///    vendor:device, class and revision, header type, command (I/O, memory and bus master
///    bits) and status, subsystem IDs, interrupt pin and line, and the capability list
///    (offset:ID, with the virtio structure of each vendor capability).
/// 2. Sizes each BAR as Linux does (decoding off, all ones written, read back, the value
///    restored) and prints the mask read back, the kind (I/O, mem32, mem64, prefetchable),
///    the size, and whether the address the firmware gave it is non-zero and aligned
///    (SeaBIOS under QEMU and Keel's firmware-less boot place BARs differently).
/// 3. Drives the first virtio-rng function (1af4:1005) through its modern interface with
///    MSI-X: the table entry 0 names the local APIC and vector 0x40, queue 0 uses it; one
///    device-writable buffer is posted and notified; the guest sees the used ring advance,
///    the vector requested in the APIC's IRR, and then its handler run after `sti; hlt`.
///    Then the same with the vector masked (the PBA bit is set, nothing is delivered, and
///    unmasking delivers it) and with the function masked.
///
/// Of the virtio features only `VERSION_1` is printed: QEMU 7.2 also offers
/// INDIRECT_DESC, EVENT_IDX and RING_RESET, which Keel's rng does not. Without a local APIC (CPUID)
/// the MSI-X part is skipped with a line saying so (Keel's interpreter has none with one
/// vCPU: run with `-smp 2`).
///
/// Run it with `-M pc -smp 2 -device virtio-rng-pci` (QEMU: `-nodefaults`; its IDE function
/// at 01.1, which Keel has no counterpart of, is the one expected difference in the scan).
pub fn pci() -> Result<TestGuest, GuestError> {
    build("pci", Mode::Long64, |g| {
        g.unpredicted();
        // The page directory for 3-4 GiB (BARs, the local APIC): 2 MiB pages, uncached.
        g.data = (0..512u64)
            .flat_map(|i| ((0xc000_0000 + (i << 21)) | 0x9b).to_le_bytes())
            .collect();
        g.data.resize(0x2000, 0);
        let mut handler = g.a.create_label();
        let mut spurious = g.a.create_label();
        let mut start = g.a.create_label();
        g.a.jmp(start)?;
        {
            let a = &mut g.a;
            a.set_label(&mut handler)?;
            a.push(rax)?;
            a.add(qword_ptr(V_IRQS), 1)?;
            a.mov(rax, LAPIC + 0xb0)?;
            a.mov(dword_ptr(rax), 0)?;
            a.pop(rax)?;
            a.iretq()?;
            a.set_label(&mut spurious)?;
            a.iretq()?;
            a.set_label(&mut start)?;
        }
        g.gates.push((MSIX_VECTOR as u8, handler));
        g.gates.push((0xff, spurious));
        let c = cfg_routines(&mut g.a)?;
        {
            let a = &mut g.a;
            // Variables and rings start zeroed.
            a.cld()?;
            a.mov(rdi, V)?;
            a.mov(ecx, ((V_END - V) / 8) as u32)?;
            a.xor(eax, eax)?;
            a.rep().stosq()?;
            a.mov(qword_ptr(V_TARGET), -1)?;
            // Map 3-4 GiB (PDPT[3]).
            a.mov(rax, layout::DATA | 3)?;
            a.mov(qword_ptr(layout::PDPT + 24), rax)?;
            a.mov(rax, cr3)?;
            a.mov(cr3, rax)?;
            // The 8259s masked (the firmware may have left the timer on), the local APIC
            // enabled, accepting every priority.
            a.mov(al, 0xff)?;
            a.out(0x21, al)?;
            a.out(0xa1, al)?;
            a.mov(rax, LAPIC)?;
            a.mov(dword_ptr(rax + 0xf0), 0x1ff)?;
            a.mov(dword_ptr(rax + 0x80), 0)?;
        }
        g.emit_str("keel-testguest pci\n")?;
        scan(g, &c)?;
        msix_round_trip(g, &c)?;
        g.emit_str("end\n")?;
        g.exit(crate::EXIT_OK)
    })
}

/// Part 1 and 2: the bus scan with BAR sizing.
fn scan(g: &mut Guest, c: &Cfg) -> R {
    let mut next_fn = g.a.create_label();
    let mut next_slot = g.a.create_label();
    let mut lp = g.a.create_label();
    let mut done = g.a.create_label();
    g.a.xor(r12d, r12d)?;
    g.a.set_label(&mut lp)?;
    rd(&mut g.a, c, 0)?;
    g.a.cmp(ax, 0xffff)?;
    let mut present = g.a.create_label();
    g.a.jne(present)?;
    // Absent: function 0 ends the slot, another function goes on.
    g.a.test(r12d, 7)?;
    g.a.jz(next_slot)?;
    g.a.jmp(next_fn)?;
    g.a.set_label(&mut present)?;
    // Remember the first virtio-rng function.
    {
        let mut not = g.a.create_label();
        g.a.cmp(eax, 0x1005_1af4)?;
        g.a.jne(not)?;
        g.a.cmp(qword_ptr(V_TARGET), -1)?;
        g.a.jne(not)?;
        g.a.mov(qword_ptr(V_TARGET), r12)?;
        g.a.set_label(&mut not)?;
    }
    g.a.mov(rax, r12)?;
    g.a.shr(eax, 3)?;
    show(g, 2)?;
    g.emit_str(".")?;
    g.a.mov(rax, r12)?;
    g.a.and(eax, 7)?;
    show(g, 1)?;
    rd(&mut g.a, c, 0)?;
    field(g, " ", 0, 0xffff, 4)?;
    field(g, ":", 16, 0xffff, 4)?;
    rd(&mut g.a, c, 8)?;
    field(g, " class ", 8, 0xff_ffff, 6)?;
    field(g, " rev ", 0, 0xff, 2)?;
    rd(&mut g.a, c, 0xc)?;
    g.a.shr(eax, 16)?;
    g.a.and(eax, 0xff)?;
    g.a.mov(qword_ptr(V_HDR), rax)?;
    field(g, " hdr ", 0, 0xff, 2)?;
    rd(&mut g.a, c, 4)?;
    field(g, " cmd ", 0, 0xffff, 4)?;
    g.a.shr(eax, 16)?;
    g.a.mov(qword_ptr(V_STS), rax)?;
    field(g, " status ", 0, 0xffff, 4)?;
    let mut not_type0 = g.a.create_label();
    g.a.test(byte_ptr(V_HDR), 0x7f)?;
    g.a.jnz(not_type0)?;
    rd(&mut g.a, c, 0x2c)?;
    field(g, " sub ", 0, 0xffff, 4)?;
    field(g, ":", 16, 0xffff, 4)?;
    g.a.set_label(&mut not_type0)?;
    rd(&mut g.a, c, 0x3c)?;
    field(g, " pin ", 8, 0xff, 2)?;
    field(g, " line ", 0, 0xff, 2)?;
    g.emit_str("\n")?;
    caps(g, c)?;
    let mut no_bars = g.a.create_label();
    g.a.test(byte_ptr(V_HDR), 0x7f)?;
    g.a.jnz(no_bars)?;
    bars(g, c)?;
    g.a.set_label(&mut no_bars)?;
    // Function 0 without the multifunction bit: the slot has one function.
    g.a.test(r12d, 7)?;
    g.a.jnz(next_fn)?;
    g.a.test(byte_ptr(V_HDR), 0x80)?;
    g.a.jz(next_slot)?;
    g.a.set_label(&mut next_fn)?;
    g.a.inc(r12d)?;
    g.a.cmp(r12d, 256)?;
    g.a.jb(lp)?;
    g.a.jmp(done)?;
    g.a.set_label(&mut next_slot)?;
    g.a.or(r12d, 7)?;
    g.a.inc(r12d)?;
    g.a.cmp(r12d, 256)?;
    g.a.jb(lp)?;
    g.a.set_label(&mut done)?;
    Ok(())
}

/// The capability list of the current function (status bit 4 and 0x34), at most 48 entries.
fn caps(g: &mut Guest, c: &Cfg) -> R {
    let mut end = g.a.create_label();
    g.a.test(byte_ptr(V_STS), 0x10)?;
    g.a.jz(end)?;
    g.emit_str("  caps")?;
    rd(&mut g.a, c, 0x34)?;
    g.a.movzx(r14d, al)?;
    g.a.and(r14d, 0xfc)?;
    g.a.mov(r15d, 48)?;
    let mut lp = g.a.create_label();
    let mut last = g.a.create_label();
    g.a.set_label(&mut lp)?;
    g.a.test(r14d, r14d)?;
    g.a.jz(last)?;
    g.a.mov(rax, r14)?;
    g.emit_str(" ")?;
    show(g, 2)?;
    g.a.mov(ecx, r14d)?;
    g.a.call(c.rd)?;
    field(g, ":", 0, 0xff, 2)?;
    // MSI-X: [table size - 1].
    let mut not_msix = g.a.create_label();
    g.a.cmp(al, 0x11)?;
    g.a.jne(not_msix)?;
    field(g, "[", 16, 0x7ff, 3)?;
    g.emit_str("]")?;
    g.a.set_label(&mut not_msix)?;
    // A virtio structure: [type bar offset length].
    let mut not_vendor = g.a.create_label();
    g.a.cmp(al, 9)?;
    g.a.jne(not_vendor)?;
    field(g, "[", 24, 0xff, 1)?;
    g.a.lea(ecx, dword_ptr(r14 + 4))?;
    g.a.call(c.rd)?;
    field(g, " bar", 0, 0xff, 1)?;
    g.a.lea(ecx, dword_ptr(r14 + 8))?;
    g.a.call(c.rd)?;
    field(g, " +", 0, u32::MAX, 4)?;
    g.a.lea(ecx, dword_ptr(r14 + 12))?;
    g.a.call(c.rd)?;
    field(g, " len ", 0, u32::MAX, 4)?;
    g.emit_str("]")?;
    g.a.mov(ecx, r14d)?;
    g.a.call(c.rd)?;
    g.a.set_label(&mut not_vendor)?;
    g.a.shr(eax, 8)?;
    g.a.movzx(r14d, al)?;
    g.a.and(r14d, 0xfc)?;
    g.a.dec(r15d)?;
    g.a.jnz(lp)?;
    g.a.set_label(&mut last)?;
    g.emit_str("\n")?;
    g.a.set_label(&mut end)?;
    Ok(())
}

/// BAR sizing of the current (type 0) function, decoding off meanwhile.
fn bars(g: &mut Guest, c: &Cfg) -> R {
    rd(&mut g.a, c, 4)?;
    g.a.and(eax, 0xffff)?;
    g.a.mov(qword_ptr(V_CMD), rax)?;
    g.a.and(eax, 0xfffc)?;
    g.a.mov(ecx, 4)?;
    g.a.call(c.wr16)?;
    g.a.xor(r13d, r13d)?;
    let mut lp = g.a.create_label();
    let mut next = g.a.create_label();
    let mut end = g.a.create_label();
    g.a.set_label(&mut lp)?;
    // Size: original, all ones, read back, restore.
    let size_one = |a: &mut CodeAssembler, orig: u64, mask: u64, reg_off: i32| -> R {
        a.lea(ecx, dword_ptr(r13 * 4 + 0x10 + reg_off))?;
        a.call(c.rd)?;
        a.mov(qword_ptr(orig), rax)?;
        a.mov(eax, u32::MAX)?;
        a.call(c.wr)?;
        a.call(c.rd)?;
        a.mov(qword_ptr(mask), rax)?;
        a.mov(rax, qword_ptr(orig))?;
        a.call(c.wr)
    };
    size_one(&mut g.a, V_ORIG, V_MASK, 0)?;
    g.a.cmp(qword_ptr(V_MASK), 0)?;
    g.a.je(next)?;
    g.emit_str("  bar")?;
    g.a.mov(rax, r13)?;
    show(g, 1)?;
    let mut io = g.a.create_label();
    let mut mem32 = g.a.create_label();
    let mut sized = g.a.create_label();
    g.a.test(byte_ptr(V_MASK), 1)?;
    g.a.jnz(io)?;
    g.a.mov(rax, qword_ptr(V_MASK))?;
    g.a.and(eax, 6)?;
    g.a.cmp(eax, 4)?;
    g.a.jne(mem32)?;
    // 64-bit: the next register is the high half.
    size_one(&mut g.a, V_ORIG_HI, V_MASK_HI, 4)?;
    g.emit_str(" mem64")?;
    prefetch(g)?;
    show_mem(g, " mask ", V_MASK_HI, 8)?;
    g.print_hex_mem(V_MASK, u64::MAX, 8)?;
    {
        let a = &mut g.a;
        a.mov(rax, qword_ptr(V_MASK_HI))?;
        a.shl(rax, 32)?;
        a.or(rax, qword_ptr(V_MASK))?;
        a.and(rax, -16)?;
        a.mov(rbx, qword_ptr(V_ORIG_HI))?;
        a.shl(rbx, 32)?;
        a.or(rbx, qword_ptr(V_ORIG))?;
        a.and(rbx, -16)?;
        a.inc(r13d)?;
    }
    g.a.jmp(sized)?;
    g.a.set_label(&mut mem32)?;
    g.emit_str(" mem32")?;
    prefetch(g)?;
    show_mem(g, " mask ", V_MASK, 8)?;
    g.a.mov(rax, qword_ptr(V_MASK))?;
    g.a.and(eax, -16)?;
    g.a.mov(rbx, qword_ptr(V_ORIG))?;
    g.a.and(ebx, -16)?;
    g.a.jmp(sized)?;
    g.a.set_label(&mut io)?;
    g.emit_str(" io")?;
    show_mem(g, " mask ", V_MASK, 8)?;
    g.a.mov(rax, qword_ptr(V_MASK))?;
    g.a.and(eax, 0xfffc)?;
    g.a.mov(rbx, qword_ptr(V_ORIG))?;
    g.a.and(ebx, -4)?;
    g.a.set_label(&mut sized)?;
    {
        // size = lowest set bit of the mask; placed = base != 0 && base % size == 0.
        let a = &mut g.a;
        a.mov(rcx, rax)?;
        a.neg(rcx)?;
        a.and(rax, rcx)?;
        a.mov(qword_ptr(V_TMP), rax)?;
        a.dec(rax)?;
        a.and(rax, rbx)?;
        a.setz(al)?;
        a.test(rbx, rbx)?;
        a.setnz(cl)?;
        a.and(al, cl)?;
        a.movzx(eax, al)?;
        a.mov(qword_ptr(V_FLAG), rax)?;
    }
    show_mem(g, " size ", V_TMP, 8)?;
    show_mem(g, " placed ", V_FLAG, 1)?;
    g.emit_str("\n")?;
    g.a.set_label(&mut next)?;
    g.a.inc(r13d)?;
    g.a.cmp(r13d, 6)?;
    g.a.jb(lp)?;
    g.a.set_label(&mut end)?;
    g.a.mov(rax, qword_ptr(V_CMD))?;
    g.a.mov(ecx, 4)?;
    g.a.call(c.wr16)
}

/// Prints " pref" when the memory BAR's mask has the prefetchable bit.
fn prefetch(g: &mut Guest) -> R {
    let mut no = g.a.create_label();
    g.a.test(byte_ptr(V_MASK), 8)?;
    g.a.jz(no)?;
    g.emit_str(" pref")?;
    g.a.set_label(&mut no)
}

/// Part 3: virtio-rng through MSI-X.
fn msix_round_trip(g: &mut Guest, c: &Cfg) -> R {
    let mut none = g.a.create_label();
    let mut out = g.a.create_label();
    let mut no_apic = g.a.create_label();
    // Messages go to a local APIC: CPUID.1:EDX bit 9.
    g.a.mov(eax, 1)?;
    g.a.cpuid()?;
    g.a.bt(edx, 9)?;
    g.a.jnc(no_apic)?;
    g.a.cmp(qword_ptr(V_TARGET), -1)?;
    g.a.je(none)?;
    g.a.mov(r12, qword_ptr(V_TARGET))?;
    g.emit_str("virtio-rng at ")?;
    g.a.mov(rax, r12)?;
    g.a.shr(eax, 3)?;
    show(g, 2)?;
    g.emit_str(".")?;
    g.a.mov(rax, r12)?;
    g.a.and(eax, 7)?;
    show(g, 1)?;
    g.emit_str("\n")?;
    // Find the MSI-X capability and the common and notify structures.
    {
        let a = &mut g.a;
        rd(a, c, 0x34)?;
        a.movzx(r14d, al)?;
        a.and(r14d, 0xfc)?;
        a.mov(r15d, 48)?;
        let mut lp = a.create_label();
        let mut next = a.create_label();
        let mut last = a.create_label();
        a.set_label(&mut lp)?;
        a.test(r14d, r14d)?;
        a.jz(last)?;
        a.mov(ecx, r14d)?;
        a.call(c.rd)?;
        let mut vendor = a.create_label();
        a.cmp(al, 0x11)?;
        a.jne(vendor)?;
        a.mov(qword_ptr(V_MSIX_CAP), r14)?;
        a.jmp(next)?;
        a.set_label(&mut vendor)?;
        a.cmp(al, 9)?;
        a.jne(next)?;
        a.shr(eax, 24)?;
        let mut common = a.create_label();
        a.cmp(eax, 1)?;
        a.je(common)?;
        a.cmp(eax, 2)?;
        a.jne(next)?;
        // Notify: base of its BAR + offset; multiplier at +16.
        a.lea(ecx, dword_ptr(r14 + 4))?;
        a.call(c.rd)?;
        a.movzx(ebx, al)?;
        a.call(c.bar_base)?;
        a.mov(rbx, rax)?;
        a.lea(ecx, dword_ptr(r14 + 8))?;
        a.call(c.rd)?;
        a.add(rax, rbx)?;
        a.call(c.map_high)?;
        a.mov(qword_ptr(V_NOTIFY), rax)?;
        a.lea(ecx, dword_ptr(r14 + 16))?;
        a.call(c.rd)?;
        a.mov(qword_ptr(V_NMULT), rax)?;
        a.jmp(next)?;
        a.set_label(&mut common)?;
        a.lea(ecx, dword_ptr(r14 + 4))?;
        a.call(c.rd)?;
        a.movzx(ebx, al)?;
        a.call(c.bar_base)?;
        a.mov(rbx, rax)?;
        a.lea(ecx, dword_ptr(r14 + 8))?;
        a.call(c.rd)?;
        a.add(rax, rbx)?;
        a.call(c.map_high)?;
        a.mov(qword_ptr(V_COMMON), rax)?;
        a.set_label(&mut next)?;
        a.mov(ecx, r14d)?;
        a.call(c.rd)?;
        a.shr(eax, 8)?;
        a.movzx(r14d, al)?;
        a.and(r14d, 0xfc)?;
        a.dec(r15d)?;
        a.jnz(lp)?;
        a.set_label(&mut last)?;
        // Missing pieces end the test here.
        a.cmp(qword_ptr(V_MSIX_CAP), 0)?;
        a.je(none)?;
        a.cmp(qword_ptr(V_COMMON), 0)?;
        a.je(none)?;
        a.cmp(qword_ptr(V_NOTIFY), 0)?;
        a.je(none)?;
    }
    // MSI-X capability: table size, table and PBA locations.
    g.a.mov(r14, qword_ptr(V_MSIX_CAP))?;
    g.a.mov(ecx, r14d)?;
    g.a.call(c.rd)?;
    g.a.mov(qword_ptr(V_TMP), rax)?;
    g.a.shr(eax, 16)?;
    g.a.and(eax, 0x7ff)?;
    g.a.inc(eax)?;
    g.emit_str("msix vectors ")?;
    show(g, 3)?;
    g.a.mov(rax, qword_ptr(V_TMP))?;
    field(g, " ctrl ", 16, 0xffff, 4)?;
    for (label, off, var) in [(" table bar", 4, V_TABLE), (" pba bar", 8, V_PBA)] {
        g.a.lea(ecx, dword_ptr(r14 + off))?;
        g.a.call(c.rd)?;
        field(g, label, 0, 7, 1)?;
        field(g, "+", 0, 0xffff_fff8, 8)?;
        let a = &mut g.a;
        a.mov(ebx, eax)?;
        a.and(ebx, 7)?;
        a.and(eax, -8)?;
        a.mov(qword_ptr(V_TMP), rax)?;
        a.call(c.bar_base)?;
        a.add(rax, qword_ptr(V_TMP))?;
        a.call(c.map_high)?;
        a.mov(qword_ptr(var), rax)?;
    }
    g.emit_str("\n")?;
    // Memory decoding and bus mastering on.
    g.a.mov(eax, 7)?;
    g.a.mov(ecx, 4)?;
    g.a.call(c.wr16)?;
    // Entry 0 as reset left it (masked), then MSI-X on with the function masked, the entry
    // programmed and unmasked, the function unmasked.
    g.a.mov(rbx, qword_ptr(V_TABLE))?;
    g.a.mov(eax, dword_ptr(rbx + 12))?;
    g.emit_str("entry0 ctrl at reset ")?;
    show(g, 8)?;
    g.emit_str("\n")?;
    set_msix_ctrl(g, c, 0xc000)?;
    {
        let a = &mut g.a;
        a.mov(rbx, qword_ptr(V_TABLE))?;
        a.mov(dword_ptr(rbx), LAPIC as u32)?;
        a.mov(dword_ptr(rbx + 4), 0)?;
        a.mov(dword_ptr(rbx + 8), MSIX_VECTOR)?;
        a.mov(dword_ptr(rbx + 12), 0)?;
    }
    set_msix_ctrl(g, c, 0x8000)?;
    g.a.mov(rbx, qword_ptr(V_TABLE))?;
    g.emit_str("entry0")?;
    for off in [0, 4, 8, 12] {
        g.a.mov(eax, dword_ptr(rbx + off))?;
        g.emit_str(" ")?;
        show(g, 8)?;
    }
    g.emit_str("\n")?;
    virtio_setup(g)?;
    // Round 1: delivered. Round 2: the vector masked. Round 3: the function masked.
    for round in 1..=3u32 {
        g.emit_str(&format!("round {round}"))?;
        match round {
            2 => {
                g.emit_str(" (vector masked)")?;
                g.a.mov(rbx, qword_ptr(V_TABLE))?;
                g.a.mov(dword_ptr(rbx + 12), 1)?;
            }
            3 => {
                g.emit_str(" (function masked)")?;
                set_msix_ctrl(g, c, 0xc000)?;
            }
            _ => {}
        }
        g.emit_str("\n")?;
        post_and_wait(g, round)?;
        if round > 1 {
            show_irr_pba(g, "  while masked:")?;
            match round {
                2 => {
                    g.a.mov(rbx, qword_ptr(V_TABLE))?;
                    g.a.mov(dword_ptr(rbx + 12), 0)?;
                }
                _ => set_msix_ctrl(g, c, 0x8000)?,
            }
            g.emit_str("  unmasked\n")?;
        }
        take_interrupt(g)?;
    }
    // Reset the device and turn MSI-X off again.
    g.a.mov(rbx, qword_ptr(V_COMMON))?;
    g.a.mov(byte_ptr(rbx + 0x14), 0)?;
    set_msix_ctrl(g, c, 0)?;
    g.a.jmp(out)?;
    g.a.set_label(&mut none)?;
    g.emit_str("no virtio-rng with MSI-X and modern structures\n")?;
    g.a.jmp(out)?;
    g.a.set_label(&mut no_apic)?;
    g.emit_str("no local APIC (CPUID): no MSI-X\n")?;
    g.a.set_label(&mut out)?;
    Ok(())
}

/// Writes the MSI-X message control (enable 0x8000, function mask 0x4000).
fn set_msix_ctrl(g: &mut Guest, c: &Cfg, value: u32) -> R {
    g.a.mov(rcx, qword_ptr(V_MSIX_CAP))?;
    g.a.add(ecx, 2)?;
    g.a.mov(eax, value)?;
    g.a.call(c.wr16)
}

/// Resets the device and sets up queue 0 with MSI-X vector 0 through the common
/// configuration, then DRIVER_OK.
fn virtio_setup(g: &mut Guest) -> R {
    g.a.mov(rbx, qword_ptr(V_COMMON))?;
    {
        let a = &mut g.a;
        a.mov(byte_ptr(rbx + 0x14), 0)?;
        a.mov(byte_ptr(rbx + 0x14), 1)?;
        a.mov(byte_ptr(rbx + 0x14), 3)?;
        a.mov(dword_ptr(rbx), 1)?;
        a.mov(eax, dword_ptr(rbx + 4))?;
    }
    // Only VERSION_1 is compared: QEMU also offers INDIRECT_DESC, EVENT_IDX and RING_RESET,
    // which Keel's devices do not.
    g.emit_str("virtio VERSION_1 ")?;
    g.a.and(eax, 1)?;
    show(g, 1)?;
    g.emit_str(" queues ")?;
    g.a.movzx(eax, word_ptr(rbx + 0x12))?;
    show(g, 4)?;
    g.emit_str("\n")?;
    {
        let a = &mut g.a;
        // Only VERSION_1.
        a.mov(dword_ptr(rbx + 8), 0)?;
        a.mov(dword_ptr(rbx + 0xc), 0)?;
        a.mov(dword_ptr(rbx + 8), 1)?;
        a.mov(dword_ptr(rbx + 0xc), 1)?;
        a.mov(byte_ptr(rbx + 0x14), 0xb)?;
        a.movzx(eax, byte_ptr(rbx + 0x14))?;
    }
    g.emit_str("status after FEATURES_OK ")?;
    show(g, 2)?;
    {
        let a = &mut g.a;
        a.mov(word_ptr(rbx + 0x10), 0xffff)?;
        a.mov(word_ptr(rbx + 0x16), 0)?;
        a.movzx(eax, word_ptr(rbx + 0x18))?;
        a.mov(qword_ptr(V_QSIZE), rax)?;
        a.mov(word_ptr(rbx + 0x1a), 0)?;
    }
    show_mem(g, " queue size ", V_QSIZE, 4)?;
    g.a.movzx(eax, word_ptr(rbx + 0x1a))?;
    g.emit_str(" queue vector ")?;
    show(g, 4)?;
    g.a.movzx(eax, word_ptr(rbx + 0x10))?;
    g.emit_str(" config vector ")?;
    show(g, 4)?;
    {
        let a = &mut g.a;
        a.movzx(eax, word_ptr(rbx + 0x1e))?;
        a.mov(qword_ptr(V_NOFF), rax)?;
        for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            a.mov(dword_ptr(rbx + off), addr as u32)?;
            a.mov(dword_ptr(rbx + off + 4), 0)?;
        }
        a.mov(word_ptr(rbx + 0x1c), 1)?;
        a.mov(byte_ptr(rbx + 0x14), 0xf)?;
        a.movzx(eax, word_ptr(rbx + 0x1c))?;
    }
    g.emit_str(" enabled ")?;
    show(g, 1)?;
    g.a.movzx(eax, byte_ptr(rbx + 0x14))?;
    g.emit_str(" status ")?;
    show(g, 2)?;
    g.emit_str("\n")
}

/// Posts the buffer as descriptor 0 (device-writable, zeroed first), notifies queue 0 with
/// interrupts off and polls the used ring until entry `round` arrives.
fn post_and_wait(g: &mut Guest, round: u32) -> R {
    {
        let a = &mut g.a;
        a.cli()?;
        a.mov(qword_ptr(BUF), 0)?;
        a.mov(qword_ptr(BUF + 8), 0)?;
        a.mov(rax, BUF)?;
        a.mov(qword_ptr(DESC), rax)?;
        a.mov(dword_ptr(DESC + 8), BUF_LEN)?;
        a.mov(word_ptr(DESC + 12), 2)?;
        a.mov(word_ptr(DESC + 14), 0)?;
        // avail.ring[(round - 1) % size] = 0; avail.idx = round.
        a.mov(eax, round - 1)?;
        a.xor(edx, edx)?;
        a.mov(rcx, qword_ptr(V_QSIZE))?;
        a.div(ecx)?;
        a.mov(word_ptr(rdx * 2 + AVAIL as i32 + 4), 0)?;
        a.mfence()?;
        a.mov(word_ptr(AVAIL + 2), round)?;
        a.mfence()?;
        // Notify: notify base + queue_notify_off * multiplier.
        a.mov(rax, qword_ptr(V_NOFF))?;
        a.imul_2(rax, qword_ptr(V_NMULT))?;
        a.add(rax, qword_ptr(V_NOTIFY))?;
        a.mov(word_ptr(rax), 0)?;
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, SPINS)?;
        a.set_label(&mut lp)?;
        a.cmp(word_ptr(USED + 2), round)?;
        a.jae(done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.set_label(&mut done)?;
        a.movzx(eax, word_ptr(USED + 2))?;
    }
    g.emit_str("  used idx ")?;
    show(g, 4)?;
    {
        let a = &mut g.a;
        a.mov(eax, round - 1)?;
        a.xor(edx, edx)?;
        a.mov(rcx, qword_ptr(V_QSIZE))?;
        a.div(ecx)?;
        a.mov(eax, dword_ptr(rdx * 8 + USED as i32 + 4))?;
        a.mov(qword_ptr(V_TMP), rax)?;
        a.mov(eax, dword_ptr(rdx * 8 + USED as i32 + 8))?;
    }
    show_mem(g, " id ", V_TMP, 2)?;
    g.emit_str(" len ")?;
    show(g, 4)?;
    {
        let a = &mut g.a;
        a.mov(rax, qword_ptr(BUF))?;
        a.or(rax, qword_ptr(BUF + 8))?;
        a.setnz(al)?;
        a.movzx(eax, al)?;
    }
    g.emit_str(" filled ")?;
    show(g, 1)?;
    g.emit_str("\n")?;
    show_irr_pba(g, "  before sti:")
}

/// Prints the APIC's IRR bit of the vector, PBA bit 0 and the handler count.
fn show_irr_pba(g: &mut Guest, label: &str) -> R {
    {
        let a = &mut g.a;
        a.mov(rax, LAPIC + 0x200 + 0x10 * u64::from(MSIX_VECTOR / 32))?;
        a.mov(eax, dword_ptr(rax))?;
        a.shr(eax, MSIX_VECTOR % 32)?;
        a.and(eax, 1)?;
    }
    g.emit_str(label)?;
    g.emit_str(" irr ")?;
    show(g, 1)?;
    g.a.mov(rax, qword_ptr(V_PBA))?;
    g.a.mov(eax, dword_ptr(rax))?;
    g.a.and(eax, 1)?;
    g.emit_str(" pba ")?;
    show(g, 1)?;
    show_mem(g, " handled ", V_IRQS, 1)?;
    g.emit_str("\n")
}

/// When the vector is requested in the IRR: `sti; hlt` takes it (the handler counts it);
/// otherwise nothing is waited for.
fn take_interrupt(g: &mut Guest) -> R {
    {
        let a = &mut g.a;
        let mut skip = a.create_label();
        a.mov(rax, LAPIC + 0x200 + 0x10 * u64::from(MSIX_VECTOR / 32))?;
        a.mov(eax, dword_ptr(rax))?;
        a.test(eax, 1 << (MSIX_VECTOR % 32))?;
        a.jz(skip)?;
        a.sti()?;
        a.hlt()?;
        a.cli()?;
        a.set_label(&mut skip)?;
    }
    show_irr_pba(g, "  after sti; hlt:")
}
