//! QEMU's `isa-debug-exit`: a guest write of V ends the VMM with status `(V << 1) | 1`.
//!
//! Test guests use it to report pass/fail. Like QEMU's device it has two properties, `iobase`
//! (default 0x501) and `iosize` (default 2); reads return 0. The status is always odd, so a
//! guest cannot fake a clean exit through it (status 0 needs an ACPI power-off).

use std::sync::Arc;

use keel_accel::{BusDevice, SystemEvent, SystemEvents};
use keel_qdev::{BusType, DeviceType, PropSpec, Props};

/// Errors building an `isa-debug-exit` from user properties.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
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

/// The validated properties of an `isa-debug-exit`: ports `[iobase, iobase + iosize)`.
///
/// QEMU's properties are `uint32` and QEMU maps any region; Keel accepts what fits the 64 KiB
/// port space: `iobase` 0..=0xffff, `iosize` 1..=0x10000, and `iobase + iosize <= 0x10000`.
/// (`iosize` is the number of ports, not the access width: every access of 1 to 4 bytes at
/// any of the ports exits.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExitConfig {
    /// First port.
    pub iobase: u16,
    /// Number of ports (1..=0x10000, so a `u32`).
    pub iosize: u32,
}

impl Default for DebugExitConfig {
    /// QEMU's defaults: `iobase=0x501,iosize=0x02`.
    fn default() -> Self {
        Self {
            iobase: DebugExit::DEFAULT_IOBASE,
            iosize: DebugExit::DEFAULT_IOSIZE.into(),
        }
    }
}

impl DebugExitConfig {
    /// Checks a port range: `iosize` 1..=0x10000 and the range inside the port space.
    pub fn new(iobase: u64, iosize: u64) -> Result<Self, DebugExitError> {
        if iosize == 0 || iosize > 0x1_0000 {
            return Err(DebugExitError::BadSize(iosize));
        }
        match (u16::try_from(iobase), u32::try_from(iosize)) {
            (Ok(base), Ok(size)) if iobase + iosize <= 0x1_0000 => Ok(Self {
                iobase: base,
                iosize: size,
            }),
            _ => Err(DebugExitError::OutOfRange { iobase, iosize }),
        }
    }

    /// From the properties [`DebugExit::qdev_type`] validated (a property missing from
    /// `props` takes its default). The cross-check `iobase + iosize <= 0x10000`, which no
    /// single property range expresses, is done here.
    pub fn from_props(props: &Props) -> Result<Self, DebugExitError> {
        let d = Self::default();
        Self::new(
            props.u64("iobase").unwrap_or(d.iobase.into()),
            props.u64("iosize").unwrap_or(d.iosize.into()),
        )
    }
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

    /// QEMU's type name.
    pub const QDEV_TYPE: &'static str = "isa-debug-exit";

    /// The qdev type: `isa-debug-exit` on the ISA bus, properties `iobase` and `iosize`
    /// (see [`DebugExitConfig`] for the ranges).
    pub fn qdev_type() -> DeviceType {
        DeviceType::new(Self::QDEV_TYPE, BusType::Isa)
            .category(keel_qdev::Category::Misc)
            .description(
                "ISA debug exit device: a guest write of V ends the VMM with status (V<<1)|1",
            )
            .prop(
                PropSpec::uint32("iobase")
                    .default_u64(Self::DEFAULT_IOBASE.into())
                    .range(0, 0xffff)
                    .description("first I/O port"),
            )
            .prop(
                PropSpec::uint32("iosize")
                    .default_u64(Self::DEFAULT_IOSIZE.into())
                    .range(1, 0x1_0000)
                    .description("number of I/O ports (iobase + iosize must not pass port 0xffff)"),
            )
    }

    /// A device on the ports `config` names, reporting to `events`.
    pub fn from_config(config: DebugExitConfig, events: Arc<dyn SystemEvents>) -> Self {
        Self {
            iobase: config.iobase,
            // iosize is 1..=0x10000 by construction.
            iosize: u16::try_from(config.iosize.saturating_sub(1)).unwrap_or(u16::MAX),
            events,
        }
    }

    /// A device at `[iobase, iobase + iosize)` reporting to `events`: [`DebugExitConfig::new`]
    /// then [`DebugExit::from_config`].
    pub fn new(
        iobase: u64,
        iosize: u64,
        events: Arc<dyn SystemEvents>,
    ) -> Result<Self, DebugExitError> {
        Ok(Self::from_config(
            DebugExitConfig::new(iobase, iosize)?,
            events,
        ))
    }

    /// The ports it occupies.
    pub fn config(&self) -> DebugExitConfig {
        DebugExitConfig {
            iobase: self.iobase,
            iosize: u32::from(self.iosize) + 1,
        }
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
    fn config_from_props() {
        use keel_qdev::RawValue;
        let t = DebugExit::qdev_type();
        let props = |raw: &[(&str, &str)]| {
            let raw: Vec<_> = raw
                .iter()
                .map(|(k, v)| ((*k).to_owned(), RawValue::Str((*v).to_owned())))
                .collect();
            t.validate(&raw)
        };
        let d = DebugExitConfig::from_props(&props(&[]).unwrap()).unwrap();
        assert_eq!(
            d,
            DebugExitConfig {
                iobase: 0x501,
                iosize: 2
            }
        );
        assert_eq!(d, DebugExitConfig::default());
        let c =
            DebugExitConfig::from_props(&props(&[("iobase", "0xf4"), ("iosize", "0x04")]).unwrap());
        assert_eq!(
            c,
            Ok(DebugExitConfig {
                iobase: 0xf4,
                iosize: 4
            })
        );
        let c =
            DebugExitConfig::from_props(&props(&[("iobase", "0"), ("iosize", "0x10000")]).unwrap());
        assert_eq!(
            c,
            Ok(DebugExitConfig {
                iobase: 0,
                iosize: 0x1_0000
            })
        );
        let c = c.unwrap();
        let dev = DebugExit::from_config(c, Arc::new(Rec::default()));
        assert_eq!((dev.iobase(), dev.iosize()), (0, 0x1_0000));
        assert_eq!(dev.config(), c);
        // Each property in range, the sum not.
        let e =
            DebugExitConfig::from_props(&props(&[("iobase", "0xffff"), ("iosize", "2")]).unwrap());
        assert_eq!(
            e,
            Err(DebugExitError::OutOfRange {
                iobase: 0xffff,
                iosize: 2
            })
        );
        // The type refuses what no port range can hold.
        assert!(props(&[("iosize", "0")]).is_err());
        assert!(props(&[("iosize", "0x10001")]).is_err());
        assert!(props(&[("iobase", "0x10000")]).is_err());
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
