//! The microvm configuration: what `-M microvm,...`, `-m`, `-smp`, `-kernel`, `-initrd`,
//! `-append`, `-serial` and `-no-reboot` set.

use std::path::PathBuf;
use std::str::FromStr;

use keel_devices::{Capture, SharedWriter};

/// A machine property that cannot be set as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyError {
    /// The value is not one the property takes.
    #[error("microvm property '{name}': '{value}' is not a valid value: use on, off or auto")]
    BadValue {
        /// Property name.
        name: String,
        /// The value given.
        value: String,
    },
    /// The machine has no such property.
    #[error("microvm has no property '{name}'; accepted: {}", MACHINE_PROPERTIES.join(", "))]
    Unknown {
        /// Property name.
        name: String,
    },
}

/// A value that is not on, off or auto.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a valid value: use on, off or auto")]
pub struct BadOnOffAuto(pub String);

/// QEMU's on/off/auto machine property values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOffAuto {
    /// Enabled.
    On,
    /// Disabled.
    Off,
    /// The machine decides (see each property).
    #[default]
    Auto,
}

impl FromStr for OnOffAuto {
    type Err = BadOnOffAuto;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match (s, keel_qdev::keyval::parse_bool(s)) {
            ("auto", _) => Ok(Self::Auto),
            (_, Some(true)) => Ok(Self::On),
            (_, Some(false)) => Ok(Self::Off),
            (_, None) => Err(BadOnOffAuto(s.to_owned())),
        }
    }
}

impl OnOffAuto {
    /// `true` for On, `false` for Off, `auto` for Auto.
    pub fn resolve(self, auto: bool) -> bool {
        match self {
            Self::On => true,
            Self::Off => false,
            Self::Auto => auto,
        }
    }
}

/// Where COM1's output goes (`-serial`); `chardev:ID` is resolved by the VMM to one of these.
#[derive(Debug, Clone, Default)]
pub enum SerialBackend {
    /// Standard output, with standard input fed to the guest (started by `Microvm::start`).
    #[default]
    Stdio,
    /// Standard output only (no input thread).
    Stdout,
    /// QEMU's `mon:stdio` (`-nographic`'s default): standard input and output, with the
    /// mux's escapes on input (`keel_devices::mux`: C-a h, C-a x, C-a C-a).
    MuxStdio,
    /// A character backend by id (`-serial chardev:ID`); the built-in boards resolve it
    /// against their backends into [`SerialBackend::Writer`] (or `Stdio` for a stdio one).
    /// Left unresolved, the port has nothing attached.
    Chardev(String),
    /// A file, created or truncated.
    File(PathBuf),
    /// A UART with nothing attached.
    Null,
    /// An in-memory buffer (tests, embedders).
    Capture(Capture),
    /// A writer the embedder supplies (e.g. a `-chardev socket`); input, if any, is fed with
    /// `keel_devices::spawn_input_thread` or `Serial::enqueue_input` on `Microvm::serial()`.
    Writer(SharedWriter),
    /// No UART at all (QEMU with `-nodefaults` and no `-serial`): port 0x3f8 reads 0xff.
    None,
}

/// Everything a microvm is built from. `Default` is QEMU's: 128 MiB, one CPU, every
/// property `auto`, serial on stdio, the built-in demo guest.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// Guest RAM in bytes (`-m`).
    pub memory: u64,
    /// Number of vCPUs (`-smp`).
    pub cpus: u32,
    /// `-kernel`: PVH ELF, ELF vmlinux or bzImage. `None` boots the built-in demo guest.
    pub kernel: Option<PathBuf>,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub append: String,
    /// `rtc=`: MC146818 at 0x70 (auto: on, except under kvm, as QEMU).
    pub rtc: OnOffAuto,
    /// `pit=`: i8254 (auto: on).
    pub pit: OnOffAuto,
    /// `pic=`: i8259 pair (auto: on).
    pub pic: OnOffAuto,
    /// `acpi=`: ACPI tables and the GED power-off/reset registers (auto: on).
    pub acpi: OnOffAuto,
    /// `isa-serial=`: COM1 (auto: on).
    pub isa_serial: OnOffAuto,
    /// `i8042=` (a Keel extension: QEMU's microvm has no i8042): the keyboard controller at
    /// 0x60/0x64 whose 0xFE command resets the machine (auto: on). `i8042=off` makes the
    /// port map identical to QEMU's microvm.
    pub i8042: OnOffAuto,
    /// `auto-kernel-cmdline=` (QEMU's microvm property, default on): with ACPI off and a
    /// `-kernel`, append `virtio_mmio.device=512@0xBASE:IRQ` to the kernel command line
    /// for every cold-plugged virtio-mmio device, for kernels built with
    /// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's are not; they need `acpi=on`, where
    /// the DSDT lists the devices instead and nothing is appended, as in QEMU).
    pub auto_kernel_cmdline: OnOffAuto,
    /// `dump-guest-core=` (QEMU's machine property, default on): `off` leaves guest RAM
    /// out of the process's core dumps (`MADV_DONTDUMP`).
    pub dump_guest_core: OnOffAuto,
    /// COM1's backend.
    pub serial: SerialBackend,
    /// `-no-reboot`: a guest reset request becomes a shutdown.
    pub no_reboot: bool,
    /// `-cpu`: the CPU model (see [`crate::cpu_model::present`]); `qemu64` by default, as
    /// QEMU's.
    pub cpu: String,
}

impl Default for MicrovmConfig {
    fn default() -> Self {
        Self {
            memory: 128 << 20,
            cpus: 1,
            kernel: None,
            initrd: None,
            append: String::new(),
            rtc: OnOffAuto::Auto,
            pit: OnOffAuto::Auto,
            pic: OnOffAuto::Auto,
            acpi: OnOffAuto::Auto,
            isa_serial: OnOffAuto::Auto,
            i8042: OnOffAuto::Auto,
            auto_kernel_cmdline: OnOffAuto::Auto,
            dump_guest_core: OnOffAuto::Auto,
            serial: SerialBackend::Stdio,
            no_reboot: false,
            cpu: crate::cpu_model::QEMU64.name.to_owned(),
        }
    }
}

/// Machine properties accepted by [`MicrovmConfig::set_property`] (`-M microvm,NAME=VALUE`).
pub const MACHINE_PROPERTIES: &[&str] = &[
    "rtc",
    "pit",
    "pic",
    "acpi",
    "isa-serial",
    "i8042",
    "auto-kernel-cmdline",
    "x-option-roms",
    "dump-guest-core",
];

impl MicrovmConfig {
    /// Sets one `-M microvm,NAME=VALUE` property; the error names the accepted ones.
    pub fn set_property(&mut self, name: &str, value: &str) -> Result<(), PropertyError> {
        let v: OnOffAuto = value.parse().map_err(|_| PropertyError::BadValue {
            name: name.to_owned(),
            value: value.to_owned(),
        })?;
        match name {
            "rtc" => self.rtc = v,
            "pit" => self.pit = v,
            "pic" => self.pic = v,
            "acpi" => self.acpi = v,
            "isa-serial" => self.isa_serial = v,
            "i8042" => self.i8042 = v,
            "auto-kernel-cmdline" => self.auto_kernel_cmdline = v,
            // QEMU loads its DMA linuxboot/multiboot option ROMs unless this is off. Keel
            // loads the kernel itself and has no option ROMs, so both values describe the
            // same machine; QEMU's documented microvm line sets it, so it is accepted.
            "x-option-roms" if v != OnOffAuto::Auto => {}
            "x-option-roms" => {
                return Err(PropertyError::BadValue {
                    name: name.to_owned(),
                    value: value.to_owned(),
                });
            }
            "dump-guest-core" => self.dump_guest_core = v,
            _ => {
                return Err(PropertyError::Unknown {
                    name: name.to_owned(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_like_qemu() {
        let mut c = MicrovmConfig::default();
        c.set_property("rtc", "on").unwrap();
        c.set_property("acpi", "off").unwrap();
        assert_eq!((c.rtc, c.acpi), (OnOffAuto::On, OnOffAuto::Off));
        let e = c.set_property("pcie", "on").unwrap_err().to_string();
        assert!(
            e.contains("accepted: rtc, pit, pic, acpi, isa-serial, i8042"),
            "{e}"
        );
        assert!(
            c.set_property("pit", "maybe")
                .unwrap_err()
                .to_string()
                .contains("on, off or auto")
        );
        // QEMU's documented microvm line: x-option-roms is a plain boolean.
        c.set_property("x-option-roms", "off").unwrap();
        c.set_property("x-option-roms", "on").unwrap();
        assert!(c.set_property("x-option-roms", "auto").is_err());
        assert!(OnOffAuto::Auto.resolve(true));
        assert!(!OnOffAuto::Off.resolve(true));
    }
}
