//! Keel assembled: the embedding API behind the `vmm` binary.
//!
//! A [`Vmm`] is one machine and its lifecycle. It is configured by commands, the same ones
//! whichever way they come: typed from Rust ([`Vmm::execute`]), as JSON from a QMP client
//! ([`Vmm::serve`]), or from the command line ([`cli`]). Each command declares the phases
//! in which it is valid; out of phase it fails with `OutOfPhase` and changes nothing.
//!
//! ```
//! use vmm::{Vmm, commands::*};
//! let vmm = Vmm::new();
//! vmm.execute(MachineSet { type_name: Some("none".into()), ..Default::default() }).unwrap();
//! let choice = vmm.execute(AccelSet { accel: AccelList::Many(vec!["kvm".into(), "tcg".into()]) }).unwrap();
//! assert!(choice.accel == "kvm" || choice.accel == "tcg");
//! vmm.execute(MachineDone {}).unwrap();
//! assert!(vmm.execute(QueryStatus {}).unwrap().running);
//! ```
//!
//! # Devices
//!
//! Every board owns a `keel_qdev::DeviceTree` ([`board::Board::devices`]); `-device` and
//! `device_add` go through [`board::Board::device_add`], and the tree decides cold plug
//! (machine-init) or hot plug (machine-ready, on buses with a hotplug handler, as `pc`'s
//! `pci.0`) from the phase alone. Backends ([`backends::Backends`]) exist from no-machine on
//! and are looked up by `drive=`/`netdev=`/`chardev=` when a device is realized. The
//! repository's `docs/ARCHITECTURE.md` has the whole map.

#![deny(missing_docs)]

pub mod cli;
pub mod commands;
mod core;
pub mod devices;

/// The machine seam and the backends, from `keel-machine` (re-exported so that embedders
/// of `vmm` name one crate).
pub use keel_machine::{backends, board, device_types};

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use keel_phase::{Phase, PhaseTracker, PhaseWatch};
use keel_qmp::{
    CommandError, Dispatcher, Endpoint, EventBus, Handler, Monitor, Registry, ServerError,
    run_out_of_band,
};
use serde_json::{Map, Value};

pub use crate::board::GuestExitPolicy;
pub use crate::core::{ShutdownCause, ShutdownSignal, VmmCore};

use keel_accel::AccelProbe;
use keel_machine::factory::DeviceFactory;
use keel_machine::{MicrovmType, PcType};

use crate::board::{BoardEvent, MachineType, NoneMachine};
use crate::commands::{AccelList, AccelSet, MachineDone, MachineInit, MachineSet, VersionInfo};

struct Inner {
    core: Mutex<VmmCore>,
    registry: Registry<VmmCore>,
    events: Arc<EventBus>,
    shutdown: Arc<ShutdownSignal>,
    monitors: Mutex<Vec<Monitor>>,
    /// While set, QMP commands wait (the command line is still being run).
    held: Mutex<usize>,
    released: Condvar,
    /// Process exit status the guest asked for (`isa-debug-exit`); 0 otherwise.
    exit_status: AtomicI32,
    /// The phase, readable without `core`'s lock (out-of-band commands).
    phase: PhaseWatch,
}

/// Keeps QMP clients' commands waiting while it lives (see [`Vmm::hold_qmp`]).
#[must_use = "commands are held only while the guard lives"]
pub struct QmpHold {
    vmm: Vmm,
}

impl std::fmt::Debug for QmpHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QmpHold")
    }
}

impl Drop for QmpHold {
    fn drop(&mut self) {
        let mut n = self
            .vmm
            .inner
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        self.vmm.inner.released.notify_all();
    }
}

/// One virtual machine and its lifecycle; cheap to clone (all clones are the same VMM).
#[derive(Clone)]
pub struct Vmm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm").field("phase", &self.phase()).finish()
    }
}

/// Chooses the machine types, accelerators and QMP commands a [`Vmm`] offers.
///
/// The defaults are Keel's own: machines `none` and `microvm`, the accelerators this build
/// has (`kvm`, `tcg`: Cargo features of the same names), and every built-in command. An
/// embedder adds its own of each kind; they run exactly like the built-in ones (the same
/// phase checks, the same fallback from one accelerator to the next).
pub struct VmmBuilder {
    machines: Vec<Arc<dyn MachineType>>,
    default_machine: &'static str,
    accels: Vec<Arc<dyn AccelProbe>>,
    registry: Registry<VmmCore>,
    device_types: Vec<Arc<dyn DeviceFactory>>,
}

impl std::fmt::Debug for VmmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmBuilder")
            .field(
                "machines",
                &self.machines.iter().map(|m| m.name()).collect::<Vec<_>>(),
            )
            .field("default_machine", &self.default_machine)
            .finish_non_exhaustive()
    }
}

/// The accelerators compiled into this build (features `kvm`, `tcg`), KVM first.
fn builtin_accels() -> Vec<Arc<dyn AccelProbe>> {
    vec![
        #[cfg(feature = "kvm")]
        Arc::new(keel_kvm::KvmProbe),
        #[cfg(feature = "tcg")]
        Arc::new(keel_tcg::TcgProbe),
    ]
}

impl Default for VmmBuilder {
    fn default() -> Self {
        let mut registry = Registry::new();
        commands::register_all(&mut registry);
        VmmBuilder {
            machines: vec![
                Arc::new(NoneMachine),
                Arc::new(MicrovmType),
                Arc::new(PcType),
            ],
            default_machine: "microvm",
            accels: builtin_accels(),
            registry,
            device_types: Vec::new(),
        }
    }
}

impl VmmBuilder {
    /// Adds (or replaces, by name) a machine type.
    pub fn machine(mut self, m: Arc<dyn MachineType>) -> Self {
        self.machines.retain(|x| x.name() != m.name());
        self.machines.push(m);
        self
    }

    /// Picks the machine type used when none is named.
    pub fn default_machine(mut self, name: &'static str) -> Self {
        self.default_machine = name;
        self
    }

    /// Adds (or replaces, by name) an accelerator; `-accel NAME` and `accel-set` find it.
    pub fn accel(mut self, a: Arc<dyn AccelProbe>) -> Self {
        self.accels.retain(|x| x.name() != a.name());
        self.accels.push(a);
        self
    }

    /// Adds a device type: boards that can map it offer it to `-device`/`device_add` and
    /// list it in `qom-list-types` and `device-list-properties`.
    pub fn device_type(mut self, f: Arc<dyn DeviceFactory>) -> Self {
        self.device_types.push(f);
        self
    }

    /// Adds (or replaces, by name) a QMP command: it is served to QMP clients, listed by
    /// `query-commands` and `query-qmp-schema` with its phases, and runs through
    /// [`Vmm::execute`] like the built-in ones.
    pub fn command<K: Handler<VmmCore>>(mut self) -> Self {
        self.registry.register::<K>();
        self
    }

    /// Builds the VMM in phase no-machine.
    pub fn build(self) -> Vmm {
        let events = EventBus::new();
        let shutdown = Arc::new(ShutdownSignal::default());
        let registry = self.registry;
        let tracker = PhaseTracker::new();
        let phase = tracker.watch();
        let core = VmmCore {
            tracker,
            name: None,
            uuid: None,
            machines: self.machines,
            default_machine: self.default_machine,
            accels: self.accels,
            config: None,
            pending: board::MachineConfig::default(),
            machine: None,
            accel: None,
            accelerator: None,
            board: None,
            backends: Arc::new(backends::Backends::new()),
            memory_backend: None,
            shutdown_pause: false,
            reboot_shutdown: false,
            device_types: self.device_types,
            autostart: true,
            guest_exit: GuestExitPolicy::Shutdown,
            events: events.clone(),
            shutdown: shutdown.clone(),
            monitors: Vec::new(),
            migration: Default::default(),
            this: std::sync::Weak::new(),
        };
        Vmm {
            inner: Arc::new_cyclic(|this| Inner {
                core: Mutex::new(VmmCore {
                    this: this.clone(),
                    ..core
                }),
                registry,
                events,
                shutdown,
                monitors: Mutex::new(Vec::new()),
                held: Mutex::new(0),
                released: Condvar::new(),
                exit_status: AtomicI32::new(0),
                phase,
            }),
        }
    }
}

/// The accelerators tried when none was asked for: KVM, else the interpreter.
pub const DEFAULT_ACCELS: [&str; 2] = ["kvm", "tcg"];

impl Default for Vmm {
    fn default() -> Self {
        Self::new()
    }
}

impl Vmm {
    /// A VMM with the built-in machine types and accelerators.
    pub fn new() -> Vmm {
        VmmBuilder::default().build()
    }

    /// A builder to choose machine types and accelerators.
    pub fn builder() -> VmmBuilder {
        VmmBuilder::default()
    }

    fn core(&self) -> MutexGuard<'_, VmmCore> {
        self.inner.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a typed command: checks its phase, then runs it. Out of phase it fails with
    /// [`CommandError::OutOfPhase`] and nothing changes.
    pub fn execute<K: Handler<VmmCore>>(&self, cmd: K) -> Result<K::Output, CommandError> {
        let r = {
            let mut core = self.core();
            let r = self.inner.registry.execute(&mut core, cmd);
            self.watch_board(&mut core);
            r
        };
        // A direct caller has its answer now: a requested shutdown may proceed.
        self.inner.shutdown.release();
        r
    }

    /// Runs a command given as JSON, exactly as a QMP client's request is run.
    pub fn execute_json(
        &self,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, CommandError> {
        let r = self.dispatch_locked(name, args);
        self.inner.shutdown.release();
        r
    }

    fn dispatch_locked(&self, name: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        let mut core = self.core();
        let r = self.inner.registry.dispatch(&mut core, name, args);
        self.watch_board(&mut core);
        r
    }

    /// Once a board exists, handles its events on a thread of their own (never on a vCPU
    /// thread, which must not wait for the VMM's lock).
    fn watch_board(&self, core: &mut VmmCore) {
        let Some(rx) = core.board.as_mut().and_then(|b| b.take_events()) else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("board-events".into())
            .spawn(move || {
                while let Ok(ev) = rx.recv() {
                    if !Vmm::board_event(&weak, ev) {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot watch the machine's events: {e}");
        }
    }

    /// Acts on one board event; `false` once the VMM is gone.
    fn board_event(weak: &Weak<Inner>, ev: BoardEvent) -> bool {
        let Some(inner) = weak.upgrade() else {
            return false;
        };
        let vmm = Vmm { inner };
        match ev {
            BoardEvent::GuestReset if vmm.core().reboot_shutdown => {
                return Vmm::board_event(weak, BoardEvent::GuestShutdown);
            }
            BoardEvent::GuestShutdown => {
                let mut core = vmm.core();
                if core.shutdown_pause {
                    core.guest_shutdown_paused();
                } else {
                    drop(core);
                    vmm.request_shutdown(ShutdownCause::GuestShutdown);
                }
            }
            BoardEvent::GuestExit(status) => {
                vmm.inner.exit_status.store(status, Ordering::SeqCst);
                vmm.request_shutdown(ShutdownCause::GuestShutdown);
            }
            BoardEvent::GuestReset => vmm.core().guest_reset(),
            BoardEvent::GuestPanic => vmm.core().guest_panicked(),
            BoardEvent::DeviceEjected => {
                vmm.core().board.iter_mut().for_each(|b| b.guest_ejected())
            }
            BoardEvent::InternalError(msg) => {
                log::error!("{msg}");
                vmm.core().internal_error();
            }
            BoardEvent::BlockIoError(e) => vmm.core().block_io_error(&e),
            other => log::warn!("unhandled machine event {other:?}"),
        }
        true
    }

    /// Chooses what a guest write to `isa-debug-exit` does for machines created from now on
    /// (see [`GuestExitPolicy`]; the default shuts the VMM down in order).
    pub fn set_guest_exit_policy(&self, policy: GuestExitPolicy) {
        self.core().guest_exit = policy;
    }

    /// The process exit status: 1 after an incoming migration failed (as QEMU), else what
    /// the guest wrote to `isa-debug-exit`, else 0.
    pub fn exit_status(&self) -> i32 {
        match self.incoming_failure() {
            Some(_) => 1,
            None => self.inner.exit_status.load(Ordering::SeqCst),
        }
    }

    /// Why the incoming migration's stream could not be loaded, if it could not (the
    /// process then ends; QEMU prints it as `load of migration failed: ...`).
    pub fn incoming_failure(&self) -> Option<String> {
        self.core().migration.load_failed.clone()
    }

    /// Makes QMP requests wait until the returned guard is dropped. Monitors still accept
    /// and greet clients; their requests (negotiation included) wait. The
    /// command line holds QMP while it runs, so a client never sees it half done (QEMU
    /// likewise serves monitors only once its command line is processed).
    pub fn hold_qmp(&self) -> QmpHold {
        *self.inner.held.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        QmpHold { vmm: self.clone() }
    }

    fn wait_qmp_released(&self) {
        let mut n = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self
                .inner
                .released
                .wait(n)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The current lifecycle phase.
    pub fn phase(&self) -> Phase {
        self.core().tracker.phase()
    }

    /// The command registry (names, phases, schema).
    pub fn registry(&self) -> &Registry<VmmCore> {
        &self.inner.registry
    }

    /// The event bus: subscribe for in-process events.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.inner.events
    }

    /// Sets the VM name (`-name`), reported by `query-name`.
    pub fn set_name(&self, name: Option<String>) {
        self.core().name = name;
    }

    /// Sets the VM's UUID (`-uuid`), reported by `query-uuid`.
    pub fn set_uuid(&self, uuid: Option<String>) {
        self.core().uuid = uuid;
    }

    /// `-incoming URI` (or `defer`): machine-ready then waits in `inmigrate` for the stream.
    pub fn set_incoming(&self, uri: Option<String>) {
        self.core().migration.incoming = uri;
    }

    /// Whether entering machine-ready starts the vCPUs (`-S` turns it off).
    pub fn set_autostart(&self, on: bool) {
        self.core().autostart = on;
    }

    /// Moves forward to `target` one phase at a time with defaults for what was not given
    /// (default machine type, accelerators [`DEFAULT_ACCELS`], then `machine-init` and
    /// `machine-done`), each step through its command. `log` hears about every default.
    pub fn advance_to(
        &self,
        target: Phase,
        log: &mut dyn FnMut(String),
    ) -> Result<(), CommandError> {
        loop {
            let phase = self.phase();
            if phase >= target {
                return Ok(());
            }
            match phase {
                Phase::NoMachine => {
                    self.execute(MachineSet::default())?;
                    let name = self
                        .core()
                        .config
                        .as_ref()
                        .map(|c| c.type_name.clone())
                        .unwrap_or_default();
                    log(format!("no machine was selected; using machine '{name}'"));
                }
                Phase::MachineCreated => {
                    let choice = self.execute(AccelSet {
                        accel: AccelList::Many(DEFAULT_ACCELS.map(String::from).to_vec()),
                    })?;
                    let mut msg = format!("no accelerator was selected; using '{}'", choice.accel);
                    for r in &choice.rejected {
                        msg.push_str(&format!(" ({} rejected: {})", r.accel, r.reason));
                    }
                    log(msg);
                }
                Phase::AccelCreated => {
                    self.execute(MachineInit {})?;
                    log("building the machine now (machine-init)".into());
                }
                Phase::MachineInit => {
                    self.execute(MachineDone {})?;
                }
                Phase::MachineReady => return Ok(()),
            }
        }
    }

    /// Registers a machine-init-done notifier: it runs once on entering machine-ready (or
    /// at once if the machine is ready). It runs with the VMM locked, so it must not call
    /// back into this `Vmm`.
    pub fn on_machine_ready(&self, notifier: keel_phase::Notifier) {
        self.core().tracker.add_init_done_notifier(notifier);
    }

    /// Opens a QMP monitor on `endpoint`; it is live at once.
    pub fn serve(&self, endpoint: &Endpoint) -> Result<(), ServerError> {
        let front: Arc<dyn Dispatcher> = Arc::new(QmpFront { vmm: self.clone() });
        let m = keel_qmp::serve(endpoint, front, self.inner.events.clone())?;
        {
            // `query-chardev` names it as QEMU names the chardevs of `-qmp`.
            let mut core = self.core();
            let label = format!("compat_monitor{}", core.monitors.len());
            let filename = match endpoint {
                Endpoint::Unix { path, server, .. } => format!(
                    "unix:{}{}",
                    path.display(),
                    if *server { ",server=on" } else { "" }
                ),
                Endpoint::Tcp { host, port, .. } => format!("tcp:{host}:{port},server=on"),
                Endpoint::Stdio => "stdio".to_owned(),
                Endpoint::Fd { fd, server } => {
                    format!("fd:{fd}{}", if *server { ",server=on" } else { "" })
                }
            };
            core.monitors.push((label, filename));
        }
        self.inner
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m);
        Ok(())
    }

    /// A human monitor on `endpoint` (`-monitor`), each line answered as QMP's
    /// `human-monitor-command` answers it.
    pub fn serve_hmp(&self, endpoint: &Endpoint) -> Result<(), ServerError> {
        let vmm = self.clone();
        let q = VersionInfo::current().qemu;
        let version = format!("{}.{}.{}", q.major, q.minor, q.micro);
        let answer = move |line: &str| {
            let cmd = commands::HumanMonitorCommand {
                command_line: line.to_owned(),
                cpu_index: None,
            };
            vmm.execute(cmd)
                .unwrap_or_else(|e| format!("Error: {e}\r\n"))
        };
        keel_hmp::monitor::serve(endpoint, &version, Arc::new(answer))
    }

    /// A QMP dispatcher for this VMM, for custom transports.
    pub fn dispatcher(&self) -> Arc<dyn Dispatcher> {
        Arc::new(QmpFront { vmm: self.clone() })
    }

    /// The backend store (`-chardev`, `-object`, `-add-fd`, ...), shared with the machine.
    pub fn backends(&self) -> Arc<keel_machine::backends::Backends> {
        self.core().backends.clone()
    }

    /// Asks the VMM to shut down (e.g. on a signal); [`Vmm::wait_for_shutdown`] returns.
    pub fn request_shutdown(&self, cause: ShutdownCause) {
        self.inner.shutdown.request_now(cause);
    }

    /// Blocks until a shutdown takes effect, emits SHUTDOWN, and returns its cause.
    pub fn wait_for_shutdown(&self) -> ShutdownCause {
        let cause = loop {
            if let Some(c) = self.inner.shutdown.wait(None) {
                break c;
            }
        };
        self.core().enter_shutdown(cause);
        cause
    }

    /// Lets every QMP client receive what is queued (the SHUTDOWN event), disconnects
    /// them, and removes the sockets this VMM created. Waits at most `timeout`.
    pub fn close_monitors(&self, timeout: Duration) {
        self.inner.events.close_all(timeout);
        for m in self
            .inner
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            m.cleanup();
        }
    }
}

/// The QMP side of a [`Vmm`].
struct QmpFront {
    vmm: Vmm,
}

impl Dispatcher for QmpFront {
    fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        self.vmm.dispatch_locked(command, args)
    }

    /// `exec-oob` of a command that needs no VMM state runs without the state lock, so it
    /// is answered while an in-band command of any client still holds it; others (which
    /// the registry refuses out of band anyway) take the ordinary path.
    fn dispatch_oob(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        run_out_of_band(|| {
            let registry = &self.vmm.inner.registry;
            // Refused requests are answered without the state lock too: the monitor's
            // OOB thread serves every client and must not wait for in-band work.
            if let Some(e) = registry.refuse_out_of_band(command) {
                return Err(e);
            }
            if !registry.is_context_free(command) {
                return self.vmm.dispatch_locked(command, args);
            }
            let phase = self.vmm.inner.phase.phase();
            registry
                .dispatch_context_free(phase, command, args)
                .unwrap_or_else(|| Err(CommandError::CommandNotFound(command.to_owned())))
        })
    }

    fn before_request(&self) {
        self.vmm.wait_qmp_released();
    }

    fn version(&self) -> Value {
        serde_json::to_value(VersionInfo::current()).unwrap_or(Value::Null)
    }

    fn guest_running(&self) -> bool {
        self.vmm.inner.phase.guest_running()
    }

    fn after_reply(&self, command: &str) {
        // `migrate-incoming` ends the process when the stream cannot be loaded.
        if command == "quit" || command == "migrate-incoming" {
            self.vmm.inner.shutdown.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn exec_oob_of_a_stateless_command_does_not_wait_for_the_state_lock() {
        let vmm = Vmm::new();
        let front = QmpFront { vmm: vmm.clone() };
        // An in-band command in progress holds the VMM's state.
        let busy = vmm.core();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let _ = tx.send(front.dispatch_oob("query-yank", Map::new()));
            // A command that is not OOB-capable is refused as such, without the state.
            let _ = tx.send(front.dispatch_oob("query-status", Map::new()));
        });
        // Generous: these only fail if the OOB path waits for the lock held above.
        let first = rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(first, Ok(Ok(Value::Array(Vec::new()))));
        let second = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(
            second.unwrap_err().to_string(),
            "The command query-status does not support OOB"
        );
        drop(busy);
        t.join().unwrap();
    }
}
