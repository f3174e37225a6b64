//! Device backends (`blockdev-add`, `netdev_add`, `chardev-add` and their command-line
//! forms), kept by the VMM from no-machine on and looked up by a device's `drive=`,
//! `netdev=` or `chardev=` property when it is realized.
//!
//! Only what the backend *is* lives here (a file name, an interface name); the device models
//! in `keel-virtio` open them at realize time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;

/// Most backends of each kind; more are refused (the store is client-controlled).
pub const MAX_BACKENDS: usize = 256;

/// A raw image (`-blockdev driver=file,...` / `blockdev-add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockBackend {
    /// Image path.
    pub filename: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
}

impl BlockBackend {
    /// The backend of QMP `blockdev-add`: only `driver=file` (a raw image).
    pub fn from_blockdev(
        driver: &str,
        filename: PathBuf,
        read_only: Option<bool>,
    ) -> Result<Self, BackendError> {
        if driver != "file" {
            return Err(BackendError::Invalid(format!(
                "blockdev driver '{driver}' is not supported (use driver=file with a raw image)"
            )));
        }
        Ok(Self {
            filename,
            read_only: read_only.unwrap_or(false),
        })
    }

    /// The node as `query-named-block-nodes` and `query-block` show it (QEMU's
    /// `BlockDeviceInfo`). Keel opens images with the host page cache and keeps no I/O
    /// throttling, so the cache flags and limits are constants.
    pub fn node_info(&self, name: &str) -> serde_json::Value {
        let file = self.filename.display().to_string();
        let size = std::fs::metadata(&self.filename).map_or(0, |m| m.len());
        serde_json::json!({
            "file": file, "node-name": name, "ro": self.read_only, "drv": "file",
            "backing_file_depth": 0, "encrypted": false, "detect_zeroes": "off",
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": {"filename": file, "format": "file", "virtual-size": size},
            "write_threshold": 0,
            "cache": {"writeback": true, "direct": false, "no-flush": false},
        })
    }
}

/// A network backend (`-netdev tap,...` / `netdev_add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetBackend {
    /// Host tap interface name.
    pub ifname: String,
}

impl NetBackend {
    /// The backend of QMP `netdev_add`: `type=tap` with `ifname`; `script` and
    /// `downscript` may only be `no` (Keel runs no network scripts).
    pub fn from_netdev(
        kind: &str,
        scripts: [Option<&str>; 2],
        ifname: Option<String>,
    ) -> Result<Self, BackendError> {
        let bad = |m: String| Err(BackendError::Invalid(m));
        if kind != "tap" {
            return bad(format!(
                "netdev type '{kind}' is not supported (use type=tap)"
            ));
        }
        for (k, v) in ["script", "downscript"].into_iter().zip(scripts) {
            if v.is_some_and(|v| v != "no") {
                return bad(format!(
                    "Parameter '{k}' must be 'no': Keel does not run network scripts"
                ));
            }
        }
        match ifname {
            Some(ifname) => Ok(Self { ifname }),
            None => bad("Parameter 'ifname' is missing (name the host tap interface)".into()),
        }
    }
}

/// A character backend (`-chardev file|null,...` / `chardev-add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum CharBackend {
    /// Output goes to a file (created or truncated when the device opens it).
    File {
        /// File path.
        path: PathBuf,
    },
    /// Output is dropped.
    Null,
    /// Output goes to the VMM's standard output.
    Stdio,
}

impl CharBackend {
    /// The backend of QMP `chardev-add` (`backend`: `{"type": "file", "data": {"out":
    /// PATH}}`, `null` or `stdio`); other types are refused with what Keel takes.
    pub fn from_qmp(backend: &serde_json::Value) -> Result<Self, BackendError> {
        use serde_json::Value;
        let bad = |m: String| Err(BackendError::Invalid(m));
        let out = backend.pointer("/data/out").and_then(Value::as_str);
        match backend.get("type").and_then(Value::as_str) {
            Some("null") => Ok(CharBackend::Null),
            Some("stdio") => Ok(CharBackend::Stdio),
            Some("file") => match out {
                Some(p) if !p.is_empty() => Ok(CharBackend::File { path: p.into() }),
                _ => bad("Parameter 'backend.data.out' is missing (the output file)".into()),
            },
            Some(other) => bad(format!(
                "chardev backend '{other}' is not supported for devices (use file, null or stdio)"
            )),
            None => bad("Parameter 'backend.type' is missing".into()),
        }
    }

    /// The backend as `query-chardev` names it (`file:PATH`, `null`, `stdio`).
    pub fn filename(&self) -> String {
        match self {
            CharBackend::File { path } => format!("file:{}", path.display()),
            CharBackend::Null => "null".into(),
            CharBackend::Stdio => "stdio".into(),
        }
    }
}

/// Errors of the backend store; the text becomes a QMP `GenericError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The id or node name is taken.
    #[error("Duplicate {kind} ID '{id}'")]
    Duplicate {
        /// `node-name`, `netdev` or `chardev`.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// An id that QEMU would not accept.
    #[error("Invalid {kind} ID '{id}': use letters, digits, '-', '.', '_', starting with a letter")]
    BadId {
        /// Kind of backend.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// Too many backends of one kind.
    #[error("too many {0} backends (at most {MAX_BACKENDS})")]
    Full(&'static str),
    /// The backend cannot be used as given.
    #[error("{0}")]
    Invalid(String),
    /// A device names a backend that does not exist.
    #[error("{kind} '{id}' not found (add it first with {command})")]
    NotFound {
        /// `Drive`, `Netdev` or `Chardev`.
        kind: &'static str,
        /// The id the device gave.
        id: String,
        /// The command that creates it.
        command: &'static str,
    },
}

/// An OS error as QEMU words it: the system's message without Rust's " (os error N)".
pub fn os_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}

fn check_id(kind: &'static str, id: &str) -> Result<(), BackendError> {
    if keel_qdev::id_wellformed(id) {
        Ok(())
    } else {
        Err(BackendError::BadId {
            kind,
            id: id.to_owned(),
        })
    }
}

fn insert<T>(
    map: &mut BTreeMap<String, T>,
    kind: &'static str,
    id: &str,
    value: T,
) -> Result<(), BackendError> {
    check_id(kind, id)?;
    if map.contains_key(id) {
        return Err(BackendError::Duplicate {
            kind,
            id: id.to_owned(),
        });
    }
    if map.len() >= MAX_BACKENDS {
        return Err(BackendError::Full(kind));
    }
    map.insert(id.to_owned(), value);
    Ok(())
}

/// One device's use of a block backend.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockUse {
    lease: u64,
    /// The device writes the image.
    writes: bool,
    /// The device lets others write it (`share-rw=on`).
    shares_write: bool,
}

/// A device's claim on a block backend, released when dropped (the device is gone).
#[derive(Debug)]
pub struct BlockLease {
    backends: std::sync::Weak<Backends>,
    node: String,
    lease: u64,
}

impl Drop for BlockLease {
    fn drop(&mut self) {
        if let Some(b) = self.backends.upgrade()
            && let Some(users) = b.lock().block_users.get_mut(&self.node)
        {
            users.retain(|u| u.lease != self.lease);
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    block: BTreeMap<String, BlockBackend>,
    /// Devices using each block node.
    block_users: BTreeMap<String, Vec<BlockUse>>,
    next_lease: u64,
    net: BTreeMap<String, NetBackend>,
    chardev: BTreeMap<String, CharBackend>,
}

/// The backend store, shared by the VMM core (commands) and the board (realize).
#[derive(Debug, Default)]
pub struct Backends(Mutex<Inner>);

impl Backends {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every block node, by name.
    pub fn blocks(&self) -> Vec<(String, BlockBackend)> {
        self.lock()
            .block
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every character backend, by id.
    pub fn chardevs(&self) -> Vec<(String, CharBackend)> {
        self.lock()
            .chardev
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Removes a block node (`blockdev-del`); `false` if there is none of that name. The
    /// caller checks that no device uses it.
    pub fn remove_block(&self, node_name: &str) -> bool {
        self.lock().block.remove(node_name).is_some()
    }

    /// `blockdev-add` with `driver=file`: the file must exist (and be a regular file or a
    /// block device) now, as QEMU opens it at this point.
    pub fn add_block(&self, node_name: &str, b: BlockBackend) -> Result<(), BackendError> {
        match std::fs::metadata(&b.filename) {
            Ok(m) if !m.is_dir() => {}
            Ok(_) => {
                return Err(BackendError::Invalid(format!(
                    "Could not open '{}': Is a directory",
                    b.filename.display()
                )));
            }
            Err(e) => {
                return Err(BackendError::Invalid(format!(
                    "Could not open '{}': {}",
                    b.filename.display(),
                    os_reason(&e)
                )));
            }
        }
        insert(&mut self.lock().block, "node-name", node_name, b)
    }

    /// `netdev_add` with `type=tap`.
    pub fn add_net(&self, id: &str, n: NetBackend) -> Result<(), BackendError> {
        if n.ifname.is_empty() || n.ifname.len() >= libc::IFNAMSIZ {
            return Err(BackendError::Invalid(format!(
                "tap interface name '{}' must have 1 to {} characters",
                n.ifname,
                libc::IFNAMSIZ - 1
            )));
        }
        insert(&mut self.lock().net, "netdev", id, n)
    }

    /// `chardev-add`. A `file` backend is created (or truncated) now, as QEMU opens it at
    /// this point, so a path into a missing directory fails here and not when a device uses it.
    pub fn add_chardev(&self, id: &str, c: CharBackend) -> Result<(), BackendError> {
        let mut inner = self.lock();
        check_id("chardev", id)?;
        if inner.chardev.contains_key(id) {
            return Err(BackendError::Duplicate {
                kind: "chardev",
                id: id.to_owned(),
            });
        }
        if let CharBackend::File { path } = &c {
            std::fs::File::create(path).map_err(|e| {
                BackendError::Invalid(format!(
                    "Could not open '{}': {}",
                    path.display(),
                    os_reason(&e)
                ))
            })?;
        }
        insert(&mut inner.chardev, "chardev", id, c)
    }

    /// The block backend a device's `drive=` names.
    pub fn block(&self, id: &str) -> Result<BlockBackend, BackendError> {
        self.lock()
            .block
            .get(id)
            .cloned()
            .ok_or_else(|| BackendError::NotFound {
                kind: "Drive",
                id: id.to_owned(),
                command: "blockdev-add or -blockdev",
            })
    }

    /// Claims block node `id` for a device that `writes` (or only reads) it and does or does
    /// not let others write it (`share-rw`): one writer per image unless every user shares
    /// writes, as QEMU's permission model. The claim ends when the lease is dropped.
    pub fn attach_block(
        self: &std::sync::Arc<Self>,
        id: &str,
        writes: bool,
        shares_write: bool,
    ) -> Result<BlockLease, BackendError> {
        let mut inner = self.lock();
        if !inner.block.contains_key(id) {
            return Err(BackendError::NotFound {
                kind: "Drive",
                id: id.to_owned(),
                command: "blockdev-add or -blockdev",
            });
        }
        let users = inner.block_users.get(id).map(Vec::as_slice).unwrap_or(&[]);
        let conflict = users
            .iter()
            .any(|u| (writes && !u.shares_write) || (u.writes && !shares_write));
        if conflict {
            return Err(BackendError::Invalid(format!(
                "Drive '{id}' is already in use by another device (give share-rw=on to every \
                 device that should share it for writing)"
            )));
        }
        let lease = inner.next_lease;
        inner.next_lease += 1;
        inner
            .block_users
            .entry(id.to_owned())
            .or_default()
            .push(BlockUse {
                lease,
                writes,
                shares_write,
            });
        Ok(BlockLease {
            backends: std::sync::Arc::downgrade(self),
            node: id.to_owned(),
            lease,
        })
    }

    /// Whether a device uses block node `id` (it cannot be deleted then).
    pub fn block_in_use(&self, id: &str) -> bool {
        self.lock()
            .block_users
            .get(id)
            .is_some_and(|u| !u.is_empty())
    }

    /// The network backend a device's `netdev=` names.
    pub fn net(&self, id: &str) -> Result<NetBackend, BackendError> {
        self.lock()
            .net
            .get(id)
            .cloned()
            .ok_or_else(|| BackendError::NotFound {
                kind: "Netdev",
                id: id.to_owned(),
                command: "netdev_add or -netdev",
            })
    }

    /// The character backend a device's `chardev=` names.
    pub fn chardev(&self, id: &str) -> Result<CharBackend, BackendError> {
        self.lock()
            .chardev
            .get(id)
            .cloned()
            .ok_or_else(|| BackendError::NotFound {
                kind: "Chardev",
                id: id.to_owned(),
                command: "chardev-add or -chardev",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_and_lookups() {
        let b = Backends::new();
        let file = std::env::temp_dir().join(format!("keel-backends-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let blk = BlockBackend {
            filename: file.clone(),
            read_only: false,
        };
        b.add_block("d0", blk.clone()).unwrap();
        assert_eq!(
            b.add_block("d0", blk.clone()).unwrap_err().to_string(),
            "Duplicate node-name ID 'd0'"
        );
        assert!(b.add_block("0bad", blk).is_err());
        assert_eq!(b.block("d0").unwrap().filename, file);
        assert!(b.block("nope").unwrap_err().to_string().contains("'nope'"));
        let missing = BlockBackend {
            filename: "/nonexistent/keel".into(),
            read_only: true,
        };
        assert!(
            b.add_block("d1", missing)
                .unwrap_err()
                .to_string()
                .contains("Could not open")
        );
        assert!(
            b.add_net(
                "n0",
                NetBackend {
                    ifname: "x".repeat(20)
                }
            )
            .is_err()
        );
        b.add_chardev("c0", CharBackend::Null).unwrap();
        assert_eq!(b.chardev("c0").unwrap(), CharBackend::Null);
        std::fs::remove_file(&file).ok();
    }
}
