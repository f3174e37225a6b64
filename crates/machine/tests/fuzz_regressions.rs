//! Inputs the fuzz targets (`fuzz/fuzz_targets/boot_loaders.rs`, `acpi_tables.rs`) found to
//! crash, replayed through the public API. Each input stays in `fuzz/corpus/TARGET/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_machine::BootError;
use keel_machine::boot::{BootConfig, KernelImage, prepare};
use keel_machine::layout::e820_map;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM: u64 = 16 << 20;

fn boot(name: &'static str, image: &'static [u8]) -> Result<(), BootError> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let kernel = KernelImage::Bytes(name, image);
    let e820 = e820_map(MEM);
    prepare(
        &mem,
        &BootConfig {
            kernel: &kernel,
            initrd: None,
            cmdline: "console=ttyS0",
            e820: &e820,
            low_ram_end: MEM,
            rsdp: None,
        },
    )
    .map(|_| ())
}

/// An ELF64 whose `e_phoff` is `0xffff_ffff_ffff_fffc`: reading its first program header
/// computed `offset + 4` in `usize` and overflowed (a panic in debug builds, a wrapped read
/// range in release). Now it is a truncated program header table.
#[test]
fn elf_program_header_offset_near_usize_max() {
    let image = include_bytes!("../../../fuzz/corpus/boot_loaders/crash-phoff-overflow");
    let err = boot("crash-phoff-overflow", image).unwrap_err();
    assert!(matches!(err, BootError::BadElf { .. }), "{err}");
}
