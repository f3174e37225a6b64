//! The device model's errors and events as QMP sees them.

use std::sync::Arc;

use keel_qdev::{DeviceEvent, EventSink, QdevError};
use keel_qmp::{CommandError, ErrorClass, EventBus};

/// Forwards `DEVICE_DELETED` / `DEVICE_UNPLUG_GUEST_ERROR` to QMP clients.
#[derive(Debug)]
pub struct QmpEvents(pub Arc<EventBus>);

impl EventSink for QmpEvents {
    fn emit(&self, event: DeviceEvent) {
        self.0.emit(event.name(), Some(event.data()));
    }
}

/// A qdev error as a QMP error: its class and its message with sources.
pub fn qdev_error(e: &QdevError) -> CommandError {
    let class = match e.qmp_class() {
        "OutOfPhase" => ErrorClass::OutOfPhase,
        "DeviceNotFound" => ErrorClass::DeviceNotFound,
        _ => ErrorClass::GenericError,
    };
    CommandError::with_class(class, e.qmp_desc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_phase::Phase;

    #[test]
    fn qdev_errors_keep_their_qmp_class() {
        let mut t = keel_machine::device_types::empty_tree();
        let e = t
            .device_add_cli(Phase::MachineInit, "isa-serial")
            .unwrap_err();
        assert_eq!(qdev_error(&e).class(), ErrorClass::GenericError);
        let e = t.device_del(Phase::MachineInit, "nope").unwrap_err();
        assert_eq!(qdev_error(&e).class(), ErrorClass::DeviceNotFound);
    }
}
