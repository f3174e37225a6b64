//! Keel's QMP commands as typed definitions, one source for the wire format.
//!
//! Each command is a Rust type: its fields are the arguments (serde), its
//! [`keel_qmp::Command`] impl the name, phases, out-of-band permission and the QAPI schema
//! of arguments and result, which `query-qmp-schema` reports and the registry validates
//! against. The modules follow QEMU's `qapi/*.json`: [`machine`], [`qdev`], [`qom`],
//! [`block`], [`net`], [`char`](mod@char) and [`misc`]. What a command does is not here: the VMM
//! implements [`keel_qmp::Handler`] for each (commands that need no VMM state implement
//! [`keel_qmp::ContextFree`] here).
//!
//! [`for_each_command!`] lists every command once; the VMM registers from it and this
//! crate's tests prove, for each, that the serde struct and the declared schema agree
//! (see `tests/agreement.rs`).

#![deny(missing_docs)]

use keel_phase::{Phase, PhaseSet};
use keel_qmp::Type;

/// Declares a command without arguments: the empty struct and its [`keel_qmp::Command`].
macro_rules! no_args_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $phases:expr, $out:ty, $ret:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
        pub struct $ty {}

        impl keel_qmp::Command for $ty {
            const NAME: &'static str = $name;
            const PHASES: keel_phase::PhaseSet = $phases;
            type Output = $out;
            fn returns() -> Option<keel_qmp::Type> {
                $ret
            }
        }
    };
}

pub mod block;
pub mod char;
pub mod cli;
pub mod cmdline;
pub mod fd;
pub mod machine;
pub mod migration;
pub mod misc;
pub mod net;
pub mod pci;
pub mod qdev;
pub mod qom;

/// Valid in every phase.
const ANY: PhaseSet = PhaseSet::ANY;
/// Valid only once the machine is ready.
const READY: PhaseSet = PhaseSet::only(Phase::MachineReady);

/// Calls `$callback! { handlers: [...], aliases: [... => "name"], context_free: [...] }`
/// with every command type: those run on the VMM's state ([`keel_qmp::Handler`]), the
/// extra names some of them are also registered under, and those that run without it
/// ([`keel_qmp::ContextFree`], out-of-band). The one list of commands: the VMM registers
/// from it and the schema agreement test checks every entry.
#[macro_export]
macro_rules! for_each_command {
    ($callback:ident) => {
        $callback! {
            handlers: [
                $crate::misc::QueryVersion,
                $crate::misc::QueryCommands,
                $crate::misc::QueryQmpSchema,
                $crate::misc::QueryName,
                $crate::misc::QueryUuid,
                $crate::machine::QueryStatus,
                $crate::machine::QueryPhase,
                $crate::machine::QueryMachines,
                $crate::machine::QueryAccels,
                $crate::machine::QueryKvm,
                $crate::machine::QueryCpusFast,
                $crate::machine::MachineSet,
                $crate::machine::BootSet,
                $crate::machine::SerialAdd,
                $crate::machine::AccelSet,
                $crate::machine::MachineInit,
                $crate::machine::MachineDone,
                $crate::qdev::DeviceAdd,
                $crate::machine::Cont,
                $crate::machine::Stop,
                $crate::machine::SystemReset,
                $crate::misc::Quit,
                $crate::misc::HumanMonitorCommand,
                $crate::qom::QomSet,
                $crate::qdev::DeviceDel,
                $crate::qom::QomList,
                $crate::qom::QomGet,
                $crate::qom::QomListTypes,
                $crate::qdev::DeviceListProperties,
                $crate::qdev::XQueryDeviceTree,
                $crate::machine::SystemPowerdown,
                $crate::block::BlockdevAdd,
                $crate::net::NetdevAdd,
                $crate::char::ChardevAdd,
                $crate::misc::QueryTarget,
                $crate::misc::QueryCommandLineOptions,
                $crate::misc::QueryIothreads,
                $crate::misc::SetAction,
                $crate::misc::QueryStats,
                $crate::misc::QueryStatsSchemas,
                $crate::misc::QuerySevCapabilities,
                $crate::misc::QuerySgxCapabilities,
                $crate::misc::QueryMigrateCapabilities,
                $crate::misc::MigrateSetCapabilities,
                $crate::misc::QueryDirtyRate,
                $crate::machine::QueryCpuDefinitions,
                $crate::machine::QueryCpuModelExpansion,
                $crate::qom::QomListProperties,
                $crate::char::QueryChardev,
                $crate::block::QueryBlock,
                $crate::block::QueryNamedBlockNodes,
                $crate::block::QueryBlockstats,
                $crate::block::BlockdevDel,
                $crate::pci::QueryPci,
                $crate::migration::Migrate,
                $crate::migration::MigrateIncoming,
                $crate::migration::QueryMigrate,
                $crate::migration::MigrateCancel,
                $crate::migration::MigrateSetParameters,
                $crate::migration::QueryMigrateParameters,
                $crate::fd::Getfd,
                $crate::fd::Closefd,
                $crate::fd::AddFd,
                $crate::fd::RemoveFd,
                $crate::fd::QueryFdsets,
            ],
            aliases: [$crate::machine::MachineDone => "x-exit-preconfig"],
            context_free: [$crate::misc::QueryYank, $crate::misc::Yank],
        }
    };
}

/// Every event the VMM emits, with the schema of its `data` (`None`: no data).
pub fn events() -> Vec<(&'static str, Option<Type>)> {
    vec![
        ("DEVICE_DELETED", Some(qdev::device_deleted_data())),
        ("BLOCK_IO_ERROR", Some(block::block_io_error_data())),
        (
            "DEVICE_UNPLUG_GUEST_ERROR",
            Some(qdev::device_unplug_guest_error_data()),
        ),
        ("POWERDOWN", None),
        ("MIGRATION", Some(migration::migration_event_data())),
        ("RESUME", None),
        ("STOP", None),
        (
            "SHUTDOWN",
            Some(machine::shutdown_event_data("q_obj_SHUTDOWN-arg")),
        ),
        (
            "RESET",
            Some(machine::shutdown_event_data("q_obj_RESET-arg")),
        ),
    ]
}
