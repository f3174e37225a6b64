//! Network backends (QEMU's `qapi/net.json`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};

use crate::ANY;

/// `netdev_add` with `type: "tap"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetdevAdd {
    /// Only `tap`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Netdev id, referenced by a device's `netdev=`.
    pub id: String,
    /// Host tap interface.
    pub ifname: Option<String>,
    /// Must be `no` (Keel runs no scripts).
    pub script: Option<String>,
    /// Must be `no`.
    pub downscript: Option<String>,
}

impl Command for NetdevAdd {
    const NAME: &'static str = "netdev_add";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "Netdev",
            vec![
                req("type", Type::str()),
                req("id", Type::str()),
                opt("ifname", Type::str()),
                opt("script", Type::str()),
                opt("downscript", Type::str()),
            ],
        )
    }
}
