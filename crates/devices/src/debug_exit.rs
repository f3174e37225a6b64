//! QEMU's `isa-debug-exit`: a guest write of V ends the VMM with status `(V << 1) | 1`.
//!
//! Test guests use it to report pass/fail. Like QEMU's device it has two properties, `iobase`
//! (default 0x501) and `iosize` (default 2); reads return 0. The status is always odd, so a
//! guest cannot fake a clean exit through it (status 0 needs an ACPI power-off).

use std::sync::Arc;

use keel_accel::{BusDevice, SystemEvent, SystemEvents};

/// Errors building an `isa-debug-exit` from user properties.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugExitError {
    /// `iosize` is zero or larger than the port space.
    #[error("isa-debug-exit: iosize {0:#x} is invalid: use a value from 1 to 0x10000")]
    BadSize(u64),
    /// The port range does not fit the 64 KiB port space.
    #[error("isa-debug-exit: iobase {iobase:#x} + iosize {iosize:#x} runs past port 0xffff")]
    OutOfRange {
        /// Requested base port.
        iobase: u64,
        /// Requested size.
        iosize: u64,
    },
}

/// The `isa-debug-exit` device.
pub struct DebugExit {
    iobase: u16,
    iosize: u16,
    events: Arc<dyn SystemEvents>,
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit")
            .field("iobase", &self.iobase)
            .field("iosize", &self.iosize)
            .finish()
    }
}

impl DebugExit {
    /// QEMU's default `iobase`.
    pub const DEFAULT_IOBASE: u16 = 0x501;
    /// QEMU's default `iosize`.
    pub const DEFAULT_IOSIZE: u16 = 0x02;

    /// A device at `[iobase, iobase + iosize)` reporting to `events`.
    pub fn new(
        iobase: u64,
        iosize: u64,
        events: Arc<dyn SystemEvents>,
    ) -> Result<Self, DebugExitError> {
        if iosize == 0 || iosize > 0x1_0000 {
            return Err(DebugExitError::BadSize(iosize));
        }
        if iobase.checked_add(iosize).is_none_or(|end| end > 0x1_0000) {
            return Err(DebugExitError::OutOfRange { iobase, iosize });
        }
        Ok(Self {
            // Both checked above to fit the 16-bit port space.
            iobase: iobase as u16,
            iosize: (iosize - 1) as u16,
            events,
        })
    }

    /// First port.
    pub fn iobase(&self) -> u16 {
        self.iobase
    }

    /// Number of ports.
    pub fn iosize(&self) -> u64 {
        u64::from(self.iosize) + 1
    }

    /// The exit status a write of `value` produces: `(value << 1) | 1`, as QEMU's `exit()` call
    /// sees it (an `int`); the process status the host reports is its low 8 bits.
    pub fn status_for(value: u32) -> i32 {
        ((value << 1) | 1) as i32
    }
}

impl BusDevice for DebugExit {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        self.events
            .request(SystemEvent::Exit(Self::status_for(value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::Rec;

    #[test]
    fn write_exits_with_qemu_status() {
        let rec = Arc::new(Rec::default());
        let d = DebugExit::new(0xf4, 4, rec.clone()).unwrap();
        d.write(0, &[0x00]);
        d.write(0, &[0x10]);
        d.write(0, &[0x01, 0x01]);
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[
                SystemEvent::Exit(1),
                SystemEvent::Exit(0x21),
                SystemEvent::Exit(0x203)
            ]
        );
        let mut r = [0xaau8; 4];
        d.read(0, &mut r);
        assert_eq!(r, [0; 4]);
    }

    #[test]
    fn properties_are_validated() {
        let rec: Arc<dyn SystemEvents> = Arc::new(Rec::default());
        assert_eq!(
            DebugExit::new(0xf4, 0, rec.clone()).unwrap_err(),
            DebugExitError::BadSize(0)
        );
        assert!(DebugExit::new(0xffff, 2, rec.clone()).is_err());
        assert!(DebugExit::new(u64::MAX, 2, rec.clone()).is_err());
        let d = DebugExit::new(0xfffe, 2, rec).unwrap();
        assert_eq!((d.iobase(), d.iosize()), (0xfffe, 2));
    }

    #[test]
    fn hostile_writes_never_panic() {
        let rec = Arc::new(Rec::default());
        let d = DebugExit::new(0x501, 2, rec).unwrap();
        for len in 0..=8 {
            d.write(u64::MAX, &vec![0xff; len]);
            let mut r = vec![0; len];
            d.read(u64::MAX, &mut r);
        }
        assert_eq!(DebugExit::status_for(u32::MAX), -1);
    }
}
