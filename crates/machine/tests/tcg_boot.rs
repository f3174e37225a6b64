//! The same guests as kvm_boot.rs under the interpreter (tcg): no host support needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, mpsc};

use keel_accel::SystemEvent;
use keel_machine::{Capture, MachineEvent, Microvm, MicrovmConfig, SerialBackend};

use common::{hello_code, pvh_elf, run_until_event};

#[test]
fn demo_guest_prints_banner_and_powers_off_under_tcg() {
    let accel = keel_tcg::TcgAccel::new();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    assert!(vm.resolved().rtc, "rtc=auto is on under tcg, as in QEMU");
    vm.finish_init().unwrap();
    let ev = run_until_event(&mut vm, &rx);
    assert_eq!(
        cap.text(),
        "Hello from the Keel demo guest, running on tcg\n"
    );
    assert_eq!(ev, MachineEvent::System(SystemEvent::Shutdown));
}

#[test]
fn hello_pvh_guest_under_tcg_exits_through_isa_debug_exit() {
    let accel = keel_tcg::TcgAccel::new();
    let path = std::env::temp_dir().join(format!("keel-hello-tcg-{}.elf", std::process::id()));
    std::fs::write(&path, pvh_elf(&hello_code())).unwrap();
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        kernel: Some(path.clone()),
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
    std::fs::remove_file(&path).unwrap();
    let ev = run_until_event(&mut vm, &rx);
    assert_eq!(cap.text(), "Hello, PVH!\n");
    assert_eq!(ev, MachineEvent::System(SystemEvent::Exit(33)));
}
