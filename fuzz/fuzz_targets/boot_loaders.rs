//! Kernel loading on arbitrary bytes: the input is the kernel image, detected as
//! `prepare` detects a `-kernel` file (ELF with the PVH note, ELF vmlinux, or bzImage),
//! loaded into a 16 MiB guest with the command line, the boot structures of its protocol
//! (PVH start info or zero page, GDT, page tables) and an RSDP address.
//!
//! Checks: no panic, no unbounded allocation or copy (every segment is checked against
//! guest RAM first); a loaded ELF enters at its PVH or ELF entry with the protocol's state.
//! The entry is `keel_machine::boot::fuzz_prepare` (hidden; `prepare` with borrowed bytes).
//!
//! Run (nightly): `cargo +nightly fuzz run --fuzz-dir fuzz boot_loaders`.
#![no_main]

use std::sync::OnceLock;

use keel_machine::boot::{BootConfig, BootProtocol, KernelImage, fuzz_prepare};
use keel_machine::layout::{E820Entry, e820_map};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEM: u64 = 16 << 20;

fn mem() -> &'static (keel_accel::GuestMemory, Vec<E820Entry>) {
    static MEM_MAP: OnceLock<(keel_accel::GuestMemory, Vec<E820Entry>)> = OnceLock::new();
    MEM_MAP.get_or_init(|| {
        let m =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory");
        (m, e820_map(MEM))
    })
}

fuzz_target!(|data: &[u8]| {
    let (mem, e820) = mem();
    // The command line varies with the length, so that a seed keeps its image intact.
    let long = "x".repeat(300);
    let cmdline = match data.len() % 3 {
        0 => "",
        1 => "console=ttyS0 reboot=t panic=-1",
        _ => long.as_str(),
    };
    let unused = KernelImage::Bytes("fuzz", &[]);
    let cfg = BootConfig {
        kernel: &unused,
        initrd: None,
        cmdline,
        e820,
        low_ram_end: MEM,
        rsdp: (data.len() % 2 == 0).then_some(0xe_0000),
    };
    if let Ok(state) = fuzz_prepare(mem, data, &cfg) {
        match state.protocol {
            BootProtocol::Pvh => assert_eq!(state.sregs.cr0 & 0x8000_0000, 0, "PVH: paging off"),
            BootProtocol::Linux64 => assert_ne!(state.sregs.efer & 0x400, 0, "Linux64: LMA"),
        }
    }
});
