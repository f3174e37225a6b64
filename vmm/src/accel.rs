//! Which accelerators this host offers, as `accel-set` and `query-accels` see them.
//!
//! A probe only answers "could this backend run here?". The real backends (`keel-kvm`,
//! `keel-tcg`) build the VMs; the KVM probe asks `keel-kvm` itself.

/// An accelerator the VMM knows by name.
pub trait AccelProbe: Send + Sync {
    /// The `-accel` name.
    fn name(&self) -> &'static str;
    /// `Ok` if the backend can be used on this host, otherwise what is missing.
    fn probe(&self) -> Result<(), String>;
}

/// KVM: usable when `keel-kvm` can open `/dev/kvm` with the capabilities it needs.
#[derive(Debug, Default)]
pub struct KvmProbe;

impl AccelProbe for KvmProbe {
    fn name(&self) -> &'static str {
        "kvm"
    }

    /// The KVM backend's own check (`/dev/kvm` opens and has the capabilities Keel
    /// needs), the same answer `keel_kvm::query_kvm` gives for `present`.
    fn probe(&self) -> Result<(), String> {
        crate::microvm::kvm().map(|_| ())
    }
}

/// The interpreter: always usable.
#[derive(Debug, Default)]
pub struct TcgProbe;

impl AccelProbe for TcgProbe {
    fn name(&self) -> &'static str {
        "tcg"
    }

    fn probe(&self) -> Result<(), String> {
        Ok(())
    }
}
