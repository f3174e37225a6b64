//! Finding out which backends a host offers, and opening them.

use std::sync::Arc;

use crate::{AccelError, Accelerator};

/// An accelerator known by its `-accel` name, not yet opened.
///
/// A VMM keeps one probe per backend it was built with; `accel-set` opens them in the order
/// the user asked and hands the first one the machine accepts to the machine type, so a
/// backend added by an embedder runs every machine the built-in ones run.
pub trait AccelProbe: Send + Sync {
    /// The `-accel` name (`kvm`, `tcg`, ...).
    fn name(&self) -> &'static str;
    /// Opens the backend on this host; the error says what is missing. Cheap to call again:
    /// backends that are costly to open keep one shared instance.
    fn open(&self) -> Result<Arc<dyn Accelerator>, AccelError>;
    /// Opens the backend with the properties of `-accel NAME,PROP=VALUE,...` (in order).
    /// The default has none: any property is refused with QEMU's "not found" text.
    fn open_with(&self, props: &[(String, String)]) -> Result<Arc<dyn Accelerator>, AccelError> {
        match props.first() {
            None => self.open(),
            Some((name, _)) => Err(AccelError::UnknownProperty {
                accel: self.name(),
                name: name.clone(),
            }),
        }
    }
}
