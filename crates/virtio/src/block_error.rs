//! What a virtio-blk device does when the host fails a read or a write: QEMU's
//! `rerror=`/`werror=` (`BlockdevOnError`) and the facts of its `BLOCK_IO_ERROR` event.
//!
//! `report` completes the request with `VIRTIO_BLK_S_IOERR`, `ignore` completes it as if it
//! had succeeded, `stop` holds the request and asks for the machine to stop (run state
//! `io-error`), `enospc` stops on a full host disk and reports anything else. A held request
//! is run again, in order and before any later one, when the machine continues
//! ([`crate::Block::retry_held`]).

use std::fmt;
use std::sync::Arc;

/// One of QEMU's `rerror=`/`werror=` values (`auto` is QEMU's alias of the default and is
/// read as such).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Complete the request with an I/O error (the default for reads).
    #[default]
    Report,
    /// Complete the request as if it had succeeded.
    Ignore,
    /// Hold the request and stop the machine.
    Stop,
    /// Stop on `ENOSPC` (a full host disk), report any other error (the default for writes).
    Enospc,
}

impl OnError {
    /// Reads a QAPI spelling (`report`, `ignore`, `stop`, `enospc`); `auto` is `default`.
    pub fn parse(s: &str, default: OnError) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "stop" => OnError::Stop,
            "enospc" => OnError::Enospc,
            "auto" => default,
            _ => return None,
        })
    }

    /// What happens for a host error with this `errno` (QEMU's `blk_get_error_action`).
    pub fn action(self, errno: i32) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if errno == libc::ENOSPC => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        }
    }
}

/// The error handling of one disk: `rerror=` for reads, `werror=` for writes and flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPolicy {
    /// `rerror=`; `report` by default.
    pub read: OnError,
    /// `werror=`; `enospc` by default.
    pub write: OnError,
}

impl ErrorPolicy {
    /// Whether some error can stop the machine (`werror=enospc|stop` or `rerror=stop`):
    /// only then does QEMU track the disk's I/O status, and say in `BLOCK_IO_ERROR`
    /// whether the host ran out of space (`nospace`).
    pub fn can_stop(&self) -> bool {
        matches!(self.write, OnError::Enospc | OnError::Stop) || self.read == OnError::Stop
    }
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        Self {
            read: OnError::Report,
            write: OnError::Enospc,
        }
    }
}

/// What was done about one failed request (`BLOCK_IO_ERROR`'s `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The guest saw an I/O error.
    Report,
    /// The guest saw success.
    Ignore,
    /// The request is held and the machine asked to stop.
    Stop,
}

impl ErrorAction {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The direction of a failed request (`BLOCK_IO_ERROR`'s `operation`; a flush is a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// A read.
    Read,
    /// A write or a flush.
    Write,
}

impl IoOperation {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// One host I/O error as a disk reports it: the facts of QEMU's `BLOCK_IO_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoErrorReport {
    /// Read or write.
    pub operation: IoOperation,
    /// What the disk did about it.
    pub action: ErrorAction,
    /// The host's `errno`.
    pub errno: i32,
    /// Whether the disk tracks an I/O status ([`ErrorPolicy::can_stop`]).
    pub io_status: bool,
}

impl IoErrorReport {
    /// Whether the host disk is full (`nospace`).
    pub fn nospace(&self) -> bool {
        self.errno == libc::ENOSPC
    }

    /// The host's description of the error (`reason`, C's `strerror`), e.g.
    /// `No space left on device`.
    pub fn reason(&self) -> String {
        let text = std::io::Error::from_raw_os_error(self.errno).to_string();
        match text.rfind(" (os error ") {
            Some(at) => text[..at].to_string(),
            None => text,
        }
    }
}

/// Receives a disk's host I/O errors; for [`ErrorAction::Stop`] the receiver stops the
/// machine (and later continues it, which retries the held requests). Called on the thread
/// that serves the disk's queue, with the device's lock held: it must not block.
pub trait IoErrorSink: Send + Sync {
    /// One failed request and what was done about it.
    fn io_error(&self, report: IoErrorReport);
}

/// The handler a disk without one uses: errors are only logged.
pub(crate) struct LogOnly;

impl IoErrorSink for LogOnly {
    fn io_error(&self, report: IoErrorReport) {
        log::warn!(
            "virtio-blk: host {} error ({}), action {}",
            report.operation.as_str(),
            report.reason(),
            report.action.as_str()
        );
    }
}

/// The shared handle a [`crate::Block`] keeps.
#[derive(Clone)]
pub(crate) struct Sink(pub(crate) Arc<dyn IoErrorSink>);

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IoErrorSink")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_stops_only_on_a_full_disk() {
        assert_eq!(OnError::Enospc.action(libc::ENOSPC), ErrorAction::Stop);
        assert_eq!(OnError::Enospc.action(libc::EIO), ErrorAction::Report);
        assert_eq!(OnError::Stop.action(libc::EIO), ErrorAction::Stop);
        assert_eq!(OnError::Ignore.action(libc::ENOSPC), ErrorAction::Ignore);
        assert_eq!(
            OnError::parse("auto", OnError::Enospc),
            Some(OnError::Enospc)
        );
        assert_eq!(OnError::parse("halt", OnError::Report), None);
        assert!(ErrorPolicy::default().can_stop());
        let report = ErrorPolicy {
            read: OnError::Report,
            write: OnError::Report,
        };
        assert!(!report.can_stop());
    }

    #[test]
    fn reason_is_the_host_text() {
        let r = IoErrorReport {
            operation: IoOperation::Write,
            action: ErrorAction::Stop,
            errno: libc::ENOSPC,
            io_status: true,
        };
        assert_eq!(r.reason(), "No space left on device");
        assert!(r.nospace());
    }
}
