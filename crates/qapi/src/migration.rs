//! Migration commands (QEMU's `qapi/migration.json`): `migrate`, `migrate-incoming`,
//! `query-migrate`, `migrate_cancel`, and the state behind `query-migrate` and the
//! `MIGRATION` event ([`MigrationTracker`]). What saving and loading do is the machine's
//! (`keel_machine::migration`); the stream is Keel's own (`docs/SNAPSHOT.md`).

use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, CommandError, EventBus, Type};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::misc::MigrateSetCapabilities;
use crate::{ANY, READY};

/// `migrate`: saves the machine to `uri` (`file:PATH`, `exec:COMMAND`; QEMU 8.2's file
/// form and QEMU's exec form), or migrates it live to another Keel (`unix:PATH`,
/// `tcp:HOST:PORT`: the command returns at once, `query-migrate` follows it). The vCPUs
/// stop for the save, or for the last copy (`STOP`); afterwards the run state is
/// `postmigrate`, as QEMU's source after a completed migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Migrate {
    /// Where to write the stream.
    pub uri: String,
    /// Block migration (refused when true: Keel saves no disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk: Option<bool>,
    /// Incremental block migration (refused when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inc: Option<bool>,
    /// Ignored, as by QEMU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
    /// Resume a paused postcopy migration (refused when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    const PHASES: keel_phase::PhaseSet = READY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "q_obj_migrate-arg",
            vec![
                req("uri", Type::str()),
                opt("blk", Type::bool()),
                opt("inc", Type::bool()),
                opt("detach", Type::bool()),
                opt("resume", Type::bool()),
            ],
        )
    }
}

/// `migrate-incoming`: loads a stream into a machine started with `-incoming defer`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrateIncoming {
    /// Where to read the stream.
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    const PHASES: keel_phase::PhaseSet = READY;
    type Output = ();
    fn arguments() -> Type {
        Type::object("q_obj_migrate-incoming-arg", vec![req("uri", Type::str())])
    }
}

no_args_command!(
    /// `migrate_cancel`: stops a live migration (`unix:`/`tcp:`) before its switchover (the
    /// guest keeps running, `query-migrate` says `cancelled`); a save to `file:`/`exec:`
    /// runs to completion inside `migrate`, so there is none to cancel then, and the command
    /// succeeds without effect, as QEMU's with no migration in progress.
    MigrateCancel, "migrate_cancel", ANY, (), None
);

/// `migrate-set-parameters`: the parameters a live migration follows (QEMU's
/// `MigrateSetParameters`, the members Keel uses; any other is refused as unknown).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Longest the guest may stay stopped for the last copy, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Most bytes per second while the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    const PHASES: keel_phase::PhaseSet = ANY;
    type Output = ();
    fn arguments() -> Type {
        Type::object(
            "MigrateSetParameters",
            vec![
                opt(
                    "downtime-limit",
                    Type::Builtin(keel_qmp::schema::Builtin::Size),
                ),
                opt(
                    "max-bandwidth",
                    Type::Builtin(keel_qmp::schema::Builtin::Size),
                ),
            ],
        )
    }
}

/// `query-migrate-parameters`' answer (QAPI `MigrationParameters`, the members Keel uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Longest the guest may stay stopped for the last copy, in milliseconds (300).
    pub downtime_limit: u64,
    /// Most bytes per second while the guest runs (128 MiB/s, QEMU's default).
    pub max_bandwidth: u64,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        Self {
            downtime_limit: 300,
            max_bandwidth: 128 << 20,
        }
    }
}

/// QEMU's upper bound of `downtime-limit` (2000 seconds).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

no_args_command!(
    /// `query-migrate-parameters`: `downtime-limit` and `max-bandwidth`.
    QueryMigrateParameters, "query-migrate-parameters", ANY, MigrationParameters,
    Some(Type::object("MigrationParameters", vec![
        req("downtime-limit", Type::Builtin(keel_qmp::schema::Builtin::Size)),
        req("max-bandwidth", Type::Builtin(keel_qmp::schema::Builtin::Size)),
    ]))
);

/// RAM statistics of a migration (QAPI `MigrationStats`, the members Keel knows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes written.
    pub transferred: u64,
    /// Bytes left.
    pub remaining: u64,
    /// Guest RAM bytes.
    pub total: u64,
    /// Pages not sent because they were zero.
    pub duplicate: u64,
    /// Pages skipped.
    pub skipped: u64,
    /// Pages sent.
    pub normal: u64,
    /// Bytes of the pages sent.
    pub normal_bytes: u64,
    /// Pages dirtied per second (no live migration: 0).
    pub dirty_pages_rate: u64,
    /// Throughput in Mbit/s.
    pub mbps: f64,
    /// Dirty bitmap syncs (one pass).
    pub dirty_sync_count: u64,
    /// Postcopy requests (none).
    pub postcopy_requests: u64,
    /// Guest page size.
    pub page_size: u64,
    /// Bytes sent by multifd channels (none).
    pub multifd_bytes: u64,
    /// Pages sent per second.
    pub pages_per_second: u64,
    /// Bytes sent while the guest was stopped (all of them: the save is not live).
    pub downtime_bytes: u64,
    /// Bytes sent in postcopy (none).
    pub postcopy_bytes: u64,
    /// Bytes sent in precopy while the guest ran (none).
    pub precopy_bytes: u64,
    /// Zero-copy sends that missed (none).
    pub dirty_sync_missed_zero_copy: u64,
}

/// `query-migrate`'s answer (QAPI `MigrationInfo`): empty before any migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// RAM statistics, once completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// Milliseconds from start to completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Milliseconds the guest was stopped for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Milliseconds of setup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Milliseconds the guest is expected to stop for (while active).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

fn stats_type() -> Type {
    Type::object(
        "MigrationStats",
        vec![
            req("transferred", Type::int()),
            req("remaining", Type::int()),
            req("total", Type::int()),
            req("duplicate", Type::int()),
            req("skipped", Type::int()),
            req("normal", Type::int()),
            req("normal-bytes", Type::int()),
            req("dirty-pages-rate", Type::int()),
            req("mbps", Type::Builtin(keel_qmp::schema::Builtin::Number)),
            req("dirty-sync-count", Type::int()),
            req("postcopy-requests", Type::int()),
            req("page-size", Type::int()),
            req("multifd-bytes", Type::int()),
            req("pages-per-second", Type::int()),
            req("downtime-bytes", Type::int()),
            req("postcopy-bytes", Type::int()),
            req("precopy-bytes", Type::int()),
            req("dirty-sync-missed-zero-copy", Type::int()),
        ],
    )
}

/// The QAPI `MigrationStatus` values.
pub const MIGRATION_STATUS: &[&str] = &[
    "none",
    "setup",
    "cancelling",
    "cancelled",
    "active",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover",
    "completed",
    "failed",
    "colo",
    "pre-switchover",
    "device",
    "wait-unplug",
];

no_args_command!(
    /// `query-migrate`: the last migration's status and statistics (`{}` before any).
    QueryMigrate, "query-migrate", ANY, MigrationInfo,
    Some(Type::object("MigrationInfo", vec![
        opt("status", Type::Enum { name: "MigrationStatus", values: MIGRATION_STATUS }),
        opt("ram", stats_type()),
        opt("total-time", Type::int()),
        opt("downtime", Type::int()),
        opt("setup-time", Type::int()),
        opt("expected-downtime", Type::int()),
        opt("error-desc", Type::str()),
    ]))
);

/// The `MIGRATION` event's data.
pub fn migration_event_data() -> Type {
    Type::object(
        "q_obj_MIGRATION-arg",
        vec![req(
            "status",
            Type::Enum {
                name: "MigrationStatus",
                values: MIGRATION_STATUS,
            },
        )],
    )
}

/// The capabilities Keel has (all others are refused by `migrate-set-capabilities`).
pub const CAPABILITIES: &[&str] = &["events"];

/// What `query-migrate` reports and which capabilities are on; the VMM keeps one.
#[derive(Debug, Clone, Default)]
pub struct MigrationTracker {
    info: MigrationInfo,
    events: bool,
    /// `-incoming URI` (or `defer`), until the incoming migration ran.
    pub incoming: Option<String>,
    /// `migrate-set-parameters`.
    pub params: MigrationParameters,
    /// Set by `migrate_cancel`; a live migration's thread watches it.
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Why the incoming stream could not be loaded: as QEMU, the VMM then exits with
    /// status 1 after the `MIGRATION` `failed` event, printing `load of migration failed`.
    pub load_failed: Option<String>,
}

impl MigrationTracker {
    /// Whether a migration is under way (`setup`, `active` or `cancelling`).
    pub fn in_progress(&self) -> bool {
        matches!(
            self.info.status.as_deref(),
            Some("setup" | "active" | "cancelling")
        )
    }

    /// `migrate-set-parameters`: checks every value, then sets them.
    pub fn set_parameters(&mut self, a: &MigrateSetParameters) -> Result<(), CommandError> {
        if a.downtime_limit.is_some_and(|d| d > MAX_DOWNTIME_LIMIT_MS) {
            return Err(CommandError::generic(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000 seconds",
            ));
        }
        if let Some(d) = a.downtime_limit {
            self.params.downtime_limit = d;
        }
        if let Some(b) = a.max_bandwidth {
            self.params.max_bandwidth = b;
        }
        Ok(())
    }

    /// `migrate_cancel`: asks a live migration to stop (`cancelling`); nothing otherwise.
    pub fn cancel(&mut self, events: &EventBus) -> Result<(), CommandError> {
        if self.in_progress() && self.info.status.as_deref() != Some("cancelling") {
            self.cancel
                .store(true, std::sync::atomic::Ordering::Release);
            let info = self.info.clone();
            self.set_status("cancelling", events);
            self.info = MigrationInfo {
                status: Some("cancelling".into()),
                ..info
            };
        }
        Ok(())
    }

    /// A live migration starts (`setup`): the cancel request is cleared.
    pub fn begin(&mut self, events: &EventBus) {
        self.cancel
            .store(false, std::sync::atomic::Ordering::Release);
        self.set_status("setup", events);
    }

    /// A live migration's numbers: `status` (a change emits `MIGRATION`), the RAM
    /// statistics and the times in milliseconds (`downtime` once completed,
    /// `expected-downtime` while active). A `cancelling` status stays until the end.
    pub fn live(
        &mut self,
        status: &str,
        ram: MigrationStats,
        (total, setup, downtime, expected): (u64, u64, Option<u64>, Option<u64>),
        events: &EventBus,
    ) {
        let keep = self.info.status.as_deref() == Some("cancelling") && status == "active";
        if !keep && self.info.status.as_deref() != Some(status) {
            self.set_status(status, events);
        }
        self.info.ram = Some(ram);
        self.info.total_time = Some(total);
        self.info.setup_time = Some(setup);
        self.info.downtime = downtime;
        self.info.expected_downtime = expected;
    }

    /// `query-migrate`'s answer.
    pub fn info(&self) -> MigrationInfo {
        self.info.clone()
    }

    /// Enters `status`; with the `events` capability, emits `MIGRATION`.
    pub fn set_status(&mut self, status: &str, events: &EventBus) {
        self.info = MigrationInfo {
            status: Some(status.to_string()),
            ..MigrationInfo::default()
        };
        if self.events {
            events.emit("MIGRATION", Some(json!({ "status": status })));
        }
    }

    /// Records a failure (`failed`, with its reason for `error-desc`).
    pub fn fail(&mut self, reason: &str, events: &EventBus) {
        self.set_status("failed", events);
        self.info.error_desc = Some(reason.to_string());
    }

    /// Records the end of a migration: its error, or success with the statistics of a
    /// save (`(pages written, pages of RAM, bytes, milliseconds)`; `None` for an incoming
    /// one, which is then over).
    pub fn finish(
        &mut self,
        result: Result<Option<(u64, u64, u64, u64)>, &String>,
        events: &EventBus,
    ) {
        match result {
            Err(e) => self.fail(e, events),
            Ok(None) => {
                self.set_status("completed", events);
                self.incoming = None;
            }
            Ok(Some(s)) => self.complete(s, events),
        }
    }

    /// Records a completed save: `pages` written of `total_pages`, `bytes` in all, in
    /// `total_ms`, all of it with the guest stopped.
    pub fn complete(
        &mut self,
        (pages, total_pages, bytes, total_ms): (u64, u64, u64, u64),
        events: &EventBus,
    ) {
        let downtime_ms = total_ms;
        self.set_status("completed", events);
        let page_size = 4096;
        self.info.total_time = Some(total_ms);
        self.info.downtime = Some(downtime_ms);
        self.info.setup_time = Some(0);
        self.info.ram = Some(MigrationStats {
            transferred: bytes,
            remaining: 0,
            total: total_pages * page_size,
            duplicate: total_pages.saturating_sub(pages),
            normal: pages,
            normal_bytes: pages * page_size,
            mbps: if total_ms == 0 {
                0.0
            } else {
                bytes as f64 * 8.0 / 1000.0 / total_ms as f64
            },
            dirty_sync_count: 1,
            page_size,
            pages_per_second: (pages * 1000).checked_div(total_ms).unwrap_or(pages),
            downtime_bytes: bytes,
            ..MigrationStats::default()
        });
    }

    /// `migrate-set-capabilities`: `events` is Keel's one capability; any other is
    /// refused as QEMU refuses an unknown one, and nothing changes.
    pub fn set_capabilities(&mut self, a: &MigrateSetCapabilities) -> Result<(), CommandError> {
        if let Some(c) = a
            .capabilities
            .iter()
            .find(|c| !CAPABILITIES.contains(&c.capability.as_str()))
        {
            return Err(CommandError::generic(format!(
                "Parameter 'capability' does not accept value '{}'",
                c.capability
            )));
        }
        for c in &a.capabilities {
            self.events = c.state;
        }
        Ok(())
    }

    /// `query-migrate-capabilities`.
    pub fn capabilities(&self) -> Vec<Value> {
        vec![json!({ "capability": "events", "state": self.events })]
    }
}
