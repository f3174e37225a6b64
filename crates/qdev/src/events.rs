//! What the device model tells the outside world: QMP events through an [`EventSink`], and
//! the time it reads through a [`Clock`] (injected so unplug timeouts are testable).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A device event, in QMP's shape (`name()` + `data()`; the QMP layer adds the timestamp).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// `DEVICE_DELETED {device?, path}`: the device is gone; its id and slot are free.
    DeviceDeleted {
        /// The device's id, if it had one.
        device: Option<String>,
        /// Its canonical path.
        path: String,
    },
    /// `DEVICE_UNPLUG_GUEST_ERROR {device?, path}`: the guest refused an unplug request, or
    /// did not answer before the timeout. The device stays.
    UnplugGuestError {
        /// The device's id, if it has one.
        device: Option<String>,
        /// Its canonical path.
        path: String,
    },
}

impl DeviceEvent {
    /// QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceEvent::DeviceDeleted { .. } => "DEVICE_DELETED",
            DeviceEvent::UnplugGuestError { .. } => "DEVICE_UNPLUG_GUEST_ERROR",
        }
    }

    /// QMP event `data`.
    pub fn data(&self) -> Value {
        let (DeviceEvent::DeviceDeleted { device, path }
        | DeviceEvent::UnplugGuestError { device, path }) = self;
        match device {
            Some(d) => json!({"device": d, "path": path}),
            None => json!({"path": path}),
        }
    }

    /// The canonical path of the device concerned.
    pub fn path(&self) -> &str {
        let (DeviceEvent::DeviceDeleted { path, .. } | DeviceEvent::UnplugGuestError { path, .. }) =
            self;
        path
    }
}

/// Where device events go; the VMM connects it to its QMP event broadcaster.
pub trait EventSink: Send + Sync {
    /// Delivers one event; must not block and must not call back into the tree.
    fn emit(&self, event: DeviceEvent);
}

/// An [`EventSink`] that keeps events in memory (tests, or a VMM without QMP).
#[derive(Debug, Default)]
pub struct EventLog(Mutex<Vec<DeviceEvent>>);

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }
    /// Removes and returns the events so far.
    pub fn take(&self) -> Vec<DeviceEvent> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
    /// A copy of the events so far.
    pub fn snapshot(&self) -> Vec<DeviceEvent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl EventSink for EventLog {
    fn emit(&self, event: DeviceEvent) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

/// A sink that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _event: DeviceEvent) {}
}

/// Monotonic time as the device model sees it.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin; never goes backwards.
    fn now(&self) -> Duration;
}

/// The host's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to (deterministic tests).
#[derive(Debug, Default)]
pub struct ManualClock(Mutex<Duration>);

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }
    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t = t.saturating_add(by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
