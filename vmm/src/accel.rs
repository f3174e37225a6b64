//! Which accelerators this host offers, as `accel-set` and `query-accels` see them.
//!
//! A probe only answers "could this backend run here?". The real backends (`keel-kvm`,
//! `keel-tcg`) replace these probes when machines are integrated.

use std::fs::OpenOptions;

/// An accelerator the VMM knows by name.
pub trait AccelProbe: Send + Sync {
    /// The `-accel` name.
    fn name(&self) -> &'static str;
    /// `Ok` if the backend can be used on this host, otherwise what is missing.
    fn probe(&self) -> Result<(), String>;
}

/// KVM: usable when `/dev/kvm` opens read-write.
#[derive(Debug, Default)]
pub struct KvmProbe;

impl AccelProbe for KvmProbe {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn probe(&self) -> Result<(), String> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| format!("Could not access KVM kernel module: /dev/kvm: {e}"))
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
