//! Character backends (QEMU's `qapi/char.json`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    type Output = Map<String, Value>;
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
