//! The machine's lifecycle, run state, accelerators and vCPUs (QEMU's `qapi/machine.json`,
//! `run-state.json`, `accelerator.json`), plus Keel's lifecycle commands.

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_phase::{Phase, PhaseSet, RunState};
use keel_qmp::schema::{opt, req};
use keel_qmp::{Builtin, Command, Type};
use serde::{Deserialize, Serialize};

use crate::{ANY, READY};

fn run_state_enum() -> Type {
    Type::Enum {
        name: "RunState",
        values: &[
            "debug",
            "inmigrate",
            "internal-error",
            "io-error",
            "paused",
            "postmigrate",
            "prelaunch",
            "finish-migrate",
            "restore-vm",
            "running",
            "save-vm",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
            "colo",
        ],
    }
}

pub(crate) fn phase_enum() -> Type {
    Type::Enum {
        name: "MachinePhase",
        values: &[
            "no-machine",
            "machine-created",
            "accel-created",
            "machine-init",
            "machine-ready",
        ],
    }
}

/// SHUTDOWN/RESET `reason` values (QAPI `ShutdownCause`).
pub fn shutdown_cause_enum() -> Type {
    Type::Enum {
        name: "ShutdownCause",
        values: &[
            "none",
            "host-error",
            "host-qmp-quit",
            "host-qmp-system-reset",
            "host-signal",
            "host-ui",
            "guest-shutdown",
            "guest-reset",
            "guest-panic",
            "subsystem-reset",
            "snapshot-load",
        ],
    }
}

/// Data of the SHUTDOWN and RESET events.
pub fn shutdown_event_data(name: &'static str) -> Type {
    Type::object(
        name,
        vec![
            req("guest", Type::bool()),
            req("reason", shutdown_cause_enum()),
        ],
    )
}

/// `query-status`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether vCPUs run.
    pub running: bool,
    /// Always false (QEMU 7.2 still reports it).
    pub singlestep: bool,
    /// The run state; `prelaunch` before machine-ready, as QEMU's preconfig reports.
    pub status: RunState,
}

no_args_command!(
    /// `query-status`.
    QueryStatus, "query-status", ANY, StatusInfo,
    Some(Type::object("StatusInfo", vec![
        req("running", Type::bool()),
        req("singlestep", Type::bool()),
        req("status", run_state_enum()),
    ]))
);

/// `query-phase`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseInfo {
    /// The current lifecycle phase.
    pub phase: Phase,
}

no_args_command!(
    /// `query-phase`: where the machine is in its lifecycle.
    QueryPhase, "query-phase", ANY, PhaseInfo,
    Some(Type::object("PhaseInfo", vec![req("phase", phase_enum())]))
);

/// One machine type as `query-machines` reports it (QAPI `MachineInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// Type name.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Whether `machine-set` without a type picks it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
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
    /// QOM type of its vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_cpu_type: Option<String>,
    /// Id of its main RAM region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ram_id: Option<String>,
}

no_args_command!(
    /// `query-machines`: the machine types this build can run.
    QueryMachines, "query-machines", ANY, Vec<MachineInfo>,
    Some(Type::array(Type::object("MachineInfo", vec![
        req("name", Type::str()),
        req("description", Type::str()),
        opt("is-default", Type::bool()),
        req("cpu-max", Type::int()),
        req("hotpluggable-cpus", Type::bool()),
        req("numa-mem-supported", Type::bool()),
        req("deprecated", Type::bool()),
        req("acpi", Type::bool()),
        opt("default-cpu-type", Type::str()),
        opt("default-ram-id", Type::str()),
    ])))
);

/// One accelerator as `query-accels` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelInfo {
    /// `-accel` name.
    pub name: String,
    /// Whether it can be used on this host.
    pub available: bool,
    /// Why not, if it cannot (or why `accel-set` passed over it for this machine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether `accel-set` chose it.
    pub selected: bool,
}

no_args_command!(
    /// `query-accels`: the accelerators, whether they work here and which is selected.
    QueryAccels, "query-accels", ANY, Vec<AccelInfo>,
    Some(Type::array(Type::object("AccelInfo", vec![
        req("name", Type::str()),
        req("available", Type::bool()),
        opt("reason", Type::str()),
        req("selected", Type::bool()),
    ])))
);

/// `query-kvm`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    /// KVM is the selected accelerator.
    pub enabled: bool,
    /// `/dev/kvm` can be used on this host.
    pub present: bool,
}

no_args_command!(
    /// `query-kvm`.
    QueryKvm, "query-kvm", ANY, KvmInfo,
    Some(Type::object("KvmInfo", vec![req("enabled", Type::bool()), req("present", Type::bool())]))
);

/// One vCPU as `query-cpus-fast` reports it (QAPI `CpuInfoFast`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    /// Index of the vCPU.
    pub cpu_index: u32,
    /// QOM path.
    pub qom_path: String,
    /// Host thread id running it.
    pub thread_id: i64,
    /// QEMU target name (`x86_64`).
    pub target: String,
    /// Its place in the topology.
    pub props: CpuInstanceProperties,
}

/// A vCPU's place in the topology (QAPI `CpuInstanceProperties`, the members x86 sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInstanceProperties {
    /// Core within the socket.
    pub core_id: i64,
    /// Thread within the core.
    pub thread_id: i64,
    /// Socket.
    pub socket_id: i64,
}

no_args_command!(
    /// `query-cpus-fast`: only once the machine is ready, as in QEMU.
    QueryCpusFast, "query-cpus-fast", READY, Vec<CpuInfoFast>,
    Some(Type::array(Type::object("CpuInfoFast", vec![
        req("cpu-index", Type::int()),
        req("qom-path", Type::str()),
        req("thread-id", Type::int()),
        req("target", Type::str()),
        req("props", Type::object("CpuInstanceProperties", vec![
            req("core-id", Type::int()),
            req("thread-id", Type::int()),
            req("socket-id", Type::int()),
        ])),
    ])))
);
/// `machine-set`: chooses the machine type (no-machine) and sets its properties
/// (no-machine or machine-created). Unset fields keep their value or the default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineSet {
    /// Machine type; the default type if left out in no-machine.
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    /// RAM in bytes.
    pub memory: Option<u64>,
    /// vCPU count.
    pub cpus: Option<u32>,
    /// Kernel image path.
    pub kernel: Option<PathBuf>,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// A serial port backend, appended to the list (`-serial`).
    pub serial: Option<String>,
    /// Turn guest resets into shutdowns.
    pub no_reboot: Option<bool>,
    /// Machine-specific properties, as strings.
    #[serde(flatten)]
    pub props: BTreeMap<String, String>,
}

impl Command for MachineSet {
    const NAME: &'static str = "machine-set";
    // As QEMU's PHASE_ACCEL_CREATED: the machine's properties are not applied until the board
    // is built, so `-m`, `-kernel`, `-append` may follow `-accel` (QEMU command lines do).
    // The type itself is fixed from machine-created on.
    const PHASES: PhaseSet = PhaseSet::until(Phase::AccelCreated);
    type Output = ();
    fn arguments() -> Type {
        Type::Object {
            name: "q_obj_machine-set-arg",
            members: vec![
                opt("type", Type::str()),
                opt("memory", Type::size()),
                opt("cpus", Type::Builtin(Builtin::Size)),
                opt("kernel", Type::str()),
                opt("initrd", Type::str()),
                opt("append", Type::str()),
                opt("serial", Type::str()),
                opt("no-reboot", Type::bool()),
            ],
            extra: Some(Builtin::Str),
        }
    }
}

/// `boot-set`: what the board reads when it first resets, not when it is built: the kernel,
/// initrd and command line, and what a guest reset does. Valid until the machine is ready,
/// from no-machine on (without a machine yet, the values wait for it), so `-kernel` may
/// follow `-device` as QEMU users write it. Unset fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootSet {
    /// Kernel image path (`-kernel`).
    pub kernel: Option<PathBuf>,
    /// Initrd path (`-initrd`).
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    pub append: Option<String>,
    /// Turn guest resets into shutdowns (`-no-reboot`).
    pub no_reboot: Option<bool>,
}

impl Command for BootSet {
    const NAME: &'static str = "boot-set";
    const PHASES: PhaseSet = PhaseSet::until(Phase::MachineInit);
    type Output = ();
    fn arguments() -> Type {
        Type::Object {
            name: "q_obj_boot-set-arg",
            members: vec![
                opt("kernel", Type::str()),
                opt("initrd", Type::str()),
                opt("append", Type::str()),
                opt("no-reboot", Type::bool()),
            ],
            extra: None,
        }
    }
}

/// `serial-add`: the backend of the next serial port (`-serial`: `stdio`, `null`, `none`,
/// `file:PATH`). A backend, not a machine property: it never creates a machine, and the
/// board connects it when it is built or, for a port that exists already, when the machine
/// becomes ready.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialAdd {
    /// The backend, as `-serial` takes it.
    pub backend: String,
}

impl Command for SerialAdd {
    const NAME: &'static str = "serial-add";
    const PHASES: PhaseSet = PhaseSet::until(Phase::MachineInit);
    type Output = ();
    fn arguments() -> Type {
        Type::Object {
            name: "q_obj_serial-add-arg",
            members: vec![req("backend", Type::str())],
            extra: None,
        }
    }
}

/// Accelerators to try, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AccelList {
    /// One accelerator.
    One(String),
    /// Several: the first that works with the machine wins.
    Many(Vec<String>),
}

/// `accel-set`: picks the first accelerator that works here and can run the machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccelSet {
    /// `"kvm"` or `["kvm", "tcg"]`.
    pub accel: AccelList,
}

/// An accelerator that `accel-set` skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelRejection {
    /// Its name.
    pub accel: String,
    /// Why it could not be used.
    pub reason: String,
}

/// `accel-set`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    /// The accelerator in use now.
    pub accel: String,
    /// Those tried before it.
    pub rejected: Vec<AccelRejection>,
}

impl Command for AccelSet {
    const NAME: &'static str = "accel-set";
    const PHASES: PhaseSet = PhaseSet::only(Phase::MachineCreated);
    type Output = AccelChoice;
    fn arguments() -> Type {
        Type::object(
            "q_obj_accel-set-arg",
            vec![req(
                "accel",
                Type::Alternate {
                    name: "AccelList",
                    types: vec![Type::str(), Type::array(Type::str())],
                },
            )],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::object(
            "AccelChoice",
            vec![
                req("accel", Type::str()),
                req(
                    "rejected",
                    Type::array(Type::object(
                        "AccelRejection",
                        vec![req("accel", Type::str()), req("reason", Type::str())],
                    )),
                ),
            ],
        ))
    }
}

no_args_command!(
    /// `machine-init`: builds the board; devices added from now on are cold-plugged.
    MachineInit, "machine-init", PhaseSet::only(Phase::AccelCreated), (), None
);

/// `machine-done` (QEMU: `x-exit-preconfig`): finishes the machine (building it first if
/// needed), enters machine-ready and starts the vCPUs unless `-S`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineDone {}

impl Command for MachineDone {
    const NAME: &'static str = "machine-done";
    const PHASES: PhaseSet = PhaseSet::only(Phase::AccelCreated).with(Phase::MachineInit);
    type Output = ();
    fn phase_hint(phase: Phase) -> Option<&'static str> {
        (phase == Phase::MachineReady)
            .then_some("The command is permitted only before machine initialization")
    }
}
no_args_command!(
    /// `cont`: starts or resumes the vCPUs (RESUME).
    Cont, "cont", READY, (), None
);

no_args_command!(
    /// `stop`: pauses running vCPUs (STOP).
    Stop, "stop", READY, (), None
);

no_args_command!(
    /// `system_reset`: resets the machine (RESET).
    SystemReset, "system_reset", READY, (), None
);
no_args_command!(
    /// `system_powerdown`: presses the ACPI power button (POWERDOWN).
    SystemPowerdown, "system_powerdown", READY, (), None
);

/// One CPU model (QAPI `CpuDefinitionInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuDefinitionInfo {
    /// Model name (`-cpu NAME`).
    pub name: String,
    /// Its QOM type.
    pub typename: String,
    /// Features the model needs that this host or accelerator lacks.
    pub unavailable_features: Vec<String>,
    /// Whether the model never changes with the host, accelerator or version.
    #[serde(rename = "static")]
    pub is_static: bool,
    /// Whether it can be migrated safely.
    pub migration_safe: bool,
    /// Whether it is deprecated.
    pub deprecated: bool,
}

no_args_command!(
    /// `query-cpu-definitions`: the CPU models Keel can present.
    QueryCpuDefinitions, "query-cpu-definitions", ANY, Vec<CpuDefinitionInfo>,
    Some(Type::array(Type::object("CpuDefinitionInfo", vec![
        req("name", Type::str()),
        req("typename", Type::str()),
        req("unavailable-features", Type::array(Type::str())),
        req("static", Type::bool()),
        req("migration-safe", Type::bool()),
        req("deprecated", Type::bool()),
    ])))
);

/// A CPU model and its properties (QAPI `CpuModelInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuModelInfo {
    /// Model name.
    pub name: String,
    /// Property values (features as booleans).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub props: Option<serde_json::Map<String, serde_json::Value>>,
}

fn cpu_model_info() -> Type {
    Type::object(
        "CpuModelInfo",
        vec![req("name", Type::str()), opt("props", Type::any())],
    )
}

/// `query-cpu-model-expansion`: a model expanded into its properties.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryCpuModelExpansion {
    /// `static` (in terms of the `base` model) or `full`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The model to expand.
    pub model: CpuModelInfo,
}

/// `query-cpu-model-expansion`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuModelExpansionInfo {
    /// The expanded model.
    pub model: CpuModelInfo,
}

impl Command for QueryCpuModelExpansion {
    const NAME: &'static str = "query-cpu-model-expansion";
    const PHASES: PhaseSet = ANY;
    type Output = CpuModelExpansionInfo;
    fn arguments() -> Type {
        Type::object(
            "q_obj_query-cpu-model-expansion-arg",
            vec![
                req(
                    "type",
                    Type::Enum {
                        name: "CpuModelExpansionType",
                        values: &["static", "full"],
                    },
                ),
                req("model", cpu_model_info()),
            ],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::object(
            "CpuModelExpansionInfo",
            vec![req("model", cpu_model_info())],
        ))
    }
}
