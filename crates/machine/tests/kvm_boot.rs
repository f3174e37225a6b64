//! Boots real guests on the microvm machine under KVM (skipped with a message when /dev/kvm
//! is absent or unusable).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, mpsc};
use std::time::Duration;

use keel_accel::{Accelerator, SystemEvent};
use keel_machine::{Capture, MachineEvent, Microvm, MicrovmConfig, SerialBackend};

fn kvm() -> Option<keel_kvm::KvmAccel> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is absent on this host");
        return None;
    }
    match keel_kvm::KvmAccel::new() {
        Ok(a) => Some(a),
        Err(e) => {
            eprintln!("skipping: KVM is not usable here: {e}");
            None
        }
    }
}

/// A minimal ELF64 with one PT_LOAD of `code` at 1 MiB and a PVH note pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
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
fn hello_code() -> Vec<u8> {
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

fn run_until_event(vm: &mut Microvm, rx: &mpsc::Receiver<MachineEvent>) -> MachineEvent {
    vm.start().unwrap();
    let ev = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the guest did not finish in time");
    vm.shutdown();
    ev
}

#[test]
fn demo_guest_prints_banner_and_powers_off_under_kvm() {
    let Some(accel) = kvm() else { return };
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    vm.finish_init().unwrap();
    let ev = run_until_event(&mut vm, &rx);
    assert_eq!(
        cap.text(),
        "Hello from the Keel demo guest, running on kvm\n"
    );
    assert_eq!(ev, MachineEvent::System(SystemEvent::Shutdown));
}

#[test]
fn hello_pvh_guest_under_kvm_exits_through_isa_debug_exit() {
    let Some(accel) = kvm() else { return };
    let dir = std::env::temp_dir().join(format!("keel-hello-{}.elf", std::process::id()));
    std::fs::write(&dir, pvh_elf(&hello_code())).unwrap();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        memory: 128 << 20,
        kernel: Some(dir.clone()),
        append: "console=ttyS0".into(),
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    vm.add_device(
        "isa-debug-exit",
        &[
            ("iobase".into(), "0xf4".into()),
            ("iosize".into(), "0x04".into()),
        ],
    )
    .unwrap();
    vm.finish_init().unwrap();
    std::fs::remove_file(&dir).unwrap();

    // The start info the guest will see, read back from guest memory.
    use vm_memory::{Bytes, GuestAddress};
    let mut info = [0u8; 56];
    vm.memory()
        .read_slice(&mut info, GuestAddress(keel_machine::layout::PVH_INFO_ADDR))
        .unwrap();
    assert_eq!(&info[0..4], &0x336e_c578u32.to_le_bytes());
    let cmdline_addr = u64::from_le_bytes(info[24..32].try_into().unwrap());
    let mut cl = [0u8; 14];
    vm.memory()
        .read_slice(&mut cl, GuestAddress(cmdline_addr))
        .unwrap();
    assert_eq!(&cl, b"console=ttyS0\0");
    let rsdp = u64::from_le_bytes(info[32..40].try_into().unwrap());
    let mut sig = [0u8; 8];
    vm.memory()
        .read_slice(&mut sig, GuestAddress(rsdp))
        .unwrap();
    assert_eq!(&sig, b"RSD PTR ");
    assert_eq!(u32::from_le_bytes(info[48..52].try_into().unwrap()), 4);

    let ev = run_until_event(&mut vm, &rx);
    assert_eq!(cap.text(), "Hello, PVH!\n");
    assert_eq!(ev, MachineEvent::System(SystemEvent::Exit(33)));
}

#[test]
fn pause_resume_and_reset_a_running_guest_under_kvm() {
    let Some(accel) = kvm() else { return };
    // Prints "A" and spins forever.
    let code = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee, 0xeb, 0xfe];
    let dir = std::env::temp_dir().join(format!("keel-spin-{}.elf", std::process::id()));
    std::fs::write(&dir, pvh_elf(&code)).unwrap();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        kernel: Some(dir.clone()),
        cpus: 2,
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
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
    let cpus = vm.cpu_info();
    assert_eq!(cpus.len(), 2);
    assert!(cpus.iter().all(|c| c.thread_id.is_some_and(|t| t > 0)));
    vm.resume();
    // Reset reloads the image and restarts the bootstrap processor: a second "A".
    vm.reset().unwrap();
    wait_for("AA");
    vm.shutdown();
    std::fs::remove_file(&dir).unwrap();
    assert!(rx.try_recv().is_err(), "no system event expected");
    let _ = accel.name();
}
