//! What every machine type builds and runs the same way: guest RAM, the buses, the backend
//! VM with its platform devices, the event hub, and the vCPUs with their threads and run
//! control (start, pause, resume, hold across a reset, stop). A machine type ([`Microvm`],
//! [`Pc`]) adds its own devices and firmware tables around one [`MachineCore`]; what it
//! does with its vCPUs is this module's, so both types behave alike and a third one does
//! not copy them again.
//!
//! [`Microvm`]: crate::microvm::Microvm
//! [`Pc`]: crate::pc::Pc

use std::sync::Arc;
use std::thread::JoinHandle;

use keel_accel::{
    Accelerator, GuestMemory, IoBuses, MachineRequirements, Regs, SpecialRegs, SystemEvents, Vcpu,
    Vm,
};
use keel_devices::Serial;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::board::{self, BoardError};
use crate::config::SerialBackend;
use crate::cpu_model::Presented;
use crate::disk_errors::DiskErrors;
use crate::layout;
use crate::microvm::MachineError;
use crate::runner::{self, CpuInfo, Hub, MachineEvents, Shared};

/// Where the vCPU threads are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Threads {
    NotStarted,
    Running,
    Stopped,
}

/// The sizes a machine type gives its core.
#[derive(Debug, Clone)]
pub(crate) struct CoreSpec<'a> {
    /// Guest RAM as (guest address, length) ranges.
    pub ranges: &'a [(GuestAddress, usize)],
    /// Total RAM in bytes (for the error if it cannot be mapped).
    pub memory: u64,
    /// vCPU count.
    pub cpus: u32,
    /// `-no-reboot`: a reset request powers off instead.
    pub no_reboot: bool,
    /// Whether guest RAM goes into the VMM's core dumps (`dump-guest-core`).
    pub dump_guest_core: bool,
    /// The `-cpu` value: the CPU model the vCPUs present.
    pub cpu: &'a str,
}

/// A machine's RAM, buses, backend VM, events and vCPUs.
pub(crate) struct MachineCore {
    memory: Arc<GuestMemory>,
    buses: Arc<IoBuses>,
    vm: Arc<dyn Vm>,
    hub: Arc<Hub>,
    shared: Arc<Shared>,
    /// The disks' host I/O errors, reported to the machine's events.
    disks: Arc<DiskErrors>,
    /// The CPU model the vCPUs present (a restore replaces it with the stream's).
    cpu: Presented,
    /// The accelerator that presented [`Self::cpu`] first (the saving one after a restore).
    cpu_accel: String,
    /// The accelerator running the machine.
    accel_name: &'static str,
    /// vCPUs created but not yet handed to a thread (all of them until [`Self::start`]).
    vcpus: Vec<Box<dyn Vcpu>>,
    threads: Vec<JoinHandle<()>>,
    state: Threads,
    input_started: bool,
}

impl MachineCore {
    /// Allocates RAM, creates the backend VM over it, maps the backend's platform devices
    /// (the interpreter's PIC and PIT) on the port bus and gives the VM the `-cpu` model
    /// (before any vCPU exists). The vCPUs come later
    /// ([`Self::create_vcpus`]), once the machine type has wired its devices.
    pub(crate) fn new(
        spec: CoreSpec<'_>,
        req: &MachineRequirements,
        accel: &dyn Accelerator,
        events: Arc<dyn MachineEvents>,
    ) -> Result<Self, MachineError> {
        let memory = Arc::new(
            GuestMemoryMmap::from_ranges(spec.ranges)
                .map_err(|e| MachineError::Ram(spec.memory, e))?,
        );
        if !spec.dump_guest_core {
            layout::exclude_from_core_dumps(&memory);
        }
        let buses = Arc::new(IoBuses::new());
        let shared = Shared::new(spec.cpus);
        let disks = DiskErrors::new(events.clone());
        let hub = Arc::new(Hub {
            no_reboot: spec.no_reboot.into(),
            sink: events,
            shared: shared.clone(),
        });
        let sys: Arc<dyn SystemEvents> = hub.clone();
        let vm: Arc<dyn Vm> = Arc::from(
            accel
                .create_vm(req, memory.clone(), buses.clone(), sys)
                .map_err(MachineError::Accel)?,
        );
        for (range, dev) in vm.platform_devices() {
            buses
                .pio
                .insert(range.base, range.len, dev)
                .map_err(|e| MachineError::Bus("platform device".into(), e))?;
        }
        let cpu = crate::cpu_model::apply(spec.cpu, accel, vm.as_ref(), spec.cpus)?;
        Ok(Self {
            memory,
            buses,
            vm,
            hub,
            shared,
            disks,
            cpu,
            cpu_accel: accel.name().to_owned(),
            accel_name: accel.name(),
            vcpus: Vec::new(),
            threads: Vec::new(),
            state: Threads::NotStarted,
            input_started: false,
        })
    }

    /// Creates vCPUs `0..cpus`, each registered to be kicked out of the backend when the
    /// machine changes run state.
    pub(crate) fn create_vcpus(&mut self, cpus: u32) -> Result<(), MachineError> {
        for i in 0..cpus {
            let v = self.vm.create_vcpu(i).map_err(MachineError::Accel)?;
            self.shared.add_kicker(v.kicker());
            self.vcpus.push(v);
        }
        Ok(())
    }

    /// Starts one thread per vCPU (running unless paused before) and, with `-serial stdio`
    /// (or `mon:stdio`), the thread that feeds standard input to COM1. Only once.
    pub(crate) fn start(
        &mut self,
        serial_backend: &SerialBackend,
        serial: Option<&Arc<Serial>>,
    ) -> Result<(), MachineError> {
        if self.state != Threads::NotStarted {
            return Err(MachineError::Phase {
                op: "start",
                when: "after start",
            });
        }
        if matches!(
            serial_backend,
            SerialBackend::Stdio | SerialBackend::MuxStdio
        ) && !self.input_started
            && let Some(s) = serial
        {
            let mux = matches!(serial_backend, SerialBackend::MuxStdio);
            keel_devices::spawn_mux_input_thread(
                s.clone(),
                Box::new(std::io::stdin()),
                mux.then(keel_devices::mux_escape),
            )
            .map_err(MachineError::Serial)?;
            self.input_started = true;
        }
        for v in self.vcpus.drain(..) {
            let t =
                runner::spawn_vcpu(v, self.shared.clone(), self.hub.clone(), self.buses.clone())
                    .map_err(MachineError::Thread)?;
            self.threads.push(t);
        }
        self.state = Threads::Running;
        Ok(())
    }

    /// Whether [`Self::start`] has run (the vCPU threads exist).
    pub(crate) fn started(&self) -> bool {
        self.state != Threads::NotStarted
    }

    /// Stops guest execution; returns once every vCPU is parked. Idempotent.
    pub(crate) fn pause(&self) {
        self.shared.pause();
    }

    /// Lets the vCPUs run again (before start: start runs the guest). A machine held by a
    /// system event stays held until it is reset.
    pub(crate) fn resume(&self) {
        self.shared.resume();
    }

    /// Whether [`Self::pause`] is in effect.
    pub(crate) fn is_paused(&self) -> bool {
        self.shared.is_paused()
    }

    /// Parks every vCPU for a reset and keeps them parked until [`Self::release_after_reset`]
    /// (on a failed reset they stay held: a half-reset machine must not run).
    pub(crate) fn hold_for_reset(&self) {
        self.shared.hold_and_wait();
    }

    /// Ends a reset: every vCPU is reset and the bootstrap processor gets its new entry state
    /// before it next runs; the machine stays paused if it was.
    pub(crate) fn release_after_reset(&self) {
        self.shared.release_after_reset();
    }

    /// Stops and joins every vCPU thread. The machine cannot run again afterwards.
    pub(crate) fn shutdown(&mut self) {
        self.shared.stop();
        for t in self.threads.drain(..) {
            // A vCPU thread that panicked has nothing left to clean up.
            let _ = t.join();
        }
        self.state = Threads::Stopped;
    }

    /// The registers of vCPU `index`: read directly before the vCPU threads start, and
    /// afterwards as each thread left them when it parked; `None` while the vCPUs run.
    pub(crate) fn registers(&self, index: u32) -> Option<(Regs, SpecialRegs)> {
        if let Some(v) = self.vcpus.iter().find(|v| v.index() == index) {
            return v.regs().and_then(|r| v.sregs().map(|s| (r, s))).ok();
        }
        self.shared.registers(index)
    }

    /// vCPU indexes and host thread ids (`query-cpus-fast`).
    pub(crate) fn cpu_info(&self) -> Vec<CpuInfo> {
        self.shared.cpu_info()
    }

    /// The vCPUs not yet running on a thread (all of them before [`Self::start`]), to be
    /// read or written directly; `None` once the threads own them.
    pub(crate) fn idle_vcpus(&mut self) -> Option<&mut [Box<dyn Vcpu>]> {
        (self.state == Threads::NotStarted).then_some(self.vcpus.as_mut_slice())
    }

    /// The state shared with the vCPU threads (boot entry states, snapshot requests).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Guest RAM.
    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The PIO and MMIO buses.
    pub(crate) fn buses(&self) -> &Arc<IoBuses> {
        &self.buses
    }

    /// The backend VM.
    pub(crate) fn vm(&self) -> &Arc<dyn Vm> {
        &self.vm
    }

    /// The event hub (devices raise reset, power-off and exit requests through it).
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Where devices raise reset, power-off and exit requests for this machine.
    pub(crate) fn system_events(&self) -> Arc<dyn SystemEvents> {
        self.hub.clone()
    }

    /// Where the machine's disks report host I/O errors, and which of them to retry.
    pub(crate) fn disk_errors(&self) -> Arc<DiskErrors> {
        self.disks.clone()
    }

    /// The CPU model the vCPUs present.
    pub(crate) fn cpu(&self) -> &Presented {
        &self.cpu
    }

    /// The accelerator that first presented [`Self::cpu`] (for a restored guest, the one
    /// it was saved under).
    pub(crate) fn cpu_accel(&self) -> &str {
        &self.cpu_accel
    }

    /// Records that the vCPUs now present `cpuid` of model `name`, first presented under
    /// `accel` (a restore keeps the guest's CPU).
    pub(crate) fn set_cpu(
        &mut self,
        name: String,
        cpuid: Vec<keel_accel::CpuidLeaf>,
        accel: String,
    ) {
        self.cpu.name = name;
        self.cpu.cpuid = cpuid;
        self.cpu_accel = accel;
    }

    /// The accelerator running the machine (`kvm`, `tcg`).
    pub(crate) fn accel_name(&self) -> &'static str {
        self.accel_name
    }
}

/// A machine type built on a [`MachineCore`]: what the boards' shared run control needs.
pub(crate) trait CoreMachine {
    /// The machine's core.
    fn core(&self) -> &MachineCore;
    /// Starts the vCPU threads (the machine type checks its own phase first).
    fn start(&mut self) -> Result<(), MachineError>;
}

/// A board's `cont`: the vCPUs run (their threads started if they were not yet), and disks
/// that held requests after a host error (`werror=stop`) run them again.
pub(crate) fn resume(m: &mut impl CoreMachine) -> Result<(), BoardError> {
    if !m.core().started() {
        return m.start().map_err(BoardError::from);
    }
    m.core().resume();
    m.core().disk_errors().retry();
    Ok(())
}

/// A board's `stop`: parks the vCPUs if their threads exist (before that nothing runs).
pub(crate) fn pause(m: &impl CoreMachine) {
    if m.core().started() {
        m.core().pause();
    }
}

/// `query-cpus-fast`: every vCPU is a core of the one socket (the topology CPUID reports),
/// attached where QEMU attaches a vCPU created by the machine.
pub(crate) fn cpus(m: &impl CoreMachine) -> Vec<board::CpuInfo> {
    m.core()
        .cpu_info()
        .into_iter()
        .map(|c| board::CpuInfo {
            cpu_index: c.index,
            qom_path: format!("/machine/unattached/device[{}]", c.index),
            thread_id: c.thread_id.map(i64::from).unwrap_or(0),
            target: "x86_64".into(),
            props: board::CpuProps {
                core_id: i64::from(c.index),
                thread_id: 0,
                socket_id: 0,
            },
        })
        .collect()
}

/// The registers of vCPU `index` while it does not run (`info registers`).
pub(crate) fn cpu_registers(m: &impl CoreMachine, index: u32) -> Option<board::CpuRegisters> {
    m.core()
        .registers(index)
        .map(|(regs, sregs)| board::CpuRegisters { regs, sregs })
}
