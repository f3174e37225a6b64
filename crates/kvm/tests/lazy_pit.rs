//! The in-kernel PIT appears on the guest's first access to its ports, and that first access
//! is not lost: it is executed again against the new PIT.
//!
//! Each test skips (prints why and returns) where `/dev/kvm` cannot be used.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use keel_accel::{ExitAction, GuestMemory, IoBuses, Vcpu, VcpuExit, Vm, handle_exit};
use keel_kvm::{KvmOptions, KvmVm};
use vm_memory::{Bytes, GuestAddress};

use common::{Events, accel, requirements, start_real_mode};

const RAM: u64 = 0x10_0000;
const CODE: u64 = 0x1000;

/// A real-mode guest at 0:0x1000 on a VM that wants a PIT (`pit`), with the in-kernel irqchip.
fn guest(code: &[u8], pit: bool) -> Option<(KvmVm, Box<dyn Vcpu>)> {
    let accel = accel(KvmOptions::default())?;
    let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap());
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let req = requirements("microvm", 1, RAM, pit);
    let vm = accel
        .create_kvm_vm(&req, mem, Arc::new(Events::default()))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    start_real_mode(vcpu.as_mut(), CODE);
    Some((vm, vcpu))
}

/// Runs to the guest's final `out 0x99, al` (`hlt` would block in the kernel: the irqchip is
/// in-kernel), returning every other port access that reached userspace.
fn run_to_done(vcpu: &mut dyn Vcpu) -> Vec<VcpuExit> {
    let buses = IoBuses::new();
    let mut io = Vec::new();
    for _ in 0..1000 {
        let exit = vcpu.run().unwrap();
        if matches!(exit, VcpuExit::IoOut { port, .. } if port.0 == 0x99) {
            return io;
        }
        match handle_exit(&exit, &buses) {
            ExitAction::Resume => io.push(exit),
            ExitAction::CompleteRead(v) => {
                io.push(exit);
                vcpu.complete_read(v);
            }
            other => panic!("unexpected {exit:?} -> {other:?}"),
        }
    }
    panic!("the guest did not finish");
}

#[test]
fn a_guest_that_never_touches_the_pit_gets_none() {
    // out 0x80, al ; out 0x99,al
    let Some((vm, mut vcpu)) = guest(&[0xe6, 0x80, 0xe6, 0x99], true) else {
        return;
    };
    let io = run_to_done(vcpu.as_mut());
    assert_eq!(io.len(), 1, "{io:?}");
    assert!(!vm.pit_created());
    assert!(vm.vm_fd().get_pit2().is_err(), "KVM has a PIT");
}

#[test]
fn the_first_write_is_replayed_against_the_new_pit() {
    // mov al,0xb4 ; out 0x43,al    (channel 2, lobyte/hibyte, mode 2, binary: first access)
    // mov al,0x34 ; out 0x42,al ; mov al,0x12 ; out 0x42,al   (count 0x1234)
    // out 0x99,al
    let code = [
        0xb0, 0xb4, 0xe6, 0x43, 0xb0, 0x34, 0xe6, 0x42, 0xb0, 0x12, 0xe6, 0x42, 0xe6, 0x99,
    ];
    let Some((vm, mut vcpu)) = guest(&code, true) else {
        return;
    };
    assert!(!vm.pit_created());
    let io = run_to_done(vcpu.as_mut());
    assert!(io.is_empty(), "PIT accesses reached userspace: {io:?}");
    assert!(vm.pit_created());
    let st = vm.vm_fd().get_pit2().unwrap();
    let ch2 = st.channels[2];
    // Had the mode write been lost, the channel would still be in its reset state (mode 0xff
    // for KVM) and the two count bytes would have been taken as one access each.
    assert_eq!((ch2.mode, ch2.rw_mode), (2, 3), "{ch2:?}");
    assert_eq!(ch2.count, 0x1234, "{ch2:?}");
}

#[test]
fn the_first_read_is_replayed_and_keeps_the_other_register_bits() {
    // mov ax,0xab00 ; in al,0x61 (first access: speaker/gate port) ; mov bx,ax
    // mov al,1 ; out 0x61,al (gate 2 on) ; in al,0x61 ; out 0x99,al
    let code = [
        0xb8, 0x00, 0xab, 0xe4, 0x61, 0x89, 0xc3, 0xb0, 0x01, 0xe6, 0x61, 0xe4, 0x61, 0xe6, 0x99,
    ];
    let Some((vm, mut vcpu)) = guest(&code, true) else {
        return;
    };
    let io = run_to_done(vcpu.as_mut());
    assert!(io.is_empty(), "PIT accesses reached userspace: {io:?}");
    assert!(vm.pit_created());
    let r = vcpu.regs().unwrap();
    // AH survived the replayed `in`; port 0x61 bit 0 reads back the gate set by the `out`.
    assert_eq!(r.rbx >> 8 & 0xff, 0xab, "bx {:#x}", r.rbx);
    assert_eq!(r.rax & 1, 1, "ax {:#x}", r.rax);
}

#[test]
fn without_a_pit_the_ports_are_ordinary_exits() {
    // in al,0x61 ; out 0x99,al
    let Some((vm, mut vcpu)) = guest(&[0xe4, 0x61, 0xe6, 0x99], false) else {
        return;
    };
    let io = run_to_done(vcpu.as_mut());
    assert_eq!(io.len(), 1, "{io:?}");
    assert!(!vm.pit_created());
    // Unassigned ports read as all ones.
    assert_eq!(vcpu.regs().unwrap().rax & 0xff, 0xff);
}

#[test]
fn vm_reset_restores_a_lazily_created_pit() {
    let code = [
        0xb0, 0xb4, 0xe6, 0x43, 0xb0, 0x34, 0xe6, 0x42, 0xb0, 0x12, 0xe6, 0x42, 0xe6, 0x99,
    ];
    let Some((vm, mut vcpu)) = guest(&code, true) else {
        return;
    };
    Vm::reset(&vm).unwrap(); // no PIT yet: nothing to do
    run_to_done(vcpu.as_mut());
    assert_eq!(vm.vm_fd().get_pit2().unwrap().channels[2].mode, 2);
    Vm::reset(&vm).unwrap();
    assert_ne!(vm.vm_fd().get_pit2().unwrap().channels[2].mode, 2);
}
