//! Boots real guests on the microvm machine under KVM (skipped with a message when /dev/kvm
//! is absent or unusable).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, mpsc};

use common::{hello_code, pvh_elf, run_until_event};

use keel_accel::SystemEvent;
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
    vm.add_debug_exit(keel_devices::DebugExitConfig::new(0xf4, 4).unwrap())
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
    common::pause_resume_reset(&accel, 2);
}
