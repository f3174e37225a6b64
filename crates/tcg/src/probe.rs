//! The interpreter as a VMM discovers it.

use std::sync::Arc;

use keel_accel::{AccelError, AccelProbe, Accelerator};

use crate::TcgAccel;

/// `-accel tcg`: the interpreter needs nothing from the host, so it always opens.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcgProbe;

impl AccelProbe for TcgProbe {
    fn name(&self) -> &'static str {
        "tcg"
    }

    fn open(&self) -> Result<Arc<dyn Accelerator>, AccelError> {
        Ok(Arc::new(TcgAccel::new()))
    }
}
