//! `Vm::register_ioevent` / `Vm::register_irqfd` on the real `/dev/kvm` (skips where it
//! cannot be used): a matching guest write signals the eventfd without an exit, any other
//! write (other value, other width) exits as usual, and deregistration restores the exit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use keel_accel::{
    AccelError, Accelerator, EventFd, ExitAction, GuestMemory, IoBuses, IoEventMatch, MmioAddress,
    VcpuExit, handle_exit,
};
use keel_kvm::KvmOptions;
use vm_memory::{Bytes, GuestAddress};

use common::{Events, accel, requirements, start_real_mode};

const NOTIFY: u64 = 0xd0050;

#[test]
fn matching_writes_signal_the_eventfd_without_an_exit() {
    let Some(accel) = accel(KvmOptions::default()) else {
        return;
    };
    // mov ax,0xd000 ; mov ds,ax
    // mov dword [0x50],1 ; mov dword [0x50],2 ; mov word [0x50],1 ; mov dword [0x50],1
    // out 0x99,al (the end: with the in-kernel irqchip a hlt would not exit)
    #[rustfmt::skip]
    let code = [
        0xb8, 0x00, 0xd0, 0x8e, 0xd8,
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x02, 0x00, 0x00, 0x00,
        0xc7, 0x06, 0x50, 0x00, 0x01, 0x00,
        0x66, 0xc7, 0x06, 0x50, 0x00, 0x01, 0x00, 0x00, 0x00,
        0xe6, 0x99,
    ];
    // 64 KiB of RAM, so 0xd0000 is MMIO.
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    mem.write_slice(&code, GuestAddress(0x1000)).unwrap();
    let req = requirements("test", 1, 0x10000, false);
    let buses = Arc::new(IoBuses::new());
    let vm = accel
        .create_vm(&req, mem, buses.clone(), Arc::new(Events::default()))
        .unwrap();
    let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let m = IoEventMatch::U32(1);
    vm.register_ioevent(MmioAddress(NOTIFY), m, &fd).unwrap();
    // The same address and match twice is refused by KVM.
    let again = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(vm.register_ioevent(MmioAddress(NOTIFY), m, &again).is_err());

    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(vcpu.as_mut(), 0x1000);

    let mut writes = Vec::new();
    let mut unregistered = false;
    for _ in 0..1000 {
        let exit = vcpu.run().unwrap();
        match exit {
            VcpuExit::MmioWrite { addr, size, data } => {
                writes.push((addr.0, size, data));
                // After the two non-matching writes, drop the registration: the last
                // (matching) write must exit now.
                if writes.len() == 2 && !unregistered {
                    assert_eq!(fd.read().unwrap(), 1, "one matching write so far");
                    vm.unregister_ioevent(MmioAddress(NOTIFY), m, &fd).unwrap();
                    unregistered = true;
                }
            }
            VcpuExit::IoOut { port, .. } if port.0 == 0x99 => break,
            other => {
                if let ExitAction::CompleteRead(v) = handle_exit(&other, &buses) {
                    vcpu.complete_read(v);
                }
            }
        }
    }
    assert_eq!(
        writes,
        [(NOTIFY, 4, 2), (NOTIFY, 2, 1), (NOTIFY, 4, 1)],
        "only the matching 4-byte write was absorbed"
    );
    assert!(fd.read().is_err(), "nothing signalled after deregistration");
}

#[test]
fn irqfd_needs_a_valid_gsi_and_can_be_removed() {
    let Some(accel) = accel(KvmOptions::default()) else {
        return;
    };
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    let req = requirements("test", 1, 0x10000, false);
    let vm = accel
        .create_vm(
            &req,
            mem,
            Arc::new(IoBuses::new()),
            Arc::new(Events::default()),
        )
        .unwrap();
    let trigger = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    assert!(matches!(
        vm.register_irqfd(24, &trigger, Some(&resample)),
        Err(AccelError::Incompatible { .. })
    ));
    vm.register_irqfd(17, &trigger, Some(&resample)).unwrap();
    trigger.write(1).unwrap();
    vm.unregister_irqfd(17, &trigger).unwrap();
    let plain = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(5, &plain, None).unwrap();
    plain.write(1).unwrap();
    vm.unregister_irqfd(5, &plain).unwrap();
}

/// `Vm::signal_msi` is `KVM_SIGNAL_MSI`: a message to an existing local APIC is accepted
/// (the in-kernel APIC decodes it), whether or not the guest has its APIC enabled yet.
#[test]
fn signal_msi_reaches_the_in_kernel_apic() {
    let Some(accel) = accel(KvmOptions::default()) else {
        return;
    };
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
    let req = requirements("test", 1, 0x10000, false);
    let vm = accel
        .create_vm(
            &req,
            mem,
            Arc::new(IoBuses::new()),
            Arc::new(Events::default()),
        )
        .unwrap();
    let _vcpu = vm.create_vcpu(0).unwrap();
    vm.signal_msi(0xfee0_0000, 0x0041).unwrap();
}
