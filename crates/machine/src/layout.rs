//! The microvm memory map: where RAM, boot structures, ACPI tables and MMIO devices live.
//!
//! ```text
//! 0x0000_0500  PVH GDT; 0x520 empty IDT and 0x540 GDT for the Linux 64-bit entry
//! 0x0000_6000  PVH hvm_start_info, module list (0x6100) and memory map (0x6200..0x7000)
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack top (Linux 64-bit entry)
//! 0x0000_9000  identity page tables for the Linux 64-bit entry (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  end of base RAM (EBDA reserved up to 0xa0000)
//! 0x000e_0000  ACPI tables (RSDP first), reserved up to 1 MiB
//! port 0x600   ACPI PM1a event/control blocks and PM timer (only without an IOAPIC)
//! 0x0010_0000  kernel; initrd at the top of RAM below 3 GiB
//! 0xc000_0000  start of the 32-bit MMIO hole (RAM beyond it continues at 4 GiB)
//! 0xfea0_0000  ACPI GED (sleep control/status and reset registers at +0x200)
//! 0xfeb0_0000  virtio-mmio windows (0x200 each)
//! 0xfec0_0000  IOAPIC
//! 0xfee0_0000  local APICs
//! ```

/// GDT of the PVH entry state.
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT of the Linux 64-bit entry state.
pub const IDT_ADDR: u64 = 0x520;
/// GDT of the Linux 64-bit entry state.
pub const LINUX_GDT_ADDR: u64 = 0x540;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6100;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6200;
/// Largest number of memory-map entries (fits below the zero page).
pub const PVH_MEMMAP_MAX: usize = (0x7000 - 0x6200) / 24;
/// Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Boot stack pointer for the Linux 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory of the boot identity map (2 MiB pages, first 1 GiB).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line including its NUL.
pub const CMDLINE_MAX: u64 = 0x1_0000;
/// End of conventional memory (the EBDA starts here).
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables; the RSDP comes first, where the legacy scan also finds it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the ACPI area (1 MiB).
pub const ACPI_END: u64 = 0x10_0000;
/// Where high memory (the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 4 GiB: RAM beyond the hole continues here.
pub const FOUR_GIB: u64 = 1 << 32;
/// I/O port of the ACPI PM register block (`keel_devices::AcpiPm`), ICH9's PMBASE; used
/// only when the backend has no IOAPIC and the FADT is therefore a full one.
pub const ACPI_PM_BASE: u16 = 0x600;
/// ACPI Generic Event Device registers (QEMU microvm's address).
pub const GED_MMIO_BASE: u64 = 0xfea0_0000;
/// First virtio-mmio window (QEMU microvm's address).
pub const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// An e820 / PVH memory-map entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Kind of memory.
    pub kind: E820Type,
}

/// Guest RAM ranges for `mem` bytes: below the MMIO hole, then from 4 GiB.
pub fn ram_ranges(mem: u64) -> Vec<(u64, u64)> {
    let low = mem.min(MMIO_HOLE_START);
    let mut v = vec![(0, low)];
    if mem > low {
        v.push((FOUR_GIB, mem - low));
    }
    v
}

/// RAM below 4 GiB and above it, in bytes.
pub fn split_ram(mem: u64) -> (u64, u64) {
    let low = mem.min(MMIO_HOLE_START);
    (low, mem - low)
}

/// The memory map the guest sees (e820 and PVH): conventional memory, the reserved EBDA and
/// BIOS/ACPI area, then RAM from 1 MiB, and RAM above 4 GiB if any.
pub fn e820_map(mem: u64) -> Vec<E820Entry> {
    let (low, high) = split_ram(mem);
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa_0000 - EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820Type::Reserved,
        },
    ];
    if low > HIMEM_START {
        v.push(E820Entry {
            addr: HIMEM_START,
            size: low - HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    if high > 0 {
        v.push(E820Entry {
            addr: FOUR_GIB,
            size: high,
            kind: E820Type::Ram,
        });
    }
    v
}

/// Leaves guest RAM out of the process's core dumps (`-machine dump-guest-core=off`,
/// QEMU's `MADV_DONTDUMP`); a region the kernel refuses is logged and stays in.
pub fn exclude_from_core_dumps(memory: &vm_memory::GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in memory.iter() {
        let len = usize::try_from(region.len()).unwrap_or(0);
        // SAFETY: the range is exactly one mapping that `memory` owns; MADV_DONTDUMP only
        // changes how a core dump treats it, never its contents or its mapping.
        let r = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_DONTDUMP) };
        if r != 0 {
            log::warn!(
                "dump-guest-core=off: madvise: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_and_large_guests() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 4);
        assert_eq!(m[3].addr, HIMEM_START);
        assert_eq!(m[3].addr + m[3].size, 128 << 20);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (HIMEM_START - EBDA_START));
        let big = e820_map(4 << 30);
        let last = big.last().unwrap();
        assert_eq!(
            (last.addr, last.size),
            (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)
        );
        // Sorted, non-overlapping, nothing in the MMIO hole.
        for w in big.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
        assert!(
            big.iter()
                .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= FOUR_GIB)
        );
        assert_eq!(ram_ranges(4 << 30).len(), 2);
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
    }
}
