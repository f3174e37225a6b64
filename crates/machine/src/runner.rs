//! vCPU threads: one per vCPU, each running `Vcpu::run` → `handle_exit` → `complete_read`.
//!
//! The threads live in the machine crate, not in the assembling `vmm` crate, so that an
//! embedder using only keel-machine and a backend can run a machine; boards drive them
//! through `Microvm::{start, pause, resume, reset, shutdown}`.
//!
//! State machine (one mutex + condvar, [`Control`]): a vCPU runs guest code only while the
//! machine is neither *paused* (by the user: `stop`/`cont`) nor *held* (by a system event or a
//! vCPU error, until the caller resets or shuts down) nor *stopping*. To change state the
//! caller flips the flag, kicks every vCPU out of the backend with its [`Kick`], and (for
//! pause and reset) waits until every live vCPU thread is parked at the top of its loop.
//! A reset bumps a boot generation; each vCPU applies its new entry state before it runs again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use keel_accel::{
    AccelError, ExitAction, IoBuses, Kick, Regs, SpecialRegs, SystemEvent, SystemEvents, Vcpu,
    handle_exit,
};

use crate::boot::BootState;

/// What the machine reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineEvent {
    /// A device or vCPU asked for a reset, power-off, exit or panic. The vCPUs are held
    /// (not running guest code) until the owner calls `reset()` or `shutdown()`.
    /// With `no_reboot`, a reset request arrives as [`SystemEvent::Shutdown`].
    System(SystemEvent),
    /// The guest ejected hot-pluggable devices (ACPI PCI hot plug); the owner completes
    /// their removal. The vCPUs keep running.
    DeviceEjected,
    /// A vCPU failed (the backend returned an error); all vCPUs are held.
    VcpuError {
        /// vCPU index.
        index: u32,
        /// The backend's message.
        error: String,
    },
    /// A disk's host read or write failed; under `werror=stop` (or `enospc` on a full host
    /// disk) the disk holds the request and the owner should stop the machine, and
    /// continuing it runs the request again. The vCPUs keep running.
    BlockIoError(crate::BlockIoError),
}

/// Receives [`MachineEvent`]s; called from vCPU threads, must not block for long.
pub trait MachineEvents: Send + Sync {
    /// Delivers one event.
    fn machine_event(&self, event: MachineEvent);
}

impl MachineEvents for std::sync::mpsc::Sender<MachineEvent> {
    fn machine_event(&self, event: MachineEvent) {
        // A dropped receiver means nobody listens any more; nothing to do.
        let _ = self.send(event);
    }
}

/// A bounded channel never blocks a vCPU thread: when it is full the event is dropped. The
/// vCPUs are held after any event, so at most one event per vCPU is in flight; a bound of
/// the vCPU count (or more) loses nothing.
impl MachineEvents for std::sync::mpsc::SyncSender<MachineEvent> {
    fn machine_event(&self, event: MachineEvent) {
        let _ = self.try_send(event);
    }
}

/// A vCPU and the host thread that runs it (for `query-cpus-fast`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    /// vCPU index (`cpu-index`).
    pub index: u32,
    /// Host thread id (`thread-id`), once the vCPU thread has started.
    pub thread_id: Option<i32>,
}

#[derive(Debug)]
struct Control {
    user_paused: bool,
    held: bool,
    stop: bool,
    parked: u32,
    alive: u32,
    boot_gen: u64,
    thread_ids: Vec<Option<i32>>,
}

/// State shared by the machine, its vCPU threads and its event hub.
pub(crate) struct Shared {
    ctl: Mutex<Control>,
    cv: Condvar,
    kickers: Mutex<Vec<Arc<dyn Kick>>>,
    boot: Mutex<Vec<Option<BootState>>>,
    /// Bumped on every change of `ctl` that a running vCPU must notice.
    epoch: AtomicU64,
    /// Each vCPU's registers, read by its own thread each time it parks (`info registers`).
    registers: Mutex<Vec<Option<(Regs, SpecialRegs)>>>,
    /// Snapshot requests to parked vCPU threads and their answers (`crate::snapshot`).
    pub(crate) states: Mutex<Vec<crate::snapshot::StateSlot>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(cpus: u32) -> Arc<Self> {
        Arc::new(Self {
            ctl: Mutex::new(Control {
                user_paused: false,
                held: false,
                stop: false,
                parked: 0,
                alive: 0,
                boot_gen: 0,
                thread_ids: vec![None; cpus as usize],
            }),
            cv: Condvar::new(),
            kickers: Mutex::new(Vec::new()),
            boot: Mutex::new(vec![None; cpus as usize]),
            epoch: AtomicU64::new(0),
            registers: Mutex::new(vec![None; cpus as usize]),
            states: Mutex::new(
                (0..cpus)
                    .map(|_| crate::snapshot::StateSlot::Idle)
                    .collect(),
            ),
        })
    }

    pub(crate) fn add_kicker(&self, k: Arc<dyn Kick>) {
        lock(&self.kickers).push(k);
    }

    fn kick_all(&self) {
        for k in lock(&self.kickers).iter() {
            k.kick();
        }
    }

    /// Sets the entry state vCPU `index` applies before it next runs (after a reset).
    pub(crate) fn set_boot_state(&self, index: usize, state: Option<BootState>) {
        if let Some(slot) = lock(&self.boot).get_mut(index) {
            *slot = state;
        }
    }

    /// Stops guest execution until `release` (system events, vCPU errors, resets).
    /// Changes the control state and tells running vCPUs to look at it.
    fn update(&self, f: impl FnOnce(&mut Control)) {
        let mut c = lock(&self.ctl);
        f(&mut c);
        self.epoch.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn hold(&self) {
        self.update(|c| c.held = true);
        self.cv.notify_all();
        self.kick_all();
    }

    /// Waits until every live vCPU thread is parked.
    fn wait_parked<'a>(&'a self, mut c: MutexGuard<'a, Control>) -> MutexGuard<'a, Control> {
        while c.parked < c.alive {
            c = match self.cv.wait_timeout(c, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            // A vCPU may have been inside the backend when the first kick landed before its
            // thread registered; kicking again is harmless.
            if c.parked < c.alive {
                drop(c);
                self.kick_all();
                c = lock(&self.ctl);
            }
        }
        c
    }

    pub(crate) fn pause(&self) {
        self.update(|c| c.user_paused = true);
        self.cv.notify_all();
        self.kick_all();
        drop(self.wait_parked(lock(&self.ctl)));
    }

    pub(crate) fn resume(&self) {
        self.update(|c| c.user_paused = false);
        self.cv.notify_all();
    }

    pub(crate) fn is_paused(&self) -> bool {
        lock(&self.ctl).user_paused
    }

    /// Holds and waits for every vCPU to park (reset's first half).
    pub(crate) fn hold_and_wait(&self) {
        self.hold();
        drop(self.wait_parked(lock(&self.ctl)));
    }

    /// New boot states are in place: every vCPU reloads its entry state and may run again
    /// (unless the user paused the machine).
    pub(crate) fn release_after_reset(&self) {
        self.update(|c| {
            c.boot_gen += 1;
            c.held = false;
        });
        self.cv.notify_all();
    }

    pub(crate) fn stop(&self) {
        self.update(|c| c.stop = true);
        self.cv.notify_all();
        self.kick_all();
    }

    /// The registers of vCPU `index` as it left them when it last parked; `None` unless
    /// every live vCPU is parked now (paused or held), so the values are current.
    pub(crate) fn registers(&self, index: u32) -> Option<(Regs, SpecialRegs)> {
        let c = lock(&self.ctl);
        if !(c.user_paused || c.held) || c.parked < c.alive {
            return None;
        }
        lock(&self.registers).get(index as usize).copied().flatten()
    }

    /// Runs `ops[i]` on vCPU `i`'s own thread while every vCPU is parked, and waits for
    /// the answers; an error if the vCPUs are not all parked (paused or held).
    pub(crate) fn vcpu_states(
        &self,
        ops: Vec<crate::snapshot::StateOp>,
    ) -> Result<Vec<Option<Box<keel_accel::VcpuState>>>, String> {
        let c = lock(&self.ctl);
        if !(c.user_paused || c.held) {
            return Err("the vCPUs are running: stop the machine first".to_string());
        }
        // Paused or held, but a vCPU thread started a moment ago (`-S`: the machine was
        // never run) may not have parked yet: it will, so wait for it.
        let mut c = self.wait_parked(c);
        if (c.alive as usize) < ops.len() {
            return Err("a vCPU thread has ended".to_string());
        }
        {
            let mut st = lock(&self.states);
            for (slot, op) in st.iter_mut().zip(ops) {
                *slot = crate::snapshot::StateSlot::Asked(op);
            }
        }
        self.cv.notify_all();
        loop {
            let done = lock(&self.states)
                .iter()
                .all(|s| !matches!(s, crate::snapshot::StateSlot::Asked(_)));
            if done {
                break;
            }
            c = match self.cv.wait_timeout(c, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(c);
        let mut out = Vec::new();
        for slot in lock(&self.states).iter_mut() {
            match std::mem::replace(slot, crate::snapshot::StateSlot::Idle) {
                crate::snapshot::StateSlot::Done(r) => out.push(r?),
                _ => out.push(None),
            }
        }
        Ok(out)
    }

    pub(crate) fn cpu_info(&self) -> Vec<CpuInfo> {
        lock(&self.ctl)
            .thread_ids
            .iter()
            .enumerate()
            .map(|(i, t)| CpuInfo {
                index: i as u32,
                thread_id: *t,
            })
            .collect()
    }
}

/// The [`SystemEvents`] sink devices and the backend report to: applies `no_reboot`, holds
/// the vCPUs, and forwards to the owner.
pub(crate) struct Hub {
    /// Read on every reset request, so `-no-reboot` given after machine-init still applies.
    pub(crate) no_reboot: std::sync::atomic::AtomicBool,
    pub(crate) sink: Arc<dyn MachineEvents>,
    pub(crate) shared: Arc<Shared>,
}

impl Hub {
    fn vcpu_error(&self, index: u32, e: &AccelError) {
        self.shared.hold();
        self.sink.machine_event(MachineEvent::VcpuError {
            index,
            error: e.to_string(),
        });
    }
}

impl SystemEvents for Hub {
    fn request(&self, event: SystemEvent) {
        let event = match event {
            SystemEvent::Reset if self.no_reboot.load(Ordering::Relaxed) => SystemEvent::Shutdown,
            e => e,
        };
        self.shared.hold();
        self.sink.machine_event(MachineEvent::System(event));
    }
}

const HALT_BACKOFF_MIN: Duration = Duration::from_millis(1);
const HALT_BACKOFF_MAX: Duration = Duration::from_millis(100);

fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Starts the thread for `vcpu`.
pub(crate) fn spawn_vcpu(
    mut vcpu: Box<dyn Vcpu>,
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    buses: Arc<IoBuses>,
) -> std::io::Result<JoinHandle<()>> {
    let index = vcpu.index();
    {
        // Counted before the thread exists so that pause() right after start() waits for it.
        lock(&shared.ctl).alive += 1;
    }
    let result = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn({
            let shared = shared.clone();
            move || {
                keel_sandbox::enter(keel_sandbox::ThreadClass::Vcpu);
                let _exit = ThreadExit {
                    index,
                    shared: &shared,
                    hub: &hub,
                };
                vcpu_thread(&mut *vcpu, &shared, &hub, &buses);
            }
        });
    if result.is_err() {
        lock(&shared.ctl).alive -= 1;
    }
    result
}

/// Runs when a vCPU thread ends, normally or by a panic in a backend or device: the thread no
/// longer counts as live (so `pause` cannot wait for it forever), and a panic is reported as a
/// vCPU error (which holds the other vCPUs).
struct ThreadExit<'a> {
    index: u32,
    shared: &'a Shared,
    hub: &'a Hub,
}

impl Drop for ThreadExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.hub.vcpu_error(
                self.index,
                &AccelError::Guest {
                    vcpu: self.index,
                    reason: "the vCPU thread panicked (a bug in the backend or a device)".into(),
                },
            );
        }
        let mut c = lock(&self.shared.ctl);
        c.alive = c.alive.saturating_sub(1);
        drop(c);
        self.shared.cv.notify_all();
    }
}

fn vcpu_thread(vcpu: &mut dyn Vcpu, shared: &Shared, hub: &Hub, buses: &IoBuses) {
    let index = vcpu.index();
    if let Some(t) = lock(&shared.ctl).thread_ids.get_mut(index as usize) {
        *t = Some(current_tid());
    }
    let mut applied_gen = None;
    // The first entry state is applied at once rather than at the first run, so that a
    // machine saved before it ever ran (`-S`, then `migrate`) saves the state it starts in.
    if let Some(st) = lock(&shared.boot).get(index as usize).copied().flatten() {
        match vcpu
            .set_sregs(&st.sregs)
            .and_then(|()| vcpu.set_regs(&st.regs))
        {
            Ok(()) => applied_gen = Some(lock(&shared.ctl).boot_gen),
            Err(e) => hub.vcpu_error(index, &e),
        }
    }
    let mut halt_backoff = HALT_BACKOFF_MIN;
    // Fast path: the control state changes rarely, so a vCPU takes the control lock only when
    // the epoch moved since it last looked (one atomic load per exit otherwise).
    let mut seen_epoch = None;
    let mut generation = 0;
    loop {
        // Gate: park while paused or held; leave when stopping.
        let epoch = shared.epoch.load(Ordering::Acquire);
        if seen_epoch != Some(epoch) {
            seen_epoch = Some(epoch);
            let mut c = lock(&shared.ctl);
            loop {
                if c.stop {
                    return;
                }
                if !c.user_paused && !c.held {
                    break;
                }
                if crate::snapshot::serve(vcpu, &shared.states) {
                    // The restored vCPU continues where it was saved: no boot state.
                    applied_gen = Some(c.boot_gen);
                    shared.cv.notify_all();
                }
                let snapshot = vcpu.regs().and_then(|r| vcpu.sregs().map(|s| (r, s))).ok();
                if let Some(slot) = lock(&shared.registers).get_mut(index as usize) {
                    *slot = snapshot;
                }
                c.parked += 1;
                shared.cv.notify_all();
                c = match shared.cv.wait(c) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                c.parked -= 1;
            }
            generation = c.boot_gen;
        }
        if applied_gen != Some(generation) {
            // After a machine reset (not at first boot) the vCPU returns to its power-on
            // state first: registers, local APIC, and wait-for-SIPI for application processors.
            let reset = if applied_gen.is_some() {
                vcpu.reset()
            } else {
                Ok(())
            };
            applied_gen = Some(generation);
            let state = lock(&shared.boot).get(index as usize).copied().flatten();
            let r = reset.and_then(|()| match state {
                Some(st) => vcpu
                    .set_sregs(&st.sregs)
                    .and_then(|()| vcpu.set_regs(&st.regs)),
                None => Ok(()),
            });
            if let Err(e) = r {
                hub.vcpu_error(index, &e);
                continue;
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                hub.vcpu_error(index, &e);
                continue;
            }
        };
        let action = handle_exit(&exit, buses);
        if action != ExitAction::WaitForInterrupt {
            halt_backoff = HALT_BACKOFF_MIN;
        }
        match action {
            ExitAction::Resume | ExitAction::CheckRequests => {}
            ExitAction::CompleteRead(data) => vcpu.complete_read(data),
            ExitAction::WaitForInterrupt => {
                // The backend cannot wait itself (e.g. `cli; hlt`: nothing but a reset wakes the
                // CPU). Sleep until the machine state changes, or briefly and then let the
                // backend look again; the sleep doubles while the vCPU stays halted (1 ms to
                // 100 ms), so a dead CPU costs next to nothing and a woken one waits little.
                let c = lock(&shared.ctl);
                if !c.stop && !c.user_paused && !c.held {
                    drop(shared.cv.wait_timeout(c, halt_backoff));
                }
                halt_backoff = (halt_backoff * 2).min(HALT_BACKOFF_MAX);
                continue;
            }
            ExitAction::TripleFault | ExitAction::Reset => hub.request(SystemEvent::Reset),
            ExitAction::PowerOff => hub.request(SystemEvent::Shutdown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_accel::{BusDevice, PioAddress, Regs, SpecialRegs, VcpuExit};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::mpsc;

    /// A fake vCPU: each run() does `out 0x80` (or returns Interrupted after a kick).
    struct FakeVcpu {
        index: u32,
        kicked: Arc<AtomicBool>,
        runs: Arc<AtomicU64>,
        regs: Arc<Mutex<Regs>>,
        script: Vec<VcpuExit>,
    }
    struct FakeKick(Arc<AtomicBool>);
    impl Kick for FakeKick {
        fn kick(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    impl Vcpu for FakeVcpu {
        fn index(&self) -> u32 {
            self.index
        }
        fn run(&mut self) -> Result<VcpuExit, AccelError> {
            if self.kicked.swap(false, Ordering::SeqCst) {
                return Ok(VcpuExit::Interrupted);
            }
            self.runs.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            Ok(self.script.pop().unwrap_or(VcpuExit::IoOut {
                port: PioAddress(0x80),
                size: 1,
                data: 0,
            }))
        }
        fn complete_read(&mut self, data: u64) {
            // The test bus has nothing at 0xdead: an unassigned read, which this fake backend
            // treats as a bug and panics on.
            assert_ne!(data, 0xff, "fake backend bug");
        }
        fn regs(&self) -> Result<Regs, AccelError> {
            Ok(*self.regs.lock().unwrap())
        }
        fn set_regs(&mut self, regs: &Regs) -> Result<(), AccelError> {
            *self.regs.lock().unwrap() = *regs;
            Ok(())
        }
        fn sregs(&self) -> Result<SpecialRegs, AccelError> {
            Ok(SpecialRegs::default())
        }
        fn set_sregs(&mut self, _sregs: &SpecialRegs) -> Result<(), AccelError> {
            Ok(())
        }
        fn kicker(&self) -> Arc<dyn Kick> {
            Arc::new(FakeKick(self.kicked.clone()))
        }
        fn reset(&mut self) -> Result<(), AccelError> {
            *self.regs.lock().unwrap() = Regs::default();
            Ok(())
        }
    }

    struct Exit;
    impl BusDevice for Exit {
        fn read(&self, _o: u64, d: &mut [u8]) {
            d.fill(0);
        }
        fn write(&self, _o: u64, _d: &[u8]) {}
    }

    struct Rig {
        shared: Arc<Shared>,
        rx: mpsc::Receiver<MachineEvent>,
        runs: Vec<Arc<AtomicU64>>,
        regs: Vec<Arc<Mutex<Regs>>>,
        threads: Vec<JoinHandle<()>>,
    }

    fn rig(n: u32, script0: Vec<VcpuExit>) -> Rig {
        let shared = Shared::new(n);
        let (tx, rx) = mpsc::channel();
        let hub = Arc::new(Hub {
            no_reboot: true.into(),
            sink: Arc::new(tx),
            shared: shared.clone(),
        });
        let buses = Arc::new(IoBuses::new());
        buses.pio.insert(0x80, 1, Arc::new(Exit)).unwrap();
        let mut runs = Vec::new();
        let mut regs = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n {
            let r = Arc::new(AtomicU64::new(0));
            let g = Arc::new(Mutex::new(Regs::default()));
            let v = FakeVcpu {
                index: i,
                kicked: Arc::new(AtomicBool::new(false)),
                runs: r.clone(),
                regs: g.clone(),
                script: if i == 0 { script0.clone() } else { Vec::new() },
            };
            shared.add_kicker(v.kicker());
            shared.set_boot_state(
                i as usize,
                Some(crate::boot::pvh_entry_state(0x1000 + u64::from(i))),
            );
            threads
                .push(spawn_vcpu(Box::new(v), shared.clone(), hub.clone(), buses.clone()).unwrap());
            runs.push(r);
            regs.push(g);
        }
        Rig {
            shared,
            rx,
            runs,
            regs,
            threads,
        }
    }

    fn wait_until(f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not reached"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pause_parks_every_vcpu_and_resume_continues() {
        let rig = rig(2, Vec::new());
        wait_until(|| rig.runs.iter().all(|r| r.load(Ordering::SeqCst) > 5));
        rig.shared.pause();
        let before: Vec<u64> = rig.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        std::thread::sleep(Duration::from_millis(20));
        let after: Vec<u64> = rig.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
        assert_eq!(before, after, "no guest code runs while paused");
        assert!(rig.shared.cpu_info().iter().all(|c| c.thread_id.is_some()));
        rig.shared.resume();
        wait_until(|| rig.runs[0].load(Ordering::SeqCst) > after[0] + 5);
        rig.shared.stop();
        for t in rig.threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn entry_state_is_applied_and_reapplied_after_reset() {
        let rig = rig(1, Vec::new());
        wait_until(|| rig.regs[0].lock().unwrap().rip == 0x1000);
        rig.regs[0].lock().unwrap().rip = 0xdead;
        rig.shared.hold_and_wait();
        rig.shared
            .set_boot_state(0, Some(crate::boot::pvh_entry_state(0x2000)));
        rig.shared.release_after_reset();
        wait_until(|| rig.regs[0].lock().unwrap().rip == 0x2000);
        rig.shared.stop();
        for t in rig.threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_vcpu_is_reported_and_pause_still_returns() {
        let rig = rig(
            2,
            vec![VcpuExit::IoIn {
                port: PioAddress(0xdead),
                size: 1,
            }],
        );
        let ev = rig.rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(ev, MachineEvent::VcpuError { index: 0, .. }),
            "{ev:?}"
        );
        rig.shared.pause();
        rig.shared.stop();
        let results: Vec<bool> = rig.threads.into_iter().map(|t| t.join().is_ok()).collect();
        assert_eq!(results, [false, true]);
    }

    #[test]
    fn a_dead_halted_vcpu_backs_off_and_still_pauses() {
        let rig = rig(1, vec![VcpuExit::Halted; 10_000]);
        std::thread::sleep(Duration::from_millis(300));
        let runs = rig.runs[0].load(Ordering::SeqCst);
        assert!(runs < 50, "{runs} runs in 300 ms: no back-off");
        rig.shared.pause();
        rig.shared.stop();
        for t in rig.threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn triple_fault_with_no_reboot_is_a_held_shutdown() {
        let rig = rig(1, vec![VcpuExit::Shutdown]);
        let ev = rig.rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(ev, MachineEvent::System(SystemEvent::Shutdown));
        // Held: the vCPU parks and runs no more guest code.
        drop(rig.shared.wait_parked(lock(&rig.shared.ctl)));
        let n = rig.runs[0].load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rig.runs[0].load(Ordering::SeqCst), n);
        rig.shared.stop();
        for t in rig.threads {
            t.join().unwrap();
        }
    }
}
