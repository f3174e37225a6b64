//! The KVM backend as a VMM discovers it: one shared, lazily opened `/dev/kvm`.

use std::sync::{Arc, OnceLock};

use keel_accel::{AccelError, AccelProbe, Accelerator};

use crate::{ACCEL_NAME, KvmAccel};

/// The process's one KVM handle with the default options.
///
/// Opening `/dev/kvm` and reading its CPUID and MSR lists costs about a millisecond, and a
/// VMM needs the answer several times (probe, `query-accels`, `accel-set`, machine-init);
/// the first outcome, success or failure, is kept for the life of the process.
pub fn shared() -> Result<Arc<KvmAccel>, AccelError> {
    static KVM: OnceLock<Result<Arc<KvmAccel>, String>> = OnceLock::new();
    KVM.get_or_init(|| {
        KvmAccel::new().map(Arc::new).map_err(|e| match e {
            AccelError::Unavailable { reason, .. } => reason,
            other => other.to_string(),
        })
    })
    .clone()
    .map_err(|reason| AccelError::Unavailable {
        accel: ACCEL_NAME,
        reason,
    })
}

/// `-accel kvm`: usable when [`shared`] can open `/dev/kvm` with the capabilities Keel needs.
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmProbe;

impl AccelProbe for KvmProbe {
    fn name(&self) -> &'static str {
        ACCEL_NAME
    }

    fn open(&self) -> Result<Arc<dyn Accelerator>, AccelError> {
        shared().map(|a| a as Arc<dyn Accelerator>)
    }
}
