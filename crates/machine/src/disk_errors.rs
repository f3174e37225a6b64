//! Host I/O errors of the machine's disks: each virtio-blk device reports its failed
//! requests here (QEMU's `rerror=`/`werror=`), the machine's owner hears of them as
//! [`crate::BoardEvent::BlockIoError`] (QMP's `BLOCK_IO_ERROR`, and for `stop` the run
//! state `io-error`), and continuing the machine runs the requests the disks held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use keel_virtio::{ErrorAction, IoErrorReport, IoErrorSink, VirtioDevice};

use crate::runner::{MachineEvent, MachineEvents};

/// `query-block`: each device with a `drive`, the node it has inserted and, when the disk
/// tracks one, its `io-status`.
pub fn query_block(
    board: Option<&dyn crate::board::Board>,
    backends: &crate::backends::Backends,
) -> Vec<serde_json::Value> {
    let Some(board) = board else {
        return Vec::new();
    };
    let mut v = Vec::new();
    for d in board.devices().views() {
        let Some(keel_qdev::PropValue::Str(node)) = d.props.get("drive") else {
            continue;
        };
        let mut e = serde_json::json!({
            "device": "", "qdev": d.id.unwrap_or(d.path), "type": "unknown",
            "removable": false, "locked": false,
        });
        if let Some(info) = backends.node_info(node) {
            e["inserted"] = info;
        }
        if let Some(s) = board.block_io_status(node) {
            e["io-status"] = s.into();
        }
        v.push(e);
    }
    v
}

/// One failed request of one disk: the facts of QEMU's `BLOCK_IO_ERROR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIoError {
    /// The block node the disk uses (`drive=`).
    pub node_name: String,
    /// What failed and what the disk did about it.
    pub report: IoErrorReport,
}

impl BlockIoError {
    /// Whether the disk holds the request and wants the machine stopped (`io-error`).
    pub fn stops_machine(&self) -> bool {
        self.report.action == ErrorAction::Stop
    }

    /// The data of QMP's `BLOCK_IO_ERROR` as QEMU 7.2 sends it for a disk on a
    /// `-blockdev` node: `device` is the (anonymous) block backend's name, empty;
    /// `nospace` only when the disk tracks an I/O status (a policy that can stop).
    pub fn event_data(&self) -> serde_json::Value {
        let mut data = serde_json::json!({
            "device": "",
            "node-name": self.node_name,
            "operation": self.report.operation.as_str(),
            "action": self.report.action.as_str(),
            "reason": self.report.reason(),
        });
        if self.report.io_status {
            data["nospace"] = self.report.nospace().into();
        }
        data
    }
}

/// One disk the machine has.
struct Disk {
    device: Weak<Mutex<dyn VirtioDevice>>,
    node: String,
    /// Whether it tracks an I/O status (its policy can stop the machine).
    io_status: bool,
}

/// The machine's disks and where their errors go.
pub(crate) struct DiskErrors {
    events: Arc<dyn MachineEvents>,
    disks: Mutex<Vec<Disk>>,
    /// The I/O status of block nodes whose disk stopped the machine: `nospace` or `failed`
    /// (QEMU's `BlockDeviceIoStatus`). It stays after `cont`, as QEMU 7.2's for a disk on a
    /// `-blockdev` node (its `cont` resets only the named backends of `-drive`).
    failed: Arc<Mutex<HashMap<String, &'static str>>>,
}

impl DiskErrors {
    /// Errors go to `events` as [`MachineEvent::BlockIoError`].
    pub(crate) fn new(events: Arc<dyn MachineEvents>) -> Arc<Self> {
        Arc::new(Self {
            events,
            disks: Mutex::new(Vec::new()),
            failed: Arc::default(),
        })
    }

    /// The sink for the disk on block node `node`.
    pub(crate) fn sink_for(&self, node: &str) -> Arc<dyn IoErrorSink> {
        Arc::new(DiskSink {
            node: node.to_owned(),
            events: self.events.clone(),
            failed: self.failed.clone(),
        })
    }

    /// Remembers `disk` on block node `node`, so that [`DiskErrors::retry`] reaches it and
    /// [`DiskErrors::io_status`] knows it (`io_status`: its policy can stop the machine);
    /// an unplugged disk is forgotten once it is dropped.
    pub(crate) fn track(&self, disk: &Arc<Mutex<dyn VirtioDevice>>, node: &str, io_status: bool) {
        let mut disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        disks.retain(|d| d.device.strong_count() > 0);
        disks.push(Disk {
            device: Arc::downgrade(disk),
            node: node.to_owned(),
            io_status,
        });
    }

    /// `query-block`'s `io-status` of the disk on block node `node`: `ok`, or `failed` or
    /// `nospace` once an error stopped the machine; `None` if no disk on it tracks one.
    pub(crate) fn io_status(&self, node: &str) -> Option<&'static str> {
        let disks = self.disks.lock().unwrap_or_else(|p| p.into_inner());
        disks
            .iter()
            .any(|d| d.node == node && d.io_status && d.device.strong_count() > 0)
            .then(|| {
                let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get(node).copied().unwrap_or("ok")
            })
    }

    /// The machine continues: every disk runs the requests it held.
    pub(crate) fn retry(&self) {
        let disks: Vec<_> = self
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|d| d.device.upgrade())
            .collect();
        for disk in disks {
            disk.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }
}

struct DiskSink {
    node: String,
    events: Arc<dyn MachineEvents>,
    failed: Arc<Mutex<HashMap<String, &'static str>>>,
}

impl IoErrorSink for DiskSink {
    fn io_error(&self, report: IoErrorReport) {
        log::warn!(
            "block node '{}': host {} error ({}), action {}",
            self.node,
            report.operation.as_str(),
            report.reason(),
            report.action.as_str()
        );
        if report.action == ErrorAction::Stop {
            // The first error stays, as QEMU's `blk_iostatus_set_err`.
            let status = if report.nospace() {
                "nospace"
            } else {
                "failed"
            };
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.node.clone())
                .or_insert(status);
        }
        self.events
            .machine_event(MachineEvent::BlockIoError(BlockIoError {
                node_name: self.node.clone(),
                report,
            }));
    }
}
