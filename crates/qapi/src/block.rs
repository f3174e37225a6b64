//! Block devices (QEMU's `qapi/block-core.json`).

use std::path::PathBuf;

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};

use crate::ANY;

/// `blockdev-add` with `driver: "file"` (a raw image).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAdd {
    /// Only `file`.
    pub driver: String,
    /// Node name, referenced by a device's `drive=`.
    pub node_name: String,
    /// Image path.
    pub filename: PathBuf,
    /// Open read-only.
    pub read_only: Option<bool>,
}

impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "BlockdevOptions",
            vec![
                req("driver", Type::str()),
                req("node-name", Type::str()),
                req("filename", Type::str()),
                opt("read-only", Type::bool()),
            ],
        )
    }
}
