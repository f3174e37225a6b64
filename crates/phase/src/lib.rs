//! The machine lifecycle: [`Phase`] (forward-only, one step at a time), the [`RunState`] that
//! exists only once the machine is ready, [`PhaseSet`]s that commands declare, and the
//! machine-init-done notifier list, and the end of it all ([`shutdown`]: why and when the
//! VMM stops).
//!
//! This crate knows nothing of QMP or devices; both build on it.

#![deny(missing_docs)]

pub mod shutdown;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// Where the machine is in its construction. Spellings are the QMP ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Process started: event loop, monitors and backends only.
    NoMachine,
    /// A machine type and its properties are chosen.
    MachineCreated,
    /// The accelerator exists and has accepted the machine.
    AccelCreated,
    /// The board exists (RAM, onboard devices, CPUs); devices added now are cold-plugged.
    MachineInit,
    /// Init-done notifiers have run; devices added now are hot-plugged; the run state exists.
    MachineReady,
}

impl Phase {
    /// Every phase in order.
    pub const ALL: [Phase; 5] = [
        Phase::NoMachine,
        Phase::MachineCreated,
        Phase::AccelCreated,
        Phase::MachineInit,
        Phase::MachineReady,
    ];

    /// The QMP spelling, e.g. `machine-init`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::NoMachine => "no-machine",
            Phase::MachineCreated => "machine-created",
            Phase::AccelCreated => "accel-created",
            Phase::MachineInit => "machine-init",
            Phase::MachineReady => "machine-ready",
        }
    }

    /// The phase after this one, if any.
    pub fn next(self) -> Option<Phase> {
        match self {
            Phase::NoMachine => Some(Phase::MachineCreated),
            Phase::MachineCreated => Some(Phase::AccelCreated),
            Phase::AccelCreated => Some(Phase::MachineInit),
            Phase::MachineInit => Some(Phase::MachineReady),
            Phase::MachineReady => None,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Phase {
    type Err = PhaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| PhaseError::UnknownPhase(s.to_owned()))
    }
}

/// QEMU's QAPI `RunState` names, for the states Keel can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Ready, CPUs not started yet (`-S`, `-preconfig`).
    Prelaunch,
    /// vCPUs run.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest shut down (with `-no-shutdown`, or while the process winds down).
    Shutdown,
    /// The guest reported a panic.
    GuestPanicked,
    /// The accelerator hit an error it cannot continue from.
    InternalError,
    /// A disk's host I/O failed under `werror=stop`/`rerror=stop` (or `enospc` on a full
    /// host disk); `cont` runs the held requests again.
    IoError,
    /// Reset in progress.
    Restore,
    /// Waiting for `system_wakeup`.
    Suspended,
    /// Waiting for an incoming migration (`-incoming`).
    #[serde(rename = "inmigrate")]
    InMigrate,
    /// A migration to elsewhere completed; the guest stays stopped here.
    #[serde(rename = "postmigrate")]
    PostMigrate,
    /// The vCPUs are stopped for the last copy of a migration (QEMU's stop-and-copy);
    /// then `postmigrate`, or back to the state before if it fails.
    FinishMigrate,
}

impl RunState {
    /// The QAPI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::GuestPanicked => "guest-panicked",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Restore => "restore-vm",
            RunState::Suspended => "suspended",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
        }
    }

    /// Whether vCPUs execute in this state (QMP `query-status`'s `running`).
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of phases, as a command declares where it is valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PhaseSet(u8);

impl PhaseSet {
    /// No phase.
    pub const NONE: PhaseSet = PhaseSet(0);
    /// Every phase.
    pub const ANY: PhaseSet = PhaseSet(0b1_1111);

    /// Exactly one phase.
    pub const fn only(p: Phase) -> Self {
        PhaseSet(1 << (p as u8))
    }

    /// `p` and every later phase.
    pub const fn from(p: Phase) -> Self {
        PhaseSet(Self::ANY.0 & !((1u8 << (p as u8)) - 1))
    }

    /// Every phase up to and including `p`.
    pub const fn until(p: Phase) -> Self {
        PhaseSet(((1u16 << (p as u8 + 1)) - 1) as u8)
    }

    /// Adds a phase.
    pub const fn with(self, p: Phase) -> Self {
        PhaseSet(self.0 | (1 << (p as u8)))
    }

    /// Whether `p` is in the set.
    pub fn contains(self, p: Phase) -> bool {
        self.0 & p.bit() != 0
    }

    /// The phases in order.
    pub fn iter(self) -> impl Iterator<Item = Phase> {
        Phase::ALL.into_iter().filter(move |p| self.contains(*p))
    }

    /// Human list: `machine-init or machine-ready`, `any phase`.
    pub fn describe(self) -> String {
        if self == Self::ANY {
            return "any phase".to_owned();
        }
        let names: Vec<&str> = self.iter().map(Phase::as_str).collect();
        match names.as_slice() {
            [] => "no phase".to_owned(),
            [one] => (*one).to_owned(),
            [init @ .., last] => format!("{} or {}", init.join(", "), last),
        }
    }
}

impl fmt::Debug for PhaseSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Lifecycle errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PhaseError {
    /// An attempt to skip or go back; phases move one step forward only.
    #[error("cannot advance from {from} to {to}: phases move forward one step at a time")]
    BadAdvance {
        /// Current phase.
        from: Phase,
        /// Requested phase.
        to: Phase,
    },
    /// Run state asked for before machine-ready.
    #[error("there is no run state in phase {0}: the machine is not ready")]
    NoRunState(Phase),
    /// A string that names no phase.
    #[error(
        "'{0}' is not a phase (expected no-machine, machine-created, accel-created, machine-init or machine-ready)"
    )]
    UnknownPhase(String),
}

/// The machine-init-done callback type.
pub type Notifier = Box<dyn FnOnce() + Send>;

/// The current phase and run state of one machine, plus its init-done notifiers.
pub struct PhaseTracker {
    phase: Phase,
    run_state: Option<RunState>,
    notifiers: Mutex<Vec<Notifier>>,
    watch: PhaseWatch,
}

/// A read-only view of a [`PhaseTracker`]'s phase that needs no lock: for threads that must
/// not wait for whoever owns the tracker (QMP out-of-band commands check their phase with
/// it while an in-band command holds the VMM's state).
/// It also tells whether the guest runs (the QMP monitor budgets its CPU time only then).
#[derive(Debug, Clone)]
pub struct PhaseWatch(Arc<(AtomicU8, AtomicBool)>);

impl PhaseWatch {
    /// The tracker's current phase.
    pub fn phase(&self) -> Phase {
        let i = usize::from(self.0.0.load(Ordering::Acquire));
        Phase::ALL.get(i).copied().unwrap_or(Phase::NoMachine)
    }

    /// Whether the run state is `running` (vCPUs execute guest code).
    pub fn guest_running(&self) -> bool {
        self.0.1.load(Ordering::Acquire)
    }

    fn set(&self, p: Phase) {
        let i = Phase::ALL.iter().position(|&q| q == p).unwrap_or(0);
        self.0.0.store(i as u8, Ordering::Release);
    }
}

impl fmt::Debug for PhaseTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhaseTracker")
            .field("phase", &self.phase)
            .field("run_state", &self.run_state)
            .finish_non_exhaustive()
    }
}

impl Default for PhaseTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl PhaseTracker {
    /// A tracker in `no-machine`.
    pub fn new() -> Self {
        Self {
            phase: Phase::NoMachine,
            run_state: None,
            notifiers: Mutex::new(Vec::new()),
            watch: PhaseWatch(Arc::new((AtomicU8::new(0), AtomicBool::new(false)))),
        }
    }

    /// A lock-free view of this tracker's phase that follows every [`PhaseTracker::advance`].
    pub fn watch(&self) -> PhaseWatch {
        self.watch.clone()
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the current phase is `p` or later (QEMU's `phase_check`).
    pub fn reached(&self, p: Phase) -> bool {
        self.phase >= p
    }

    /// Moves to `to`, which must be the next phase. Entering machine-ready sets the run state
    /// to `prelaunch` and runs the init-done notifiers, once, in registration order.
    pub fn advance(&mut self, to: Phase) -> Result<(), PhaseError> {
        if self.phase.next() != Some(to) {
            return Err(PhaseError::BadAdvance {
                from: self.phase,
                to,
            });
        }
        self.phase = to;
        self.watch.set(to);
        if to == Phase::MachineReady {
            self.run_state = Some(RunState::Prelaunch);
            let pending =
                std::mem::take(&mut *self.notifiers.lock().unwrap_or_else(|p| p.into_inner()));
            for n in pending {
                n();
            }
        }
        Ok(())
    }

    /// Current run state; only exists in machine-ready.
    pub fn run_state(&self) -> Result<RunState, PhaseError> {
        self.run_state.ok_or(PhaseError::NoRunState(self.phase))
    }

    /// Changes the run state; refused before machine-ready.
    pub fn set_run_state(&mut self, state: RunState) -> Result<RunState, PhaseError> {
        match self.run_state.as_mut() {
            Some(s) => {
                self.watch.0.1.store(state.is_running(), Ordering::Release);
                Ok(std::mem::replace(s, state))
            }
            None => Err(PhaseError::NoRunState(self.phase)),
        }
    }

    /// Registers a machine-init-done notifier: it runs on entering machine-ready, or at once
    /// if the machine is already ready.
    pub fn add_init_done_notifier(&self, n: Notifier) {
        if self.phase == Phase::MachineReady {
            n();
        } else {
            self.notifiers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn spellings_round_trip() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
            assert_eq!(
                serde_json::to_string(&p).unwrap(),
                format!("\"{}\"", p.as_str())
            );
        }
        assert_eq!(
            serde_json::to_string(&RunState::GuestPanicked).unwrap(),
            "\"guest-panicked\""
        );
        assert!("preconfig".parse::<Phase>().is_err());
    }

    #[test]
    fn a_watch_follows_the_tracker_from_another_thread() {
        let mut t = PhaseTracker::new();
        let w = t.watch();
        assert_eq!(w.phase(), Phase::NoMachine);
        for p in &Phase::ALL[1..] {
            t.advance(*p).unwrap();
            let w = w.clone();
            assert_eq!(std::thread::spawn(move || w.phase()).join().unwrap(), *p);
        }
        // A refused advance leaves the watch where it was.
        assert!(t.advance(Phase::MachineInit).is_err());
        assert_eq!(w.phase(), Phase::MachineReady);
    }

    #[test]
    fn a_watch_tells_whether_the_guest_runs() {
        let mut t = PhaseTracker::new();
        let w = t.watch();
        for p in &Phase::ALL[1..] {
            t.advance(*p).unwrap();
        }
        assert!(!w.guest_running(), "prelaunch");
        t.set_run_state(RunState::Running).unwrap();
        assert!(w.guest_running());
        t.set_run_state(RunState::Paused).unwrap();
        assert!(!w.guest_running());
    }

    #[test]
    fn advance_is_one_step_forward() {
        let mut t = PhaseTracker::new();
        assert!(t.advance(Phase::AccelCreated).is_err());
        assert!(t.advance(Phase::NoMachine).is_err());
        assert_eq!(t.phase(), Phase::NoMachine);
        for p in &Phase::ALL[1..] {
            t.advance(*p).unwrap();
        }
        assert!(t.advance(Phase::MachineReady).is_err());
        assert_eq!(t.run_state().unwrap(), RunState::Prelaunch);
    }

    #[test]
    fn run_state_only_when_ready() {
        let mut t = PhaseTracker::new();
        assert_eq!(t.run_state(), Err(PhaseError::NoRunState(Phase::NoMachine)));
        assert!(t.set_run_state(RunState::Running).is_err());
    }

    #[test]
    fn notifiers_run_once_and_late_ones_at_once() {
        let mut t = PhaseTracker::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        t.add_init_done_notifier(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        for p in &Phase::ALL[1..4] {
            t.advance(*p).unwrap();
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        t.advance(Phase::MachineReady).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let h = hits.clone();
        t.add_init_done_notifier(Box::new(move || {
            h.fetch_add(10, Ordering::SeqCst);
        }));
        assert_eq!(hits.load(Ordering::SeqCst), 11);
    }

    #[test]
    fn phase_sets() {
        let s = PhaseSet::only(Phase::MachineInit).with(Phase::MachineReady);
        assert_eq!(s, PhaseSet::from(Phase::MachineInit));
        assert_eq!(s.describe(), "machine-init or machine-ready");
        assert_eq!(
            PhaseSet::until(Phase::NoMachine),
            PhaseSet::only(Phase::NoMachine)
        );
        assert_eq!(PhaseSet::until(Phase::MachineReady), PhaseSet::ANY);
        assert_eq!(PhaseSet::ANY.describe(), "any phase");
        assert!(!PhaseSet::from(Phase::AccelCreated).contains(Phase::MachineCreated));
    }

    proptest::proptest! {
        #[test]
        fn random_advances_never_skip(steps in proptest::collection::vec(0usize..5, 0..40)) {
            let mut t = PhaseTracker::new();
            for s in steps {
                let before = t.phase();
                let to = Phase::ALL[s];
                let ok = t.advance(to).is_ok();
                proptest::prop_assert_eq!(ok, before.next() == Some(to));
                if !ok { proptest::prop_assert_eq!(t.phase(), before); }
            }
        }
    }
}
