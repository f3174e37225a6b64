//! Test guests generated in code, for differential tests (tcg against kvm against a Rust
//! model of x86) and for benchmarks.
//!
//! Every guest is a small bare-metal program assembled here with iced-x86's `code_asm`. It
//! starts the way a PVH kernel starts (32-bit flat protected mode, paging off), loads its own
//! GDT (and, for 64-bit guests, page tables and IDT), runs one instruction group, writes text
//! to the serial port at 0x3f8 and ends with an `out` to `isa-debug-exit` at 0xf4. Nothing here
//! is an opaque blob: the source of each guest is the Rust function that builds it.
//!
//! A [`TestGuest`] can be run two ways:
//! * raw: copy [`TestGuest::image`] to [`TestGuest::load_addr`] and start a vCPU with
//!   [`TestGuest::entry`] (what the in-test machines do);
//! * as a PVH ELF: [`TestGuest::pvh_elf`] gives a file QEMU (and Keel's `-kernel`) boot with
//!   the `XEN_ELFNOTE_PHYS32_ENTRY` note.
//!
//! The serial text is identical either way; guests never read `%ebx` (hvm_start_info).
//!
//! # The guests ([`all`] builds each with default parameters)
//!
//! | builder | mode | what it checks | output predicted by |
//! |---|---|---|---|
//! | [`hello`] | 32/64 | the entry path, serial, isa-debug-exit | construction |
//! | [`counter`] | 64 | counts and prints (integer and SSE state in every line): stopped, saved and restored by the snapshot tests | construction |
//! | [`exit_with`] | 64 | an isa-debug-exit status other than 0 reaches the process | construction |
//! | [`port_io`] | 64 | `in`/`out`, `rep outsb`, `insb` with DF both ways | construction |
//! | [`timer`] | 64 | 8259 init, PIT mode 2 IRQ 0 in `hlt`, latch, read-back, port 0x61 | construction |
//! | [`exceptions`] | 64 | #DE #UD #BP #GP #PF: vectors, error codes, CR2, precise RIP | construction |
//! | [`paging`] | 64 | demand paging, `invlpg`, CR3 reload, Accessed/Dirty bits | construction |
//! | [`smc`] | 64 | self- and cross-modifying code | construction |
//! | [`interrupts`] | 64/CPL3 | `int 0x80` through DPL 0/3 gates, RSP0, #DF on IST1 | construction |
//! | [`triple_fault`] | 64 | an exception with no IDT ends in a shutdown | construction |
//! | [`addressing`] | 64 | `lea`, `67` wrap, FS/GS/`swapgs`, bit strings, stack ops, `loop`, `lock` | construction |
//! | [`paging32`] | 32 | two-level and PAE paging (NX), 32-bit IDT, #PF codes | construction |
//! | [`usermode`] | 64/CPL3 | TSS RSP0, `iretq` to CPL 3, SYSCALL/SYSRET, user #GP/#PF, `popfq` | construction |
//! | [`sse`] | 64/CPL3 | SSE2 integer and float, conversions, `(u)comisd`, x87, `fxsave` | Rust arithmetic |
//! | [`string_ops`] | 64 | a scripted sequence of string instructions | QEMU (pinned in tests) |
//! | [`string_model`] | 64 | every string op/size/prefix/DF | [`strings::model`] |
//! | [`alu`], [`shifts`], [`muldiv`], [`bitops`], [`misc`] | 64 | integer ops at widths 8-64, edge operands, flags | [`ops::model`] |
//! | [`alu_mem`] | 64 | the read-modify-write (memory destination) forms | [`ops::model`] |
//! | [`ops32_alu`], [`ops32_muldiv_bitops`] | 32 | the same tables in 32-bit mode | [`ops::model`] |
//! | [`reg_loop`], [`mem_loop`] | 32/64 | benchmark loops with an iteration count | construction |
//! | [`debug_exceptions`] | 64/CPL3 | TF, `mov ss` shadow, `int1`, DR0-3 instruction and data breakpoints, RF, DR access rules | the SDM (`tests/exception_classes.rs`) |
//! | [`page_walk_faults`] | 64/CPL3 | reserved bits at every level, #PF error codes, CR2, SMEP/SMAP vs CPUID | the SDM |
//! | [`legacy32`] | 32 | BOUND, INTO, ARPL, faulting far jmp/call, single step | the SDM |
//! | [`pci`] | 64 | PCI scan through 0xCF8, BAR sizing, capabilities, virtio-rng over MSI-X (masking, PBA) on `pc` | QEMU 7.2 `-M pc` (`tests/pci_guest.rs`) |
//!
//! Every predicted output was checked against QEMU 7.2 (`-M microvm`, tcg and kvm; `timer`
//! on `-M pc`, microvm has no port 0x61) on the development host; the few places where
//! KVM-PVM or QEMU differ are documented on the builders and in `tests/differential.rs`.
//!
//! This crate is test support: it is never linked into the `vmm` binary.

#![deny(missing_docs)]

mod asm;
mod counter;
mod elf;
mod exc_classes;
pub mod guests;
pub mod ops;
mod pci_guest;
mod simd;
pub mod strings;

pub use asm::{hash_u32s, hash_u64s, layout};
pub use counter::{REPORTED_LEAVES, counter, counter_dirty, cpuid_report};
pub use exc_classes::{
    debug_exceptions, debug_exceptions_without, legacy32, page_walk_faults,
    page_walk_faults_without,
};
pub use guests::*;
pub use pci_guest::pci;
pub use simd::sse;

use keel_accel::{GuestMemory, Regs, Segment, SpecialRegs};
use vm_memory::{Bytes, GuestAddress};

/// Port of the serial line the guests write their report to.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Port of QEMU's `isa-debug-exit` (iobase=0xf4,iosize=0x04).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Guest RAM every guest here fits in (the harnesses use this much; QEMU `-m 32M` works too).
pub const GUEST_MEM_SIZE: u64 = 32 << 20;
/// The value a guest writes to [`DEBUG_EXIT_PORT`] when it finished normally.
pub const EXIT_OK: u8 = 0;
/// The value a guest writes when it took an exception it did not expect.
pub const EXIT_UNEXPECTED_EXCEPTION: u8 = 3;

/// Errors building a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The assembler refused an instruction or could not resolve a label (a bug in the
    /// guest builder, reported rather than panicking).
    #[error("assembling test guest '{guest}' failed")]
    Assemble {
        /// Guest name.
        guest: String,
        /// iced-x86's error.
        #[source]
        source: iced_x86::IcedError,
    },
    /// A part of the guest does not fit the fixed layout in [`layout`].
    #[error("test guest '{guest}': {what} is {size:#x} bytes, more than the {max:#x} reserved")]
    TooBig {
        /// Guest name.
        guest: String,
        /// Which part (code, data).
        what: &'static str,
        /// Its size.
        size: usize,
        /// Space reserved for it.
        max: usize,
    },
    /// Writing the image into guest memory failed (memory too small).
    #[error("loading test guest '{guest}' into guest memory failed")]
    Load {
        /// Guest name.
        guest: String,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The register state a guest starts with: what a PVH loader sets up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    /// General registers (RIP = entry point, RFLAGS = 0x2).
    pub regs: Regs,
    /// Flat 32-bit protected mode, paging off.
    pub sregs: SpecialRegs,
}

impl EntryState {
    /// The PVH entry state: 32-bit flat code and data segments, CR0.PE only, `rip = entry`,
    /// `rbx = start_info` (the guests here ignore it).
    pub fn pvh(entry: u64, start_info: u64) -> Self {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: true,
            s: true,
            l: false,
            g: true,
            avl: false,
            unusable: false,
        };
        let data = Segment {
            selector: 0x10,
            type_: 0x3,
            ..code
        };
        let tr = Segment {
            base: 0,
            limit: 0x67,
            selector: 0x18,
            type_: 0xb,
            s: false,
            db: false,
            g: false,
            ..code
        };
        let ldt = Segment {
            selector: 0,
            type_: 0x2,
            s: false,
            db: false,
            g: false,
            limit: 0,
            present: true,
            unusable: true,
            ..code
        };
        let sregs = SpecialRegs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt,
            cr0: 0x11,
            ..SpecialRegs::default()
        };
        let regs = Regs {
            rip: entry,
            rbx: start_info,
            rflags: 0x2,
            ..Regs::default()
        };
        Self { regs, sregs }
    }
}

/// A generated guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuest {
    /// Short name, used in test output and as the ELF file stem.
    pub name: String,
    /// Flat image to copy to `load_addr` (code, tables, data).
    pub image: Vec<u8>,
    /// Guest-physical address of `image[0]`.
    pub load_addr: u64,
    /// Registers at the first instruction (PVH entry state).
    pub entry: EntryState,
    /// The serial output a correct CPU produces, when this crate can predict it (from the
    /// Rust model in [`ops`] or because the guest is deterministic by construction).
    pub expected_serial: Option<String>,
    /// The value the guest writes to `isa-debug-exit` on success.
    pub expected_exit: u8,
    /// The guest ends in a triple fault (a shutdown) instead of writing `isa-debug-exit`.
    pub ends_in_triple_fault: bool,
    /// Where the guest leaves per-case result records (see [`ops::CaseResult`]), if any.
    pub results: Option<ResultArea>,
    /// Guest instructions executed, when the guest is a benchmark loop (for MIPS).
    pub instructions: Option<u64>,
    /// The guest programs the 8259 PIC pair and the 8254 PIT and takes timer interrupts:
    /// the machine must provide them (`MachineRequirements::pit`).
    pub uses_pic_pit: bool,
}

/// A block of result records the guest writes to memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultArea {
    /// Guest-physical address of the first record.
    pub addr: u64,
    /// Number of records.
    pub count: usize,
    /// Bytes per record ([`ops::RESULT_SIZE`] or [`strings::STR_RESULT_SIZE`]).
    pub record_size: usize,
}

impl TestGuest {
    /// Copies the image into `mem` at `load_addr`.
    pub fn load(&self, mem: &GuestMemory) -> Result<(), GuestError> {
        mem.write_slice(&self.image, GuestAddress(self.load_addr))
            .map_err(|source| GuestError::Load {
                guest: self.name.clone(),
                source,
            })
    }

    /// The guest as an ELF64 executable with a Xen PVH entry note, bootable with
    /// `qemu-system-x86_64 -kernel FILE` (and Keel's `-kernel`).
    pub fn pvh_elf(&self) -> Vec<u8> {
        elf::pvh_elf(&self.image, self.load_addr, self.entry.regs.rip)
    }

    /// Reads the raw result area back from guest memory after a run (empty when the guest
    /// has none).
    pub fn read_result_bytes(&self, mem: &GuestMemory) -> Result<Vec<u8>, GuestError> {
        let Some(area) = self.results else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; area.count * area.record_size];
        mem.read_slice(&mut buf, GuestAddress(area.addr))
            .map_err(|source| GuestError::Load {
                guest: self.name.clone(),
                source,
            })?;
        Ok(buf)
    }

    /// Reads the [`ops::CaseResult`] records of a table-driven op guest back from guest
    /// memory after a run (empty for other guests).
    pub fn read_results(&self, mem: &GuestMemory) -> Result<Vec<ops::CaseResult>, GuestError> {
        match self.results {
            Some(a) if a.record_size == ops::RESULT_SIZE => Ok(self
                .read_result_bytes(mem)?
                .chunks_exact(ops::RESULT_SIZE)
                .map(ops::CaseResult::from_bytes)
                .collect()),
            _ => Ok(Vec::new()),
        }
    }
}
