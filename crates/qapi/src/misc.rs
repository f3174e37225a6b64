//! Protocol and monitor commands (QEMU's `qapi/misc.json`, `control.json`, `yank.json`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, CommandError, CommandInfo, ContextFree, ErrorClass, Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ANY;
use crate::machine::phase_enum;

/// The QEMU release whose QMP dialect Keel follows; reported in `query-version`.
pub const QEMU_DIALECT: (u32, u32, u32) = (7, 2, 0);

/// `query-version`'s answer: the QEMU dialect and Keel's own version as `package`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// `{"major", "minor", "micro"}`.
    pub qemu: VersionTriple,
    /// `keel X.Y.Z`.
    pub package: String,
}

/// A three-part version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl VersionInfo {
    /// This build's version.
    pub fn current() -> VersionInfo {
        VersionInfo {
            qemu: VersionTriple {
                major: QEMU_DIALECT.0,
                minor: QEMU_DIALECT.1,
                micro: QEMU_DIALECT.2,
            },
            package: format!("keel {}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn schema() -> Type {
        let triple = Type::object(
            "VersionTriple",
            vec![
                req("major", Type::int()),
                req("minor", Type::int()),
                req("micro", Type::int()),
            ],
        );
        Type::object(
            "VersionInfo",
            vec![req("qemu", triple), req("package", Type::str())],
        )
    }
}

no_args_command!(
    /// `query-version`.
    QueryVersion, "query-version", ANY, VersionInfo, Some(VersionInfo::schema())
);

no_args_command!(
    /// `query-commands`: every command with the phases it is valid in.
    QueryCommands, "query-commands", ANY, Vec<CommandInfo>,
    Some(Type::array(Type::object("CommandInfo", vec![
        req("name", Type::str()),
        req("phases", Type::array(phase_enum())),
    ])))
);

fn schema_info_type() -> Type {
    let meta = Type::Enum {
        name: "SchemaMetaType",
        values: &[
            "builtin",
            "enum",
            "array",
            "object",
            "alternate",
            "command",
            "event",
        ],
    };
    Type::object(
        "SchemaInfo",
        vec![req("name", Type::str()), req("meta-type", meta)],
    )
}

no_args_command!(
    /// `query-qmp-schema`: SchemaInfo for every command, event and type.
    QueryQmpSchema, "query-qmp-schema", ANY, Vec<Value>, Some(Type::array(schema_info_type()))
);

/// `query-name`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameInfo {
    /// The `-name` given, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

no_args_command!(
    /// `query-name`.
    QueryName, "query-name", ANY, NameInfo,
    Some(Type::object("NameInfo", vec![opt("name", Type::str())]))
);

/// What `query-uuid` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UuidInfo {
    /// The `-uuid` given, or all zeros.
    #[serde(rename = "UUID")]
    pub uuid: String,
}

no_args_command!(
    /// `query-uuid`: the VM's UUID (`-uuid`), all zeros when none was given, as QEMU.
    QueryUuid, "query-uuid", ANY, UuidInfo,
    Some(Type::object("UuidInfo", vec![req("UUID", Type::str())]))
);

no_args_command!(
    /// `quit`: ends the process after the reply (SHUTDOWN).
    Quit, "quit", ANY, (), None
);

/// `human-monitor-command`: the few HMP commands Keel understands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    /// The HMP command line.
    pub command_line: String,
    /// Ignored: Keel's HMP commands do not depend on a current CPU.
    pub cpu_index: Option<i64>,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = String;
    fn arguments() -> Type {
        Type::object(
            "q_obj_human-monitor-command-arg",
            vec![
                req("command-line", Type::str()),
                opt("cpu-index", Type::int()),
            ],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::str())
    }
}

fn yank_instance() -> Type {
    let kind = Type::Enum {
        name: "YankInstanceType",
        values: &["block-node", "chardev", "migration"],
    };
    let members = vec![
        req("type", kind),
        opt("node-name", Type::str()),
        opt("id", Type::str()),
    ];
    Type::object("YankInstance", members)
}

/// `query-yank`: the instances `yank` could cut loose. Keel has no yankable connections
/// (no network block devices, socket chardevs or migration), so the list is empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryYank {}
impl Command for QueryYank {
    const NAME: &'static str = "query-yank";
    const PHASES: keel_phase::PhaseSet = ANY;
    const ALLOW_OOB: bool = true;
    type Output = Vec<Value>;
    fn returns() -> Option<Type> {
        Some(Type::array(yank_instance()))
    }
}
impl ContextFree for QueryYank {
    fn handle(self) -> Result<Vec<Value>, CommandError> {
        Ok(Vec::new())
    }
}

/// `yank`: drops the connections of the given instances without waiting for them; an
/// empty list succeeds, any instance fails because none exists (see [`QueryYank`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Yank {
    /// Instances to yank.
    pub instances: Vec<Value>,
}
impl Command for Yank {
    const NAME: &'static str = "yank";
    const PHASES: keel_phase::PhaseSet = ANY;
    const ALLOW_OOB: bool = true;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_yank-arg",
            vec![req("instances", Type::array(yank_instance()))],
        )
    }
}
impl ContextFree for Yank {
    fn handle(self) -> Result<(), CommandError> {
        match self.instances.is_empty() {
            true => Ok(()),
            false => Err(CommandError::with_class(
                ErrorClass::DeviceNotFound,
                "Instance not found",
            )),
        }
    }
}

/// `query-target`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// The guest architecture (`x86_64`).
    pub arch: String,
}

no_args_command!(
    /// `query-target`: the guest architecture.
    QueryTarget, "query-target", ANY, TargetInfo,
    Some(Type::object("TargetInfo", vec![req("arch", Type::str())]))
);

/// `query-command-line-options`: the options that take parameters, and which.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryCommandLineOptions {
    /// Only this option.
    pub option: Option<String>,
}

/// One parameter of a command line option.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLineParameterInfo {
    /// Parameter name.
    pub name: String,
    /// `string`, `boolean`, `number` or `size`.
    #[serde(rename = "type")]
    pub ty: String,
    /// What it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

/// One command line option (QAPI `CommandLineOptionInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandLineOptionInfo {
    /// Option name, without the dash.
    pub option: String,
    /// Its parameters (empty: it takes any, checked by its consumer).
    pub parameters: Vec<CommandLineParameterInfo>,
}

impl Command for QueryCommandLineOptions {
    const NAME: &'static str = "query-command-line-options";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<CommandLineOptionInfo>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_query-command-line-options-arg",
            vec![opt("option", Type::str())],
        )
    }
    fn returns() -> Option<Type> {
        let kind = Type::Enum {
            name: "CommandLineParameterType",
            values: &["string", "boolean", "number", "size"],
        };
        Some(Type::array(Type::object(
            "CommandLineOptionInfo",
            vec![
                req("option", Type::str()),
                req(
                    "parameters",
                    Type::array(Type::object(
                        "CommandLineParameterInfo",
                        vec![
                            req("name", Type::str()),
                            req("type", kind),
                            opt("help", Type::str()),
                        ],
                    )),
                ),
            ],
        )))
    }
}

no_args_command!(
    /// `query-iothreads`: Keel has no I/O threads objects (`-object iothread`), so `[]`.
    QueryIothreads, "query-iothreads", ANY, Vec<Value>,
    Some(Type::array(Type::object("IOThreadInfo", vec![
        req("id", Type::str()),
        req("thread-id", Type::int()),
        req("poll-max-ns", Type::int()),
        req("poll-grow", Type::int()),
        req("poll-shrink", Type::int()),
        req("aio-max-batch", Type::int()),
    ])))
);

/// `set-action`: what the VMM does on guest events. Only what Keel does can be chosen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetAction {
    /// On a guest reset request: `reset` or `shutdown` (`-no-reboot`).
    pub reboot: Option<String>,
    /// On a guest power-off: `poweroff` or `pause`.
    pub shutdown: Option<String>,
    /// On a guest panic: `pause`, `shutdown`, `exit-failure` or `none`.
    pub panic: Option<String>,
    /// On a watchdog expiry.
    pub watchdog: Option<String>,
}

impl Command for SetAction {
    const NAME: &'static str = "set-action";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_set-action-arg",
            vec![
                opt(
                    "reboot",
                    Type::Enum {
                        name: "RebootAction",
                        values: &["reset", "shutdown"],
                    },
                ),
                opt(
                    "shutdown",
                    Type::Enum {
                        name: "ShutdownAction",
                        values: &["poweroff", "pause"],
                    },
                ),
                opt(
                    "panic",
                    Type::Enum {
                        name: "PanicAction",
                        values: &["pause", "shutdown", "exit-failure", "none"],
                    },
                ),
                opt(
                    "watchdog",
                    Type::Enum {
                        name: "WatchdogAction",
                        values: &[
                            "reset",
                            "shutdown",
                            "poweroff",
                            "pause",
                            "debug",
                            "none",
                            "inject-nmi",
                        ],
                    },
                ),
            ],
        )
    }
}

/// `query-stats`: Keel has no statistics providers, so `[]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryStats {
    /// `vm` or `vcpu`.
    pub target: String,
    /// Only these providers.
    pub providers: Option<Vec<Value>>,
    /// Only these vCPUs (QOM paths).
    pub vcpus: Option<Vec<String>>,
}

fn stats_provider() -> Type {
    Type::Enum {
        name: "StatsProvider",
        values: &["kvm"],
    }
}

impl Command for QueryStats {
    const NAME: &'static str = "query-stats";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<Value>;
    fn arguments() -> Type {
        Type::object(
            "StatsFilter",
            vec![
                req(
                    "target",
                    Type::Enum {
                        name: "StatsTarget",
                        values: &["vm", "vcpu"],
                    },
                ),
                opt("providers", Type::array(Type::any())),
                opt("vcpus", Type::array(Type::str())),
            ],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(Type::object(
            "StatsResult",
            vec![
                req("provider", stats_provider()),
                opt("qom-path", Type::str()),
                req("stats", Type::array(Type::any())),
            ],
        )))
    }
}

/// `query-stats-schemas`: none, as [`QueryStats`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueryStatsSchemas {
    /// Only this provider.
    pub provider: Option<String>,
}

impl Command for QueryStatsSchemas {
    const NAME: &'static str = "query-stats-schemas";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = Vec<Value>;
    fn arguments() -> Type {
        Type::object(
            "q_obj_query-stats-schemas-arg",
            vec![opt("provider", stats_provider())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::array(Type::object(
            "StatsSchema",
            vec![
                req("provider", stats_provider()),
                req("target", Type::str()),
                req("stats", Type::array(Type::any())),
            ],
        )))
    }
}

no_args_command!(
    /// `query-sev-capabilities`: Keel has no SEV; QEMU's error on a host without it.
    QuerySevCapabilities, "query-sev-capabilities", ANY, Value,
    Some(Type::object("SevCapability", vec![
        req("pdh", Type::str()),
        req("cert-chain", Type::str()),
        req("cpu0-id", Type::str()),
        req("cbitpos", Type::int()),
        req("reduced-phys-bits", Type::int()),
    ]))
);

no_args_command!(
    /// `query-sgx-capabilities`: Keel has no SGX; QEMU's error on a host without it.
    QuerySgxCapabilities, "query-sgx-capabilities", ANY, Value,
    Some(Type::object("SGXInfo", vec![
        req("sgx", Type::bool()),
        req("sgx1", Type::bool()),
        req("sgx2", Type::bool()),
        req("flc", Type::bool()),
        req("section-size", Type::int()),
    ]))
);

no_args_command!(
    /// `query-migrate-capabilities`: Keel's one capability, `events` (the `MIGRATION` event).
    QueryMigrateCapabilities, "query-migrate-capabilities", ANY, Vec<Value>,
    Some(Type::array(Type::object("MigrationCapabilityStatus", vec![
        req("capability", Type::str()),
        req("state", Type::bool()),
    ])))
);

/// One capability to set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// Capability name.
    pub capability: String,
    /// On or off.
    pub state: bool,
}

/// `migrate-set-capabilities`: `events` turns the `MIGRATION` event on or off; any other
/// capability is refused as QEMU refuses an unknown one (see
/// [`crate::migration::MigrationTracker::set_capabilities`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateSetCapabilities {
    /// The capabilities.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_migrate-set-capabilities-arg",
            vec![req(
                "capabilities",
                Type::array(Type::object(
                    "MigrationCapabilityStatus",
                    vec![req("capability", Type::str()), req("state", Type::bool())],
                )),
            )],
        )
    }
}

/// `query-dirty-rate`'s answer (QAPI `DirtyRateInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// Always `unstarted`: Keel has no dirty-rate measurement (`calc-dirty-rate`).
    pub status: String,
    /// Start of the last measurement (none: 0).
    pub start_time: i64,
    /// Its length in seconds (none: 0).
    pub calc_time: i64,
    /// Pages sampled per GiB (none: 0).
    pub sample_pages: u64,
    /// Measurement mode.
    pub mode: String,
}

no_args_command!(
    /// `query-dirty-rate`: no measurement was ever started.
    QueryDirtyRate, "query-dirty-rate", ANY, DirtyRateInfo,
    Some(Type::object("DirtyRateInfo", vec![
        req("status", Type::Enum { name: "DirtyRateStatus", values: &["unstarted", "measuring", "measured"] }),
        req("start-time", Type::int()),
        req("calc-time", Type::int()),
        req("sample-pages", Type::int()),
        req("mode", Type::Enum { name: "DirtyRateMeasureMode", values: &["page-sampling", "dirty-ring", "dirty-bitmap"] }),
    ]))
);
