//! Device register machines for Keel's x86 machines: the 8250 UART (on vm-superio), an i8042
//! keyboard controller, QEMU's `isa-debug-exit`, an MC146818 RTC/CMOS, the ACPI Generic
//! Event Device registers microvm uses to power off and reset, and the ACPI PM1/PM-timer
//! register block used instead when the platform has no IOAPIC.
//!
//! Every device here is a register machine in the vm-superio style: it knows its registers,
//! its interrupt output (an [`keel_accel::IrqLine`]) and the [`keel_accel::SystemEvents`] sink
//! it reports resets and power-off to, and nothing about buses or backends. Each device type
//! also implements [`keel_accel::BusDevice`] with one lock per device so a machine can map it
//! on a PIO or MMIO bus directly. Guest accesses of any offset, size or value never panic.
//!
//! Each device also describes itself to the device model: `X::QDEV_TYPE` is its QEMU type
//! name, `X::qdev_type()` its [`keel_qdev::DeviceType`] (bus, properties with defaults and
//! ranges, description), and [`qdev_types`] lists them all. A user-creatable device has a
//! typed configuration built from the validated properties ([`DebugExitConfig::from_props`]).

#![deny(missing_docs)]

mod acpi_ged;
mod acpi_pm;
mod debug_exit;
mod i8042;
pub mod mux;
mod rtc;
mod serial;

pub use acpi_ged::{
    AcpiGed, AcpiGedSnapshot, GED_EVENT_POWER_BUTTON, GED_EVENT_SELECTOR_OFFSET, GED_MMIO_LEN,
    GED_REGS_OFFSET, GED_RESET, GED_RESET_VALUE, GED_SLEEP_CTL, GED_SLEEP_STS, SLP_TYP_S5,
};
pub use acpi_pm::{
    ACPI_PM_LEN, AcpiPm, AcpiPmSnapshot, PM_SLP_TYP_S5, PM_TIMER_HZ, PM_TMR_LEN, PM_TMR_OFFSET,
    PM1_CNT_LEN, PM1_CNT_OFFSET, PM1_EVT_LEN, PM1_EVT_OFFSET, PM1_PWRBTN, PM1_TMR,
};
pub use debug_exit::{DebugExit, DebugExitConfig, DebugExitError};
pub use i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042Port, I8042Snapshot};
pub use mux::{MuxByte, MuxInput, mux_escape, mux_help, set_mux_escape};
pub use rtc::{CmosMemoryLayout, Rtc, RtcDateTime, RtcSnapshot};
pub use serial::{
    CAPTURE_LIMIT, Capture, IrqTrigger, Serial, SerialConfig, SerialError, SerialInputSignal,
    SerialOutput, SerialSnapshot, SharedWriter, spawn_input_thread, spawn_mux_input_thread,
};

/// The qdev types of this crate's devices, for a machine to register in one line:
/// `isa-debug-exit` (user-creatable) and the onboard `isa-serial`, `i8042`, `mc146818rtc`
/// and `acpi-ged`.
pub fn qdev_types() -> Vec<keel_qdev::DeviceType> {
    vec![
        DebugExit::qdev_type(),
        Serial::qdev_type(),
        I8042::qdev_type(),
        Rtc::qdev_type(),
        AcpiGed::qdev_type(),
    ]
}

/// Locks a mutex even if another thread panicked while holding it: device state stays usable
/// (a register machine has no invariant a panic elsewhere could break half-way).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod qdev_tests {
    #[test]
    fn types_register() {
        let mut r = keel_qdev::TypeRegistry::new();
        for t in super::qdev_types() {
            r.register(t).unwrap();
        }
    }
}

/// Shared helpers for this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use keel_accel::{SystemEvent, SystemEvents};
    use std::sync::Mutex;

    /// Records every [`SystemEvent`] a device raises, in order.
    #[derive(Default)]
    pub(crate) struct Rec(pub(crate) Mutex<Vec<SystemEvent>>);

    impl SystemEvents for Rec {
        fn request(&self, e: SystemEvent) {
            self.0.lock().unwrap().push(e);
        }
    }
}
