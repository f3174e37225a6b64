//! Block devices (QEMU's `qapi/block-core.json`).

use std::path::PathBuf;

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ANY;

/// `blockdev-add`: `driver: "file"` (a raw image), or `driver: "raw"` over a file node
/// named by `file` (the pair libvirt adds).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAdd {
    /// `file` or `raw`.
    pub driver: String,
    /// Node name, referenced by a device's `drive=`.
    pub node_name: String,
    /// Image path (driver `file`).
    pub filename: Option<PathBuf>,
    /// The file node under a `raw` node, by name.
    pub file: Option<String>,
    /// Open read-only.
    pub read_only: Option<bool>,
    /// Fall back to read-only when the image cannot be opened for writing.
    pub auto_read_only: Option<bool>,
    /// `ignore` or `unmap`.
    pub discard: Option<String>,
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
                opt("filename", Type::str()),
                opt("file", Type::str()),
                opt("read-only", Type::bool()),
                opt("auto-read-only", Type::bool()),
                opt("discard", Type::str()),
            ],
        )
    }
}

/// QAPI `BlockDeviceInfo`: a node as `query-named-block-nodes` and `query-block` show it.
pub fn block_device_info() -> Type {
    Type::object(
        "BlockDeviceInfo",
        vec![
            req("file", Type::str()),
            req("node-name", Type::str()),
            req("ro", Type::bool()),
            req("drv", Type::str()),
            req("backing_file_depth", Type::int()),
            req("encrypted", Type::bool()),
            req("detect_zeroes", Type::str()),
            req("bps", Type::int()),
            req("bps_rd", Type::int()),
            req("bps_wr", Type::int()),
            req("iops", Type::int()),
            req("iops_rd", Type::int()),
            req("iops_wr", Type::int()),
            req(
                "image",
                Type::object(
                    "ImageInfo",
                    vec![
                        req("filename", Type::str()),
                        req("format", Type::str()),
                        req("virtual-size", Type::int()),
                        opt("actual-size", Type::int()),
                        opt("dirty-flag", Type::bool()),
                    ],
                ),
            ),
            req("write_threshold", Type::int()),
            req(
                "cache",
                Type::object(
                    "BlockdevCacheInfo",
                    vec![
                        req("writeback", Type::bool()),
                        req("direct", Type::bool()),
                        req("no-flush", Type::bool()),
                    ],
                ),
            ),
        ],
    )
}

no_args_command!(
    /// `query-block`: the block devices and the node each one has inserted.
    QueryBlock, "query-block", ANY, Vec<Value>,
    Some(Type::array(Type::object("BlockInfo", vec![
        req("device", Type::str()),
        opt("qdev", Type::str()),
        req("type", Type::str()),
        req("removable", Type::bool()),
        req("locked", Type::bool()),
        opt("inserted", block_device_info()),
        opt("io-status", Type::Enum {
            name: "BlockDeviceIoStatus",
            values: &["ok", "failed", "nospace"],
        }),
    ])))
);

/// Data of the `BLOCK_IO_ERROR` event (a disk's host I/O failed and its `werror`/`rerror`
/// policy decided `action`).
pub fn block_io_error_data() -> Type {
    Type::object(
        "q_obj_BLOCK_IO_ERROR-arg",
        vec![
            req("device", Type::str()),
            opt("node-name", Type::str()),
            req(
                "operation",
                Type::Enum {
                    name: "IoOperationType",
                    values: &["read", "write"],
                },
            ),
            req(
                "action",
                Type::Enum {
                    name: "BlockErrorAction",
                    values: &["ignore", "report", "stop"],
                },
            ),
            opt("nospace", Type::bool()),
            req("reason", Type::str()),
        ],
    )
}

/// `query-named-block-nodes`: every node made by `blockdev-add` / `-blockdev`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryNamedBlockNodes {
    /// Leave out the backing chains (Keel's nodes have none).
    pub flat: Option<bool>,
}

impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<Value>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_query-named-block-nodes-arg",
            vec![opt("flat", Type::bool())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(block_device_info()))
    }
}

/// `query-blockstats`: Keel's block devices keep no I/O statistics, so `[]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryBlockstats {
    /// Report nodes instead of devices.
    pub query_nodes: Option<bool>,
}

impl Command for QueryBlockstats {
    const NAME: &'static str = "query-blockstats";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<Value>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_query-blockstats-arg",
            vec![opt("query-nodes", Type::bool())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(Type::object(
            "BlockStats",
            vec![
                opt("device", Type::str()),
                opt("qdev", Type::str()),
                opt("node-name", Type::str()),
                req("stats", Type::any()),
            ],
        )))
    }
}

/// `blockdev-del`: removes a node no device uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node.
    pub node_name: String,
}

impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_blockdev-del-arg",
            vec![req("node-name", Type::str())],
        )
    }
}
