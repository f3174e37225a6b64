//! The VMM's state and the lifecycle transitions the commands perform.

use std::sync::Arc;

pub use keel_phase::shutdown::{ShutdownCause, ShutdownSignal};
use keel_phase::{Phase, PhaseTracker, RunState};
use keel_qdev::{DeviceRequest, DeviceTree};
use keel_qmp::{CommandError, EventBus, PhaseSource};

use crate::commands::{
    AccelChoice, AccelInfo, AccelRejection, BootSet, DeviceAdd, KvmInfo, MachineSet, cause_data,
};
use crate::devices::{QmpEvents, qdev_error};
use keel_accel::{AccelProbe, Accelerator};
use keel_machine::backends::Backends;
use keel_machine::board::{Board, BoardError, MachineConfig, MachineType, MachineTypeInfo};
use keel_machine::board::{BoardContext, GuestExitPolicy};
use keel_machine::device_types::empty_tree;
use keel_machine::factory::DeviceFactory;
pub(crate) use keel_machine::migration::error_chain as chain;
use keel_machine::migration::{self, MigrationError, live};

/// Everything the commands act on. Commands reach it through `Vmm::execute` or QMP; it is
/// never shared without its lock.
pub struct VmmCore {
    pub(crate) tracker: PhaseTracker,
    pub(crate) name: Option<String>,
    /// `-uuid`, lower case.
    pub(crate) uuid: Option<String>,
    pub(crate) machines: Vec<Arc<dyn MachineType>>,
    pub(crate) default_machine: &'static str,
    pub(crate) accels: Vec<Arc<dyn AccelProbe>>,
    pub(crate) config: Option<MachineConfig>,
    /// `boot-set` and `serial-add` values given before a machine exists; the machine
    /// created next starts from them.
    pub(crate) pending: MachineConfig,
    pub(crate) machine: Option<Arc<dyn MachineType>>,
    pub(crate) accel: Option<AccelChoice>,
    /// The opened accelerator `accel` names; the machine is built on it.
    pub(crate) accelerator: Option<Arc<dyn Accelerator>>,
    pub(crate) board: Option<Box<dyn Board>>,
    pub(crate) backends: Arc<Backends>,
    /// `-machine memory-backend=ID`: the `-object` that is the machine's RAM.
    pub(crate) memory_backend: Option<String>,
    /// `set-action shutdown=pause` (`-no-shutdown`): a guest power-off stops the machine
    /// in the `shutdown` state and the process stays.
    pub(crate) shutdown_pause: bool,
    /// `set-action reboot=shutdown` (`-no-reboot`): a guest reset request powers off.
    pub(crate) reboot_shutdown: bool,
    /// Device types the embedder added ([`crate::VmmBuilder::device_type`]).
    pub(crate) device_types: Vec<Arc<dyn DeviceFactory>>,
    pub(crate) autostart: bool,
    pub(crate) guest_exit: GuestExitPolicy,
    pub(crate) events: Arc<EventBus>,
    pub(crate) shutdown: Arc<ShutdownSignal>,
    /// The QMP monitors served: (`query-chardev` label, filename).
    pub(crate) monitors: Vec<(String, String)>,
    pub(crate) migration: keel_qapi::migration::MigrationTracker,
    /// The VMM this core belongs to, for the threads of a live migration.
    pub(crate) this: std::sync::Weak<crate::Inner>,
}

impl std::fmt::Debug for VmmCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmCore")
            .field("tracker", &self.tracker)
            .field("name", &self.name)
            .field("config", &self.config)
            .field("accel", &self.accel)
            .field("autostart", &self.autostart)
            .finish_non_exhaustive()
    }
}

impl PhaseSource for VmmCore {
    fn phase(&self) -> Phase {
        self.tracker.phase()
    }
}

pub(crate) fn generic(e: impl std::fmt::Display) -> CommandError {
    CommandError::generic(e.to_string())
}

fn board_of(b: &mut Option<Box<dyn Board>>) -> Result<&mut (dyn Board + 'static), CommandError> {
    b.as_deref_mut()
        .ok_or_else(|| generic("the board is missing"))
}

/// A machine's error as a QMP `GenericError`: the message and its causes on one line.
fn board_error(e: BoardError) -> CommandError {
    CommandError::generic(chain(&e))
}

impl VmmCore {
    /// The run state, or `prelaunch` before machine-ready (what QEMU reports in preconfig).
    pub fn run_state(&self) -> RunState {
        self.tracker.run_state().unwrap_or(RunState::Prelaunch)
    }

    /// The selected configuration, once `machine-set` ran.
    pub fn machine_config(&self) -> Option<&MachineConfig> {
        self.config.as_ref()
    }

    /// The accelerator choice, once `accel-set` ran.
    pub fn accel_choice(&self) -> Option<&AccelChoice> {
        self.accel.as_ref()
    }

    fn find_machine(&self, name: &str) -> Option<Arc<dyn MachineType>> {
        self.machines.iter().find(|m| m.name() == name).cloned()
    }

    pub(crate) fn machine_infos(&self) -> Vec<MachineTypeInfo> {
        self.machines
            .iter()
            .filter(|m| m.available().is_ok())
            .map(|m| {
                let mut i = m.info();
                i.is_default = m.name() == self.default_machine;
                i
            })
            .collect()
    }

    pub(crate) fn accel_infos(&self) -> Vec<AccelInfo> {
        self.accels
            .iter()
            .map(|a| {
                let probe = a.open().map(drop).map_err(|e| e.to_string());
                // Usable here but refused by the machine at accel-set: say why.
                let refused = self.accel.as_ref().and_then(|c| {
                    c.rejected
                        .iter()
                        .find(|r| r.accel == a.name())
                        .map(|r| r.reason.clone())
                });
                AccelInfo {
                    name: a.name().to_owned(),
                    available: probe.is_ok(),
                    reason: probe.err().or(refused),
                    selected: self.accel.as_ref().is_some_and(|c| c.accel == a.name()),
                }
            })
            .collect()
    }

    pub(crate) fn kvm_info(&self) -> KvmInfo {
        KvmInfo {
            enabled: self.accel.as_ref().is_some_and(|c| c.accel == "kvm"),
            present: self
                .accels
                .iter()
                .any(|a| a.name() == "kvm" && a.open().is_ok()),
        }
    }

    pub(crate) fn machine_set(&mut self, set: MachineSet) -> Result<(), CommandError> {
        let first = self.tracker.phase() == Phase::NoMachine;
        let (machine, mut cfg) = if first {
            let name = set
                .type_name
                .clone()
                .unwrap_or_else(|| self.default_machine.to_owned());
            let supported: Vec<&str> = self
                .machines
                .iter()
                .filter(|m| m.available().is_ok())
                .map(|m| m.name())
                .collect();
            let m = self.find_machine(&name).ok_or_else(|| {
                generic(format!(
                    "unsupported machine type '{name}' (supported: {})",
                    supported.join(", ")
                ))
            })?;
            m.available().map_err(board_error)?;
            let cfg = MachineConfig {
                type_name: name,
                ..self.pending.clone()
            };
            (m, cfg)
        } else {
            let (Some(m), Some(cfg)) = (self.machine.clone(), self.config.clone()) else {
                return Err(generic("no machine configuration exists"));
            };
            if let Some(t) = &set.type_name
                && *t != cfg.type_name
            {
                return Err(generic(format!(
                    "the machine type is already '{}'; it cannot change once set",
                    cfg.type_name
                )));
            }
            (m, cfg)
        };
        if let Some(v) = set.memory {
            cfg.memory = Some(v);
        }
        if let Some(v) = set.cpus {
            cfg.cpus = Some(v);
        }
        if let Some(v) = set.kernel {
            cfg.kernel = Some(v);
        }
        if let Some(v) = set.initrd {
            cfg.initrd = Some(v);
        }
        if let Some(v) = set.append {
            cfg.append = Some(v);
        }
        if let Some(v) = set.serial {
            cfg.serial.push(v);
        }
        if let Some(v) = set.no_reboot {
            cfg.no_reboot = v;
        }
        let mut props = set.props;
        let backend = keel_machine::backends::take_common_machine_props(&mut props)
            .map_err(|e| generic(e.to_string()))?;
        cfg.props.extend(props);
        machine.check_config(&cfg).map_err(board_error)?;
        if backend.is_some() {
            self.memory_backend = backend;
        }
        // Once an accelerator accepted the machine, a change must still suit it.
        if let (Some(choice), Some(accel)) = (&self.accel, &self.accelerator) {
            machine.check_accel(&cfg, accel.as_ref()).map_err(|e| {
                generic(format!(
                    "accelerator '{}' cannot run the machine with this change: {}",
                    choice.accel,
                    chain(&e)
                ))
            })?;
        }
        if first {
            self.tracker
                .advance(Phase::MachineCreated)
                .map_err(generic)?;
        }
        self.machine = Some(machine);
        self.config = Some(cfg);
        if first {
            self.pending = MachineConfig::default();
        }
        Ok(())
    }

    /// Applies `change` to the machine's configuration, or to the pending one before a
    /// machine exists; an existing machine checks the result (and an accepted accelerator
    /// still has to suit it), and a refused change leaves everything as it was.
    fn change_config(
        &mut self,
        change: impl FnOnce(&mut MachineConfig),
    ) -> Result<(), CommandError> {
        let (Some(machine), Some(cfg)) = (self.machine.clone(), self.config.as_ref()) else {
            change(&mut self.pending);
            return Ok(());
        };
        let mut cfg = cfg.clone();
        change(&mut cfg);
        machine.check_config(&cfg).map_err(board_error)?;
        self.config = Some(cfg);
        Ok(())
    }

    /// `boot-set`: values read when the machine becomes ready.
    pub(crate) fn boot_set(&mut self, set: BootSet) -> Result<(), CommandError> {
        self.change_config(|cfg| {
            if let Some(v) = set.kernel {
                cfg.kernel = Some(v);
            }
            if let Some(v) = set.initrd {
                cfg.initrd = Some(v);
            }
            if let Some(v) = set.append {
                cfg.append = Some(v);
            }
            if let Some(v) = set.no_reboot {
                cfg.no_reboot = v;
            }
        })
    }

    /// `serial-add`: the backend of the next serial port.
    pub(crate) fn serial_add(&mut self, backend: String) -> Result<(), CommandError> {
        self.change_config(|cfg| cfg.serial.push(backend))
    }

    pub(crate) fn accel_set(&mut self, list: &[String]) -> Result<AccelChoice, CommandError> {
        if list.is_empty() {
            return Err(generic("accel-set needs at least one accelerator"));
        }
        let (Some(machine), Some(cfg)) = (self.machine.clone(), self.config.clone()) else {
            return Err(generic("no machine configuration exists"));
        };
        let known: Vec<&str> = self.accels.iter().map(|a| a.name()).collect();
        let mut rejected = Vec::new();
        for name in list {
            // `NAME,PROP=VALUE,...` (what -accel passes): the backend takes the properties.
            let (name, props) = keel_qapi::cli::accel_props(name);
            let opened = match self.accels.iter().find(|a| a.name() == name) {
                None => Err(format!(
                    "no accelerator of that name (known: {})",
                    known.join(", ")
                )),
                Some(a) => a
                    .open_with(&props)
                    .map_err(|e| e.to_string())
                    .and_then(|accel| {
                        machine
                            .check_accel(&cfg, accel.as_ref())
                            .map(|()| accel)
                            .map_err(|e| chain(&e))
                    }),
            };
            match opened {
                Ok(accel) => {
                    self.tracker.advance(Phase::AccelCreated).map_err(generic)?;
                    let choice = AccelChoice {
                        accel: name.to_owned(),
                        rejected,
                    };
                    self.accel = Some(choice.clone());
                    self.accelerator = Some(accel);
                    return Ok(choice);
                }
                Err(reason) => rejected.push(AccelRejection {
                    accel: name.to_owned(),
                    reason,
                }),
            }
        }
        let why: Vec<String> = rejected
            .iter()
            .map(|r| format!("{}: {}", r.accel, r.reason))
            .collect();
        Err(generic(format!(
            "no accelerator can run machine '{}' here ({})",
            cfg.type_name,
            why.join("; ")
        )))
    }

    pub(crate) fn machine_init(&mut self) -> Result<(), CommandError> {
        let (Some(machine), Some(cfg), Some(accel)) = (
            self.machine.clone(),
            self.config.as_ref(),
            self.accelerator.clone(),
        ) else {
            return Err(generic("the machine or its accelerator is missing"));
        };
        let ctx = BoardContext {
            backends: self.backends.clone(),
            events: Arc::new(QmpEvents(self.events.clone())),
            guest_exit: self.guest_exit,
            device_types: self.device_types.clone(),
        };
        let mut cfg = cfg.clone();
        if let Some(id) = &self.memory_backend {
            let size = self.backends.use_memory_backend(id, cfg.memory);
            cfg.memory = Some(size.map_err(|e| generic(e.to_string()))?);
        }
        let board = machine.create(&cfg, accel, &ctx).map_err(board_error)?;
        self.config = Some(cfg);
        self.board = Some(board);
        self.tracker.advance(Phase::MachineInit).map_err(generic)
    }

    pub(crate) fn machine_done(&mut self) -> Result<(), CommandError> {
        if self.tracker.phase() == Phase::AccelCreated {
            self.machine_init()?;
        }
        let board = board_of(&mut self.board)?;
        let cfg = self
            .config
            .as_ref()
            .ok_or_else(|| generic("the machine configuration is missing"))?;
        board.done(cfg).map_err(board_error)?;
        board
            .devices()
            .global_warnings()
            .iter()
            .for_each(|w| log::warn!("{w}"));
        self.tracker.advance(Phase::MachineReady).map_err(generic)?;
        match self.migration.incoming.clone() {
            Some(uri) => self.migrate_incoming(&uri).and_then(|()| {
                let failed = self.migration.load_failed.as_ref();
                failed.map_or(Ok(()), |e| {
                    Err(generic(format!("load of migration failed: {e}")))
                })
            }),
            None if self.autostart => self.cont(),
            None => Ok(()),
        }
    }

    /// `device_add` / `-device`: one path through the board's device tree, which decides
    /// cold or hot plug from the phase.
    pub(crate) fn device_add(&mut self, dev: DeviceAdd) -> Result<(), CommandError> {
        let phase = self.tracker.phase();
        let mut args = dev.props;
        args.insert("driver".into(), dev.driver.into());
        if let Some(id) = dev.id {
            args.insert("id".into(), id.into());
        }
        if let Some(bus) = dev.bus {
            args.insert("bus".into(), bus.into());
        }
        let req = DeviceRequest::from_qmp(&args).map_err(|e| qdev_error(&e))?;
        let board = board_of(&mut self.board)?;
        board
            .device_add(phase, &req)
            .map(|_| ())
            .map_err(|e| qdev_error(&e))
    }

    /// `device_del`: removal at once in machine-init; in machine-ready only on buses with
    /// a hotplug handler (microvm has none).
    pub(crate) fn device_del(&mut self, id: &str) -> Result<(), CommandError> {
        let phase = self.tracker.phase();
        let board = board_of(&mut self.board)?;
        board
            .devices_mut()
            .device_del(phase, id)
            .map(|_| ())
            .map_err(|e| qdev_error(&e))
    }

    /// Runs `f` on the board's device tree, or on an empty one before a board exists
    /// (introspection works in every phase).
    pub(crate) fn with_tree<T>(&self, f: impl FnOnce(&DeviceTree) -> T) -> T {
        match self.board.as_ref() {
            Some(b) => f(b.devices()),
            None => f(&empty_tree()),
        }
    }

    /// `system_powerdown`: emits POWERDOWN and presses the ACPI power button if the machine
    /// has one (the guest decides what to do, as in QEMU; without one nothing happens).
    pub(crate) fn system_powerdown(&mut self) -> Result<(), CommandError> {
        self.events.emit("POWERDOWN", None);
        if let Some(b) = self.board.as_mut() {
            b.power_button();
        }
        Ok(())
    }

    pub(crate) fn cont(&mut self) -> Result<(), CommandError> {
        let state = self.tracker.run_state().map_err(generic)?;
        match state {
            // Already running: nothing to do and, as with QEMU 7.2, no event.
            RunState::Running => Ok(()),
            RunState::InMigrate => {
                self.autostart = true; // run once it came in, as QEMU
                Ok(())
            }
            RunState::Shutdown | RunState::GuestPanicked | RunState::InternalError => {
                Err(generic("Resetting the Virtual Machine is required"))
            }
            RunState::Suspended => Err(generic(
                "the guest is suspended; wake it with system_wakeup",
            )),
            _ => {
                if let Some(b) = self.board.as_mut() {
                    b.resume().map_err(board_error)?;
                }
                self.tracker
                    .set_run_state(RunState::Running)
                    .map_err(generic)?;
                self.events.emit("RESUME", None);
                Ok(())
            }
        }
    }

    pub(crate) fn stop(&mut self) -> Result<(), CommandError> {
        if self.tracker.run_state().map_err(generic)? != RunState::Running {
            return Ok(());
        }
        if let Some(b) = self.board.as_mut() {
            b.pause().map_err(board_error)?;
        }
        self.tracker
            .set_run_state(RunState::Paused)
            .map_err(generic)?;
        self.events.emit("STOP", None);
        Ok(())
    }

    pub(crate) fn system_reset(&mut self) -> Result<(), CommandError> {
        let state = self.tracker.run_state().map_err(generic)?;
        // RESET before the DEVICE_DELETED of the unplugs the reset completes, as QEMU.
        self.events.emit(
            "RESET",
            Some(serde_json::json!({"guest": false, "reason": "host-qmp-system-reset"})),
        );
        if let Some(b) = self.board.as_mut() {
            b.reset().map_err(board_error)?;
        }
        if matches!(
            state,
            RunState::Shutdown | RunState::GuestPanicked | RunState::InternalError
        ) {
            self.tracker
                .set_run_state(RunState::Prelaunch)
                .map_err(generic)?;
        }
        Ok(())
    }

    pub(crate) fn qom_set(
        &mut self,
        path: &str,
        property: &str,
        _value: &serde_json::Value,
    ) -> Result<(), CommandError> {
        match (path, self.config.as_ref()) {
            ("/machine", Some(cfg)) => Err(generic(format!(
                "Property '{}-machine.{property}' not found",
                cfg.type_name
            ))),
            _ => Err(CommandError::with_class(
                keel_qmp::ErrorClass::DeviceNotFound,
                format!("Device '{path}' not found"),
            )),
        }
    }

    /// Emits SHUTDOWN and moves a ready machine to the `shutdown` run state.
    /// The guest reset the machine (i8042, triple fault without `-no-reboot`).
    pub(crate) fn guest_reset(&mut self) {
        self.events.emit(
            "RESET",
            Some(serde_json::json!({"guest": true, "reason": "guest-reset"})),
        );
        if let Some(b) = self.board.as_mut()
            && let Err(e) = b.reset()
        {
            log::error!("guest reset failed: {e}");
            self.internal_error();
        }
    }

    /// The guest reported a panic: the run state says so (QEMU's default action is to pause).
    pub(crate) fn guest_panicked(&mut self) {
        if let Some(b) = self.board.as_mut() {
            let _ = b.pause();
        }
        let _ = self.tracker.set_run_state(RunState::GuestPanicked);
        self.events.emit(
            "GUEST_PANICKED",
            Some(serde_json::json!({"action": "pause"})),
        );
    }

    /// A disk's host I/O failed: `BLOCK_IO_ERROR`, and under `stop` the machine pauses in
    /// `io-error` (STOP after the event, as QEMU); `cont` retries the held requests.
    pub(crate) fn block_io_error(&mut self, e: &keel_machine::BlockIoError) {
        self.events.emit("BLOCK_IO_ERROR", Some(e.event_data()));
        if e.stops_machine() && self.run_state() == RunState::Running {
            if let Some(b) = self.board.as_mut() {
                let _ = b.pause();
            }
            let _ = self.tracker.set_run_state(RunState::IoError);
            self.events.emit("STOP", None);
        }
    }

    /// A vCPU failed; the machine is held and reports `internal-error`.
    pub(crate) fn internal_error(&mut self) {
        if let Some(b) = self.board.as_mut() {
            let _ = b.pause();
        }
        if self.tracker.set_run_state(RunState::InternalError).is_ok() {
            self.events.emit("STOP", None);
        }
    }

    /// The guest powered off under `-no-shutdown`: SHUTDOWN, then the machine stops in the
    /// `shutdown` state (STOP), as QEMU's shutdown action `pause`.
    pub(crate) fn guest_shutdown_paused(&mut self) {
        let cause = ShutdownCause::GuestShutdown;
        self.events.emit("SHUTDOWN", Some(cause_data(true, cause)));
        if let Some(b) = self.board.as_mut() {
            let _ = b.pause();
        }
        if self.tracker.set_run_state(RunState::Shutdown).is_ok() {
            self.events.emit("STOP", None);
        }
    }

    fn set_run(&mut self, state: RunState) -> Result<(), CommandError> {
        self.tracker.set_run_state(state).map(drop).map_err(generic)
    }

    /// `migrate`: stops the guest and saves the machine to `uri`; the run state is then
    /// `postmigrate` (after a failure, what it was). `unix:`/`tcp:` migrate live on a thread.
    pub(crate) fn migrate(&mut self, uri: &str) -> Result<(), CommandError> {
        if self.run_state() == RunState::PostMigrate {
            let e = "Can't migrate the vm that was paused due to previous migration";
            return Err(generic(e));
        }
        if self.migration.in_progress() {
            return Err(generic("There's a migration process in progress"));
        }
        let running = self.run_state() == RunState::Running;
        self.migration.begin(&self.events);
        // `fd:` is taken first: a name nobody passed fails before the guest stops.
        let fd = migration::take_fd(uri, &self.backends).transpose();
        let fd = fd.map_err(|e| self.migrate_failed(&e))?;
        let target = match (live::SocketUri::parse(uri), fd) {
            (Some(s), _) => live::Target::Socket(s),
            (None, Some(f)) if running => live::Target::Stream(f),
            (None, fd) => return self.save(uri, fd),
        };
        {
            let board = board_of(&mut self.board)?;
            let ram = board.live_ram(true).map_err(board_error)?;
            let p = self.migration.params;
            let params = live::LiveParams {
                downtime_limit_ms: p.downtime_limit,
                max_bandwidth: p.max_bandwidth,
            };
            let link = Box::new(LiveLink(self.this.clone()));
            let cancel = self.migration.cancel.clone();
            live::start_source(target, ram, params, link, cancel)
                .map_err(|e| self.migrate_failed(&e))
        }
    }

    /// A migration failed before it began: `failed`, and the error for the command.
    fn migrate_failed(&mut self, e: &MigrationError) -> CommandError {
        self.migration.fail(&chain(e), &self.events);
        generic(chain(e))
    }

    /// `migrate` by stop-and-copy: `active`, the vCPUs stop, the machine is saved to `uri`
    /// (or to `fd`, taken for `fd:NAME`). As QEMU, a failure to write the stream is not
    /// the command's error: `query-migrate` and the `MIGRATION` event report it.
    fn save(&mut self, uri: &str, fd: Option<std::fs::File>) -> Result<(), CommandError> {
        self.migration.set_status("active", &self.events);
        let before = self.finish_migrate()?;
        let running = before == RunState::Running;
        let (board, backends) = (board_of(&mut self.board)?, &self.backends);
        let r = match fd {
            Some(f) => migration::save_fd(board, f, uri.trim_start_matches("fd:"), running),
            None => migration::save(board, uri, running, backends),
        };
        let shown = r.as_ref().map(|r| r.stats()).map_err(|e| chain(e));
        self.migration.finish(shown.as_ref().copied(), &self.events);
        self.after_migrate(before, r.is_ok())?;
        match r {
            Err(e) if !e.is_write_failure() => Err(generic(chain(&e))),
            _ => Ok(()),
        }
    }

    /// The stop-and-copy starts: the vCPUs stop (`STOP` if they ran) in `finish-migrate`,
    /// as QEMU's source. Returns the run state before.
    fn finish_migrate(&mut self) -> Result<RunState, CommandError> {
        let before = self.run_state();
        self.stop()?;
        self.set_run(RunState::FinishMigrate)?;
        Ok(before)
    }

    /// The stop-and-copy ended: `postmigrate` after a success; after a failure the state
    /// from `before` (a guest that ran runs again: `RESUME`).
    fn after_migrate(&mut self, before: RunState, ok: bool) -> Result<(), CommandError> {
        match (ok, before) {
            (true, _) => self.set_run(RunState::PostMigrate),
            (false, RunState::Running) => self.cont(),
            (false, s) => self.set_run(s),
        }
    }

    /// `migrate-incoming` / `-incoming URI|defer` (at machine-done): waits in `inmigrate`,
    /// or restores `uri`; the guest then runs if it ran when saved (unless `-S`).
    pub(crate) fn migrate_incoming(&mut self, uri: &str) -> Result<(), CommandError> {
        if self.migration.incoming.is_none() {
            return Err(generic("'-incoming' was not specified on the command line"));
        }
        self.set_run(RunState::InMigrate)?;
        if uri == "defer" {
            return Ok(());
        }
        self.migration.set_status("setup", &self.events);
        let board = board_of(&mut self.board)?;
        let snap = match migration::open(uri, &self.backends) {
            // A live stream (a socket, or `fd:` after a live `migrate`): on a thread.
            Ok(migration::Incoming::Live(listener)) => {
                let ram = board.live_ram(false).map_err(board_error)?;
                let link = Box::new(LiveLink(self.this.clone()));
                return live::start_incoming(listener, ram, link).map_err(|e| generic(chain(&e)));
            }
            Ok(migration::Incoming::Snapshot(snap)) => Ok(snap),
            Err(e) => Err(e),
        };
        self.migration.set_status("active", &self.events);
        let r = snap.and_then(|s| board.restore_snapshot(&s).map_err(MigrationError::from));
        let shown = r.as_ref().map(|_| None).map_err(|e| chain(e));
        self.migration.finish(shown.as_ref().copied(), &self.events);
        let running = match r {
            Ok(running) => running,
            Err(e) if e.is_stream_failure() => {
                self.load_failed(&e);
                return Ok(());
            }
            Err(e) => return Err(generic(chain(&e))),
        };
        self.set_run(RunState::Paused)?;
        let start = running && self.autostart;
        start.then(|| self.cont()).transpose().map(drop)
    }

    /// The incoming stream could not be loaded: as QEMU, the process ends with status 1
    /// once the reply is out (no `SHUTDOWN`: the guest never ran here).
    fn load_failed(&mut self, e: &MigrationError) {
        self.migration.load_failed = Some(chain(e));
        self.shutdown.request(ShutdownCause::HostError);
    }

    pub(crate) fn enter_shutdown(&mut self, cause: ShutdownCause) {
        if let Some(b) = self.board.as_mut() {
            let _ = b.pause();
            b.shutdown();
        }
        let _ = self.tracker.set_run_state(RunState::Shutdown);
        if self.migration.load_failed.is_none() {
            let data = cause_data(cause.by_guest(), cause);
            self.events.emit("SHUTDOWN", Some(data));
        }
    }
}

/// How a live migration's thread reaches the VMM (each call takes the core's lock).
struct LiveLink(std::sync::Weak<crate::Inner>);

impl LiveLink {
    fn with<R>(&self, f: impl FnOnce(&mut VmmCore) -> R) -> Option<R> {
        let inner = self.0.upgrade()?;
        let mut core = inner.core.lock().unwrap_or_else(|p| p.into_inner());
        Some(f(&mut core))
    }
}

fn vmm_err(e: CommandError) -> MigrationError {
    MigrationError::Vmm(e.to_string())
}

impl live::LiveHost for LiveLink {
    fn progress(&self, p: &live::LiveProgress) {
        self.with(|c| c.live_numbers("active", p));
    }

    fn switchover(
        &self,
        f: &mut dyn FnMut(&mut dyn Board, bool) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let gone = || Err(MigrationError::Vmm("the VMM is gone".into()));
        self.with(|c| {
            let before = c.finish_migrate().map_err(vmm_err)?;
            let running = before == RunState::Running;
            let r = f(board_of(&mut c.board).map_err(vmm_err)?, running);
            c.after_migrate(before, r.is_ok()).map_err(vmm_err)?;
            r
        })
        .unwrap_or_else(gone)
    }

    fn restore(&self, snap: &live::Snapshot) -> Result<(), MigrationError> {
        let gone = || Err(MigrationError::Vmm("the VMM is gone".into()));
        self.with(|c| {
            let running = board_of(&mut c.board)
                .map_err(vmm_err)?
                .restore_state(snap)?;
            c.set_run(RunState::Paused).map_err(vmm_err)?;
            if running && c.autostart {
                c.cont().map_err(vmm_err)?;
            }
            Ok(())
        })
        .unwrap_or_else(gone)
    }

    fn finished(&self, result: Result<(), MigrationError>, p: &live::LiveProgress) {
        self.with(|c| match result {
            Ok(()) => {
                c.live_numbers("completed", p);
                c.migration.incoming = None;
            }
            Err(MigrationError::Cancelled) => c.live_numbers("cancelled", p),
            Err(e) => {
                c.migration.fail(&chain(&e), &c.events);
                if c.migration.incoming.is_some() {
                    c.load_failed(&e);
                    c.shutdown.release();
                }
            }
        });
    }
}

impl VmmCore {
    /// `query-migrate`'s numbers from a live migration's.
    fn live_numbers(&mut self, status: &str, p: &live::LiveProgress) {
        let page = keel_accel::dirty::DIRTY_PAGE;
        let ram = keel_qapi::migration::MigrationStats {
            transferred: p.transferred,
            remaining: p.remaining,
            total: p.total,
            duplicate: p.duplicate,
            normal: p.normal,
            normal_bytes: p.normal * page,
            dirty_pages_rate: p.dirty_pages_rate,
            mbps: p.mbps,
            dirty_sync_count: p.dirty_sync_count,
            page_size: page,
            pages_per_second: ((p.normal + p.duplicate) * 1000)
                .checked_div(p.total_ms)
                .unwrap_or(0),
            downtime_bytes: p.downtime_bytes,
            precopy_bytes: p.precopy_bytes,
            ..Default::default()
        };
        let expected = (status == "active").then_some(p.expected_downtime_ms);
        let times = (p.total_ms, p.setup_ms, p.downtime_ms, expected);
        self.migration.live(status, ram, times, &self.events);
    }
}
