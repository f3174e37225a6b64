//! What the real-KVM test files share: the skip-or-accelerator opening, a system-event
//! recorder, the machine requirements of a test VM and a real-mode start at a given address.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Mutex;

use keel_accel::{IrqChip, MachineRequirements, SystemEvent, SystemEvents, Vcpu};
use keel_kvm::{KvmAccel, KvmOptions};

/// Records the system events a VM requests.
#[derive(Default)]
pub struct Events(pub Mutex<Vec<SystemEvent>>);

impl SystemEvents for Events {
    fn request(&self, event: SystemEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// KVM with `opts`, or `None` after printing why the test skips (no usable /dev/kvm).
pub fn accel(opts: KvmOptions) -> Option<KvmAccel> {
    match KvmAccel::with_options(opts) {
        Ok(a) => Some(a),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// KVM without the in-kernel irqchip, so `hlt` exits to userspace.
pub fn no_irqchip() -> KvmOptions {
    KvmOptions {
        in_kernel_irqchip: false,
    }
}

/// The requirements of a test VM of `vcpus` vCPUs and `memory` bytes of RAM.
pub fn requirements(machine: &str, vcpus: u32, memory: u64, pit: bool) -> MachineRequirements {
    MachineRequirements {
        machine: machine.into(),
        vcpus,
        memory,
        irqchip: IrqChip::PicIoapic,
        pit,
    }
}

/// Puts `vcpu` in real mode with flat zero-based CS/DS/ES/SS at `rip`, stack at 0x8000.
pub fn start_real_mode(vcpu: &mut dyn Vcpu, rip: u64) {
    let mut s = vcpu.sregs().unwrap();
    for seg in [&mut s.cs, &mut s.ds, &mut s.es, &mut s.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&s).unwrap();
    let mut r = vcpu.regs().unwrap();
    r.rip = rip;
    r.rsp = 0x8000;
    r.rflags = 2;
    vcpu.set_regs(&r).unwrap();
}
