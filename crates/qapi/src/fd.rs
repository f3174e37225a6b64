//! Descriptors passed over the monitor (QEMU's `getfd`, `closefd`, `add-fd`, `remove-fd`,
//! `query-fdsets`): how a client that opened a file or socket itself (libvirt: a save
//! target, a disk image) hands it to the VMM. The descriptor comes with the request as
//! `SCM_RIGHTS` data on a unix socket ([`keel_qmp::passfd`]).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, Type};
use serde::{Deserialize, Serialize};

use crate::ANY;

/// `getfd`: keeps the descriptor passed with the request under `fdname` (replacing one of
/// that name), for a later `migrate uri=fd:NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Getfd {
    /// The name; it may not start with a digit (QEMU's rule: `fd:3` means descriptor 3).
    pub fdname: String,
}
impl Command for Getfd {
    const NAME: &'static str = "getfd";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object("q_obj_getfd-arg", vec![req("fdname", Type::str())])
    }
}

/// `closefd`: closes the descriptor kept under `fdname`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Closefd {
    /// The name given to `getfd`.
    pub fdname: String,
}
impl Command for Closefd {
    const NAME: &'static str = "closefd";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object("q_obj_closefd-arg", vec![req("fdname", Type::str())])
    }
}

/// `add-fd`: puts the descriptor passed with the request into fd set `fdset-id` (the
/// first free id when absent), which `/dev/fdset/N` paths then open.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddFd {
    /// The set; created if new.
    pub fdset_id: Option<i64>,
    /// Free text kept with the descriptor.
    pub opaque: Option<String>,
}

/// `add-fd`'s answer: the set and the descriptor's number in the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct AddfdInfo {
    /// The set.
    pub fdset_id: i64,
    /// The descriptor's number in the VMM (what `remove-fd` names).
    pub fd: i64,
}

impl Command for AddFd {
    const NAME: &'static str = "add-fd";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = AddfdInfo;
    fn arguments() -> Type {
        Type::object(
            "q_obj_add-fd-arg",
            vec![opt("fdset-id", Type::int()), opt("opaque", Type::str())],
        )
    }
    fn returns() -> Option<Type> {
        Some(Type::object(
            "AddfdInfo",
            vec![req("fdset-id", Type::int()), req("fd", Type::int())],
        ))
    }
}

/// `remove-fd`: removes descriptor `fd` (all, when absent) from fd set `fdset-id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoveFd {
    /// The set.
    pub fdset_id: i64,
    /// The descriptor; every descriptor of the set when absent.
    pub fd: Option<i64>,
}
impl Command for RemoveFd {
    const NAME: &'static str = "remove-fd";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_remove-fd-arg",
            vec![req("fdset-id", Type::int()), opt("fd", Type::int())],
        )
    }
}

/// One descriptor of an fd set, as `query-fdsets` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdsetFdInfo {
    /// Its number in the VMM.
    pub fd: i64,
    /// The text given with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opaque: Option<String>,
}

/// One fd set, as `query-fdsets` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FdsetInfo {
    /// The set's id.
    pub fdset_id: i64,
    /// Its descriptors, in the order they were added.
    pub fds: Vec<FdsetFdInfo>,
}

no_args_command!(
    /// `query-fdsets`: the fd sets (`-add-fd`, `add-fd`), highest id first as QEMU lists
    /// them.
    QueryFdsets, "query-fdsets", ANY, Vec<FdsetInfo>,
    Some(Type::array(Type::object("FdsetInfo", vec![
        req("fdset-id", Type::int()),
        req("fds", Type::array(Type::object("FdsetFdInfo", vec![
            req("fd", Type::int()),
            opt("opaque", Type::str()),
        ]))),
    ])))
);
