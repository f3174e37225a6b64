//! Ending the VMM: why ([`ShutdownCause`], QAPI's names) and when ([`ShutdownSignal`]).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why the VMM is shutting down (QAPI `ShutdownCause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// `quit`.
    HostQmpQuit,
    /// SIGINT, SIGTERM or SIGHUP.
    HostSignal,
    /// The guest powered off.
    GuestShutdown,
    /// The host failed.
    HostError,
}

impl ShutdownCause {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::HostError => "host-error",
        }
    }

    /// Whether the guest asked for it.
    pub fn by_guest(self) -> bool {
        self == ShutdownCause::GuestShutdown
    }
}

#[derive(Debug, Default)]
struct ShutdownInner {
    cause: Option<ShutdownCause>,
    /// The reply of the request that asked for it has gone out.
    released: bool,
}

/// A shutdown request, held until the reply of the command that made it is written, so
/// clients see `{"return": {}}` before the SHUTDOWN event, as with QEMU.
#[derive(Debug, Default)]
pub struct ShutdownSignal {
    inner: Mutex<ShutdownInner>,
    cv: Condvar,
}

impl ShutdownSignal {
    /// Records a request (the first cause wins); it takes effect on [`Self::release`].
    pub fn request(&self, cause: ShutdownCause) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.cause.get_or_insert(cause);
    }

    /// Records a request that takes effect at once (signals, guest power-off).
    pub fn request_now(&self, cause: ShutdownCause) {
        self.request(cause);
        self.release();
    }

    /// Lets a pending request take effect.
    pub fn release(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.cause.is_some() {
            g.released = true;
            self.cv.notify_all();
        }
    }

    /// Whether a request is pending or effective.
    pub fn requested(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cause
            .is_some()
    }

    /// Blocks until a request takes effect (or `timeout` passes); returns its cause.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ShutdownCause> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        while !g.released {
            match deadline {
                None => g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    g = self
                        .cv
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        g.cause
    }
}
