//! Command errors as QMP reports them: a class and a human-readable description.

use keel_phase::{Phase, PhaseSet};
use serde::{Deserialize, Serialize};

/// QMP error classes: QEMU's (`qapi/error.json`) plus Keel's `OutOfPhase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Everything without a more specific class.
    GenericError,
    /// The command does not exist (or not in capabilities-negotiation mode).
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// A device id names no device.
    DeviceNotFound,
    /// KVM lacks a capability the request needs.
    KVMMissingCap,
    /// The command exists but is not valid in the current lifecycle phase.
    OutOfPhase,
}

impl ErrorClass {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::OutOfPhase => "OutOfPhase",
        }
    }
}

/// Why a command failed. Its `Display` text is the QMP `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The command is declared for other phases; nothing was changed.
    #[error("'{command}' is not allowed in phase {phase}: it needs {}{}", needs.describe(), hint.map(|h| format!(" ({h})")).unwrap_or_default())]
    OutOfPhase {
        /// Command name.
        command: String,
        /// The phase the machine is in.
        phase: Phase,
        /// The phases the command is declared for.
        needs: PhaseSet,
        /// An extra sentence for this command (e.g. QEMU's own wording).
        hint: Option<&'static str>,
    },
    /// No command of that name is registered.
    #[error("The command {0} has not been found")]
    CommandNotFound(String),
    /// Any other failure, with its class.
    #[error("{desc}")]
    Other {
        /// Error class.
        class: ErrorClass,
        /// Description.
        desc: String,
    },
}

impl CommandError {
    /// A `GenericError` with this description.
    pub fn generic(desc: impl Into<String>) -> Self {
        CommandError::Other {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of the given class.
    pub fn with_class(class: ErrorClass, desc: impl Into<String>) -> Self {
        CommandError::Other {
            class,
            desc: desc.into(),
        }
    }

    /// The QMP error class.
    pub fn class(&self) -> ErrorClass {
        match self {
            CommandError::OutOfPhase { .. } => ErrorClass::OutOfPhase,
            CommandError::CommandNotFound(_) => ErrorClass::CommandNotFound,
            CommandError::Other { class, .. } => *class,
        }
    }
}
