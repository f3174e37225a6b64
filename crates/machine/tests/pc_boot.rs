//! A small PVH guest on the `pc` machine under both accelerators: it scans the PCI
//! configuration space through ports 0xCF8/0xCFC (the i440FX at 00.0, the PIIX4 PM function
//! at 01.3), then, with a cold-plugged transitional virtio-rng-pci at 03.0, reads its IDs,
//! sizes its I/O BAR0 and memory BAR1 the way firmware does (all ones, read the mask back,
//! restore) and reads the legacy header's queue size through BAR0; it reports through
//! `isa-debug-exit`. KVM is skipped with a message when /dev/kvm is absent or unusable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::pvh_elf;
use keel_accel::{Accelerator, SystemEvent};
use keel_machine::{MachineEvent, Pc, PcConfig, SerialBackend};

/// Reads 00.0 and 01.3's vendor/device through mechanism #1, then checks the virtio-rng-pci
/// function at 03.0 (module documentation); exits with 0x10 when everything matches
/// (status 33), 0x11 otherwise (status 35).
fn pci_scan_code() -> Vec<u8> {
    let mut c = Vec::new();
    for (addr, id) in [(0x8000_0000u32, 0x1237_8086u32), (0x8000_0b00, 0x7113_8086)] {
        c.push(0xb8); // mov eax, addr
        c.extend_from_slice(&addr.to_le_bytes());
        c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x0c, 0xef]); // mov dx, 0xcf8; out dx, eax
        c.extend_from_slice(&[0x66, 0xba, 0xfc, 0x0c, 0xed]); // mov dx, 0xcfc; in eax, dx
        c.push(0x3d); // cmp eax, id
        c.extend_from_slice(&id.to_le_bytes());
        c.extend_from_slice(&[0x75, 0x00]); // jne bad (patched below)
    }
    let (j1, j2) = (20, 42);
    // The virtio-rng-pci function at 03.0 (bus 0, devfn 0x18).
    let f = 0x8000_1800u32;
    let mut jumps = Vec::new();
    let check = |c: &mut Vec<u8>, jumps: &mut Vec<usize>, want: u32| {
        c.push(0x3d); // cmp eax, want
        c.extend_from_slice(&want.to_le_bytes());
        jumps.push(c.len());
        c.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]); // jne bad (rel32, patched)
    };
    let select = |c: &mut Vec<u8>, reg: u32| {
        c.push(0xb8); // mov eax, f | reg
        c.extend_from_slice(&(f | reg).to_le_bytes());
        c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x0c, 0xef]); // mov dx, 0xcf8; out dx, eax
        c.extend_from_slice(&[0x66, 0xba, 0xfc, 0x0c]); // mov dx, 0xcfc
    };
    let read = |c: &mut Vec<u8>, reg: u32| {
        select(c, reg);
        c.push(0xed); // in eax, dx
    };
    let write = |c: &mut Vec<u8>, reg: u32, v: u32| {
        select(c, reg);
        c.push(0xb8); // mov eax, v
        c.extend_from_slice(&v.to_le_bytes());
        c.push(0xef); // out dx, eax
    };
    read(&mut c, 0x00);
    check(&mut c, &mut jumps, 0x1005_1af4);
    write(&mut c, 0x04, 0x0007); // I/O, memory, bus master
    // BAR0: I/O at 0xc000 (the first I/O BAR placed), 32 bytes.
    read(&mut c, 0x10);
    check(&mut c, &mut jumps, 0xc001);
    write(&mut c, 0x10, 0xffff_ffff);
    read(&mut c, 0x10);
    check(&mut c, &mut jumps, 0xffff_ffe1);
    write(&mut c, 0x10, 0xc000);
    // BAR1: 32-bit memory, 4 KiB; the placed address is kept in esi and restored.
    read(&mut c, 0x14);
    c.extend_from_slice(&[0x89, 0xc6]); // mov esi, eax
    write(&mut c, 0x14, 0xffff_ffff);
    read(&mut c, 0x14);
    check(&mut c, &mut jumps, 0xffff_f000);
    select(&mut c, 0x14);
    c.extend_from_slice(&[0x89, 0xf0, 0xef]); // mov eax, esi; out dx, eax
    read(&mut c, 0x10);
    check(&mut c, &mut jumps, 0xc001);
    // The legacy header: select queue 0 (0xc00e), read its size (0xc00c): 8, as QEMU's rng.
    c.extend_from_slice(&[0x66, 0xba, 0x0e, 0xc0, 0x31, 0xc0, 0x66, 0xef]); // out 0xc00e, ax=0
    c.extend_from_slice(&[0x66, 0xba, 0x0c, 0xc0, 0x66, 0xed]); // mov dx, 0xc00c; in ax, dx
    c.extend_from_slice(&[0x0f, 0xb7, 0xc0]); // movzx eax, ax
    check(&mut c, &mut jumps, 8);
    let bad = c.len() + 4;
    c[j1 + 1] = (bad - (j1 + 2)) as u8;
    c[j2 + 1] = (bad - (j2 + 2)) as u8;
    for j in jumps {
        let rel = (bad - (j + 6)) as u32;
        c[j + 2..j + 6].copy_from_slice(&rel.to_le_bytes());
    }
    c.extend_from_slice(&[0xb0, 0x10, 0xeb, 0x02]); // mov al, 0x10; jmp out
    c.extend_from_slice(&[0xb0, 0x11]); // bad: mov al, 0x11
    c.extend_from_slice(&[0x66, 0xba, 0xf4, 0x00, 0xee, 0xf4]); // out 0xf4, al; hlt
    c
}

fn scan(accel: &dyn Accelerator, cpus: u32) {
    let elf = std::env::temp_dir().join(format!(
        "keel-pc-scan-{}-{}-{cpus}.elf",
        std::process::id(),
        accel.name()
    ));
    std::fs::write(&elf, pvh_elf(&pci_scan_code())).unwrap();
    let cfg = PcConfig {
        memory: 64 << 20,
        cpus,
        kernel: Some(elf.clone()),
        serial: SerialBackend::Null,
        ..PcConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut pc = Pc::new(cfg, accel, Arc::new(tx)).unwrap();
    pc.add_debug_exit(keel_devices::DebugExitConfig::new(0xf4, 4).unwrap())
        .unwrap();
    let a = keel_pci::PciAddress::new(3, 0).unwrap();
    let rng = Arc::new(std::sync::Mutex::new(keel_virtio::Rng::with_source(
        Box::new(std::io::repeat(1)),
    )));
    let t = keel_pci::VirtioPci::new(
        rng,
        pc.memory().clone(),
        pc.intx_line(3, 0x18).unwrap(),
        pc.msi_sink(),
    )
    .unwrap();
    pc.add_pci_function(a, Arc::new(t)).unwrap();
    pc.finish_init().unwrap();
    std::fs::remove_file(&elf).ok();
    pc.start().unwrap();
    let ev = rx.recv_timeout(Duration::from_secs(60));
    pc.shutdown();
    assert_eq!(ev, Ok(MachineEvent::System(SystemEvent::Exit(33))));
}

#[test]
fn pvh_guest_scans_pci_under_tcg() {
    scan(&keel_tcg::TcgAccel::new(), 1);
    scan(&keel_tcg::TcgAccel::new(), 2);
}

#[test]
fn pvh_guest_scans_pci_under_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is absent on this host");
        return;
    }
    let accel = match keel_kvm::KvmAccel::new() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("skipping: KVM is not usable here: {e}");
            return;
        }
    };
    scan(&accel, 1);
    scan(&accel, 2);
}

/// Whether the mapping holding host address `addr` has the kernel's "do not dump" flag
/// (`dd` in `/proc/self/smaps`' VmFlags).
fn excluded_from_core_dumps(addr: usize) -> bool {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = (lo..hi).contains(&addr);
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return flags.split_whitespace().any(|f| f == "dd");
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// `-machine pc,dump-guest-core=off`: every RAM region is `MADV_DONTDUMP`; by default
/// (QEMU's `on`) none is.
#[test]
fn dump_guest_core_off_excludes_pc_ram_from_core_dumps() {
    use vm_memory::GuestMemoryBackend;
    for (setting, excluded) in [
        (keel_machine::OnOffAuto::Off, true),
        (keel_machine::OnOffAuto::Auto, false),
    ] {
        let cfg = PcConfig {
            memory: 64 << 20,
            serial: SerialBackend::Null,
            dump_guest_core: setting,
            ..PcConfig::default()
        };
        let (tx, _rx) = mpsc::channel();
        let mut pc = Pc::new(cfg, &keel_tcg::TcgAccel::new(), Arc::new(tx)).unwrap();
        for region in pc.memory().iter() {
            let addr = region.as_ptr() as usize;
            assert_eq!(excluded_from_core_dumps(addr), excluded, "{setting:?}");
        }
        pc.shutdown();
    }
}
