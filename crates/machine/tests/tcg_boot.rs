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
    vm.add_debug_exit(keel_devices::DebugExitConfig::new(0xf4, 4).unwrap())
        .unwrap();
    vm.finish_init().unwrap();
    std::fs::remove_file(&path).unwrap();
    let ev = run_until_event(&mut vm, &rx);
    assert_eq!(cap.text(), "Hello, PVH!\n");
    assert_eq!(ev, MachineEvent::System(SystemEvent::Exit(33)));
}

/// Typing reaches the guest through the receive interrupt: IRQ 4 through the 8259 into the
/// guest's handler, which echoes each byte. (Under this host's KVM-PVM the same guest stops at
/// its first `iret`, which the host's instruction emulator cannot handle, so it runs on tcg.)
#[test]
fn serial_input_is_interrupt_driven_under_tcg() {
    let accel = keel_tcg::TcgAccel::new();
    let elf = common::assemble("serial_rx_irq");
    let cap = Capture::new();
    let cfg = MicrovmConfig {
        kernel: Some(elf.clone()),
        serial: SerialBackend::Capture(cap.clone()),
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    vm.add_debug_exit(keel_devices::DebugExitConfig::new(0xf4, 2).unwrap())
        .unwrap();
    vm.finish_init().unwrap();
    vm.start().unwrap();
    let wait_for = |want: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while cap.text() != want {
            assert!(std::time::Instant::now() < deadline, "got {:?}", cap.text());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    };
    wait_for(">");
    let serial = vm.serial().unwrap().clone();
    assert_eq!(serial.enqueue_input(b"abc"), 3);
    wait_for(">bcd");
    serial.enqueue_input(b"q");
    let ev = rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap();
    vm.shutdown();
    std::fs::remove_dir_all(elf.parent().unwrap()).unwrap();
    assert_eq!(ev, MachineEvent::System(SystemEvent::Exit(11)));
}

#[test]
fn pause_resume_and_reset_a_running_guest_under_tcg() {
    common::pause_resume_reset(&keel_tcg::TcgAccel::new(), 1);
}

/// The interpreter has no IOAPIC: the MADT advertises none and virtio-mmio devices get free
/// ISA IRQs instead of GSIs 16-23.
#[test]
fn without_an_ioapic_virtio_gets_isa_irqs_and_the_madt_lists_none() {
    struct Window;
    impl keel_accel::BusDevice for Window {
        fn read(&self, _o: u64, d: &mut [u8]) {
            d.fill(0);
        }
        fn write(&self, _o: u64, _d: &[u8]) {}
    }
    let accel = keel_tcg::TcgAccel::new();
    let cfg = MicrovmConfig {
        serial: SerialBackend::Null,
        ..MicrovmConfig::default()
    };
    let (tx, _rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    assert!(!vm.resolved().ioapic);
    let gsis: Vec<u32> = (0..7)
        .map(|_| vm.add_virtio_mmio(Arc::new(Window)).unwrap().gsi)
        .collect();
    assert_eq!(gsis, [5, 6, 10, 11, 12, 14, 3]);
    assert!(vm.add_virtio_mmio(Arc::new(Window)).is_err());
    vm.finish_init().unwrap();
    use vm_memory::{Bytes, GuestAddress};
    let mut rsdp = [0u8; 36];
    vm.memory()
        .read_slice(&mut rsdp, GuestAddress(keel_machine::layout::ACPI_START))
        .unwrap();
    let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let mut x = [0u8; 52];
    vm.memory().read_slice(&mut x, GuestAddress(xsdt)).unwrap();
    let madt_addr = u64::from_le_bytes(x[44..52].try_into().unwrap());
    let mut hdr = [0u8; 8];
    vm.memory()
        .read_slice(&mut hdr, GuestAddress(madt_addr))
        .unwrap();
    let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
    let mut madt = vec![0u8; len];
    vm.memory()
        .read_slice(&mut madt, GuestAddress(madt_addr))
        .unwrap();
    // Walk the entries: one local APIC, one LAPIC NMI, no IOAPIC (type 1).
    let mut types = Vec::new();
    let mut off = 44;
    while off + 2 <= madt.len() {
        types.push(madt[off]);
        off += usize::from(madt[off + 1]).max(2);
    }
    assert_eq!(types, [0, 4]);
}

/// Without an IOAPIC the machine maps the ACPI PM block at 0x600 (what the full FADT points
/// at): the PM timer counts, SCI_EN reads set, and SLP_EN with `\_S5`'s type powers off.
#[test]
fn tcg_machine_maps_the_acpi_pm_block_and_s5_powers_off() {
    use keel_accel::PioAddress;
    let accel = keel_tcg::TcgAccel::new();
    let cfg = MicrovmConfig {
        serial: SerialBackend::Null,
        ..MicrovmConfig::default()
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &accel, Arc::new(tx)).unwrap();
    vm.finish_init().unwrap();
    let pm = vm
        .device_info()
        .into_iter()
        .find(|d| d.type_name == "acpi-pm")
        .unwrap();
    assert_eq!((pm.pio, pm.gsi), (vec![(0x600, 12)], Some(9)));
    let ged = vm
        .device_info()
        .into_iter()
        .find(|d| d.type_name == "acpi-ged")
        .unwrap();
    assert_eq!(ged.gsi, None, "the SCI, not the GED, owns IRQ 9");
    let timer = |vm: &Microvm| {
        let mut b = [0u8; 4];
        vm.buses().pio_read(PioAddress(0x608), &mut b);
        u32::from_le_bytes(b)
    };
    let t0 = timer(&vm);
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_ne!(timer(&vm), t0);
    let mut cnt = [0u8; 2];
    vm.buses().pio_read(PioAddress(0x604), &mut cnt);
    assert_eq!(cnt[0] & 1, 1, "SCI_EN");
    assert!(vm.power_button());
    let mut sts = [0u8; 2];
    vm.buses().pio_read(PioAddress(0x600), &mut sts);
    assert_eq!(u16::from_le_bytes(sts) & (1 << 8), 1 << 8, "PWRBTN_STS");
    vm.buses()
        .pio_write(PioAddress(0x604), &((1u16 << 13) | (5 << 10)).to_le_bytes());
    assert_eq!(
        rx.try_recv().unwrap(),
        MachineEvent::System(SystemEvent::Shutdown)
    );
}
