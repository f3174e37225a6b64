//! The floor for a short-lived VM on this host: the least a VMM can do with kvm-ioctls to run
//! a guest that prints a line on COM1 and exits, with nothing of Keel in between.
//!
//! `cargo run --release -p keel-kvm --example bare_hello` creates a VM with 128 MiB of RAM
//! (one memory slot), the in-kernel irqchip and one vCPU in real mode, runs a guest that
//! writes 50 bytes to port 0x3f8 and then 0 to port 0xf4, writes each byte to stdout and exits
//! with status 1 (isa-debug-exit's `(0 << 1) | 1`). Timing it from process start to exit next
//! to `vmm` on a hello guest shows how much of a VMM's start-to-exit time is the host
//! kernel's (VM creation, SRCU grace periods when memory slots, IRQ routes and the VM are set
//! up and torn down) rather than the VMM's own work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

const RAM: usize = 128 << 20;
const CODE: u64 = 0x1000;

fn main() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.set_identity_map_address(0xfffb_c000)
        .expect("identity map");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    // SAFETY: an anonymous private mapping of RAM bytes; no file, no fixed address.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED, "mmap");
    // mov dx,0x3f8 ; mov cx,50 ; l: mov al,'k' ; out dx,al ; loop l ; mov al,0 ; out 0xf4,al
    let code: [u8; 15] = [
        0xba, 0xf8, 0x03, 0xb9, 0x32, 0x00, 0xb0, 0x6b, 0xee, 0xe2, 0xfb, 0xb0, 0x00, 0xe6, 0xf4,
    ];
    // SAFETY: `mem` is RAM bytes long and writable; CODE + 15 is inside it.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            (mem as *mut u8).add(CODE as usize),
            code.len(),
        )
    };
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the mapping lives until the process exits, longer than the VM.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut s = vcpu.get_sregs().expect("sregs");
    s.cs.base = 0;
    s.cs.selector = 0;
    vcpu.set_sregs(&s).expect("set sregs");
    let mut r = vcpu.get_regs().expect("regs");
    r.rip = CODE;
    r.rflags = 2;
    vcpu.set_regs(&r).expect("set regs");
    let mut out = std::io::stdout().lock();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x3f8, data) => {
                let _ = out.write_all(data);
                let _ = out.flush();
            }
            VcpuExit::IoOut(0xf4, data) => {
                std::process::exit(i32::from(data[0]) << 1 | 1);
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}
