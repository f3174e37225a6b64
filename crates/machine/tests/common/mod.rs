//! Shared helpers for the boot tests: tiny PVH guests built in code.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use keel_machine::{MachineEvent, Microvm};

/// A minimal ELF64 with one PT_LOAD of `code` at 1 MiB and a PVH note pointing at it.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let note_off = 64 + 2 * 56;
    let note: Vec<u8> = [
        &4u32.to_le_bytes()[..],
        &4u32.to_le_bytes(),
        &18u32.to_le_bytes(),
        b"Xen\0",
        &0x10_0000u32.to_le_bytes(),
    ]
    .concat();
    let code_off = (note_off + note.len()) as u64;
    let mut b = vec![0u8; note_off];
    b[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&2u16.to_le_bytes());
    let ph = |b: &mut Vec<u8>, i: usize, kind: u32, off: u64, addr: u64, size: u64| {
        let o = 64 + i * 56;
        b[o..o + 4].copy_from_slice(&kind.to_le_bytes());
        b[o + 8..o + 16].copy_from_slice(&off.to_le_bytes());
        b[o + 16..o + 24].copy_from_slice(&addr.to_le_bytes());
        b[o + 24..o + 32].copy_from_slice(&addr.to_le_bytes());
        b[o + 32..o + 40].copy_from_slice(&size.to_le_bytes());
        b[o + 40..o + 48].copy_from_slice(&size.to_le_bytes());
    };
    ph(&mut b, 0, 1, code_off, 0x10_0000, code.len() as u64);
    ph(&mut b, 1, 4, note_off as u64, 0, note.len() as u64);
    b.extend_from_slice(&note);
    b.extend_from_slice(code);
    b
}

/// Checks the start-info magic at [ebx], prints "Hello, PVH!\n" on COM1, and writes 0x10 to
/// isa-debug-exit at 0xf4 (status 33), or 0x11 (status 35) if the magic is wrong.
pub fn hello_code() -> Vec<u8> {
    let mut c = vec![
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
        0x75, 0x15, // jne bad
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xbe, 0x25, 0x00, 0x10, 0x00, // mov esi, msg
        0xac, // lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp lodsb
        0xb0, 0x10, // done: mov al, 0x10
        0xeb, 0x02, // jmp out
        0xb0, 0x11, // bad: mov al, 0x11
        0x66, 0xba, 0xf4, 0x00, // out: mov dx, 0xf4
        0xee, // out dx, al
        0xf4, // hlt
    ];
    assert_eq!(c.len(), 37);
    c.extend_from_slice(b"Hello, PVH!\n\0");
    c
}

pub fn run_until_event(vm: &mut Microvm, rx: &mpsc::Receiver<MachineEvent>) -> MachineEvent {
    vm.start().unwrap();
    let ev = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the guest did not finish in time");
    vm.shutdown();
    ev
}

/// Assembles `tests/guests/NAME.S` with GNU as/ld (binutils, as the crate's build script) into
/// a PVH ELF linked like the demo guest, and returns its path.
pub fn assemble(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("keel-guest-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj = dir.join("guest.o");
    let elf = dir.join("guest.elf");
    let ok = std::process::Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&obj)
        .arg(root.join("tests/guests").join(format!("{name}.S")))
        .status()
        .unwrap()
        .success();
    assert!(ok, "as failed on {name}.S");
    let ok = std::process::Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-static",
            "-nostdlib",
            "--build-id=none",
        ])
        .args(["-z", "noexecstack", "--no-warn-rwx-segments", "-T"])
        .arg(root.join("src/demo/demo.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&obj)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ld failed on {name}");
    elf
}

/// Boots a guest that prints "A" and spins, pauses it (every vCPU parks, thread ids known),
/// resumes it, resets it (a second "A": the image was reloaded and the BSP restarted) and
/// shuts it down; no system event may arrive.
pub fn pause_resume_reset(accel: &dyn keel_accel::Accelerator, cpus: u32) {
    use keel_machine::{Capture, MicrovmConfig, SerialBackend};
    use std::sync::Arc;
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xeb, 0xfe];
    let path = std::env::temp_dir().join(format!(
        "keel-spin-{}-{}.elf",
        accel.name(),
        std::process::id()
    ));
    std::fs::write(&path, pvh_elf(&code)).unwrap();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        kernel: Some(path.clone()),
        cpus,
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, accel, Arc::new(tx)).unwrap();
    vm.finish_init().unwrap();
    vm.start().unwrap();
    let wait_for = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while cap.text() != want {
            assert!(std::time::Instant::now() < deadline, "got {:?}", cap.text());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for("A");
    vm.pause();
    assert!(vm.is_paused());
    let cpu_info = vm.cpu_info();
    assert_eq!(cpu_info.len(), cpus as usize);
    assert!(cpu_info.iter().all(|c| c.thread_id.is_some_and(|t| t > 0)));
    vm.resume();
    vm.reset().unwrap();
    wait_for("AA");
    vm.shutdown();
    std::fs::remove_file(&path).unwrap();
    assert!(rx.try_recv().is_err(), "no system event expected");
}
