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
