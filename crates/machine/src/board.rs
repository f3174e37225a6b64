//! The machine seam: a [`MachineType`] validates a configuration, says which accelerators
//! can run it and builds a [`Board`]; the board does what the lifecycle commands ask.
//!
//! A VMM (the `vmm` crate, or an embedder's own) holds a list of machine types and drives
//! them through the phases; it never names a concrete machine. A new machine is a type that
//! implements these two traits, in this crate or any other, registered with the VMM's builder.
//! `none` lives here so the whole lifecycle runs anywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use keel_accel::{AccelError, Accelerator};
use keel_phase::Phase;
use keel_qdev::{Added, DeviceRequest, DeviceTree, EventSink, QdevError};
use serde::Serialize;

use crate::MachineError;
use crate::backends::Backends;
use crate::factory::DeviceFactory;

/// Errors of machine types and boards; the text (with its sources) becomes a QMP
/// `GenericError`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BoardError {
    /// A property the machine type does not have.
    #[error("Property '{machine}-machine.{property}' not found")]
    UnknownProperty {
        /// Machine type name.
        machine: String,
        /// Property name.
        property: String,
    },
    /// A configuration value the machine cannot use.
    #[error("{0}")]
    Invalid(String),
    /// The machine cannot take this device.
    #[error("{0}")]
    Device(String),
    /// The machine type exists but cannot run in this build or on this host.
    #[error("machine type '{machine}' is not available: {reason}")]
    Unavailable {
        /// Machine type name.
        machine: String,
        /// Why, and what to use instead.
        reason: String,
    },
    /// A machine property cannot be set as given.
    #[error(transparent)]
    Property(#[from] crate::config::PropertyError),
    /// The accelerator cannot serve this machine (its own words).
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// Building or driving the machine model failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// A snapshot could not be written, or a stream was refused (its own words).
    #[error(transparent)]
    Snapshot(#[from] keel_snapshot::SnapshotError),
    /// The device model refused (onboard devices, buses); the message already carries the
    /// causes, so it is not repeated as a source.
    #[error("{}", .0.qmp_desc())]
    Qdev(QdevError),
}

/// Checks that `bytes` of guest RAM can be backed on this host: no more than its RAM plus
/// swap (`/proc/meminfo`). Guest RAM is mapped lazily, so without this check an oversized
/// `-m` is accepted and the process then grows until the host runs out. The error names the
/// numbers; where `/proc/meminfo` cannot be read, nothing is refused.
pub fn check_host_memory(ram_name: &str, bytes: u64) -> Result<(), BoardError> {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return Ok(());
    };
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    let (Some(ram), swap) = (field("MemTotal:"), field("SwapTotal:").unwrap_or(0)) else {
        return Ok(());
    };
    if bytes > ram.saturating_add(swap) {
        return Err(BoardError::Invalid(format!(
            "cannot set up guest memory '{ram_name}': {} requested, but this host has {} of RAM \
             and {} of swap",
            human_size(bytes),
            human_size(ram),
            human_size(swap)
        )));
    }
    Ok(())
}

/// A size in QEMU's style: `1 GiB`, `23.4 GiB`, `512 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What `machine-set` accumulated: the type and its properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineConfig {
    /// Machine type name.
    pub type_name: String,
    /// Guest RAM in bytes (`-m`); the machine's default if unset.
    pub memory: Option<u64>,
    /// Number of vCPUs (`-smp`); the machine's default if unset.
    pub cpus: Option<u32>,
    /// Kernel image to boot (`-kernel`).
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (`-initrd`).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    pub append: Option<String>,
    /// Serial port backends in order (`-serial`).
    pub serial: Vec<String>,
    /// Turn a guest reset into a shutdown (`-no-reboot`).
    pub no_reboot: bool,
    /// Machine-specific properties (`-machine TYPE,key=value`).
    pub props: BTreeMap<String, String>,
}

/// What `query-machines` says about a machine type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineTypeInfo {
    /// Type name.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Whether `machine-set` without a type picks it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_default: bool,
    /// Maximum vCPUs.
    pub cpu_max: u32,
    /// Whether vCPUs can be hot-plugged.
    pub hotpluggable_cpus: bool,
    /// Whether NUMA memory options apply.
    pub numa_mem_supported: bool,
    /// Whether the type is deprecated.
    pub deprecated: bool,
    /// Whether the machine has ACPI.
    pub acpi: bool,
    /// QOM type of the vCPUs it creates, if it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_cpu_type: Option<String>,
    /// Id of its main RAM region (`-machine memory-backend=` takes a backend in its place).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ram_id: Option<String>,
}

/// One vCPU as `query-cpus-fast` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfo {
    /// Index of the vCPU.
    pub cpu_index: u32,
    /// QOM path.
    pub qom_path: String,
    /// Host thread id running it.
    pub thread_id: i64,
    /// QEMU target name (`x86_64`).
    pub target: String,
    /// Where the vCPU sits in the topology.
    pub props: CpuProps,
}

/// A vCPU's place in the topology (QAPI `CpuInstanceProperties` as x86 fills it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuProps {
    /// Core within the socket.
    pub core_id: i64,
    /// Thread within the core.
    pub thread_id: i64,
    /// Socket.
    pub socket_id: i64,
}

/// A vCPU's registers, as the accelerator reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuRegisters {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: keel_accel::Regs,
    /// Segment, descriptor-table and control registers.
    pub sregs: keel_accel::SpecialRegs,
}

/// A kind of machine: validates configurations and builds boards.
pub trait MachineType: Send + Sync {
    /// `-machine` name.
    fn name(&self) -> &'static str;
    /// What `query-machines` reports (`is_default` is filled in by the VMM).
    fn info(&self) -> MachineTypeInfo;
    /// `Ok` if the type can run in this build; otherwise [`BoardError::Unavailable`].
    fn available(&self) -> Result<(), BoardError> {
        Ok(())
    }
    /// The machine properties `-machine TYPE,NAME=VALUE` takes, as `qom-list-properties`
    /// shows them: (name, QOM type, description).
    fn properties(&self) -> Vec<(&'static str, &'static str, Option<&'static str>)> {
        Vec::new()
    }
    /// Checks a configuration at `machine-set` time, so a bad property fails early.
    fn check_config(&self, cfg: &MachineConfig) -> Result<(), BoardError>;
    /// Whether the machine can run on `accel` (`accel-set` calls this with each opened
    /// accelerator in the user's order); `Err` says why not.
    fn check_accel(&self, cfg: &MachineConfig, accel: &dyn Accelerator) -> Result<(), BoardError>;
    /// Builds the board on `accel`: RAM, onboard devices, vCPUs, its device tree
    /// (`machine-init`).
    fn create(
        &self,
        cfg: &MachineConfig,
        accel: Arc<dyn Accelerator>,
        ctx: &BoardContext,
    ) -> Result<Box<dyn Board>, BoardError>;
}

/// What the VMM hands a machine type when it builds a board: the backends devices look up at
/// realize time, and where device events (`DEVICE_DELETED`, ...) go.
#[derive(Clone)]
pub struct BoardContext {
    /// Block, network and character backends (`blockdev-add`, `netdev_add`, `chardev-add`).
    pub backends: Arc<Backends>,
    /// Device events, forwarded to QMP clients.
    pub events: Arc<dyn EventSink>,
    /// What a guest write to `isa-debug-exit` does.
    pub guest_exit: GuestExitPolicy,
    /// Device types added by the embedder, offered by every board that can map them.
    pub device_types: Vec<Arc<dyn DeviceFactory>>,
}

/// What happens when the guest asks to end the process (`isa-debug-exit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GuestExitPolicy {
    /// The VMM shuts down in order (vCPUs stopped, monitors told, `SHUTDOWN` sent) and
    /// the VMM's exit status holds it: right for an embedder.
    #[default]
    Shutdown,
    /// The process exits at once from the vCPU thread with the guest's status, as QEMU's
    /// device calls `exit()`: the `vmm` binary's choice, where a test guest's last write
    /// should end the process without a round of thread hand-offs.
    ExitProcess,
}

impl std::fmt::Debug for BoardContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoardContext")
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

impl Default for BoardContext {
    /// No backends; events dropped (tests, dry runs).
    fn default() -> Self {
        Self {
            backends: Arc::new(Backends::new()),
            events: Arc::new(keel_qdev::NoEvents),
            guest_exit: GuestExitPolicy::Shutdown,
            device_types: Vec::new(),
        }
    }
}

/// Something the running machine reports (from its vCPU threads, via a channel).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BoardEvent {
    /// The guest powered off (ACPI S5, or a reset with `-no-reboot`).
    GuestShutdown,
    /// The guest asked for a reset (i8042, triple fault, ACPI reset).
    GuestReset,
    /// The guest wrote `isa-debug-exit`: the process ends with this status.
    GuestExit(i32),
    /// The guest reported a panic.
    GuestPanic,
    /// A vCPU failed; the machine is held.
    InternalError(String),
    /// The guest ejected hot-plugged devices: call [`Board::guest_ejected`].
    DeviceEjected,
    /// A disk's host I/O failed (`BLOCK_IO_ERROR`); if it
    /// [stops the machine](crate::BlockIoError::stops_machine), the owner pauses it in the
    /// run state `io-error` and [`Board::resume`] runs the held requests again.
    BlockIoError(crate::BlockIoError),
}

/// A built machine, driven by the lifecycle commands.
pub trait Board: Send {
    /// The machine's device tree: `device_add`/`-device`, `device_del` and the QOM queries
    /// go through it, and it decides cold or hot plug from the phase.
    fn devices(&self) -> &DeviceTree;
    /// The device tree, for changes.
    fn devices_mut(&mut self) -> &mut DeviceTree;
    /// `device_add` / `-device` on this board; the tree decides cold or hot from `phase`.
    /// Boards override it to add the child buses some devices bring.
    fn device_add(&mut self, phase: Phase, req: &DeviceRequest) -> Result<Added, QdevError> {
        self.devices_mut().device_add(phase, req)
    }
    /// Entering machine-ready: cold-plugged devices are final (boot order, tables), and
    /// `cfg` has the values read now rather than at machine-init (kernel, initrd, command
    /// line, serial backends, `no-reboot`), which may have changed since [`MachineType::create`].
    fn done(&mut self, cfg: &MachineConfig) -> Result<(), BoardError>;
    /// Starts or resumes the vCPUs (`cont`).
    fn resume(&mut self) -> Result<(), BoardError>;
    /// Pauses the vCPUs (`stop`).
    fn pause(&mut self) -> Result<(), BoardError>;
    /// Resets the machine (`system_reset`).
    fn reset(&mut self) -> Result<(), BoardError>;
    /// The vCPUs.
    fn cpus(&self) -> Vec<CpuInfo>;
    /// The registers of vCPU `index` (`info registers`). Only while the vCPUs do not run
    /// (before the first start, or paused); `None` otherwise, or if the board has no such
    /// vCPU or cannot read it. The default reads none.
    fn cpu_registers(&self, index: u32) -> Option<CpuRegisters> {
        let _ = index;
        None
    }
    /// The PCI buses and their functions (`query-pci`, `info pci`); none by default (a
    /// machine without PCI).
    fn pci(&self) -> Vec<crate::PciBusInfo> {
        Vec::new()
    }
    /// `query-block`'s `io-status` of the disk on block node `node` (`ok`, `failed`,
    /// `nospace`); `None` when no disk there tracks one (QEMU's rule: only disks whose
    /// `werror`/`rerror` can stop the machine do). None by default.
    fn block_io_status(&self, node: &str) -> Option<&'static str> {
        let _ = node;
        None
    }
    /// The channel of [`BoardEvent`]s, taken once by the VMM right after creation.
    fn take_events(&mut self) -> Option<std::sync::mpsc::Receiver<BoardEvent>> {
        None
    }
    /// Completes the removal of the devices the guest ejected ([`BoardEvent::DeviceEjected`]):
    /// they leave the device tree (`DEVICE_DELETED`). The default has none.
    fn guest_ejected(&mut self) {}
    /// Presses the ACPI power button (`system_powerdown`); `false` if the machine has none.
    fn power_button(&mut self) -> bool {
        false
    }
    /// Stops the vCPU threads for good (the process is ending).
    fn shutdown(&mut self) {}
    /// Writes the whole machine to `out` in Keel's snapshot stream (`migrate`); the vCPUs
    /// must be paused. `running` is the run state to record (the restored machine resumes
    /// only if it was running). The default says the machine cannot be saved.
    fn save_snapshot(
        &mut self,
        out: &mut dyn std::io::Write,
        running: bool,
    ) -> Result<keel_snapshot::RamStats, BoardError> {
        let _ = (out, running);
        Err(BoardError::Invalid(
            "this machine type cannot be saved (microvm and pc can)".to_string(),
        ))
    }
    /// Restores a parsed stream into this machine (created with the same shape, vCPUs not
    /// running); everything is checked before anything changes. Returns whether the guest
    /// was running when saved. The default says the machine cannot be restored.
    fn restore_snapshot(&mut self, snap: &keel_snapshot::Snapshot) -> Result<bool, BoardError> {
        let _ = snap;
        Err(BoardError::Invalid(
            "this machine type cannot be restored (microvm and pc can)".to_string(),
        ))
    }
    /// What a live migration copies while the guest runs: the RAM, the stream header (the
    /// machine's shape), and with `track` the accelerator's dirty log, started. The default
    /// says the machine cannot be migrated live.
    fn live_ram(&mut self, track: bool) -> Result<crate::migration::live::LiveRam, BoardError> {
        let _ = track;
        Err(BoardError::Invalid(
            "this machine type cannot be migrated live (microvm and pc can)".to_string(),
        ))
    }
    /// As [`Board::save_snapshot`] without the RAM section (a live migration's final state;
    /// the vCPUs must be paused). The default says the machine cannot be saved.
    fn save_state(
        &mut self,
        out: &mut dyn std::io::Write,
        running: bool,
    ) -> Result<(), BoardError> {
        let _ = (out, running);
        Err(BoardError::Invalid(
            "this machine type cannot be saved (microvm and pc can)".to_string(),
        ))
    }
    /// As [`Board::restore_snapshot`] for a stream without RAM: the RAM stays as a live
    /// migration wrote it. The default says the machine cannot be restored.
    fn restore_state(&mut self, snap: &keel_snapshot::Snapshot) -> Result<bool, BoardError> {
        let _ = snap;
        Err(BoardError::Invalid(
            "this machine type cannot be restored (microvm and pc can)".to_string(),
        ))
    }
}

/// QEMU's `none` machine: no RAM, no vCPUs, no buses. It lets every lifecycle step run
/// and be tested on any host.
#[derive(Debug, Default)]
pub struct NoneMachine;

impl MachineType for NoneMachine {
    fn name(&self) -> &'static str {
        "none"
    }

    fn info(&self) -> MachineTypeInfo {
        MachineTypeInfo {
            name: "none".into(),
            description: "empty machine".into(),
            is_default: false,
            cpu_max: 1,
            hotpluggable_cpus: false,
            numa_mem_supported: false,
            deprecated: false,
            acpi: false,
            // Keel's `none` has no vCPU and no RAM region at all.
            default_cpu_type: None,
            default_ram_id: None,
        }
    }

    fn check_config(&self, cfg: &MachineConfig) -> Result<(), BoardError> {
        if let Some(property) = cfg.props.keys().next() {
            return Err(BoardError::UnknownProperty {
                machine: "none".into(),
                property: property.clone(),
            });
        }
        if let Some(n) = cfg.cpus
            && n != 1
        {
            return Err(BoardError::Invalid(format!(
                "Invalid SMP CPUs {n}. The max CPUs supported by machine 'none' is 1"
            )));
        }
        for (what, set) in [
            ("kernel", cfg.kernel.is_some()),
            ("initrd", cfg.initrd.is_some()),
            ("append", cfg.append.is_some()),
        ] {
            if set {
                return Err(BoardError::Invalid(format!(
                    "machine 'none' has no RAM and cannot boot anything: '{what}' is not accepted"
                )));
            }
        }
        Ok(())
    }

    fn check_accel(
        &self,
        _cfg: &MachineConfig,
        _accel: &dyn Accelerator,
    ) -> Result<(), BoardError> {
        Ok(())
    }

    fn create(
        &self,
        _cfg: &MachineConfig,
        _accel: Arc<dyn Accelerator>,
        ctx: &BoardContext,
    ) -> Result<Box<dyn Board>, BoardError> {
        let mut tree = crate::device_types::empty_tree();
        tree.set_machine_type("none-machine");
        tree.set_globals(ctx.backends.globals());
        Ok(Box::new(NoneBoard(tree)))
    }
}

/// The board of the `none` machine: a device tree without buses, so every `device_add`
/// fails naming the bus type the device needs.
#[derive(Debug)]
pub struct NoneBoard(DeviceTree);

impl Board for NoneBoard {
    fn devices(&self) -> &DeviceTree {
        &self.0
    }

    fn devices_mut(&mut self) -> &mut DeviceTree {
        &mut self.0
    }

    fn done(&mut self, _cfg: &MachineConfig) -> Result<(), BoardError> {
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BoardError> {
        Ok(())
    }

    fn pause(&mut self) -> Result<(), BoardError> {
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BoardError> {
        Ok(())
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_accepts_only_what_it_has() {
        let m = NoneMachine;
        let mut cfg = MachineConfig {
            type_name: "none".into(),
            ..Default::default()
        };
        assert!(m.check_config(&cfg).is_ok());
        cfg.cpus = Some(2);
        assert!(
            m.check_config(&cfg)
                .unwrap_err()
                .to_string()
                .contains("max CPUs")
        );
        cfg.cpus = None;
        cfg.props.insert("pit".into(), "off".into());
        assert_eq!(
            m.check_config(&cfg).unwrap_err().to_string(),
            "Property 'none-machine.pit' not found"
        );
        let mut b = m
            .create(
                &MachineConfig::default(),
                Arc::new(keel_tcg::TcgAccel::new()),
                &BoardContext::default(),
            )
            .unwrap();
        assert!(
            b.devices_mut()
                .device_add_cli(keel_phase::Phase::MachineInit, "virtio-rng-device")
                .is_err()
        );
        assert!(b.cpus().is_empty());
    }
}
