//! The in-kernel PIT, created on the guest's first touch of its ports.
//!
//! `KVM_CREATE_PIT2` itself is cheap, but a VM that has a PIT pays for it when it is destroyed:
//! the PIT's interrupt-ack and mask notifiers are unregistered with a full (non-expedited)
//! `synchronize_srcu` each, which on the hosts measured here is about 10 ms, the largest single
//! cost of a short-lived VM (process start to exit of a hello guest: ~30 ms with the PIT
//! created up front, ~20 ms without). Guests that never program the PIT (PVH test guests,
//! kernels that calibrate from CPUID or kvmclock) should not pay it; Linux on a PC machine
//! does touch it and then gets exactly the PIT it would have had.
//!
//! How: until the PIT exists, nothing in the kernel claims ports 0x40–0x43 and 0x61, so the
//! first guest access exits to userspace. At that exit RIP still points at the `in`/`out`
//! (KVM advances it when userspace completes the I/O, and skips that step when userspace has
//! moved RIP). The vCPU then creates the PIT, lets KVM finish the pending I/O without entering
//! the guest (`KVM_RUN` with `immediate_exit` set), restores the registers it read at the exit
//! (RIP at the instruction, RAX untouched) and re-enters: the instruction executes again, now
//! against the in-kernel PIT. Every vCPU that exits on those ports does the same, so an access
//! that raced with another vCPU's creation is replayed too. The PIT state right after
//! creation is what [`Vm::reset`](keel_accel::Vm::reset) restores, as before.

use std::sync::{Arc, Mutex};

use keel_accel::AccelError;
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_pit_state2};
use kvm_ioctls::VmFd;

/// Whether `port` is one the in-kernel PIT claims once it exists (counters, mode register,
/// and the port-0x61 speaker/gate register it emulates).
pub(crate) fn is_pit_port(port: u16) -> bool {
    matches!(port, 0x40..=0x43 | 0x61)
}

/// The machine's PIT: wanted or not, and once created, its power-on state.
#[derive(Debug)]
pub(crate) struct LazyPit {
    vm: Arc<VmFd>,
    wanted: bool,
    power_on: Mutex<Option<kvm_pit_state2>>,
}

impl LazyPit {
    /// A PIT that `ensure` creates on demand if `wanted`.
    pub(crate) fn new(vm: Arc<VmFd>, wanted: bool) -> Self {
        Self {
            vm,
            wanted,
            power_on: Mutex::new(None),
        }
    }

    /// Whether an exit on `port` is a guest access that the (maybe not yet created) in-kernel
    /// PIT must serve.
    pub(crate) fn claims(&self, port: u16) -> bool {
        self.wanted && is_pit_port(port)
    }

    /// Whether the in-kernel PIT exists.
    pub(crate) fn created(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<kvm_pit_state2>> {
        self.power_on.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates the in-kernel PIT unless it exists.
    pub(crate) fn ensure(&self) -> Result<(), AccelError> {
        let mut state = self.lock();
        if state.is_some() {
            return Ok(());
        }
        let cfg = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm
            .create_pit2(cfg)
            .map_err(crate::vcpu::host("KVM_CREATE_PIT2"))?;
        *state = Some(
            self.vm
                .get_pit2()
                .map_err(crate::vcpu::host("KVM_GET_PIT2"))?,
        );
        Ok(())
    }

    /// Puts the PIT back in its power-on state, if it exists (a PIT created later starts
    /// in that state anyway).
    pub(crate) fn reset(&self) -> Result<(), AccelError> {
        if let Some(pit) = self.lock().as_ref() {
            self.vm
                .set_pit2(pit)
                .map_err(crate::vcpu::host("KVM_SET_PIT2"))?;
        }
        Ok(())
    }
}
