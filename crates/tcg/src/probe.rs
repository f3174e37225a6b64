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

    /// `jit=on|off` (Keel's: the compiling tier) and QEMU's `thread=single` (one vCPU runs
    /// at a time, which is how Keel's interpreter always runs; `thread=multi` is refused).
    fn open_with(&self, props: &[(String, String)]) -> Result<Arc<dyn Accelerator>, AccelError> {
        let mut accel = TcgAccel::new();
        for (name, value) in props {
            match name.as_str() {
                "jit" => {
                    accel.jit = Some(match value.as_str() {
                        "on" | "yes" | "true" => true,
                        "off" | "no" | "false" => false,
                        v => {
                            return Err(AccelError::BadProperty(format!(
                                "Parameter 'jit' expects 'on' or 'off', not '{v}'"
                            )));
                        }
                    })
                }
                "thread" if value == "single" => {}
                "thread" if value == "multi" => {
                    return Err(AccelError::BadProperty(
                        "thread=multi is not supported: Keel's interpreter runs one vCPU at a \
                         time (give thread=single or leave it out)"
                            .into(),
                    ));
                }
                "thread" => {
                    return Err(AccelError::BadProperty(format!(
                        "Invalid 'thread' setting {value}"
                    )));
                }
                _ => {
                    return Err(AccelError::UnknownProperty {
                        accel: "tcg",
                        name: name.clone(),
                    });
                }
            }
        }
        Ok(Arc::new(accel))
    }
}
