//! Character backends (QEMU's `qapi/char.json`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ANY;

/// `chardev-add` for the `file`, `null` and `stdio` backends
/// (`{"id": "c0", "backend": {"type": "file", "data": {"out": "PATH"}}}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChardevAdd {
    /// Chardev id, referenced by a device's `chardev=`.
    pub id: String,
    /// `{"type": ..., "data": {...}}`.
    pub backend: Value,
}

impl Command for ChardevAdd {
    const NAME: &'static str = "chardev-add";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ChardevReturn;
    fn arguments() -> Type {
        Type::object(
            "q_obj_chardev-add-arg",
            vec![req("id", Type::str()), req("backend", Type::any())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::object("ChardevReturn", vec![opt("pty", Type::str())]))
    }
}

/// `chardev-add`'s answer (QAPI `ChardevReturn`): `{}` for Keel's backends, which have no pty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevReturn {
    /// The pty's path, for `pty` backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pty: Option<String>,
}

/// One character device as `query-chardev` reports it (QAPI `ChardevInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChardevInfo {
    /// Its id.
    pub label: String,
    /// What it is connected to, in QEMU's notation (`stdio`, `null`, `unix:PATH,server=on`).
    pub filename: String,
    /// Whether a front end (device or monitor) uses it.
    pub frontend_open: bool,
}

no_args_command!(
    /// `query-chardev`: the monitors, the serial port and the backends of `chardev-add`.
    QueryChardev, "query-chardev", ANY, Vec<ChardevInfo>,
    Some(Type::array(Type::object("ChardevInfo", vec![
        req("label", Type::str()),
        req("filename", Type::str()),
        req("frontend-open", Type::bool()),
    ])))
);
