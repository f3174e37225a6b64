//! Device backends (`blockdev-add`, `netdev_add`, `chardev-add` and their command-line
//! forms), kept by the VMM from no-machine on and looked up by a device's `drive=`,
//! `netdev=` or `chardev=` property when it is realized.
//!
//! Only what the backend *is* lives here (a file name, an interface name); the device models
//! in `keel-virtio` open them at realize time.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// The options of `-netdev user` (re-exported so that callers need not name keel-slirp).
pub use keel_slirp::UserOptions;

/// Most backends of each kind; more are refused (the store is client-controlled).
pub const MAX_BACKENDS: usize = 256;

/// The id prefix of the backends `-nic` creates (QEMU's `__org.qemu.nicN`).
pub const NIC_NETDEV_PREFIX: &str = "__org.qemu.nic";

/// A raw image (`-blockdev driver=file,...` / `blockdev-add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockBackend {
    /// Image path.
    pub filename: PathBuf,
    /// Opened read-only.
    pub read_only: bool,
}

/// A `-drive`'s `rerror=` and `werror=` (QEMU keeps them on the block backend; a disk whose
/// own property is `auto` takes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriveErrors {
    /// `rerror=`.
    pub read: Option<String>,
    /// `werror=`.
    pub write: Option<String>,
}

/// What `blockdev-add` / `-blockdev` asks for: a `file` node (a raw image) or a `raw`
/// format node over a `file` node (libvirt's pair, `libvirt-N-format` on
/// `libvirt-N-storage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockdevSpec {
    /// `driver`: `file` or `raw`.
    pub driver: String,
    /// `filename` (driver `file`).
    pub filename: Option<PathBuf>,
    /// `file`: the node under a `raw` node, by name.
    pub file: Option<String>,
    /// `read-only` (default off).
    pub read_only: Option<bool>,
    /// `auto-read-only`: a `file` node that cannot be opened for writing is opened
    /// read-only instead of failing, as QEMU.
    pub auto_read_only: Option<bool>,
    /// `discard`: `ignore` or `unmap` (Keel's disks do not offer discard, so both behave
    /// as `ignore`).
    pub discard: Option<String>,
}

impl BlockBackend {
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

/// A network backend (`-netdev tap,...`, `-netdev user,...` / `netdev_add`).
#[derive(Debug, Clone)]
pub enum NetBackend {
    /// A host tap interface, opened when a device uses it.
    Tap {
        /// Host tap interface name.
        ifname: String,
    },
    /// A user network (libslirp), running from the moment it was added, as in QEMU: its
    /// `hostfwd` ports listen at once.
    User(Arc<keel_slirp::UserNet>),
}

/// What `netdev_add` / `-netdev` asks for (`type=tap` or `type=user`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetdevSpec {
    /// `type`: `tap` or `user`.
    pub kind: String,
    /// `ifname` (tap).
    pub ifname: Option<String>,
    /// `script` (tap; only `no`).
    pub script: Option<String>,
    /// `downscript` (tap; only `no`).
    pub downscript: Option<String>,
    /// The options of `type=user`.
    pub user: keel_slirp::UserOptions,
}

impl NetdevSpec {
    /// The first option given that belongs to the other type, named as QEMU would.
    fn foreign_option(&self) -> Option<&'static str> {
        let u = &self.user;
        if self.kind == "user" {
            [
                ("ifname", self.ifname.is_some()),
                ("script", self.script.is_some()),
                ("downscript", self.downscript.is_some()),
            ]
            .into_iter()
            .find_map(|(k, set)| set.then_some(k))
        } else {
            [
                ("net", u.net.is_some()),
                ("host", u.host.is_some()),
                ("dhcpstart", u.dhcpstart.is_some()),
                ("dns", u.dns.is_some()),
                ("hostname", u.hostname.is_some()),
                ("domainname", u.domainname.is_some()),
                ("restrict", u.restrict),
                ("ipv4", u.ipv4.is_some()),
                ("ipv6", u.ipv6.is_some()),
                ("hostfwd", !u.hostfwd.is_empty()),
            ]
            .into_iter()
            .find_map(|(k, set)| set.then_some(k))
        }
    }
}

impl NetBackend {
    /// The backend `spec` describes. `tap` needs `ifname`, and `script`/`downscript` may
    /// only be `no` (Keel runs no network scripts); `user` starts its libslirp stack now,
    /// binding its `hostfwd` ports (a taken port fails here, as in QEMU).
    pub fn from_netdev(spec: &NetdevSpec) -> Result<Self, BackendError> {
        let bad = |m: String| Err(BackendError::Invalid(m));
        if !matches!(spec.kind.as_str(), "tap" | "user") {
            return bad(format!(
                "netdev type '{}' is not supported (use type=user or type=tap)",
                spec.kind
            ));
        }
        if let Some(k) = spec.foreign_option() {
            return bad(format!(
                "Parameter '{k}' is unexpected for type={}",
                spec.kind
            ));
        }
        if spec.kind == "user" {
            let config = keel_slirp::UserConfig::from_options(&spec.user)
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            let net = keel_slirp::UserNet::start(config)
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            return Ok(NetBackend::User(Arc::new(net)));
        }
        let scripts = [spec.script.as_deref(), spec.downscript.as_deref()];
        for (k, v) in ["script", "downscript"].into_iter().zip(scripts) {
            if v.is_some_and(|v| v != "no") {
                return bad(format!(
                    "Parameter '{k}' must be 'no': Keel does not run network scripts"
                ));
            }
        }
        match &spec.ifname {
            Some(ifname) => Ok(NetBackend::Tap {
                ifname: ifname.clone(),
            }),
            None => bad("Parameter 'ifname' is missing (name the host tap interface)".into()),
        }
    }
}

/// A character backend (`-chardev file|null,...` / `chardev-add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum CharBackend {
    /// Output goes to a file, opened when the backend is added (`/dev/fdset/N` takes a
    /// descriptor of an fd set, see [`Backends::open`]).
    File {
        /// File path.
        path: PathBuf,
        /// Append to the file instead of truncating it (`append=on`).
        append: bool,
    },
    /// Output is dropped.
    Null,
    /// Output goes to the VMM's standard output.
    Stdio,
    /// A pseudo-terminal the VMM creates; a client opens `path` (`/dev/pts/N`) to read
    /// the output. While nobody does, output is dropped, as with QEMU.
    Pty {
        /// The terminal's path, known once the backend is added.
        path: String,
    },
}

impl CharBackend {
    /// The backend as `query-chardev` names it (`file:PATH`, `null`, `stdio`).
    pub fn filename(&self) -> String {
        match self {
            CharBackend::File { path, .. } => format!("file:{}", path.display()),
            CharBackend::Null => "null".into(),
            CharBackend::Stdio => "stdio".into(),
            CharBackend::Pty { path } => format!("pty:{path}"),
        }
    }
}

impl CharBackend {
    /// The backend of a `chardev-add` (`{"type": "file", "data": {"out": PATH,
    /// "append": BOOL}}`, `null`, `stdio`), with QEMU's messages for what is missing.
    pub fn from_qapi(backend: &serde_json::Value) -> Result<Self, BackendError> {
        let kind = backend.get("type").and_then(serde_json::Value::as_str);
        let data = backend.get("data");
        Ok(match kind {
            Some("null") => CharBackend::Null,
            Some("stdio") => CharBackend::Stdio,
            Some("pty") => CharBackend::Pty {
                path: String::new(),
            },
            Some("file") => {
                let out = data.and_then(|d| d.get("out")).and_then(|v| v.as_str());
                let append = data
                    .and_then(|d| d.get("append"))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                match out {
                    Some(p) if !p.is_empty() => CharBackend::File {
                        path: p.into(),
                        append,
                    },
                    _ => {
                        return Err(BackendError::Invalid(
                            "Parameter 'backend.data.out' is missing (the output file)".into(),
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(BackendError::Invalid(format!(
                    "chardev backend '{other}' is not supported for devices (use file, pty, null or stdio)"
                )));
            }
            None => {
                return Err(BackendError::Invalid(
                    "Parameter 'backend.type' is missing".into(),
                ));
            }
        })
    }
}

/// One fd set as `query-fdsets` reports it: its id and its descriptors with their opaque
/// text.
pub type FdSetInfo = (u64, Vec<(i32, Option<String>)>);

/// A user-created object (`-object`): what Keel keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserObject {
    /// `secret`: bytes other objects may refer to by id (libvirt's master key).
    Secret {
        /// The secret's bytes as given (`format=raw`) or its base64 text (`format=base64`).
        data: Vec<u8>,
    },
    /// `memory-backend-ram`: anonymous RAM of `size` bytes, used by a machine through
    /// `-machine memory-backend=ID`.
    MemoryBackendRam {
        /// Size in bytes.
        size: u64,
        /// A machine took it as its RAM.
        used: bool,
    },
    /// `rng-random`: an entropy source read from a host file (`filename`, by default
    /// `/dev/urandom`), for `virtio-rng-*,rng=ID`.
    RngRandom {
        /// The host file.
        filename: String,
    },
    /// `rng-builtin`: QEMU's own entropy (the host's `/dev/urandom` for Keel).
    RngBuiltin,
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

/// One descriptor of an fd set (`-add-fd`).
#[derive(Debug)]
struct SetFd {
    fd: std::os::fd::OwnedFd,
    opaque: Option<String>,
    /// `remove-fd` asked for it while the guest was not running: QEMU closes such a
    /// descriptor at the next `remove-fd` of its set while the guest runs, and lists it
    /// until then.
    removed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Files of the `file` character backends and masters of the `pty` ones, opened when
    /// the backend was added.
    char_files: BTreeMap<String, Arc<std::fs::File>>,
    /// Log files of character backends (`logfile=`), opened with them.
    char_logs: BTreeMap<String, Arc<std::fs::File>>,
    /// Fd sets by id (`-add-fd`).
    fdsets: BTreeMap<u64, Vec<SetFd>>,
    /// `-object` objects by id.
    objects: BTreeMap<String, UserObject>,
    /// `-audiodev` ids (driver `none`).
    audiodevs: Vec<String>,
    block: BTreeMap<String, BlockBackend>,
    /// `raw` format nodes: the `file` node under each.
    block_children: BTreeMap<String, String>,
    /// Devices using each block node.
    block_users: BTreeMap<String, Vec<BlockUse>>,
    next_lease: u64,
    /// Descriptors kept by `getfd`, by name.
    named_fds: BTreeMap<String, std::os::fd::OwnedFd>,
    /// `-drive` error policies (`rerror=`, `werror=`) by node.
    drive_errors: BTreeMap<String, DriveErrors>,
    net: BTreeMap<String, NetBackend>,
    chardev: BTreeMap<String, CharBackend>,
    /// `-global` defaults, in the order given.
    globals: Vec<keel_qdev::GlobalProp>,
    /// `-rtc base=`: the guest's RTC time minus the host's UTC time, seconds.
    rtc_offset: Option<i64>,
    /// `-mem-prealloc`: the board touches every page of guest RAM when it builds it.
    mem_prealloc: bool,
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

    /// Adds a `-global` default; the board hands them to its device tree when it is built
    /// (they are command-line state read by the board, like the backends).
    pub fn add_global(&self, g: keel_qdev::GlobalProp) {
        self.lock().globals.push(g);
    }

    /// `-rtc base=utc|localtime|DATE`: the RTC the board builds starts there (see
    /// [`rtc_offset`]); QEMU's error text for a malformed date.
    pub fn set_rtc_base(&self, base: &str) -> Result<(), BackendError> {
        let off = rtc_offset(base, now_unix()).map_err(BackendError::Invalid)?;
        self.lock().rtc_offset = Some(off);
        Ok(())
    }

    /// The RTC's start as the guest's time minus the host's UTC time, seconds, if `-rtc
    /// base=` was given.
    pub fn rtc_offset(&self) -> Option<i64> {
        self.lock().rtc_offset
    }

    /// `-mem-prealloc`: every page of the guest's RAM is allocated when the machine is built.
    pub fn set_mem_prealloc(&self) {
        self.lock().mem_prealloc = true;
    }

    /// Whether `-mem-prealloc` was given.
    pub fn mem_prealloc(&self) -> bool {
        self.lock().mem_prealloc
    }

    /// The `-global` defaults, in the order given.
    pub fn globals(&self) -> Vec<keel_qdev::GlobalProp> {
        self.lock().globals.clone()
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
        let mut inner = self.lock();
        inner.block_children.remove(node_name);
        inner.drive_errors.remove(node_name);
        inner.block.remove(node_name).is_some()
    }

    /// Sets the error policy of `-drive` `node_name` (values as QEMU's `-drive` checked
    /// them): a disk on the node follows it where its own `rerror`/`werror` is `auto`.
    pub fn set_drive_errors(&self, node_name: &str, policy: DriveErrors) {
        self.lock()
            .drive_errors
            .insert(node_name.to_owned(), policy);
    }

    /// The `-drive` error policy of block node `node_name` (none set: both `None`).
    pub fn drive_errors(&self, node_name: &str) -> DriveErrors {
        self.lock()
            .drive_errors
            .get(node_name)
            .cloned()
            .unwrap_or_default()
    }

    /// The `raw` node that has block node `node_name` as its `file` (a child cannot be
    /// deleted before its parent).
    pub fn block_parent(&self, node_name: &str) -> Option<String> {
        self.lock()
            .block_children
            .iter()
            .find(|(_, child)| *child == node_name)
            .map(|(parent, _)| parent.clone())
    }

    /// QMP `blockdev-add` / `-blockdev`: a `file` node, or a `raw` node over an existing
    /// `file` node (the same image; a device on it reads and writes the image directly).
    pub fn add_blockdev(&self, node_name: &str, spec: BlockdevSpec) -> Result<(), BackendError> {
        match spec.discard.as_deref() {
            None | Some("ignore" | "off" | "unmap" | "on") => {}
            Some(v) => {
                return Err(BackendError::Invalid(format!(
                    "Parameter 'discard' does not accept value '{v}'"
                )));
            }
        }
        let read_only = spec.read_only.unwrap_or(false);
        match (spec.driver.as_str(), spec.filename, spec.file) {
            ("file", Some(filename), None) => {
                let writable = || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&filename)
                        .is_ok()
                };
                let read_only = read_only || (spec.auto_read_only == Some(true) && !writable());
                self.add_block(
                    node_name,
                    BlockBackend {
                        filename,
                        read_only,
                    },
                )
            }
            ("file", None, _) => Err(BackendError::Invalid(
                "Parameter 'filename' is missing".into(),
            )),
            ("raw", None, Some(child)) => {
                let mut inner = self.lock();
                let Some(under) = inner.block.get(&child).cloned() else {
                    return Err(BackendError::Invalid(format!(
                        "Cannot find device='' nor node-name='{child}'"
                    )));
                };
                if !read_only && under.read_only {
                    return Err(BackendError::Invalid(format!(
                        "Could not open '{}': Block node is read-only",
                        under.filename.display()
                    )));
                }
                let b = BlockBackend {
                    filename: under.filename,
                    read_only,
                };
                insert(&mut inner.block, "node-name", node_name, b)?;
                inner.block_children.insert(node_name.to_owned(), child);
                Ok(())
            }
            ("raw", _, _) => Err(BackendError::Invalid(
                "Parameter 'file' is missing (the name of a driver=file node)".into(),
            )),
            (d, _, _) => Err(BackendError::Invalid(format!(
                "blockdev driver '{d}' is not supported (use driver=file with a raw image)"
            ))),
        }
    }

    /// Block node `name` as `query-named-block-nodes` and `query-block` show it, `None` if
    /// there is none: a `raw` node shows its driver and format.
    pub fn node_info(&self, name: &str) -> Option<serde_json::Value> {
        let inner = self.lock();
        let mut v = inner.block.get(name)?.node_info(name);
        if inner.block_children.contains_key(name) {
            v["drv"] = "raw".into();
            v["image"]["format"] = "raw".into();
        }
        Some(v)
    }

    /// Every block node as `query-named-block-nodes` shows it.
    pub fn node_infos(&self) -> Vec<serde_json::Value> {
        let names: Vec<String> = self.lock().block.keys().cloned().collect();
        names.iter().filter_map(|n| self.node_info(n)).collect()
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

    /// `netdev_add`: checks the id, then builds the backend (a user network starts here)
    /// and keeps it. `-nic`'s own backends are named `__org.qemu.nicN`, as in QEMU.
    pub fn add_netdev(&self, id: &str, spec: &NetdevSpec) -> Result<(), BackendError> {
        let mut inner = self.lock();
        if !id.starts_with(NIC_NETDEV_PREFIX) {
            check_id("netdev", id)?;
        }
        if inner.net.contains_key(id) {
            return Err(BackendError::Duplicate {
                kind: "netdev",
                id: id.to_owned(),
            });
        }
        let n = NetBackend::from_netdev(spec)?;
        if let NetBackend::Tap { ifname } = &n
            && (ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ)
        {
            return Err(BackendError::Invalid(format!(
                "tap interface name '{ifname}' must have 1 to {} characters",
                libc::IFNAMSIZ - 1
            )));
        }
        if inner.net.len() >= MAX_BACKENDS {
            return Err(BackendError::Full("netdev"));
        }
        inner.net.insert(id.to_owned(), n);
        Ok(())
    }

    /// HMP's `hostfwd_add` (`add`) or `hostfwd_remove` on user network `netdev` (the first
    /// one when `None`): the monitor's text, QEMU's lines.
    pub fn hostfwd_command(&self, add: bool, netdev: Option<&str>, rule: &str) -> String {
        let net = match self.user_net(netdev) {
            Ok(n) => n,
            Err(e) => return format!("{e}\r\n"),
        };
        let r = if add {
            net.hostfwd_add(rule).map(|()| String::new())
        } else {
            net.hostfwd_remove(rule).map(|found| {
                let what = if found { "removed" } else { "not found" };
                format!("host forwarding rule for {rule} {what}\r\n")
            })
        };
        r.unwrap_or_else(|e| format!("{e}\r\n"))
    }

    /// The user network `id` names, or the first one when `id` is `None` (HMP's
    /// `hostfwd_add [netdev_id] rule`), with QEMU's messages when there is none.
    pub fn user_net(&self, id: Option<&str>) -> Result<Arc<keel_slirp::UserNet>, BackendError> {
        let inner = self.lock();
        let bad = |m: String| Err(BackendError::Invalid(m));
        match id {
            Some(id) => match inner.net.get(id) {
                Some(NetBackend::User(n)) => Ok(Arc::clone(n)),
                Some(_) => bad("invalid device specified".into()),
                None => bad(format!("unrecognized netdev id '{id}'")),
            },
            None => inner
                .net
                .values()
                .find_map(|n| match n {
                    NetBackend::User(n) => Some(Arc::clone(n)),
                    NetBackend::Tap { .. } => None,
                })
                .map_or_else(|| bad("user mode network stack not in use".into()), Ok),
        }
    }

    /// `chardev-add`. A `file` backend is created (or truncated) now, as QEMU opens it at
    /// this point, so a path into a missing directory fails here and not when a device uses it.
    pub fn add_chardev(&self, id: &str, c: CharBackend) -> Result<(), BackendError> {
        self.add_chardev_logged(id, c, None).map(drop)
    }

    /// `chardev-add` with QEMU's `logfile`/`logappend`: every byte the device writes also
    /// goes to the log. A `pty` backend's terminal is created now; its path is returned.
    pub fn add_chardev_logged(
        &self,
        id: &str,
        mut c: CharBackend,
        log: Option<CharLog>,
    ) -> Result<Option<String>, BackendError> {
        let mut inner = self.lock();
        check_id("chardev", id)?;
        if inner.chardev.contains_key(id) {
            return Err(BackendError::Duplicate {
                kind: "chardev",
                id: id.to_owned(),
            });
        }
        if inner.chardev.len() >= MAX_BACKENDS {
            return Err(BackendError::Full("chardev"));
        }
        if let CharBackend::File { path, append } = &c {
            let mode = if *append {
                OpenMode::Append
            } else {
                OpenMode::Create
            };
            let f = open_in(&inner, path, mode)?;
            inner.char_files.insert(id.to_owned(), Arc::new(f));
        }
        let mut pty = None;
        if let CharBackend::Pty { path } = &mut c {
            let (master, name) = open_pty()?;
            *path = name.clone();
            pty = Some(name);
            inner.char_files.insert(id.to_owned(), Arc::new(master));
        }
        if let Some(log) = log {
            let mode = if log.append {
                OpenMode::Append
            } else {
                OpenMode::Create
            };
            match open_in(&inner, &log.path, mode) {
                Ok(f) => {
                    inner.char_logs.insert(id.to_owned(), Arc::new(f));
                }
                Err(e) => {
                    inner.char_files.remove(id);
                    return Err(e);
                }
            }
        }
        if let Err(e) = insert(&mut inner.chardev, "chardev", id, c) {
            inner.char_files.remove(id);
            inner.char_logs.remove(id);
            return Err(e);
        }
        Ok(pty)
    }

    /// Where a device reads its input from character backend `id`: the terminal of a `pty`
    /// backend, standard input for `stdio`; `None` for backends that give no input
    /// (`file`, `null`).
    pub fn char_reader(
        &self,
        id: &str,
    ) -> Result<Option<Box<dyn std::io::Read + Send>>, BackendError> {
        let backend = self.chardev(id)?;
        let file = self.lock().char_files.get(id).cloned();
        Ok(match backend {
            CharBackend::Pty { .. } => file.map(|f| Box::new(PtyReader(f)) as Box<_>),
            CharBackend::Stdio => Some(Box::new(std::io::stdin())),
            CharBackend::File { .. } | CharBackend::Null => None,
        })
    }

    /// Where a device writes the output of character backend `id`: its file (shared with
    /// the backend, so `append` and fd sets hold), nothing (`null`) or standard output.
    pub fn char_writer(&self, id: &str) -> Result<Box<dyn std::io::Write + Send>, BackendError> {
        let backend = self.chardev(id)?;
        let (file, log) = {
            let inner = self.lock();
            (
                inner.char_files.get(id).cloned(),
                inner.char_logs.get(id).cloned(),
            )
        };
        let not_open = || BackendError::Invalid(format!("chardev '{id}' is not open"));
        let out: Box<dyn std::io::Write + Send> = match backend {
            CharBackend::File { .. } => Box::new(FileWriter(file.ok_or_else(not_open)?)),
            CharBackend::Pty { .. } => Box::new(PtyWriter(file.ok_or_else(not_open)?)),
            CharBackend::Null => Box::new(std::io::sink()),
            CharBackend::Stdio => Box::new(std::io::stdout()),
        };
        Ok(match log {
            Some(log) => Box::new(Tee(out, FileWriter(log))),
            None => out,
        })
    }

    /// Opens `path` with `options`, as QEMU's `qemu_open`: `/dev/fdset/N` duplicates a
    /// descriptor of fd set `N` (`-add-fd`) whose access mode matches; any other path is
    /// opened. Errors carry QEMU's words.
    pub fn open(
        &self,
        path: &std::path::Path,
        mode: OpenMode,
    ) -> Result<std::fs::File, BackendError> {
        open_in(&self.lock(), path, mode)
    }

    /// `-add-fd fd=FD,set=SET[,opaque=TEXT]`: puts the inherited descriptor `fd` into fd set
    /// `set` (the process owns it from now on).
    pub fn add_fd(&self, set: u64, fd: i32, opaque: Option<String>) -> Result<(), BackendError> {
        use std::os::fd::FromRawFd;
        if fd < 3 {
            return Err(BackendError::Invalid(
                "fd cannot be a standard I/O stream".into(),
            ));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags; an fd that is not open fails.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(BackendError::Invalid(
                "fd is not valid or already in use".into(),
            ));
        }
        let mut inner = self.lock();
        let in_use = inner
            .fdsets
            .values()
            .flatten()
            .any(|s| std::os::fd::AsRawFd::as_raw_fd(&s.fd) == fd);
        if in_use {
            return Err(BackendError::Invalid(
                "fd is not valid or already in use".into(),
            ));
        }
        let total: usize = inner.fdsets.values().map(Vec::len).sum();
        if total >= MAX_BACKENDS {
            return Err(BackendError::Full("fd set"));
        }
        // SAFETY: the descriptor is open (checked above), inherited for this purpose and
        // in no set yet: the store becomes its only owner, as QEMU's fd sets own theirs.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        inner.fdsets.entry(set).or_default().push(SetFd {
            fd,
            opaque,
            removed: false,
        });
        Ok(())
    }

    /// `add-fd`: a descriptor the client passed joins fd set `set` (the lowest id not in
    /// use when `None`); returns the set and the descriptor's number.
    pub fn add_passed_fd(
        &self,
        set: Option<i64>,
        fd: std::os::fd::OwnedFd,
        opaque: Option<String>,
    ) -> Result<(u64, i32), BackendError> {
        use std::os::fd::AsRawFd;
        check_text_len("opaque", opaque.as_deref().unwrap_or(""))?;
        let set = match set {
            Some(s) => u64::try_from(s).map_err(|_| {
                BackendError::Invalid("Parameter 'fdset-id' expects a non-negative value".into())
            })?,
            None => {
                let inner = self.lock();
                (0..).find(|id| !inner.fdsets.contains_key(id)).unwrap_or(0)
            }
        };
        let mut inner = self.lock();
        let total: usize = inner.fdsets.values().map(Vec::len).sum();
        if total >= MAX_BACKENDS {
            return Err(BackendError::Full("fd set"));
        }
        let raw = fd.as_raw_fd();
        inner.fdsets.entry(set).or_default().push(SetFd {
            fd,
            opaque,
            removed: false,
        });
        Ok((set, raw))
    }

    /// `remove-fd`: descriptor `fd` of set `set` (every one when `None`) is removed: closed
    /// now if the guest is `running`, otherwise marked and closed by a later `remove-fd`
    /// while it runs (QEMU 7.2 keeps listing such descriptors meanwhile).
    pub fn remove_fd(&self, set: i64, fd: Option<i64>, running: bool) -> Result<(), BackendError> {
        use std::os::fd::AsRawFd;
        let not_found = || {
            let name = match fd {
                Some(fd) => format!("fdset-id:{set}, fd:{fd}"),
                None => format!("fdset-id:{set}"),
            };
            BackendError::Invalid(format!("File descriptor named '{name}' not found"))
        };
        let mut inner = self.lock();
        let id = u64::try_from(set).map_err(|_| not_found())?;
        let fds = inner.fdsets.get_mut(&id).ok_or_else(not_found)?;
        match fd {
            Some(n) => {
                let entry = fds
                    .iter_mut()
                    .find(|s| i64::from(s.fd.as_raw_fd()) == n)
                    .ok_or_else(not_found)?;
                entry.removed = true;
            }
            None => fds.iter_mut().for_each(|s| s.removed = true),
        }
        if running {
            fds.retain(|s| !s.removed);
            if fds.is_empty() {
                inner.fdsets.remove(&id);
            }
        }
        Ok(())
    }

    /// `getfd`: keeps a descriptor the client passed under `name`, replacing (and closing)
    /// one of that name.
    pub fn keep_named_fd(&self, name: &str, fd: std::os::fd::OwnedFd) -> Result<(), BackendError> {
        check_text_len("fdname", name)?;
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(BackendError::Invalid(
                "Parameter 'fdname' expects a name not starting with a digit".into(),
            ));
        }
        let mut inner = self.lock();
        if !inner.named_fds.contains_key(name) && inner.named_fds.len() >= MAX_BACKENDS {
            return Err(BackendError::Full("named descriptor"));
        }
        inner.named_fds.insert(name.to_owned(), fd);
        Ok(())
    }

    /// `closefd`: closes the descriptor kept under `name`.
    pub fn close_named_fd(&self, name: &str) -> Result<(), BackendError> {
        match self.take_named_fd(name) {
            Some(_) => Ok(()),
            None => Err(BackendError::Invalid(format!(
                "File descriptor named '{name}' not found"
            ))),
        }
    }

    /// Takes the descriptor kept under `name` (`migrate uri=fd:NAME` consumes it, as QEMU).
    pub fn take_named_fd(&self, name: &str) -> Option<std::os::fd::OwnedFd> {
        self.lock().named_fds.remove(name)
    }

    /// The fd sets as `query-fdsets` reports them, highest id first as QEMU lists them:
    /// `(set, [(fd, opaque)])`, each set's descriptors in the order they were added.
    pub fn fdsets(&self) -> Vec<FdSetInfo> {
        use std::os::fd::AsRawFd;
        self.lock()
            .fdsets
            .iter()
            .rev()
            .map(|(id, fds)| {
                let v = fds
                    .iter()
                    .map(|s| (s.fd.as_raw_fd(), s.opaque.clone()))
                    .collect();
                (*id, v)
            })
            .collect()
    }

    /// `-object QOM-TYPE,id=ID,...`: the types Keel has (`secret`, `memory-backend-ram`),
    /// their properties checked and, for a secret, its data read now, as QEMU does.
    pub fn add_object(
        &self,
        qom_type: &str,
        id: &str,
        props: &[(String, String)],
    ) -> Result<(), BackendError> {
        let object = user_object(qom_type, props)?;
        let mut inner = self.lock();
        if inner.objects.contains_key(id) {
            return Err(BackendError::Invalid(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        insert(&mut inner.objects, "object", id, object)
    }

    /// The entropy source of `virtio-rng-*,rng=ID`: the `rng-random` object's file opened,
    /// or `None` for `rng-builtin` (the device's default source). QEMU's words otherwise.
    pub fn rng_source(&self, id: &str) -> Result<Option<std::fs::File>, BackendError> {
        match self.object(id) {
            Some(UserObject::RngRandom { filename }) => {
                std::fs::File::open(&filename).map(Some).map_err(|e| {
                    BackendError::Invalid(format!("Could not open '{filename}': {}", os_reason(&e)))
                })
            }
            Some(UserObject::RngBuiltin) => Ok(None),
            Some(_) => Err(BackendError::Invalid(format!(
                "Invalid parameter type for 'rng', expected: an rng-random or rng-builtin object ('{id}' is not one)"
            ))),
            None => Err(BackendError::Invalid(format!("Device '{id}' not found"))),
        }
    }

    /// The object `id`, if there is one.
    pub fn object(&self, id: &str) -> Option<UserObject> {
        self.lock().objects.get(id).cloned()
    }

    /// A machine takes memory backend `id` as its RAM (`-machine memory-backend=ID`): its
    /// size, which must equal `-m` when that was given.
    pub fn use_memory_backend(&self, id: &str, ram_size: Option<u64>) -> Result<u64, BackendError> {
        let mut inner = self.lock();
        match inner.objects.get_mut(id) {
            Some(UserObject::MemoryBackendRam { size, used }) => {
                if *used {
                    return Err(BackendError::Invalid(format!(
                        "memory backend {id} can't be used multiple times."
                    )));
                }
                if ram_size.is_some_and(|r| r != *size) {
                    return Err(BackendError::Invalid(
                        "Size specified by -m option must match size of explicitly specified \
                         'memory-backend' property"
                            .into(),
                    ));
                }
                *used = true;
                Ok(*size)
            }
            _ => Err(BackendError::Invalid(format!(
                "Memory backend '{id}' not found"
            ))),
        }
    }

    /// `-audiodev driver=none,id=ID`: an audio backend that plays nothing (Keel has no
    /// sound device to use another).
    pub fn add_audiodev(&self, id: &str, driver: &str) -> Result<(), BackendError> {
        if driver != "none" {
            return Err(BackendError::Invalid(format!(
                "audio driver '{driver}' is not supported: Keel has no sound device (use driver=none)"
            )));
        }
        check_id("audiodev", id)?;
        let mut inner = self.lock();
        if inner.audiodevs.iter().any(|a| a == id) {
            return Err(BackendError::Duplicate {
                kind: "audiodev",
                id: id.to_owned(),
            });
        }
        if inner.audiodevs.len() >= MAX_BACKENDS {
            return Err(BackendError::Full("audiodev"));
        }
        inner.audiodevs.push(id.to_owned());
        Ok(())
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

/// Takes the machine properties every QEMU machine has that Keel handles outside the
/// machine types (QEMU's `MachineState`): `usb` (Keel's machines have no USB, so only
/// `off`) and `memory-backend` (the RAM's `-object`, returned, resolved at machine-init by
/// [`Backends::use_memory_backend`]). The rest stay for the machine type to check.
pub fn take_common_machine_props(
    props: &mut BTreeMap<String, String>,
) -> Result<Option<String>, BackendError> {
    if let Some(v) = props.remove("usb") {
        match keel_qdev::keyval::parse_bool(&v) {
            Some(false) => {}
            Some(true) => {
                return Err(BackendError::Invalid(
                    "usb=on: Keel's machines have no USB controller".into(),
                ));
            }
            None => {
                return Err(BackendError::Invalid(
                    "Parameter 'usb' expects 'on' or 'off'".into(),
                ));
            }
        }
    }
    Ok(props.remove("memory-backend"))
}

/// `-snapshot`: a private copy of the image at `path` that the guest can write to, gone
/// when the process exits (QEMU writes to a temporary overlay instead; for a raw image the
/// effect is the same). The copy is an unnamed file in `$TMPDIR` (else `/var/tmp`, as
/// QEMU's overlays) held open for the life of the process and opened again through
/// `/proc/self/fd/N`, the path returned.
pub fn temporary_copy(path: &std::path::Path) -> Result<PathBuf, BackendError> {
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |what: &str, e: std::io::Error| {
        BackendError::Invalid(format!(
            "-snapshot: cannot {what} '{}': {}",
            path.display(),
            os_reason(&e)
        ))
    };
    let dir = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let mut src = std::fs::File::open(path).map_err(|e| fail("open", e))?;
    let mut copy = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(&dir)
        .map_err(|e| fail(&format!("make a temporary copy in {} of", dir.display()), e))?;
    // By hand (read, write, seek): all-zero blocks stay holes, and no call outside the
    // main thread class's filter (copy_file_range) is made.
    let copied = (|| -> std::io::Result<()> {
        use std::io::{Read, Seek, Write};
        let mut buf = vec![0u8; 64 << 10];
        let mut len = 0u64;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf[..n].iter().all(|b| *b == 0) {
                copy.seek(std::io::SeekFrom::Current(n as i64))?;
            } else {
                copy.write_all(&buf[..n])?;
            }
            len += n as u64;
        }
        copy.set_len(len)
    })();
    copied.map_err(|e| fail("copy", e))?;
    // Kept open until the process exits: the copy's only reference.
    let fd = copy.into_raw_fd();
    Ok(PathBuf::from(format!("/proc/self/fd/{fd}")))
}

/// `-mem-prealloc`: allocates every page of `mem` now (by writing a zero into each page
/// of the still-zeroed RAM), as QEMU's preallocation, so the guest never waits for the
/// host to find memory and a host short of it fails at start rather than later.
pub fn prealloc(mem: &keel_accel::GuestMemory) {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
    const PAGE: u64 = 4096;
    for region in mem.iter() {
        let start = region.start_addr();
        let mut off = 0;
        while off < region.len() {
            // The RAM was just mapped and nothing has written to it: zero stays zero.
            let _ = mem.write_obj(0u8, vm_memory::GuestAddress(start.0 + off));
            off += PAGE;
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// QEMU's `-rtc base=`: the guest's RTC time minus the host's UTC time at `now` (seconds
/// since the epoch), in seconds. `utc`: 0; `localtime`: the host time zone's offset from
/// UTC now; `YYYY-MM-DD[THH:MM:SS]`: the RTC shows that date and time now and runs from
/// there. The error is QEMU's text.
pub fn rtc_offset(base: &str, now: i64) -> Result<i64, String> {
    match base {
        "utc" => return Ok(0),
        "localtime" => {
            let t: libc::time_t = now;
            // SAFETY: tm is plain data that localtime_r fills; both pointers are valid for
            // the call.
            let mut tm: libc::tm = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
            return Ok(if ok { tm.tm_gmtoff } else { 0 });
        }
        _ => {}
    }
    let bad = || {
        "invalid datetime format\nvalid formats: '2006-06-17T16:01:21' or '2006-06-17'".to_owned()
    };
    let (date, time) = base.split_once('T').unwrap_or((base, "00:00:00"));
    let num = |s: &str| s.trim().parse::<i64>().map_err(|_| bad());
    let d: Vec<i64> = date.split('-').map(num).collect::<Result<_, _>>()?;
    let t: Vec<i64> = time.split(':').map(num).collect::<Result<_, _>>()?;
    let ([y, mo, da], [h, mi, se]) = (d.as_slice(), t.as_slice()) else {
        return Err(bad());
    };
    if !(1..=12).contains(mo)
        || !(1..=31).contains(da)
        || !(0..=23).contains(h)
        || !(0..=59).contains(mi)
        || !(0..=59).contains(se)
    {
        return Err(bad());
    }
    // Each value was checked to fit above.
    let u = |v: i64| u32::try_from(v).unwrap_or(0);
    let dt = keel_devices::RtcDateTime {
        year: (*y).clamp(0, 9999),
        month: u(*mo),
        day: u(*da),
        hour: u(*h),
        minute: u(*mi),
        second: u(*se),
        weekday: 1,
    };
    Ok(dt.to_unix() - now)
}

/// `-overcommit mem-lock=on`: locks every page of the process in RAM, now and from now on
/// (guest RAM included), as QEMU's `mlockall(MCL_CURRENT | MCL_FUTURE)`.
pub fn lock_all_memory() -> Result<(), BackendError> {
    // SAFETY: mlockall takes flags only and changes no memory contents.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        return Err(BackendError::Invalid(format!(
            "locking memory failed: mlockall: {}",
            os_reason(&std::io::Error::last_os_error())
        )));
    }
    Ok(())
}

/// A character backend's log (QEMU's `logfile=PATH,logappend=on|off`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharLog {
    /// The log file (`/dev/fdset/N` takes a descriptor of an fd set).
    pub path: PathBuf,
    /// Append instead of truncating.
    pub append: bool,
}

impl CharLog {
    /// The log a `chardev-add` backend's `data` asks for (`logfile`, `logappend`).
    pub fn from_qapi(backend: &serde_json::Value) -> Option<Self> {
        let data = backend.get("data")?;
        let path = data.get("logfile")?.as_str()?;
        Some(Self {
            path: path.into(),
            append: data
                .get("logappend")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
        })
    }
}

/// Creates a pseudo-terminal in raw mode, as QEMU's `pty` chardev: its master (non-blocking,
/// close-on-exec) and the path of its slave.
fn open_pty() -> Result<(std::fs::File, String), BackendError> {
    use std::os::fd::FromRawFd;
    let fail = |what: &str| {
        BackendError::Invalid(format!(
            "Failed to create PTY: {what}: {}",
            os_reason(&std::io::Error::last_os_error())
        ))
    };
    // SAFETY: posix_openpt returns a new descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(fail("posix_openpt"));
    }
    // SAFETY: `fd` is a new descriptor this function owns from here on.
    let master = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut name = [0u8; 64];
    // SAFETY: grantpt/unlockpt act on the master we own; ptsname_r writes at most
    // `name.len()` bytes, NUL included, into our buffer.
    let ok = unsafe {
        libc::grantpt(fd) == 0
            && libc::unlockpt(fd) == 0
            && libc::ptsname_r(fd, name.as_mut_ptr().cast(), name.len()) == 0
    };
    if !ok {
        return Err(fail("grantpt/unlockpt/ptsname"));
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path = String::from_utf8_lossy(&name[..len]).into_owned();
    // Raw mode on the terminal (no echo, no line editing, no CR/LF translation).
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)
        .map_err(|_| fail("open"))?;
    {
        use std::os::fd::AsRawFd;
        // SAFETY: termios is plain data filled by tcgetattr on a terminal we opened.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptors are open terminals we own; `t` is a valid termios.
        let raw_ok = unsafe {
            libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 && {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSAFLUSH, &t) == 0
            }
        };
        if !raw_ok {
            return Err(fail("tcsetattr"));
        }
        // SAFETY: fcntl on the master we own; O_NONBLOCK so a full buffer (nobody reading)
        // never blocks the device.
        let fl = unsafe { libc::fcntl(master.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            return Err(fail("fcntl"));
        }
        // SAFETY: as above.
        let r = unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(fail("fcntl"));
        }
    }
    Ok((master, path))
}

/// A pty master as a writer: what the terminal cannot take now (nobody reads it) is
/// dropped, as QEMU's pty chardev does while disconnected.
struct PtyWriter(Arc<std::fs::File>);

impl std::io::Write for PtyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match (&*self.0).write(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(buf.len()),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(buf.len()),
            Err(e) => Err(e),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Longest client text kept with a descriptor (`getfd`'s name, `add-fd`'s opaque): the
/// store keeps up to [`MAX_BACKENDS`] of each, so their size is bounded too.
pub const MAX_FD_TEXT: usize = 1024;

fn check_text_len(what: &str, text: &str) -> Result<(), BackendError> {
    if text.len() > MAX_FD_TEXT {
        return Err(BackendError::Invalid(format!(
            "Parameter '{what}' is longer than {MAX_FD_TEXT} bytes"
        )));
    }
    Ok(())
}

/// A pty master as the guest's input: what a program on the terminal types. The master
/// is non-blocking, so the reader waits in `poll`; while no program holds the terminal
/// (the master reads `EIO` or polls `POLLHUP`) it looks again every tenth of a second,
/// as QEMU's pty chardev notices a connection by polling.
struct PtyReader(Arc<std::fs::File>);

impl std::io::Read for PtyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let idle = std::time::Duration::from_millis(100);
        loop {
            let mut p = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on a descriptor this reader keeps open.
            let r = unsafe { libc::poll(&mut p, 1, 1000) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                continue;
            }
            if p.revents & libc::POLLIN == 0 {
                std::thread::sleep(idle);
                continue;
            }
            match (&*self.0).read(buf) {
                Ok(0) => std::thread::sleep(idle),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => std::thread::sleep(idle),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Writes to a backend and its log.
struct Tee(Box<dyn std::io::Write + Send>, FileWriter);

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        // The log is best effort: a full disk must not stop the device.
        let _ = self.1.write_all(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A shared file as a writer (a character backend's file, written by its device).
struct FileWriter(Arc<std::fs::File>);

impl std::io::Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        (&*self.0).flush()
    }
}

/// How [`Backends::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only.
    Read,
    /// Read and write, no creation.
    ReadWrite,
    /// Write only, created if missing, truncated.
    Create,
    /// Write only, created if missing, appended to.
    Append,
}

fn open_in(
    inner: &Inner,
    path: &std::path::Path,
    mode: OpenMode,
) -> Result<std::fs::File, BackendError> {
    let name = path.display();
    let Some(set) = path.to_str().and_then(|p| p.strip_prefix("/dev/fdset/")) else {
        let mut o = std::fs::OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::Create => o.write(true).create(true).truncate(true),
            OpenMode::Append => o.append(true).create(true),
        };
        return o.open(path).map_err(|e| {
            BackendError::Invalid(format!("Could not open '{name}': {}", os_reason(&e)))
        });
    };
    let set: u64 = set
        .parse()
        .map_err(|_| BackendError::Invalid(format!("Could not open '{name}': Invalid argument")))?;
    // A descriptor of the set is taken when its access mode (F_GETFL) is the one asked.
    let want = match mode {
        OpenMode::Read => libc::O_RDONLY,
        OpenMode::ReadWrite => libc::O_RDWR,
        OpenMode::Create | OpenMode::Append => libc::O_WRONLY,
    };
    for s in inner.fdsets.get(&set).into_iter().flatten() {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL reads the flags of a descriptor the store owns.
        let fl = unsafe { libc::fcntl(s.fd.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            continue;
        }
        if fl & libc::O_ACCMODE == want {
            let fd = s.fd.try_clone().map_err(|e| {
                BackendError::Invalid(format!("Could not dup FD for {name}: {}", os_reason(&e)))
            })?;
            return Ok(std::fs::File::from(fd));
        }
    }
    Err(BackendError::Invalid(format!(
        "Could not open '{name}': No such file or directory"
    )))
}

/// The object of type `qom_type` from its properties (QEMU's names and messages).
fn user_object(qom_type: &str, props: &[(String, String)]) -> Result<UserObject, BackendError> {
    let bad = |k: &str| BackendError::Invalid(format!("Property '{qom_type}.{k}' not found"));
    let flag = |k: &str, v: &str| {
        keel_qdev::keyval::parse_bool(v)
            .ok_or_else(|| BackendError::Invalid(format!("Parameter '{k}' expects 'on' or 'off'")))
    };
    match qom_type {
        "secret" => {
            let (mut data, mut file, mut base64) = (None, None, false);
            for (k, v) in props {
                match k.as_str() {
                    "data" => data = Some(v.clone().into_bytes()),
                    "file" => file = Some(v.clone()),
                    "format" if v == "raw" => base64 = false,
                    "format" if v == "base64" => base64 = true,
                    "format" => {
                        return Err(BackendError::Invalid(format!(
                            "Parameter 'format' does not accept value '{v}'"
                        )));
                    }
                    "keyid" | "iv" => {
                        return Err(BackendError::Invalid(format!(
                            "secret: '{k}' (an encrypted secret) is not supported"
                        )));
                    }
                    _ => return Err(bad(k)),
                }
            }
            let data = match (data, file) {
                (Some(_), Some(_)) => {
                    return Err(BackendError::Invalid(
                        "'data' and 'file' are mutually exclusive".into(),
                    ));
                }
                (Some(d), None) => d,
                (None, Some(f)) => std::fs::read(&f).map_err(|e| {
                    BackendError::Invalid(format!("Unable to read {f}: {}", os_reason(&e)))
                })?,
                (None, None) => {
                    return Err(BackendError::Invalid(
                        "Either 'file' or 'data' must be provided".into(),
                    ));
                }
            };
            let b64 = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=');
            if base64 && !data.iter().all(b64) {
                return Err(BackendError::Invalid(
                    "Failed to base64 decode the secret: invalid character".into(),
                ));
            }
            Ok(UserObject::Secret { data })
        }
        "memory-backend-ram" => {
            let mut size = None;
            for (k, v) in props {
                match k.as_str() {
                    "size" => {
                        size = Some(keel_qdev::keyval::parse_size_unit(v, 1).ok_or_else(|| {
                            BackendError::Invalid(
                                "Parameter 'size' expects a non-negative number below 2^64".into(),
                            )
                        })?)
                    }
                    // What anonymous RAM is anyway: private, mergeable, in core dumps, not
                    // preallocated, no NUMA policy.
                    "share" | "prealloc" if !flag(k, v)? => {}
                    "merge" | "dump" if flag(k, v)? => {}
                    "policy" if v == "default" => {}
                    "share" | "prealloc" | "merge" | "dump" | "policy" => {
                        return Err(BackendError::Invalid(format!(
                            "memory-backend-ram: {k}={v} is not supported by Keel (its RAM is \
                             private anonymous memory)"
                        )));
                    }
                    _ => return Err(bad(k)),
                }
            }
            match size {
                None => Err(BackendError::Invalid("Parameter 'size' is missing".into())),
                Some(0) => Err(BackendError::Invalid(
                    "can't create backend with size 0".into(),
                )),
                Some(size) => Ok(UserObject::MemoryBackendRam { size, used: false }),
            }
        }
        "rng-random" => {
            let mut filename = "/dev/urandom".to_owned();
            for (k, v) in props {
                match k.as_str() {
                    "filename" => filename = v.clone(),
                    _ => return Err(bad(k)),
                }
            }
            Ok(UserObject::RngRandom { filename })
        }
        "rng-builtin" => match props.first() {
            Some((k, _)) => Err(bad(k)),
            None => Ok(UserObject::RngBuiltin),
        },
        other => Err(BackendError::Invalid(format!(
            "Parameter 'qom-type' does not accept value '{other}' (Keel's object types: \
             secret, memory-backend-ram, rng-random, rng-builtin)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
        let tap = |ifname: &str| NetdevSpec {
            kind: "tap".into(),
            ifname: Some(ifname.into()),
            ..NetdevSpec::default()
        };
        assert!(b.add_netdev("n0", &tap(&"x".repeat(20))).is_err());
        b.add_netdev("n0", &tap("keeltap0")).unwrap();
        let e = b.add_netdev("n0", &tap("keeltap0")).unwrap_err();
        assert_eq!(e.to_string(), "Duplicate netdev ID 'n0'");
        let mut user = tap("t");
        user.kind = "user".into();
        let e = b.add_netdev("n1", &user).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'ifname' is unexpected for type=user"
        );
        let mut net = tap("t");
        net.user.net = Some("10.0.3.0/24".into());
        let e = b.add_netdev("n1", &net).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'net' is unexpected for type=tap");
        assert_eq!(
            b.user_net(None).unwrap_err().to_string(),
            "user mode network stack not in use"
        );
        assert_eq!(
            b.user_net(Some("n0")).unwrap_err().to_string(),
            "invalid device specified"
        );
        b.add_chardev("c0", CharBackend::Null).unwrap();
        assert_eq!(b.chardev("c0").unwrap(), CharBackend::Null);
        std::fs::remove_file(&file).ok();
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("keel-backends-{}-{name}", std::process::id()))
    }

    /// libvirt's pair: a `file` node (with `auto-read-only` and `discard`) and a `raw`
    /// node over it; the device's node is the `raw` one, the child goes last.
    #[test]
    fn raw_node_over_a_file_node_as_libvirt_adds_them() {
        let b = Backends::new();
        let file = tmp("raw-pair");
        std::fs::write(&file, [0u8; 512]).unwrap();
        let storage = BlockdevSpec {
            driver: "file".into(),
            filename: Some(file.clone()),
            auto_read_only: Some(true),
            discard: Some("unmap".into()),
            ..BlockdevSpec::default()
        };
        b.add_blockdev("s", storage.clone()).unwrap();
        let format = BlockdevSpec {
            driver: "raw".into(),
            file: Some("s".into()),
            read_only: Some(false),
            ..BlockdevSpec::default()
        };
        b.add_blockdev("f", format.clone()).unwrap();
        assert_eq!(b.block("f").unwrap().filename, file);
        assert!(!b.block("f").unwrap().read_only);
        let info = b.node_info("f").unwrap();
        assert_eq!(
            (info["drv"].as_str(), info["file"].as_str()),
            (Some("raw"), file.to_str())
        );
        assert_eq!(b.node_info("s").unwrap()["drv"], "file");
        assert_eq!(b.node_infos().len(), 2);
        assert_eq!(b.block_parent("s").as_deref(), Some("f"));
        let missing = BlockdevSpec {
            file: Some("nope".into()),
            ..format.clone()
        };
        let e = b.add_blockdev("g", missing).unwrap_err().to_string();
        assert!(e.contains("node-name='nope'"), "{e}");
        let bad = BlockdevSpec {
            discard: Some("sometimes".into()),
            ..storage.clone()
        };
        assert!(b.add_blockdev("t", bad).is_err());
        let qcow = BlockdevSpec {
            driver: "qcow2".into(),
            ..format.clone()
        };
        assert!(
            b.add_blockdev("q", qcow)
                .unwrap_err()
                .to_string()
                .contains("qcow2")
        );
        assert!(b.remove_block("f"));
        assert_eq!(b.block_parent("s"), None);
        assert!(b.remove_block("s"));
        // A read-write raw node over a read-only file node is refused, as QEMU.
        let ro = BlockdevSpec {
            read_only: Some(true),
            ..storage
        };
        b.add_blockdev("s", ro).unwrap();
        let e = b.add_blockdev("f", format.clone()).unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
        b.add_blockdev(
            "f",
            BlockdevSpec {
                read_only: Some(true),
                ..format
            },
        )
        .unwrap();
        assert!(b.block("f").unwrap().read_only);
        std::fs::remove_file(&file).ok();
    }

    #[test]
    fn fd_sets_hand_out_a_descriptor_of_the_right_mode() {
        use std::io::Write;
        use std::os::fd::IntoRawFd;
        let b = Backends::new();
        let path = tmp("fdset");
        std::fs::write(&path, b"a").unwrap();
        let w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let r = std::fs::File::open(&path).unwrap();
        b.add_fd(3, w.into_raw_fd(), Some("serial".into())).unwrap();
        b.add_fd(3, r.into_raw_fd(), None).unwrap();
        let sets = b.fdsets();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].0, 3);
        assert_eq!(sets[0].1.len(), 2);
        assert_eq!(sets[0].1[0].1.as_deref(), Some("serial"));
        // A writer gets the write-only descriptor (appending, as it was opened).
        let mut f = b.open(Path::new("/dev/fdset/3"), OpenMode::Append).unwrap();
        f.write_all(b"b").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ab");
        b.open(Path::new("/dev/fdset/3"), OpenMode::Read).unwrap();
        // No read-write descriptor, no set 4, and a descriptor cannot be added twice.
        for (p, m) in [
            ("/dev/fdset/3", OpenMode::ReadWrite),
            ("/dev/fdset/4", OpenMode::Read),
        ] {
            assert_eq!(
                b.open(Path::new(p), m).unwrap_err().to_string(),
                format!("Could not open '{p}': No such file or directory")
            );
        }
        let fd = sets[0].1[0].0;
        assert_eq!(
            b.add_fd(1, fd, None).unwrap_err().to_string(),
            "fd is not valid or already in use"
        );
        assert!(
            b.add_fd(1, 2, None)
                .unwrap_err()
                .to_string()
                .contains("standard I/O")
        );
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn file_chardevs_append_or_truncate_and_log() {
        use std::io::Write;
        let b = Backends::new();
        let (out, log) = (tmp("chr-out"), tmp("chr-log"));
        std::fs::write(&out, b"old ").unwrap();
        std::fs::write(&log, b"log ").unwrap();
        let file = |append| CharBackend::File {
            path: out.clone(),
            append,
        };
        let logged = Some(CharLog {
            path: log.clone(),
            append: true,
        });
        b.add_chardev_logged("c0", file(true), logged).unwrap();
        b.char_writer("c0").unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"old new");
        assert_eq!(std::fs::read(&log).unwrap(), b"log new");
        b.add_chardev("c1", file(false)).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"");
        std::fs::remove_file(&out).ok();
        std::fs::remove_file(&log).ok();
    }

    #[test]
    fn passed_descriptors_keep_bounded_text() {
        let b = Backends::new();
        let null = || std::fs::File::open("/dev/null").unwrap().into();
        let long = "x".repeat(MAX_FD_TEXT + 1);
        assert!(b.keep_named_fd(&long, null()).is_err());
        assert!(b.add_passed_fd(None, null(), Some(long)).is_err());
        b.keep_named_fd("save", null()).unwrap();
        assert!(b.take_named_fd("save").is_some());
        assert_eq!(b.add_passed_fd(Some(4), null(), None).unwrap().0, 4);
        assert_eq!(b.add_passed_fd(None, null(), None).unwrap().0, 0);
    }

    #[test]
    fn pty_chardev_is_a_raw_terminal_that_never_blocks() {
        use std::io::{Read, Write};
        let b = Backends::new();
        let pty = b
            .add_chardev_logged(
                "p",
                CharBackend::Pty {
                    path: String::new(),
                },
                None,
            )
            .unwrap()
            .unwrap();
        assert!(pty.starts_with("/dev/pts/"), "{pty}");
        assert_eq!(b.chardev("p").unwrap().filename(), format!("pty:{pty}"));
        let mut w = b.char_writer("p").unwrap();
        // Nobody reads: far more than the terminal buffers is dropped, not blocked on.
        for _ in 0..256 {
            w.write_all(&[b'x'; 4096]).unwrap();
        }
        let mut tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pty)
            .unwrap();
        w.write_all(b"\n").unwrap();
        let mut buf = [0u8; 16];
        let n = tty.read(&mut buf).unwrap();
        assert!(n > 0);
        // Raw: a newline stays a newline (no CR added), no echo of what is written back.
        assert!(!buf[..n].contains(&b'\r'));
    }

    #[test]
    fn objects_and_the_machine_memory_backend() {
        let b = Backends::new();
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        b.add_object("secret", "s0", &p(&[("data", "k"), ("format", "raw")]))
            .unwrap();
        assert_eq!(
            b.object("s0"),
            Some(UserObject::Secret {
                data: b"k".to_vec()
            })
        );
        b.add_object("memory-backend-ram", "ram", &p(&[("size", "64M")]))
            .unwrap();
        assert!(
            b.add_object("memory-backend-ram", "ram", &p(&[("size", "64M")]))
                .unwrap_err()
                .to_string()
                .contains("duplicate")
        );
        for (t, props, err) in [
            (
                "secret",
                &[][..],
                "Either 'file' or 'data' must be provided",
            ),
            (
                "secret",
                &[("file", "/nonexistent/k")][..],
                "Unable to read /nonexistent/k",
            ),
            ("memory-backend-ram", &[("size", "0")][..], "size 0"),
            (
                "memory-backend-ram",
                &[("size", "1M"), ("share", "on")][..],
                "share=on",
            ),
            (
                "memory-backend-ram",
                &[("size", "1M"), ("bogus", "1")][..],
                "'memory-backend-ram.bogus' not found",
            ),
            ("iothread", &[][..], "does not accept value 'iothread'"),
        ] {
            let e = b.add_object(t, "x", &p(props)).unwrap_err().to_string();
            assert!(e.contains(err), "{t} {props:?}: {e}");
        }
        assert!(
            b.use_memory_backend("ram", Some(128 << 20))
                .unwrap_err()
                .to_string()
                .contains("must match")
        );
        assert_eq!(b.use_memory_backend("ram", None).unwrap(), 64 << 20);
        assert!(
            b.use_memory_backend("ram", None)
                .unwrap_err()
                .to_string()
                .contains("multiple times")
        );
        assert!(b.use_memory_backend("s0", None).is_err());
    }

    #[test]
    fn common_machine_props_and_audiodevs() {
        let mut props: BTreeMap<String, String> =
            [("usb", "off"), ("memory-backend", "ram"), ("acpi", "on")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(
            take_common_machine_props(&mut props).unwrap().as_deref(),
            Some("ram")
        );
        assert_eq!(props.keys().collect::<Vec<_>>(), ["acpi"]);
        props.insert("usb".into(), "on".into());
        assert!(take_common_machine_props(&mut props).is_err());
        let b = Backends::new();
        b.add_audiodev("a0", "none").unwrap();
        assert!(b.add_audiodev("a0", "none").is_err());
        assert!(b.add_audiodev("a1", "alsa").is_err());
    }
}
