//! Kernel loading and boot entry state: PVH (an ELF with `XEN_ELFNOTE_PHYS32_ENTRY`) and the
//! Linux 64-bit boot protocol (a bzImage, or an ELF vmlinux without the PVH note).
//!
//! ELF images (32- and 64-bit) are parsed here rather than with linux-loader's `Elf`, which
//! reads only ELF64 and leaves `.bss` uncleared (a reset would run on stale data); bzImages
//! go through linux-loader's `BzImage`, and its `boot_params` layout fills the zero page.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use keel_accel::{Regs, Segment, SpecialRegs};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{
    ACPI_END, ACPI_START, BOOT_STACK, CMDLINE_ADDR, CMDLINE_MAX, E820Entry, GDT_ADDR, HIMEM_START,
    IDT_ADDR, LINUX_GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR, PVH_INFO_ADDR, PVH_MEMMAP_ADDR,
    PVH_MEMMAP_MAX, PVH_MODLIST_ADDR, ZERO_PAGE_ADDR,
};

/// Errors loading a kernel or initrd and preparing the boot state; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file given with `-kernel` or `-initrd` cannot be read.
    #[error("cannot read {what} '{path}'")]
    Read {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error(
        "'{0}' is not a bootable kernel: expected an ELF image (PVH note or x86-64 vmlinux) or a Linux bzImage"
    )]
    NotAKernel(PathBuf),
    /// The ELF image is malformed or unsuitable.
    #[error("cannot boot ELF image '{path}': {reason}")]
    BadElf {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The bzImage could not be loaded.
    #[error("cannot load bzImage '{path}'")]
    BzImage {
        /// The image.
        path: PathBuf,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The bzImage cannot be entered in 64-bit mode.
    #[error(
        "bzImage '{0}' has no 64-bit entry point (boot protocol older than 2.12 or XLF_KERNEL_64 clear)"
    )]
    Not64Bit(PathBuf),
    /// Something does not fit in guest RAM.
    #[error(
        "{what} needs {size:#x} bytes at {addr:#x}, which is not inside guest RAM below 3 GiB; increase -m"
    )]
    TooBig {
        /// What was being placed.
        what: String,
        /// Where.
        addr: u64,
        /// How many bytes.
        size: u64,
    },
    /// Something is placed where no amount of RAM would put guest memory (above the 3 GiB
    /// of low RAM, or past the end of the address space): more `-m` would not help.
    #[error(
        "{what} at {addr:#x} ({size:#x} bytes) lies outside the guest RAM below 3 GiB that Keel loads images into; this image cannot be booted directly"
    )]
    OutsideRam {
        /// What was being placed.
        what: String,
        /// Where.
        addr: u64,
        /// How many bytes.
        size: u64,
    },
    /// A file is larger than guest RAM.
    #[error(
        "{what} '{path}' is {size} bytes, more than the {ram} bytes of guest RAM below 3 GiB; increase -m"
    )]
    FileTooBig {
        /// `kernel` or `initrd`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// File size.
        size: u64,
        /// RAM available.
        ram: u64,
    },
    /// A kernel segment overlaps memory the VMM uses for boot structures.
    #[error(
        "kernel segment at {addr:#x}+{size:#x} overlaps the boot data area ({area}); link the kernel at or above 1 MiB"
    )]
    Overlap {
        /// Segment start.
        addr: u64,
        /// Segment size.
        size: u64,
        /// Which area.
        area: &'static str,
    },
    /// The kernel command line is too long.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length given.
        len: usize,
        /// Maximum (without the NUL).
        max: usize,
    },
    /// Writing guest memory failed.
    #[error("writing {what} to guest memory failed")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelImage {
    /// A file (`-kernel PATH`).
    File(PathBuf),
    /// An image in memory (the built-in demo guest), with a name for messages.
    Bytes(&'static str, &'static [u8]),
}

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Xen PVH: 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `%rsi` = zero page.
    Linux64,
}

/// What [`prepare`] needs to know besides the images.
#[derive(Debug, Clone)]
pub struct BootConfig<'a> {
    /// The kernel.
    pub kernel: &'a KernelImage,
    /// `-initrd`.
    pub initrd: Option<&'a Path>,
    /// `-append`.
    pub cmdline: &'a str,
    /// The memory map.
    pub e820: &'a [E820Entry],
    /// RAM below 4 GiB (initrd goes at its top).
    pub low_ram_end: u64,
    /// RSDP address, when ACPI tables exist.
    pub rsdp: Option<u64>,
}

/// The bootstrap processor's entry state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    /// Protocol used.
    pub protocol: BootProtocol,
    /// General registers.
    pub regs: Regs,
    /// Segment and control registers.
    pub sregs: SpecialRegs,
}

/// PVH `hvm_start_info` magic.
pub const PVH_MAGIC: u32 = 0x336e_c578;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PAGE: u64 = 4096;

fn read_file(what: &'static str, path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    let err = |source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    if len > limit {
        return Err(BootError::FileTooBig {
            what,
            path: path.to_path_buf(),
            size: len,
            ram: limit,
        });
    }
    let mut v = Vec::with_capacity(len as usize);
    f.take(limit).read_to_end(&mut v).map_err(err)?;
    Ok(v)
}

fn write(
    mem: &keel_accel::GuestMemory,
    what: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| BootError::Memory { what, source })
}

fn zero(mem: &keel_accel::GuestMemory, addr: u64, len: u64) -> Result<(), BootError> {
    const Z: [u8; 4096] = [0; 4096];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(4096);
        write(mem, "zeroed .bss", addr + off, &Z[..n as usize])?;
        off += n;
    }
    Ok(())
}

/// The areas a kernel segment must not overwrite (boot structures written after loading).
const RESERVED: [(u64, u64, &str); 2] = [
    (
        GDT_ADDR,
        CMDLINE_ADDR + CMDLINE_MAX,
        "GDT, start info, zero page, page tables, command line",
    ),
    (ACPI_START, ACPI_END, "ACPI tables"),
];

fn check_segment(
    mem: &keel_accel::GuestMemory,
    low_ram_end: u64,
    addr: u64,
    size: u64,
) -> Result<(), BootError> {
    let end = addr.checked_add(size);
    if end.is_none_or(|e| e > crate::layout::MMIO_HOLE_START) {
        return Err(BootError::OutsideRam {
            what: "kernel segment".into(),
            addr,
            size,
        });
    }
    if end.is_none_or(|e| e > low_ram_end) || !mem.check_range(GuestAddress(addr), size as usize) {
        return Err(BootError::TooBig {
            what: "kernel segment".into(),
            addr,
            size,
        });
    }
    let end = addr + size;
    for (s, e, area) in RESERVED {
        if size > 0 && addr < e && s < end {
            return Err(BootError::Overlap { addr, size, area });
        }
    }
    Ok(())
}

// `None` past the end of `b`, including offsets near `usize::MAX` (a hostile `e_phoff`).
fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[derive(Debug, Clone, Copy)]
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// A parsed ELF image: class, entry, program headers, PVH entry if any.
#[derive(Debug)]
struct ElfImage {
    is64: bool,
    entry: u64,
    phdrs: Vec<Phdr>,
    pvh_entry: Option<u32>,
}

fn parse_elf(b: &[u8]) -> Result<ElfImage, String> {
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    let class = *b.get(4).ok_or("truncated header")?;
    if b.get(5) != Some(&1) {
        return Err("not little-endian".into());
    }
    let is64 = match class {
        1 => false,
        2 => true,
        _ => return Err(format!("unknown ELF class {class}")),
    };
    let machine = le16(b, 18).ok_or("truncated header")?;
    if machine != 3 && machine != 62 {
        return Err(format!(
            "machine type {machine} is not x86 (3) or x86-64 (62)"
        ));
    }
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            le64(b, 24),
            le64(b, 32),
            le16(b, 54).map(u64::from),
            le16(b, 56),
        )
    } else {
        (
            le32(b, 24).map(u64::from),
            le32(b, 28).map(u64::from),
            le16(b, 42).map(u64::from),
            le16(b, 44),
        )
    };
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (entry, phoff, phentsize, phnum)
    else {
        return Err("truncated header".into());
    };
    let want = if is64 { 56 } else { 32 };
    if phentsize != want {
        return Err(format!("program header size {phentsize}, expected {want}"));
    }
    // The whole table must be in the file before any entry is believed: a huge count would
    // otherwise read section data as program headers and blame the wrong thing.
    if phoff
        .checked_add(u64::from(phnum) * phentsize)
        .is_none_or(|end| end > b.len() as u64)
    {
        return Err(format!(
            "program header table ({phnum} entries at offset {phoff:#x}) runs past the end of the file"
        ));
    }
    let mut phdrs = Vec::with_capacity(usize::from(phnum));
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * phentsize)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or("program header offset overflows")?;
        let p = if is64 {
            (|| {
                Some(Phdr {
                    kind: le32(b, off)?,
                    offset: le64(b, off + 8)?,
                    paddr: le64(b, off + 24)?,
                    filesz: le64(b, off + 32)?,
                    memsz: le64(b, off + 40)?,
                })
            })()
        } else {
            (|| {
                Some(Phdr {
                    kind: le32(b, off)?,
                    offset: u64::from(le32(b, off + 4)?),
                    paddr: u64::from(le32(b, off + 12)?),
                    filesz: u64::from(le32(b, off + 16)?),
                    memsz: u64::from(le32(b, off + 20)?),
                })
            })()
        };
        let p = p.ok_or("program header table runs past the end of the file")?;
        if p.kind == PT_LOAD {
            if p.filesz > p.memsz {
                return Err(format!("segment at {:#x} has filesz > memsz", p.paddr));
            }
            if p.offset
                .checked_add(p.filesz)
                .is_none_or(|e| e > b.len() as u64)
            {
                return Err(format!(
                    "segment at {:#x} runs past the end of the file",
                    p.paddr
                ));
            }
        }
        phdrs.push(p);
    }
    let mut pvh_entry = None;
    for p in phdrs.iter().filter(|p| p.kind == PT_NOTE) {
        if let Some(e) = find_pvh_note(b, p.offset, p.filesz) {
            pvh_entry = Some(e);
            break;
        }
    }
    phdrs.retain(|p| p.kind == PT_LOAD);
    Ok(ElfImage {
        is64,
        entry,
        phdrs,
        pvh_entry,
    })
}

/// Walks the notes in `[off, off+len)` for `Xen`/`XEN_ELFNOTE_PHYS32_ENTRY`.
fn find_pvh_note(b: &[u8], off: u64, len: u64) -> Option<u32> {
    let start = usize::try_from(off).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?.min(b.len());
    let mut p = start;
    let align4 = |x: usize| x.checked_add(3).map(|v| v & !3);
    while p.checked_add(12)? <= end {
        let namesz = le32(b, p)? as usize;
        let descsz = le32(b, p + 4)? as usize;
        let kind = le32(b, p + 8)?;
        let name_at = p + 12;
        let desc_at = name_at.checked_add(align4(namesz)?)?;
        let next = desc_at.checked_add(align4(descsz)?)?;
        if next > end {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY
            && b.get(name_at..name_at + namesz)? == b"Xen\0"
            && descsz >= 4
        {
            // The descriptor is 32 bits (Linux) or 64 bits (some guests): the low half is
            // the entry either way.
            return le32(b, desc_at);
        }
        p = next;
    }
    None
}

/// Loaded kernel facts needed for the rest of the boot.
#[derive(Debug, Clone, Copy)]
struct Loaded {
    protocol: BootProtocol,
    entry: u64,
    end: u64,
    setup: Option<setup_header>,
}

fn load_elf(
    mem: &keel_accel::GuestMemory,
    path: &Path,
    bytes: &[u8],
    low_ram_end: u64,
) -> Result<Loaded, BootError> {
    let bad = |reason: String| BootError::BadElf {
        path: path.to_path_buf(),
        reason,
    };
    let elf = parse_elf(bytes).map_err(bad)?;
    let protocol = match (elf.pvh_entry, elf.is64) {
        (Some(_), _) => BootProtocol::Pvh,
        (None, true) => BootProtocol::Linux64,
        (None, false) => {
            return Err(bad(
                "a 32-bit ELF needs a XEN_ELFNOTE_PHYS32_ENTRY note to be booted (PVH)".into(),
            ));
        }
    };
    if elf.phdrs.is_empty() {
        return Err(bad("no loadable segment".into()));
    }
    let mut end = 0;
    for p in &elf.phdrs {
        check_segment(mem, low_ram_end, p.paddr, p.memsz)?;
        // Bounds were checked when parsing.
        let data = &bytes[p.offset as usize..(p.offset + p.filesz) as usize];
        write(mem, "kernel segment", p.paddr, data)?;
        zero(mem, p.paddr + p.filesz, p.memsz - p.filesz)?;
        end = end.max(p.paddr + p.memsz);
    }
    let entry = match elf.pvh_entry {
        Some(e) => u64::from(e),
        None => elf.entry,
    };
    Ok(Loaded {
        protocol,
        entry,
        end,
        setup: None,
    })
}

fn load_bzimage(
    mem: &keel_accel::GuestMemory,
    path: &Path,
    bytes: &[u8],
    low_ram_end: u64,
) -> Result<Loaded, BootError> {
    const XLF_KERNEL_64: u16 = 1;
    let mut cursor = std::io::Cursor::new(bytes);
    let r = BzImage::load(mem, None, &mut cursor, Some(GuestAddress(HIMEM_START))).map_err(
        |source| BootError::BzImage {
            path: path.to_path_buf(),
            source,
        },
    )?;
    let Some(hdr) = r.setup_header else {
        return Err(BootError::NotAKernel(path.to_path_buf()));
    };
    if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(path.to_path_buf()));
    }
    let load = r.kernel_load.0;
    if r.kernel_end > low_ram_end {
        return Err(BootError::TooBig {
            what: format!("bzImage '{}'", path.display()),
            addr: load,
            size: r.kernel_end - load,
        });
    }
    Ok(Loaded {
        protocol: BootProtocol::Linux64,
        // The 64-bit entry point is 0x200 past the start of the protected-mode code.
        entry: load + 0x200,
        end: r.kernel_end,
        setup: Some(hdr),
    })
}

fn load_kernel(
    mem: &keel_accel::GuestMemory,
    image: &KernelImage,
    low_ram_end: u64,
) -> Result<Loaded, BootError> {
    let (path, owned, bytes): (PathBuf, Vec<u8>, &[u8]);
    match image {
        KernelImage::File(p) => {
            path = p.clone();
            owned = read_file("kernel", p, low_ram_end)?;
            bytes = &owned;
        }
        KernelImage::Bytes(name, b) => {
            path = PathBuf::from(name);
            bytes = b;
        }
    }
    load_kernel_bytes(mem, &path, bytes, low_ram_end)
}

/// Loads a kernel image already in memory, by its format (ELF or bzImage).
fn load_kernel_bytes(
    mem: &keel_accel::GuestMemory,
    path: &Path,
    bytes: &[u8],
    low_ram_end: u64,
) -> Result<Loaded, BootError> {
    if bytes.starts_with(b"\x7fELF") {
        load_elf(mem, path, bytes, low_ram_end)
    } else if bytes.get(0x202..0x206) == Some(b"HdrS") {
        load_bzimage(mem, path, bytes, low_ram_end)
    } else {
        Err(BootError::NotAKernel(path.to_path_buf()))
    }
}

/// Places the initrd at the top of low RAM (page-aligned), below `max_end`, above `kernel_end`.
fn load_initrd(
    mem: &keel_accel::GuestMemory,
    path: &Path,
    kernel_end: u64,
    max_end: u64,
) -> Result<(u64, u64), BootError> {
    let data = read_file("initrd", path, max_end)?;
    let size = data.len() as u64;
    let too_big = || BootError::TooBig {
        what: format!("initrd '{}'", path.display()),
        addr: kernel_end,
        size,
    };
    let addr = max_end.checked_sub(size).ok_or_else(too_big)? & !(PAGE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    write(mem, "initrd", addr, &data)?;
    Ok((addr, size))
}

fn write_cmdline(
    mem: &keel_accel::GuestMemory,
    cmdline: &str,
    max: usize,
) -> Result<(), BootError> {
    if cmdline.len() > max || cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    write(mem, "command line", CMDLINE_ADDR, cmdline.as_bytes())?;
    write(
        mem,
        "command line",
        CMDLINE_ADDR + cmdline.len() as u64,
        &[0],
    )
}

const CODE32: u64 = 0x00cf_9b00_0000_ffff; // 32-bit code, 4 GiB, DPL 0
const CODE64: u64 = 0x00af_9b00_0000_ffff; // 64-bit code, DPL 0
const DATA: u64 = 0x00cf_9300_0000_ffff; // data, 4 GiB
const TSS: u64 = 0x0000_8b00_0000_0067; // busy 32-bit TSS, base 0, limit 0x67

/// PVH GDT (at [`GDT_ADDR`]): the layout QEMU's and Firecracker's PVH entries use:
/// code 0x08, data 0x10, TSS 0x18.
const PVH_GDT: [u64; 4] = [0, CODE32, DATA, TSS];
/// Linux 64-bit GDT (at [`LINUX_GDT_ADDR`]): `__BOOT_CS` 0x10, `__BOOT_DS` 0x18, TSS 0x20.
const LINUX_GDT: [u64; 5] = [0, 0, CODE64, DATA, TSS];

fn seg(d: u64, selector: u16) -> Segment {
    let limit_raw = ((d & 0xffff) | ((d >> 32) & 0x000f_0000)) as u32;
    let g = (d >> 55) & 1 == 1;
    Segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if g {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: (d >> 47) & 1 == 1,
        dpl: ((d >> 45) & 3) as u8,
        db: (d >> 54) & 1 == 1,
        s: (d >> 44) & 1 == 1,
        l: (d >> 53) & 1 == 1,
        g,
        avl: (d >> 52) & 1 == 1,
        unusable: false,
    }
}

fn write_gdt(mem: &keel_accel::GuestMemory, addr: u64, gdt: &[u64]) -> Result<(), BootError> {
    let b: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, "GDT", addr, &b)
}

fn sregs_with(
    gdt_addr: u64,
    gdt: &[u64],
    code: u16,
    data: u16,
    tss: u16,
    idt: keel_accel::DescriptorTable,
) -> SpecialRegs {
    let d = |sel: u16| seg(gdt[usize::from(sel / 8)], sel);
    SpecialRegs {
        cs: d(code),
        ds: d(data),
        es: d(data),
        fs: d(data),
        gs: d(data),
        ss: d(data),
        tr: d(tss),
        ldt: Segment {
            unusable: true,
            type_: 2,
            ..Segment::default()
        },
        gdt: keel_accel::DescriptorTable {
            base: gdt_addr,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt,
        apic_base: 0xfee0_0900, // enabled, bootstrap processor
        ..SpecialRegs::default()
    }
}

/// PVH entry: flat 32-bit protected mode, paging off, `%ebx` → `hvm_start_info`; CS 0x08,
/// data segments 0x10 (as QEMU), the IDT left as at reset (base 0, limit 0xffff), and a stack
/// at [`BOOT_STACK`] so that a guest that pushes before setting its own stack still works.
pub fn pvh_entry_state(entry: u64) -> BootState {
    let idt = keel_accel::DescriptorTable {
        base: 0,
        limit: 0xffff,
    };
    let mut sregs = sregs_with(GDT_ADDR, &PVH_GDT, 0x08, 0x10, 0x18, idt);
    sregs.cr0 = 0x11; // PE | ET
    BootState {
        protocol: BootProtocol::Pvh,
        regs: Regs {
            rip: entry,
            rbx: PVH_INFO_ADDR,
            rsp: BOOT_STACK,
            rflags: 0x2,
            ..Regs::default()
        },
        sregs,
    }
}

/// Linux 64-bit entry: long mode with the boot identity map, `%rsi` → zero page,
/// `__BOOT_CS` 0x10 / `__BOOT_DS` 0x18.
pub fn linux64_entry_state(entry: u64) -> BootState {
    let idt = keel_accel::DescriptorTable {
        base: IDT_ADDR,
        limit: 7,
    };
    let mut sregs = sregs_with(LINUX_GDT_ADDR, &LINUX_GDT, 0x10, 0x18, 0x20, idt);
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    BootState {
        protocol: BootProtocol::Linux64,
        regs: Regs {
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE_ADDR,
            rflags: 0x2,
            ..Regs::default()
        },
        sregs,
    }
}

/// Identity map of the first 1 GiB with 2 MiB pages.
fn write_page_tables(mem: &keel_accel::GuestMemory) -> Result<(), BootError> {
    write(
        mem,
        "page tables",
        PML4_ADDR,
        &(PDPT_ADDR | 3).to_le_bytes(),
    )?;
    write(mem, "page tables", PDPT_ADDR, &(PD_ADDR | 3).to_le_bytes())?;
    let mut pd = Vec::with_capacity(4096);
    for i in 0..512u64 {
        pd.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    write(mem, "page tables", PD_ADDR, &pd)
}

/// Writes `hvm_start_info` (version 1), the module list and the memory map.
fn write_pvh_info(
    mem: &keel_accel::GuestMemory,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let entries = &e820[..e820.len().min(PVH_MEMMAP_MAX)];
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    let modlist = if initrd.is_some() {
        PVH_MODLIST_ADDR
    } else {
        0
    };
    info.extend_from_slice(&modlist.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&rsdp.unwrap_or(0).to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    write(mem, "PVH start info", PVH_INFO_ADDR, &info)?;
    if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&0u64.to_le_bytes()); // no module command line
        m.extend_from_slice(&0u64.to_le_bytes());
        write(mem, "PVH module list", PVH_MODLIST_ADDR, &m)?;
    }
    let mut map = Vec::with_capacity(entries.len() * 24);
    for e in entries {
        map.extend_from_slice(&e.addr.to_le_bytes());
        map.extend_from_slice(&e.size.to_le_bytes());
        map.extend_from_slice(&(e.kind as u32).to_le_bytes());
        map.extend_from_slice(&0u32.to_le_bytes());
    }
    write(mem, "PVH memory map", PVH_MEMMAP_ADDR, &map)
}

fn write_zero_page(
    mem: &keel_accel::GuestMemory,
    setup: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = setup {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = 0xaa55;
        p.hdr.header = 0x5372_6448; // "HdrS"
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = rsdp.unwrap_or(0);
    let n = e820.len().min(p.e820_table.len());
    for (slot, e) in p.e820_table.iter_mut().zip(&e820[..n]) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind as u32;
    }
    p.e820_entries = n as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootError::Memory {
            what: "zero page",
            source,
        })
}

/// Loads the kernel (and initrd), writes the command line and the protocol's boot structures,
/// and returns the bootstrap processor's entry state. ACPI tables are written by the caller
/// before this (their RSDP address is passed in).
pub fn prepare(
    mem: &keel_accel::GuestMemory,
    cfg: &BootConfig<'_>,
) -> Result<BootState, BootError> {
    let loaded = load_kernel(mem, cfg.kernel, cfg.low_ram_end)?;
    finish(mem, cfg, loaded)
}

/// Fuzzing entry (`fuzz/fuzz_targets/boot_loaders.rs`), not part of the API: [`prepare`]
/// with the kernel given as borrowed bytes (ELF with or without the PVH note, or bzImage,
/// detected as for a file) and no initrd; `cfg.kernel` and `cfg.initrd` are ignored.
#[doc(hidden)]
pub fn fuzz_prepare(
    mem: &keel_accel::GuestMemory,
    kernel: &[u8],
    cfg: &BootConfig<'_>,
) -> Result<BootState, BootError> {
    let loaded = load_kernel_bytes(mem, Path::new("fuzz"), kernel, cfg.low_ram_end)?;
    finish(
        mem,
        &BootConfig {
            initrd: None,
            ..cfg.clone()
        },
        loaded,
    )
}

/// [`prepare`] once the kernel is loaded: initrd, command line, boot structures.
fn finish(
    mem: &keel_accel::GuestMemory,
    cfg: &BootConfig<'_>,
    loaded: Loaded,
) -> Result<BootState, BootError> {
    let mut cmdline_max = (CMDLINE_MAX - 1) as usize;
    let mut initrd_top = cfg.low_ram_end;
    if let Some(h) = loaded.setup {
        if h.version >= 0x0206 && h.cmdline_size > 0 {
            cmdline_max = cmdline_max.min(h.cmdline_size as usize);
        }
        if h.initrd_addr_max != 0 {
            initrd_top = initrd_top.min(u64::from(h.initrd_addr_max) + 1);
        }
    }
    let initrd = match cfg.initrd {
        Some(p) => Some(load_initrd(mem, p, loaded.end, initrd_top)?),
        None => None,
    };
    write_cmdline(mem, cfg.cmdline, cmdline_max)?;
    match loaded.protocol {
        BootProtocol::Pvh => {
            write_gdt(mem, GDT_ADDR, &PVH_GDT)?;
            write_pvh_info(mem, initrd, cfg.rsdp, cfg.e820)?;
            Ok(pvh_entry_state(loaded.entry))
        }
        BootProtocol::Linux64 => {
            write_gdt(mem, LINUX_GDT_ADDR, &LINUX_GDT)?;
            write(mem, "IDT", IDT_ADDR, &[0; 8])?;
            write_page_tables(mem)?;
            write_zero_page(
                mem,
                loaded.setup,
                cfg.cmdline.len(),
                initrd,
                cfg.rsdp,
                cfg.e820,
            )?;
            Ok(linux64_entry_state(loaded.entry))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{e820_map, split_ram};
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 64 << 20;

    fn mem() -> keel_accel::GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    /// A minimal ELF with one PT_LOAD of `code` at `paddr` (+ `bss` zero bytes) and, if
    /// `pvh`, a PT_NOTE with the PVH entry.
    pub(crate) fn synth_elf(
        is64: bool,
        paddr: u64,
        code: &[u8],
        bss: u64,
        pvh: Option<u32>,
    ) -> Vec<u8> {
        let (ehsize, phsize) = if is64 { (64usize, 56usize) } else { (52, 32) };
        let nph = 1 + usize::from(pvh.is_some());
        let note_off = ehsize + nph * phsize;
        let note: Vec<u8> = match pvh {
            Some(e) => [
                &4u32.to_le_bytes()[..],
                &4u32.to_le_bytes(),
                &18u32.to_le_bytes(),
                b"Xen\0",
                &e.to_le_bytes(),
            ]
            .concat(),
            None => Vec::new(),
        };
        let code_off = note_off + note.len();
        let mut b = vec![0u8; note_off];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = if is64 { 2 } else { 1 };
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&(if is64 { 62u16 } else { 3 }).to_le_bytes());
        let mut ph = |i: usize, kind: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let o = ehsize + i * phsize;
            if is64 {
                b[o..o + 4].copy_from_slice(&kind.to_le_bytes());
                b[o + 8..o + 16].copy_from_slice(&off.to_le_bytes());
                b[o + 16..o + 24].copy_from_slice(&addr.to_le_bytes());
                b[o + 24..o + 32].copy_from_slice(&addr.to_le_bytes());
                b[o + 32..o + 40].copy_from_slice(&filesz.to_le_bytes());
                b[o + 40..o + 48].copy_from_slice(&memsz.to_le_bytes());
            } else {
                b[o..o + 4].copy_from_slice(&kind.to_le_bytes());
                b[o + 4..o + 8].copy_from_slice(&(off as u32).to_le_bytes());
                b[o + 8..o + 12].copy_from_slice(&(addr as u32).to_le_bytes());
                b[o + 12..o + 16].copy_from_slice(&(addr as u32).to_le_bytes());
                b[o + 16..o + 20].copy_from_slice(&(filesz as u32).to_le_bytes());
                b[o + 20..o + 24].copy_from_slice(&(memsz as u32).to_le_bytes());
            }
        };
        ph(
            0,
            1,
            code_off as u64,
            paddr,
            code.len() as u64,
            code.len() as u64 + bss,
        );
        if pvh.is_some() {
            ph(
                1,
                4,
                note_off as u64,
                0,
                note.len() as u64,
                note.len() as u64,
            );
        }
        if is64 {
            b[24..32].copy_from_slice(&paddr.to_le_bytes());
            b[32..40].copy_from_slice(&(ehsize as u64).to_le_bytes());
            b[52..54].copy_from_slice(&(ehsize as u16).to_le_bytes());
            b[54..56].copy_from_slice(&(phsize as u16).to_le_bytes());
            b[56..58].copy_from_slice(&(nph as u16).to_le_bytes());
        } else {
            b[24..28].copy_from_slice(&(paddr as u32).to_le_bytes());
            b[28..32].copy_from_slice(&(ehsize as u32).to_le_bytes());
            b[40..42].copy_from_slice(&(ehsize as u16).to_le_bytes());
            b[42..44].copy_from_slice(&(phsize as u16).to_le_bytes());
            b[44..46].copy_from_slice(&(nph as u16).to_le_bytes());
        }
        b.extend_from_slice(&note);
        b.extend_from_slice(code);
        b
    }

    fn leak(v: Vec<u8>) -> &'static [u8] {
        Box::leak(v.into_boxed_slice())
    }

    fn boot(
        image: KernelImage,
        initrd: Option<&Path>,
        m: &keel_accel::GuestMemory,
    ) -> Result<BootState, BootError> {
        let e820 = e820_map(MEM);
        prepare(
            m,
            &BootConfig {
                kernel: &image,
                initrd,
                cmdline: "console=ttyS0 hello",
                e820: &e820,
                low_ram_end: split_ram(MEM).0,
                rsdp: Some(0xe0000),
            },
        )
    }

    #[test]
    fn pvh_elf32_and_elf64_enter_in_protected_mode_with_start_info() {
        for is64 in [false, true] {
            let m = mem();
            // Pre-dirty the bss to check it is cleared.
            m.write_slice(&[0xaa; 16], GuestAddress(0x100004)).unwrap();
            let img = synth_elf(
                is64,
                0x100000,
                &[0xf4, 0xf4, 0xf4, 0xf4],
                16,
                Some(0x100002),
            );
            let dir = std::env::temp_dir().join(format!("keel-boot-{}-{is64}", std::process::id()));
            std::fs::write(&dir, b"INITRD-CONTENTS").unwrap();
            let st = boot(KernelImage::Bytes("t", leak(img)), Some(&dir), &m).unwrap();
            std::fs::remove_file(&dir).unwrap();
            assert_eq!(st.protocol, BootProtocol::Pvh);
            assert_eq!(st.regs.rip, 0x100002);
            assert_eq!(st.regs.rbx, PVH_INFO_ADDR);
            assert_eq!(st.sregs.mode(), keel_accel::CpuMode::Protected32);
            assert_eq!(st.sregs.cr0 & 0x8000_0001, 1);
            assert_eq!((st.sregs.cs.selector, st.sregs.ss.selector), (0x08, 0x10));
            assert_eq!(st.regs.rsp, BOOT_STACK);
            let gdt: [u8; 16] = m.read_obj(GuestAddress(st.sregs.gdt.base + 8)).unwrap();
            assert_eq!(le64(&gdt, 0), Some(CODE32));
            assert_eq!(le64(&gdt, 8), Some(DATA));
            let bss: [u8; 16] = m.read_obj(GuestAddress(0x100004)).unwrap();
            assert_eq!(bss, [0; 16]);
            let mut info = [0u8; 56];
            m.read_slice(&mut info, GuestAddress(PVH_INFO_ADDR))
                .unwrap();
            assert_eq!(le32(&info, 0), Some(PVH_MAGIC));
            assert_eq!(le32(&info, 4), Some(1));
            assert_eq!(le32(&info, 12), Some(1));
            assert_eq!(le64(&info, 24), Some(CMDLINE_ADDR));
            assert_eq!(le64(&info, 32), Some(0xe0000));
            assert_eq!(le64(&info, 40), Some(PVH_MEMMAP_ADDR));
            assert_eq!(le32(&info, 48), Some(e820_map(MEM).len() as u32));
            let modl: [u8; 32] = m.read_obj(GuestAddress(le64(&info, 16).unwrap())).unwrap();
            let (ia, is) = (le64(&modl, 0).unwrap(), le64(&modl, 8).unwrap());
            assert_eq!(is, 15);
            assert_eq!(ia % PAGE, 0);
            let mut got = [0u8; 15];
            m.read_slice(&mut got, GuestAddress(ia)).unwrap();
            assert_eq!(&got, b"INITRD-CONTENTS");
            let mut cl = [0u8; 20];
            m.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
            assert_eq!(&cl, b"console=ttyS0 hello\0");
            let e: [u8; 24] = m.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 3 * 24)).unwrap();
            assert_eq!(le64(&e, 0), Some(HIMEM_START));
            assert_eq!(le32(&e, 16), Some(1));
        }
    }

    #[test]
    fn vmlinux_without_note_uses_the_64bit_protocol() {
        let m = mem();
        let img = synth_elf(true, 0x1000000, &[0x90; 32], 0, None);
        let st = boot(KernelImage::Bytes("vmlinux", leak(img)), None, &m).unwrap();
        assert_eq!(st.protocol, BootProtocol::Linux64);
        assert_eq!(st.regs.rip, 0x1000000);
        assert_eq!(st.regs.rsi, ZERO_PAGE_ADDR);
        assert_eq!(st.sregs.mode(), keel_accel::CpuMode::Long64);
        assert_eq!(st.sregs.cs.selector, 0x10);
        assert_eq!(st.sregs.ds.selector, 0x18);
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820_map(MEM).len());
        let pde: u64 = m.read_obj(GuestAddress(PD_ADDR + 8 * 8)).unwrap();
        assert_eq!(pde, (8 << 21) | 0x83);
    }

    /// A synthetic bzImage: setup sectors with a 2.15 header, then a payload.
    fn synth_bzimage(xload: u16) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        b[0x1f1] = setup_sects;
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1; // loadflags: LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        b[0x236..0x238].copy_from_slice(&xload.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        b.extend_from_slice(&[0xcc; 4096]);
        b
    }

    #[test]
    fn bzimage_loads_at_1mib_with_entry_plus_0x200() {
        let m = mem();
        let st = boot(KernelImage::Bytes("bz", leak(synth_bzimage(1))), None, &m).unwrap();
        assert_eq!(st.protocol, BootProtocol::Linux64);
        assert_eq!(st.regs.rip, 0x100200);
        let b: u8 = m.read_obj(GuestAddress(0x100000)).unwrap();
        assert_eq!(b, 0xcc);
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.version }, 0x020f);
        let err = boot(KernelImage::Bytes("bz32", leak(synth_bzimage(0))), None, &m).unwrap_err();
        assert!(matches!(err, BootError::Not64Bit(_)), "{err}");
    }

    #[test]
    fn actionable_errors() {
        let m = mem();
        let missing = KernelImage::File("/nonexistent/keel-kernel".into());
        assert!(matches!(
            boot(missing, None, &m),
            Err(BootError::Read { what: "kernel", .. })
        ));
        let junk = KernelImage::Bytes("junk", b"this is not a kernel at all");
        assert!(matches!(
            boot(junk, None, &m),
            Err(BootError::NotAKernel(_))
        ));
        let elf32 = synth_elf(false, 0x100000, &[0xf4], 0, None);
        assert!(matches!(
            boot(KernelImage::Bytes("e32", leak(elf32)), None, &m),
            Err(BootError::BadElf { .. })
        ));
        let huge = synth_elf(true, 0x100000, &[0xf4], 1 << 30, Some(0x100000));
        let e = boot(KernelImage::Bytes("big", leak(huge)), None, &m).unwrap_err();
        assert!(matches!(e, BootError::TooBig { .. }), "{e}");
        assert!(e.to_string().contains("increase -m"));
        // A segment where no guest RAM can ever be: not a matter of -m.
        let high = synth_elf(true, 0xffff_ffff_ffff_f000, &[0xf4], 0, Some(0x100000));
        let e = boot(KernelImage::Bytes("high", leak(high)), None, &m).unwrap_err();
        assert!(matches!(e, BootError::OutsideRam { .. }), "{e}");
        assert!(!e.to_string().contains("-m"), "{e}");
        let low = synth_elf(true, 0x7000, &[0xf4], 0, Some(0x7000));
        assert!(matches!(
            boot(KernelImage::Bytes("low", leak(low)), None, &m),
            Err(BootError::Overlap { .. })
        ));
        let mut trunc = synth_elf(true, 0x100000, &[0xf4; 64], 0, Some(0x100000));
        trunc.truncate(trunc.len() - 10);
        assert!(matches!(
            boot(KernelImage::Bytes("trunc", leak(trunc)), None, &m),
            Err(BootError::BadElf { .. })
        ));
    }

    #[test]
    fn hostile_elf_headers_never_panic() {
        let base = synth_elf(true, 0x100000, &[0xf4; 16], 0, Some(0x100000));
        let m = mem();
        for i in 0..base.len() {
            for v in [0u8, 0x7f, 0xff] {
                let mut b = base.clone();
                b[i] = v;
                let _ = boot(KernelImage::Bytes("fuzz", leak(b)), None, &m);
            }
        }
        for n in 0..base.len() {
            let _ = parse_elf(&base[..n]);
        }
    }

    #[test]
    fn hostile_bzimage_headers_never_panic() {
        let base = synth_bzimage(1);
        let m = mem();
        for i in 0x1f0..0x270 {
            for v in [0u8, 0x7f, 0xff] {
                let mut b = base.clone();
                b[i] = v;
                let _ = boot(KernelImage::Bytes("fuzz", leak(b)), None, &m);
            }
        }
        for n in [0x203, 0x206, 0x400, 0xa00, 0xa01] {
            let _ = boot(
                KernelImage::Bytes("short", leak(base[..n].to_vec())),
                None,
                &m,
            );
        }
    }
}
