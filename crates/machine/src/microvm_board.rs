//! The `microvm` machine type: the [`Microvm`] model behind the [`MachineType`] / [`Board`]
//! seam, with its device tree (qdev) and the realize hooks that put user devices into it.
//!
//! The machine's system events (power-off, reset, `isa-debug-exit`, panic, vCPU errors)
//! arrive on vCPU threads; they are forwarded as [`BoardEvent`]s over a channel, so the VMM
//! handles them on its own thread and never takes its lock on a vCPU thread.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use keel_accel::{Accelerator, BusDevice, SystemEvent};
use keel_devices::{DebugExit, DebugExitConfig};
use keel_phase::Phase;
use keel_qdev::{
    Added, BusSpec, BusType, DeviceHooks, DeviceKey, DeviceRequest, DeviceTree, DeviceView,
    HookError, QdevError, SlotResources, Window,
};
use keel_virtio::{
    Block, BlockProps, Console, ConsolePortProps, IoWorker, MmioTransport, Net, NetProps, Rng,
    RxPoller, VirtioDevice, VirtioMmioSlot,
};

use crate::backends::{Backends, NetBackend};
use crate::board::{Board, BoardContext, BoardError, BoardEvent, CpuInfo, MachineConfig};
use crate::board::{GuestExitPolicy, MachineType, MachineTypeInfo};
use crate::device_types::registry;
use crate::disk_errors::DiskErrors;
use crate::factory::{DeviceFactory, DeviceHost, Space, unmap};
use crate::{
    MACHINE_PROPERTIES, MachineError, MachineEvent, MachineEvents, Microvm, MicrovmConfig,
    SerialBackend, requirements,
};

/// QEMU's `microvm`: a minimal x86-64 machine without PCI, booting a kernel directly.
#[derive(Debug, Default)]
pub struct MicrovmType;

pub(crate) fn serial_backend(list: &[String]) -> Result<SerialBackend, BoardError> {
    let Some(first) = list.first() else {
        return Ok(SerialBackend::Stdio);
    };
    if list.len() > 1 {
        return Err(BoardError::Invalid(
            "Keel's machines have one serial port (COM1); give -serial once".into(),
        ));
    }
    Ok(match first.as_str() {
        "stdio" => SerialBackend::Stdio,
        "mon:stdio" => SerialBackend::MuxStdio,
        "null" => SerialBackend::Null,
        "none" => SerialBackend::None,
        s => match (s.strip_prefix("file:"), s.strip_prefix("chardev:")) {
            (Some(p), _) if !p.is_empty() => SerialBackend::File(PathBuf::from(p)),
            (_, Some(id)) if !id.is_empty() => SerialBackend::Chardev(id.to_owned()),
            _ => {
                return Err(BoardError::Invalid(format!(
                    "-serial '{s}': use stdio, mon:stdio, null, none, file:PATH or chardev:ID"
                )));
            }
        },
    })
}

/// `-serial chardev:ID` resolved against the backends: the chardev's writer (a stdio
/// chardev is the port on stdio, with input). Other backends are returned as they are.
pub(crate) fn resolve_serial(
    serial: SerialBackend,
    backends: &Backends,
) -> Result<SerialBackend, BoardError> {
    let SerialBackend::Chardev(id) = &serial else {
        return Ok(serial);
    };
    let invalid = |e: crate::backends::BackendError| {
        BoardError::Invalid(format!("-serial chardev:{id}: {e}"))
    };
    if matches!(
        backends.chardev(id).map_err(invalid)?,
        crate::backends::CharBackend::Stdio
    ) {
        return Ok(SerialBackend::Stdio);
    }
    let w = backends.char_writer(id).map_err(invalid)?;
    Ok(SerialBackend::Writer(keel_devices::SharedWriter(Arc::new(
        Mutex::new(w),
    ))))
}

/// A `-serial chardev:ID` that came after the machine was built: the board no longer
/// holds the backends to resolve it.
pub(crate) fn late_chardev(serial: &SerialBackend) -> Result<(), BoardError> {
    match serial {
        SerialBackend::Chardev(id) => Err(BoardError::Invalid(format!(
            "-serial chardev:{id}: give it before the first -device (the port is built with the machine)"
        ))),
        _ => Ok(()),
    }
}

/// The machine property `-cpu` sets.
pub const CPU_PROPERTY: &str = "cpu";

/// CPU models `-cpu` accepts. `max` is the accelerator's own model (the interpreter's
/// feature set under tcg, the host's as KVM filters it under kvm), `host` too but only under
/// kvm (as QEMU); `qemu64` (the default) and `kvm64` are QEMU's models kept to what every
/// Keel accelerator presents, the same CPUID under kvm and tcg (see
/// [`crate::cpu_model::present`]). Feature switches (`+x`, `-x`, `x=on`) are refused rather
/// than ignored.
pub const CPU_MODELS: &[&str] = &["max", "host", "qemu64", "kvm64"];

pub(crate) fn cpu_model(spec: &str) -> Result<&str, BoardError> {
    let (model, features) = spec.split_once(',').unwrap_or((spec, ""));
    if !CPU_MODELS.contains(&model) {
        return Err(BoardError::Invalid(format!(
            "unable to find CPU model '{model}' (Keel offers: {})",
            CPU_MODELS.join(", ")
        )));
    }
    if !features.is_empty() {
        return Err(BoardError::Invalid(format!(
            "-cpu {spec}: CPU feature switches are not supported; give the model alone"
        )));
    }
    Ok(model)
}

/// Turns the VMM's accumulated `machine-set` into a microvm configuration.
pub fn microvm_config(cfg: &MachineConfig) -> Result<MicrovmConfig, BoardError> {
    let mut m = MicrovmConfig::default();
    if let Some(mem) = cfg.memory {
        m.memory = mem;
    }
    crate::board::check_host_memory("microvm.ram", m.memory)?;
    if let Some(n) = cfg.cpus {
        m.cpus = n;
    }
    for (what, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if let Some(p) = path {
            let reason = match std::fs::metadata(p) {
                Ok(m) if m.is_file() => continue,
                Ok(m) if m.is_dir() => "Is a directory".to_owned(),
                Ok(_) => "not a regular file (a kernel or initrd must be a file)".to_owned(),
                Err(e) => crate::backends::os_reason(&e),
            };
            return Err(BoardError::Invalid(format!(
                "could not open {what} file '{}': {reason}",
                p.display()
            )));
        }
    }
    m.kernel = cfg.kernel.clone();
    m.initrd = cfg.initrd.clone();
    m.append = cfg.append.clone().unwrap_or_default();
    m.no_reboot = cfg.no_reboot;
    m.serial = serial_backend(&cfg.serial)?;
    for (k, v) in &cfg.props {
        if k == CPU_PROPERTY {
            m.cpu = cpu_model(v)?.to_owned();
            continue;
        }
        if !MACHINE_PROPERTIES.contains(&k.as_str()) {
            return Err(BoardError::UnknownProperty {
                machine: "microvm".into(),
                property: k.clone(),
            });
        }
        m.set_property(k, v).map_err(BoardError::Property)?;
    }
    Ok(m)
}

impl MachineType for MicrovmType {
    fn name(&self) -> &'static str {
        crate::MACHINE_NAME
    }

    fn info(&self) -> MachineTypeInfo {
        MachineTypeInfo {
            name: "microvm".into(),
            description: "microvm (i386)".into(),
            is_default: false,
            cpu_max: 288,
            hotpluggable_cpus: false,
            numa_mem_supported: false,
            deprecated: false,
            acpi: true,
            // Keel's one CPU model: what the accelerator presents (see `query-cpu-definitions`).
            default_cpu_type: Some("qemu64-x86_64-cpu".into()),
            default_ram_id: Some("microvm.ram".into()),
        }
    }

    fn properties(&self) -> Vec<(&'static str, &'static str, Option<&'static str>)> {
        let mut v = vec![
            ("kernel", "string", Some("Linux kernel image file")),
            ("initrd", "string", Some("Linux initial ramdisk file")),
            ("append", "string", Some("Linux kernel command line")),
        ];
        v.extend(MACHINE_PROPERTIES.iter().map(|&n| (n, "OnOffAuto", None)));
        v
    }

    fn check_config(&self, cfg: &MachineConfig) -> Result<(), BoardError> {
        microvm_config(cfg).map(|_| ())
    }

    fn check_accel(&self, cfg: &MachineConfig, accel: &dyn Accelerator) -> Result<(), BoardError> {
        let m = microvm_config(cfg)?;
        if let Some(spec) = cfg.props.get(CPU_PROPERTY)
            && cpu_model(spec)? == "host"
            && accel.name() != "kvm"
        {
            return Err(BoardError::Invalid("CPU model 'host' requires KVM".into()));
        }
        Ok(accel.check(&requirements(&m))?)
    }

    fn create(
        &self,
        cfg: &MachineConfig,
        accel: Arc<dyn Accelerator>,
        ctx: &BoardContext,
    ) -> Result<Box<dyn Board>, BoardError> {
        let mut m = microvm_config(cfg)?;
        m.serial = resolve_serial(m.serial, &ctx.backends)?;
        let (tx, rx) = channel();
        let sink: Arc<dyn MachineEvents> = Arc::new(Forward {
            tx,
            guest_exit: ctx.guest_exit,
        });
        let vm = Microvm::new(m, accel.as_ref(), sink)?;
        if let Some(secs) = ctx.backends.rtc_offset() {
            vm.set_rtc_offset(secs);
        }
        if ctx.backends.mem_prealloc() {
            crate::backends::prealloc(vm.memory());
        }
        let mut board = MicrovmBoard::new(vm, ctx, rx)?;
        board.serial = cfg.serial.clone();
        Ok(Box::new(board))
    }
}

/// The error and its sources on one line, as a QMP `desc`.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) struct Forward {
    pub(crate) tx: Sender<BoardEvent>,
    pub(crate) guest_exit: GuestExitPolicy,
}

impl MachineEvents for Forward {
    fn machine_event(&self, event: MachineEvent) {
        if let (MachineEvent::System(SystemEvent::Exit(code)), GuestExitPolicy::ExitProcess) =
            (&event, self.guest_exit)
        {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            std::process::exit(*code);
        }
        let ev = match event {
            MachineEvent::System(SystemEvent::Shutdown) => BoardEvent::GuestShutdown,
            MachineEvent::System(SystemEvent::Reset) => BoardEvent::GuestReset,
            MachineEvent::System(SystemEvent::Exit(code)) => BoardEvent::GuestExit(code),
            MachineEvent::System(SystemEvent::Panic) => BoardEvent::GuestPanic,
            MachineEvent::System(other) => {
                BoardEvent::InternalError(format!("unhandled system event {other:?}"))
            }
            MachineEvent::DeviceEjected => BoardEvent::DeviceEjected,
            MachineEvent::BlockIoError(e) => BoardEvent::BlockIoError(e),
            MachineEvent::VcpuError { index, error } => {
                BoardEvent::InternalError(format!("vCPU {index}: {error}"))
            }
        };
        // Nobody listening any more means the VMM is going away.
        let _ = self.tx.send(ev);
    }
}

/// One virtio-mmio window of the machine. Until a device is realized in it, it reads as a
/// transport with device ID 0, which guests skip (as QEMU's empty microvm transports do).
#[derive(Debug, Default)]
struct SlotProxy(RwLock<Option<Arc<MmioTransport>>>);

impl SlotProxy {
    fn get(&self) -> Option<Arc<MmioTransport>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, t: Option<Arc<MmioTransport>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = t;
    }
}

impl BusDevice for SlotProxy {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if let Some(t) = self.get() {
            return t.read(offset, data);
        }
        data.fill(0);
        if data.len() == 4 {
            let v = match offset {
                0x0 => keel_virtio::MMIO_MAGIC,
                0x4 => keel_virtio::MMIO_VERSION,
                0xc => keel_virtio::MMIO_VENDOR_ID,
                _ => 0,
            };
            data.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Some(t) = self.get() {
            t.write(offset, data);
        }
    }
}

/// Offset of the virtio-mmio `Status` register.
const VIRTIO_MMIO_STATUS: u64 = 0x70;

/// What a realized virtio device keeps alive until it is unrealized: the RX thread of a
/// virtio-net, the claim of a virtio-blk on its drive.
#[allow(dead_code)] // held for its Drop
pub(crate) enum Keep {
    Rx(RxPoller),
    Block(crate::backends::BlockLease),
}

/// A virtio device shared by its transport and, for virtio-net, the RX thread.
pub(crate) type SharedVirtio = Arc<Mutex<dyn VirtioDevice>>;

/// What a realized user device holds on to until it is unrealized.
enum Realized {
    DebugExit {
        iobase: u16,
    },
    /// A device of a [`DeviceFactory`]: the bus ranges it mapped.
    Factory(Vec<(Space, u64)>),
    Virtio {
        slot: usize,
        _keep: Option<Keep>,
    },
    Port {
        slot: usize,
        gsi: u32,
    },
}

/// qdev's realize/unrealize for the microvm: maps `isa-debug-exit` through
/// [`Microvm::add_debug_exit`], devices of a [`DeviceFactory`] through a [`DeviceHost`], and puts virtio devices behind an [`MmioTransport`] in their
/// slot's window. Onboard devices exist already (the machine built them).
struct MicrovmHooks {
    vm: Arc<Mutex<Microvm>>,
    backends: Arc<Backends>,
    slots: Vec<Arc<SlotProxy>>,
    /// Guest-physical base of each slot's window.
    bases: Vec<u64>,
    /// The queue worker of each slot's transport (ioeventfd/irqfd under kvm).
    workers: Vec<Option<IoWorker>>,
    realized: HashMap<DeviceKey, Realized>,
    /// Port buses of `virtio-serial-device`s: bus name → (window, GSI).
    serial_buses: HashMap<String, (usize, u32)>,
    /// virtio-mmio bus name → index of its window in `slots`.
    windows: HashMap<String, usize>,
    /// Device types from outside the machine, by name.
    factories: HashMap<String, Arc<dyn DeviceFactory>>,
}

impl MicrovmHooks {
    fn lock(&self) -> MutexGuard<'_, Microvm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts `device` behind a fresh transport in `slot`'s window, interrupting on `gsi`,
    /// with its queues processed by an [`IoWorker`] thread: guest notifies arrive through
    /// ioeventfds and the interrupt through a resampled irqfd under kvm, through the MMIO
    /// write and the IRQ line under tcg. The RX side of virtio-net has its own thread.
    fn attach(&mut self, slot: usize, gsi: u32, device: SharedVirtio) -> Result<(), HookError> {
        let (Some(proxy), Some(&base)) = (self.slots.get(slot).cloned(), self.bases.get(slot))
        else {
            return Err(format!("virtio-mmio slot {slot} does not exist").into());
        };
        self.detach(slot);
        let vm = self.vm.clone();
        let vm = vm.lock().unwrap_or_else(|p| p.into_inner());
        let irq = vm.vm().irq_line(gsi)?;
        let transport = Arc::new(MmioTransport::new(device, vm.memory().clone(), irq));
        let worker = IoWorker::start(vm.vm(), VirtioMmioSlot::new(base, gsi), transport.clone())
            .map_err(|e| chain(&e))?;
        proxy.set(Some(transport));
        if let Some(w) = self.workers.get_mut(slot) {
            *w = Some(worker);
        }
        Ok(())
    }

    /// Empties `slot`: stops its worker and removes its ioeventfds and irqfd, so another
    /// device can take the window.
    fn detach(&mut self, slot: usize) {
        if let Some(p) = self.slots.get(slot) {
            p.set(None);
        }
        if let Some(w) = self.workers.get_mut(slot).and_then(Option::take) {
            w.stop(self.lock().vm());
        }
    }

    /// A console port writing to the backend `chardev=` names.
    fn console(&self, chardev: &str) -> Result<SharedVirtio, HookError> {
        console_device(&self.backends, chardev)
    }

    fn virtio_device(
        &self,
        dev: &DeviceView<'_>,
    ) -> Result<(SharedVirtio, Option<Keep>), HookError> {
        let disks = self.lock().disk_errors();
        virtio_backend(&self.backends, &disks, dev.driver, dev.props).map_err(|e| {
            if e.to_string().is_empty() {
                format!("microvm cannot realize '{}'", dev.driver).into()
            } else {
                e
            }
        })
    }
}

/// Realizes a user `isa-serial` (microvm and pc): a 16550A at its index's (or its own)
/// ports and IRQ writing to its `chardev`, the index being the first COM port whose ports
/// are free when none is given. Where the board has its own COM1 those ports are taken and
/// the mapping fails.
pub(crate) fn realize_isa_serial(
    host: &mut DeviceHost<'_>,
    backends: &Backends,
    props: &keel_qdev::Props,
) -> Result<(), HookError> {
    use keel_devices::{Serial, SerialConfig, SerialOutput};
    let next = Serial::PORTS
        .iter()
        .position(|(base, _)| !host.pio_taken(u64::from(*base)))
        .unwrap_or(Serial::PORTS.len());
    let cfg = SerialConfig::from_props(props, next)?;
    let output = match &cfg.chardev {
        Some(id) => SerialOutput::Writer(keel_devices::SharedWriter(Arc::new(Mutex::new(
            backends.char_writer(id)?,
        )))),
        None => SerialOutput::Null,
    };
    let input = match &cfg.chardev {
        Some(id) => backends.char_reader(id)?,
        None => None,
    };
    let irq = host.irq_line(cfg.irq).map_err(|e| chain(&e))?;
    let serial = Arc::new(Serial::new(irq, output));
    host.map_pio(u64::from(cfg.iobase), Serial::LEN, serial.clone())
        .map_err(|e| format!("isa-serial at {:#x}: {e}", cfg.iobase))?;
    // What a program on the backend's terminal types reaches the guest.
    if let Some(input) = input {
        keel_devices::spawn_input_thread(serial, input).map_err(|e| chain(&e))?;
    }
    Ok(())
}

/// A console port writing to the backend `chardev=` names.
pub(crate) fn console_device(
    backends: &Arc<Backends>,
    chardev: &str,
) -> Result<SharedVirtio, HookError> {
    let out: Box<dyn Write + Send> = backends.char_writer(chardev)?;
    Ok(Arc::new(Mutex::new(Console::new(out))))
}

/// The virtio back end of kind `kind` (keel-virtio's type names: `virtio-blk-device`, ...)
/// built from validated properties `p`, and what it keeps alive (its drive lease, its RX
/// thread). An unknown kind is an empty error message (the caller names the machine).
pub(crate) fn virtio_backend(
    backends: &Arc<Backends>,
    disks: &DiskErrors,
    kind: &str,
    p: &keel_qdev::Props,
) -> Result<(SharedVirtio, Option<Keep>), HookError> {
    Ok(match kind {
        Block::QDEV_TYPE => {
            let props = BlockProps::from_props(p)?;
            let drive = backends.drive_errors(&props.drive);
            let props = props.inherit_on_error(drive.read.as_deref(), drive.write.as_deref())?;
            let b = backends.block(&props.drive)?;
            let cfg = props.config(&b.filename, b.read_only);
            let lease = backends.attach_block(&props.drive, !cfg.read_only, props.share_rw)?;
            let mut block = Block::new(&cfg)?;
            block.set_error_sink(disks.sink_for(&props.drive));
            let block: SharedVirtio = Arc::new(Mutex::new(block));
            disks.track(&block, &props.drive, cfg.on_error.can_stop());
            (block, Some(Keep::Block(lease)))
        }
        Rng::QDEV_TYPE => {
            let rng = match p.str("rng").filter(|id| !id.is_empty()) {
                Some(id) => match backends.rng_source(id)? {
                    Some(file) => Rng::with_source(Box::new(file)),
                    None => Rng::new()?,
                },
                None => Rng::new()?,
            };
            (Arc::new(Mutex::new(rng)), None)
        }
        Net::QDEV_TYPE => {
            let props = NetProps::from_props(p)?;
            let net = match backends.net(&props.netdev)? {
                NetBackend::Tap { ifname } => Net::with_tap(&ifname, props.config())?,
                NetBackend::User(user) => Net::with_user(&user, props.config())?,
            };
            let net = Arc::new(Mutex::new(net));
            let rx = RxPoller::spawn(net.clone())?;
            (net, Some(Keep::Rx(rx)))
        }
        // The port comes later (virtconsole); until then output is dropped.
        Console::QDEV_TYPE => (
            Arc::new(Mutex::new(Console::new(Box::new(std::io::sink())))),
            None,
        ),
        _ => return Err(String::new().into()),
    })
}

impl DeviceHooks for MicrovmHooks {
    fn realize(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError> {
        if dev.onboard {
            return Ok(());
        }
        if let Some(factory) = self.factories.get(dev.driver).cloned() {
            let vm = self.lock();
            let mut host = DeviceHost::new(vm.buses(), vm.memory(), vm.vm(), vm.system_events());
            let r = factory.realize(dev, &mut host);
            let mappings = host.into_mappings();
            if let Err(e) = r {
                unmap(vm.buses(), &mappings);
                return Err(e);
            }
            drop(vm);
            self.realized.insert(dev.key, Realized::Factory(mappings));
            return Ok(());
        }
        if dev.driver == keel_devices::Serial::QDEV_TYPE {
            let vm = self.lock();
            let mut host = DeviceHost::new(vm.buses(), vm.memory(), vm.vm(), vm.system_events());
            realize_isa_serial(&mut host, &self.backends, dev.props)?;
            let mappings = host.into_mappings();
            drop(vm);
            self.realized.insert(dev.key, Realized::Factory(mappings));
            return Ok(());
        }
        if dev.driver == DebugExit::QDEV_TYPE {
            let cfg = DebugExitConfig::from_props(dev.props)?;
            self.lock().add_debug_exit(cfg).map_err(|e| chain(&e))?;
            self.realized
                .insert(dev.key, Realized::DebugExit { iobase: cfg.iobase });
            return Ok(());
        }
        if dev.driver == Console::PORT_QDEV_TYPE {
            let (slot, gsi) = *self
                .serial_buses
                .get(dev.bus)
                .ok_or_else(|| format!("bus '{}' is not a virtio-serial bus", dev.bus))?;
            let props = ConsolePortProps::from_props(dev.props)?;
            let console = self.console(&props.chardev)?;
            self.attach(slot, gsi, console)?;
            self.realized.insert(dev.key, Realized::Port { slot, gsi });
            return Ok(());
        }
        let (slot, gsi) = match (self.windows.get(dev.bus), dev.resources.and_then(|r| r.irq)) {
            (Some(&w), Some(g)) => (w, g),
            _ => return Err(format!("'{}' needs a virtio-mmio slot", dev.driver).into()),
        };
        let (device, keep) = self.virtio_device(dev)?;
        self.attach(slot, gsi, device)?;
        if dev.driver == Console::QDEV_TYPE {
            self.serial_buses
                .insert(Console::port_bus_name(dev.id, Some(slot)), (slot, gsi));
        }
        self.realized
            .insert(dev.key, Realized::Virtio { slot, _keep: keep });
        Ok(())
    }

    /// System reset: virtio devices go back to their power-on state through the transport's
    /// own reset path (a write of 0 to `Status`), as a driver reset would.
    fn reset(&mut self, dev: &DeviceView<'_>) {
        if let Some(Realized::Virtio { slot, .. } | Realized::Port { slot, .. }) =
            self.realized.get(&dev.key)
            && let Some(t) = self.slots.get(*slot).and_then(|p| p.get())
        {
            t.write(VIRTIO_MMIO_STATUS, &0u32.to_le_bytes());
        }
    }

    fn unrealize(&mut self, dev: &DeviceView<'_>) {
        match self.realized.remove(&dev.key) {
            Some(Realized::Factory(mappings)) => unmap(self.lock().buses(), &mappings),
            Some(Realized::DebugExit { iobase }) => {
                self.lock().remove_device_at(iobase);
            }
            Some(Realized::Virtio { slot, _keep }) => {
                self.detach(slot);
                if dev.driver == Console::QDEV_TYPE {
                    self.serial_buses
                        .remove(&Console::port_bus_name(dev.id, Some(slot)));
                }
                // `_keep` is dropped here: the RX thread stops, the drive is released.
            }
            Some(Realized::Port { slot, gsi }) => {
                // Back to a port-less console device.
                let idle: SharedVirtio =
                    Arc::new(Mutex::new(Console::new(Box::new(std::io::sink()))));
                if let Err(e) = self.attach(slot, gsi, idle) {
                    log::warn!("detaching virtconsole: {e}");
                }
            }
            None => {}
        }
    }
}

/// Name of the virtio-mmio bus of window `i` (QEMU's).
fn virtio_bus_name(i: usize) -> String {
    format!("virtio-mmio-bus.{i}")
}

/// A running (or ready) microvm.
struct MicrovmBoard {
    vm: Arc<Mutex<Microvm>>,
    tree: DeviceTree,
    /// virtio-mmio bus name → window index (as the hooks have it).
    windows: HashMap<String, usize>,
    /// The windows' contents, shared with the hooks (read at machine-done).
    slots: Vec<Arc<SlotProxy>>,
    /// Base address of each window, by index.
    bases: Vec<u64>,
    events: Option<Receiver<BoardEvent>>,
    /// The `-serial` backends COM1 is connected to (as given at machine-init, or since).
    serial: Vec<String>,
}

impl MicrovmBoard {
    fn lock(&self) -> MutexGuard<'_, Microvm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps every virtio-mmio window the machine has (eagerly, as QEMU's microvm creates all
    /// its transports) and builds the device tree: onboard devices under
    /// `/machine/unattached`, `isa.0`, and one `virtio-mmio-bus.N` per transport.
    fn new(
        mut vm: Microvm,
        ctx: &BoardContext,
        events: Receiver<BoardEvent>,
    ) -> Result<Self, BoardError> {
        let mut slots = Vec::new();
        let mut windows = Vec::new();
        for _ in 0..crate::VIRTIO_MMIO_SLOTS {
            let proxy = Arc::new(SlotProxy::default());
            match vm.add_virtio_mmio(proxy.clone()) {
                Ok(w) => {
                    slots.push(proxy);
                    windows.push(w);
                }
                Err(MachineError::NoVirtioSlot(_)) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let onboard: Vec<&'static str> = vm
            .device_info()
            .into_iter()
            .filter(|d| d.onboard)
            .map(|d| d.type_name)
            .collect();
        let vm = Arc::new(Mutex::new(vm));
        let names: HashMap<String, usize> = (0..windows.len())
            .map(|i| (virtio_bus_name(i), i))
            .collect();
        let hooks = MicrovmHooks {
            vm: vm.clone(),
            backends: ctx.backends.clone(),
            workers: slots.iter().map(|_| None).collect(),
            bases: windows.iter().map(|w| w.base).collect(),
            slots: slots.clone(),
            realized: HashMap::new(),
            serial_buses: HashMap::new(),
            windows: names.clone(),
            factories: ctx
                .device_types
                .iter()
                .map(|f| (f.qdev_type().name().to_owned(), f.clone()))
                .collect(),
        };
        let mut types = registry();
        for f in &ctx.device_types {
            types.register(f.qdev_type()).map_err(BoardError::Qdev)?;
        }
        let mut tree = DeviceTree::new(types, Box::new(hooks), ctx.events.clone());
        tree.set_machine_type("microvm-machine");
        tree.set_globals(ctx.backends.globals());
        let e = BoardError::Qdev;
        tree.add_bus(BusSpec::new("main-system-bus", BusType::System))
            .map_err(e)?;
        tree.add_bus(BusSpec::new("isa.0", BusType::Isa))
            .map_err(e)?;
        let init = keel_phase::Phase::MachineInit;
        for name in onboard {
            if tree.registry().get(name).is_some() {
                tree.add_onboard(init, &DeviceRequest::new(name))
                    .map_err(e)?;
            }
        }
        for (i, w) in windows.iter().enumerate() {
            let t = tree
                .add_onboard(init, &DeviceRequest::new(MmioTransport::QDEV_TYPE))
                .map_err(e)?;
            let slot = SlotResources {
                mmio: Some(Window {
                    base: w.base,
                    len: w.size,
                }),
                pio: None,
                irq: Some(w.gsi),
            };
            tree.add_bus(
                BusSpec::new(virtio_bus_name(i), BusType::VirtioMmio)
                    .parent(t.path)
                    .slots(vec![slot]),
            )
            .map_err(e)?;
        }
        Ok(Self {
            vm,
            tree,
            windows: names,
            bases: windows.iter().map(|w| w.base).collect(),
            slots,
            events: Some(events),
            serial: Vec::new(),
        })
    }
}

impl Board for MicrovmBoard {
    fn devices(&self) -> &DeviceTree {
        &self.tree
    }

    fn devices_mut(&mut self) -> &mut DeviceTree {
        &mut self.tree
    }

    /// A `virtio-serial-device` brings its port bus (one slot: keel-virtio's console is
    /// single-port); if the bus cannot be added, the device goes again.
    fn device_add(&mut self, phase: Phase, req: &DeviceRequest) -> Result<Added, QdevError> {
        let added = self.tree.device_add(phase, req)?;
        if added.driver == Console::QDEV_TYPE {
            let window = self.windows.get(&added.bus).copied();
            let bus = BusSpec::new(
                Console::port_bus_name(req.id.as_deref(), window),
                Console::port_bus_type(),
            )
            .parent(added.path.clone())
            .slots(vec![SlotResources::default()]);
            if let Err(e) = self.tree.add_bus(bus) {
                let _ = self.tree.device_del(phase, &added.path);
                return Err(e);
            }
        }
        Ok(added)
    }

    /// Machine-done: the machine writes its tables and command line listing only the
    /// virtio-mmio windows that hold a (necessarily cold-plugged) device now; empty windows
    /// stay mapped but unannounced, as QEMU's microvm skips transports with an empty bus.
    fn done(&mut self, cfg: &MachineConfig) -> Result<(), BoardError> {
        let m = microvm_config(cfg)?;
        {
            let mut vm = self.lock();
            vm.set_boot(m.kernel, m.initrd, m.append, m.no_reboot)?;
            if cfg.serial != self.serial {
                late_chardev(&m.serial)?;
                vm.set_serial(m.serial)?;
            }
        }
        self.serial = cfg.serial.clone();
        let cold: Vec<u64> = self
            .slots
            .iter()
            .zip(&self.bases)
            .filter(|(p, _)| p.get().is_some())
            .map(|(_, &b)| b)
            .collect();
        let mut m = self.lock();
        m.finish_init_with(|d| cold.contains(&d.base))?;
        // The vCPU threads exist from here on, parked until `cont`, as QEMU's do: their
        // thread ids are real in `query-cpus-fast` under `-S`.
        m.pause();
        m.start()?;
        drop(m);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BoardError> {
        crate::core::resume(&mut *self.lock())
    }

    fn block_io_status(&self, node: &str) -> Option<&'static str> {
        self.lock().disk_errors().io_status(node)
    }

    fn pause(&mut self) -> Result<(), BoardError> {
        crate::core::pause(&*self.lock());
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BoardError> {
        self.lock().reset().map_err(BoardError::from)?;
        // Completes outstanding unplug requests, as a QEMU system reset does.
        self.tree.reset();
        Ok(())
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        crate::core::cpus(&*self.lock())
    }

    fn cpu_registers(&self, index: u32) -> Option<crate::board::CpuRegisters> {
        crate::core::cpu_registers(&*self.lock(), index)
    }

    fn take_events(&mut self) -> Option<Receiver<BoardEvent>> {
        self.events.take()
    }

    fn power_button(&mut self) -> bool {
        self.lock().power_button()
    }

    fn shutdown(&mut self) {
        self.lock().shutdown();
    }

    fn save_snapshot(
        &mut self,
        out: &mut dyn std::io::Write,
        running: bool,
    ) -> Result<keel_snapshot::RamStats, BoardError> {
        let extra = self.virtio_sections();
        Ok(self.lock().save_snapshot(out, running, &extra)?)
    }

    fn restore_snapshot(&mut self, snap: &keel_snapshot::Snapshot) -> Result<bool, BoardError> {
        self.restore_stream(snap, true)
    }

    fn live_ram(&mut self, track: bool) -> Result<crate::migration::live::LiveRam, BoardError> {
        let m = self.lock();
        let header = m.snapshot_header();
        crate::snapshot::live_ram(crate::core::CoreMachine::core(&*m), header, track)
    }

    fn save_state(
        &mut self,
        out: &mut dyn std::io::Write,
        running: bool,
    ) -> Result<(), BoardError> {
        let extra = self.virtio_sections();
        self.lock().save_stream(out, running, &extra, false)?;
        Ok(())
    }

    fn restore_state(&mut self, snap: &keel_snapshot::Snapshot) -> Result<bool, BoardError> {
        self.restore_stream(snap, false)
    }
}

impl MicrovmBoard {
    /// The virtio transports' sections, each device quiesced first (no request in flight).
    fn virtio_sections(&mut self) -> Vec<crate::snapshot::ExtraSection> {
        let mut extra = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(t) = slot.get() {
                // In-flight requests complete before the state is read.
                t.quiesce();
                extra.push((
                    VIRTIO_SECTION,
                    i as u32,
                    VIRTIO_VERSION,
                    keel_snapshot::Persist::to_payload(&t.save_transport()),
                ));
            }
        }
        extra
    }

    /// Restores `snap` (its RAM too with `ram`), every section checked first.
    fn restore_stream(
        &mut self,
        snap: &keel_snapshot::Snapshot,
        ram: bool,
    ) -> Result<bool, BoardError> {
        let mut virtio = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let saved = snap.payload(VIRTIO_SECTION, i as u32, VIRTIO_VERSION)?;
            match (slot.get(), saved) {
                (Some(t), Some((_, p))) => {
                    let s =
                        <keel_virtio::TransportSnapshot as keel_snapshot::Persist>::from_payload(p)
                            .map_err(|source| keel_snapshot::SnapshotError::Section {
                                section: format!("{VIRTIO_SECTION} #{i}"),
                                source,
                            })?;
                    t.check_transport(&s).map_err(|reason| {
                        keel_snapshot::SnapshotError::ShapeMismatch {
                            what: "virtio device",
                            saved: format!("in {}: {reason}", virtio_bus_name(i)),
                            here: "another device (give the same -device options)".into(),
                        }
                    })?;
                    virtio.push((t, s));
                }
                (None, None) => {}
                (here, _) => {
                    return Err(keel_snapshot::SnapshotError::ShapeMismatch {
                        what: "virtio device",
                        saved: format!(
                            "{} in {}",
                            if here.is_some() { "none" } else { "one" },
                            virtio_bus_name(i)
                        ),
                        here: (if here.is_some() { "one" } else { "none" }).to_string(),
                    }
                    .into());
                }
            }
        }
        let running = {
            let mut m = self.lock();
            m.pause();
            let r = m.check_snapshot(snap, &[VIRTIO_SECTION])?;
            let running = r.running();
            m.apply_stream(snap, r, ram)?;
            running
        };
        for (t, s) in virtio {
            t.restore_transport(&s);
        }
        Ok(running)
    }
}

/// Section of a virtio-mmio transport (instance = window index).
const VIRTIO_SECTION: keel_snapshot::SectionId = keel_snapshot::SectionId(*b"VIRT");
const VIRTIO_VERSION: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::{BlockBackend, CharBackend};

    /// What `machine-set` gives for a 16 MiB microvm with its serial port on `null`.
    fn small() -> MachineConfig {
        MachineConfig {
            type_name: "microvm".into(),
            memory: Some(16 << 20),
            serial: vec!["null".into()],
            ..MachineConfig::default()
        }
    }

    fn board() -> (MicrovmBoard, Arc<Backends>) {
        board_with(&small())
    }

    fn board_with(cfg: &MachineConfig) -> (MicrovmBoard, Arc<Backends>) {
        let cfg = microvm_config(cfg).unwrap();
        let (tx, rx) = channel();
        let sink: Arc<dyn MachineEvents> = Arc::new(Forward {
            tx,
            guest_exit: GuestExitPolicy::Shutdown,
        });
        let accel = keel_tcg::TcgAccel::new();
        let vm = Microvm::new(cfg, &accel, sink).unwrap();
        let backends = Arc::new(Backends::new());
        let ctx = BoardContext {
            backends: backends.clone(),
            events: Arc::new(keel_qdev::NoEvents),
            guest_exit: GuestExitPolicy::Shutdown,
            device_types: Vec::new(),
        };
        let mut b = MicrovmBoard::new(vm, &ctx, rx).unwrap();
        b.serial = vec!["null".into()];
        (b, backends)
    }

    fn mmio32(b: &MicrovmBoard, addr: u64) -> u32 {
        let mut d = [0u8; 4];
        b.lock().buses().mmio.read(addr, &mut d);
        u32::from_le_bytes(d)
    }

    fn add(b: &mut MicrovmBoard, arg: &str) -> Result<Added, QdevError> {
        b.device_add(Phase::MachineInit, &DeviceRequest::parse_cli(arg).unwrap())
    }

    #[test]
    fn virtio_devices_appear_in_their_slot_windows() {
        let (mut b, backends) = board();
        let base = crate::layout::VIRTIO_MMIO_BASE;
        let size = crate::layout::VIRTIO_MMIO_SIZE;
        // Every window is mapped and empty: magic, version 2, device ID 0.
        assert_eq!(mmio32(&b, base), keel_virtio::MMIO_MAGIC);
        assert_eq!(mmio32(&b, base + 4), 2);
        assert_eq!(mmio32(&b, base + 8), 0);

        let img = std::env::temp_dir().join(format!("keel-vmm-blk-{}", std::process::id()));
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        backends
            .add_block(
                "d0",
                BlockBackend {
                    filename: img.clone(),
                    read_only: false,
                },
            )
            .unwrap();
        let rng = add(&mut b, "virtio-rng-device,id=rng0").unwrap();
        assert_eq!(rng.slot, Some(0));
        let blk = add(&mut b, "virtio-blk-device,id=disk0,drive=d0").unwrap();
        assert_eq!(blk.bus, "virtio-mmio-bus.1");
        assert_eq!(mmio32(&b, base + 8), 4); // VIRTIO_ID_RNG
        assert_eq!(mmio32(&b, base + size + 8), 2); // VIRTIO_ID_BLOCK
        // Config space: capacity in sectors.
        assert_eq!(mmio32(&b, base + size + 0x100), 2048);

        // A system reset puts the device back to status 0 (the driver must start over).
        let mut w = [0u8; 4];
        w.copy_from_slice(&1u32.to_le_bytes()); // ACKNOWLEDGE
        b.lock().buses().mmio.write(base + 0x70, &w);
        assert_eq!(mmio32(&b, base + 0x70), 1);
        b.tree.reset();
        assert_eq!(mmio32(&b, base + 0x70), 0);

        // An unknown backend fails the realize: nothing is created, the slot stays empty.
        assert!(add(&mut b, "virtio-blk-device,id=disk1,drive=nope").is_err());
        assert_eq!(mmio32(&b, base + 2 * size + 8), 0);
        assert!(b.devices().find("disk1").is_none());

        // Deleting in machine-init empties the window again and frees the slot.
        b.devices_mut()
            .device_del(Phase::MachineInit, "rng0")
            .unwrap();
        assert_eq!(mmio32(&b, base + 8), 0);
        let again = add(&mut b, "virtio-rng-device").unwrap();
        assert_eq!(again.slot, Some(0));
        assert_eq!(mmio32(&b, base + 8), 4);
        std::fs::remove_file(&img).ok();
    }

    fn mmio_w32(b: &MicrovmBoard, addr: u64, v: u32) {
        b.lock().buses().mmio.write(addr, &v.to_le_bytes());
    }

    /// A driver's-eye run through the real machine: negotiate, set up queue 0 in guest RAM,
    /// submit a virtio-blk read of sector 0, notify, and find the image's bytes in RAM, the
    /// used ring advanced and the interrupt raised.
    #[test]
    fn virtio_blk_reads_the_backend_through_guest_memory() {
        use vm_memory::{Bytes, GuestAddress};
        let (mut b, backends) = board();
        let img = std::env::temp_dir().join(format!("keel-vmm-e2e-{}", std::process::id()));
        let mut data = vec![0u8; 1 << 20];
        data[..20].copy_from_slice(b"keel sector 0 marker");
        std::fs::write(&img, &data).unwrap();
        backends
            .add_block(
                "d0",
                BlockBackend {
                    filename: img.clone(),
                    read_only: true,
                },
            )
            .unwrap();
        add(&mut b, "virtio-blk-device,drive=d0").unwrap();
        let base = crate::layout::VIRTIO_MMIO_BASE;
        let (desc, avail, used, hdr, buf, status) = (
            0x10000u64, 0x11000u64, 0x12000u64, 0x13000u64, 0x14000u64, 0x15000u64,
        );

        mmio_w32(&b, base + 0x70, 1); // ACKNOWLEDGE
        mmio_w32(&b, base + 0x70, 3); // DRIVER
        mmio_w32(&b, base + 0x24, 1); // DriverFeaturesSel = 1
        mmio_w32(&b, base + 0x20, 1); // VERSION_1 (bit 32)
        mmio_w32(&b, base + 0x70, 11); // FEATURES_OK
        assert_eq!(mmio32(&b, base + 0x70), 11);
        mmio_w32(&b, base + 0x30, 0); // QueueSel
        assert!(mmio32(&b, base + 0x34) >= 8);
        mmio_w32(&b, base + 0x38, 8); // QueueNum
        for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            mmio_w32(&b, base + off, addr as u32);
            mmio_w32(&b, base + off + 4, 0);
        }
        mmio_w32(&b, base + 0x44, 1); // QueueReady
        mmio_w32(&b, base + 0x70, 15); // DRIVER_OK

        let mem = b.lock().memory().clone();
        // Request header: type IN (0), reserved, sector 0.
        mem.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
        // Descriptors: header (read), data (write), status (write).
        let d = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut e = Vec::with_capacity(16);
            e.extend_from_slice(&addr.to_le_bytes());
            e.extend_from_slice(&len.to_le_bytes());
            e.extend_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(&next.to_le_bytes());
            e
        };
        let mut table = d(hdr, 16, 1, 1);
        table.extend(d(buf, 512, 1 | 2, 2));
        table.extend(d(status, 1, 2, 0));
        mem.write_slice(&table, GuestAddress(desc)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        // Available ring: flags 0, idx 1, ring[0] = descriptor 0.
        mem.write_slice(&[0, 0, 1, 0, 0, 0], GuestAddress(avail))
            .unwrap();
        mmio_w32(&b, base + 0x50, 0); // QueueNotify: the slot's worker thread processes it

        let start = std::time::Instant::now();
        let mut used_idx: u16 = 0;
        while used_idx != 1 && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(1));
            used_idx = mem.read_obj(GuestAddress(used + 2)).unwrap();
        }
        assert_eq!(used_idx, 1, "the worker completed the request");
        let st: u8 = mem.read_obj(GuestAddress(status)).unwrap();
        assert_eq!(st, 0, "VIRTIO_BLK_S_OK");
        let mut sector = [0u8; 20];
        mem.read_slice(&mut sector, GuestAddress(buf)).unwrap();
        assert_eq!(&sector, b"keel sector 0 marker");
        // InterruptStatus is set right after the used ring is published.
        while mmio32(&b, base + 0x60) & 1 == 0
            && start.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(mmio32(&b, base + 0x60) & 1, 1, "used-buffer interrupt");
        std::fs::remove_file(&img).ok();
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    /// Machine-done lists only the windows holding a cold-plugged device: two DSDT nodes for
    /// two devices, although all eight windows are mapped.
    #[test]
    fn dsdt_lists_only_cold_plugged_virtio_devices() {
        use vm_memory::{Bytes, GuestAddress};
        let (mut b, backends) = board();
        backends.add_chardev("c0", CharBackend::Null).unwrap();
        add(&mut b, "virtio-rng-device").unwrap();
        add(&mut b, "virtio-serial-device,id=ser").unwrap();
        add(&mut b, "virtconsole,chardev=c0,bus=ser.0").unwrap();
        // A device added and deleted again in machine-init leaves no trace.
        add(&mut b, "virtio-rng-device,id=gone").unwrap();
        b.devices_mut()
            .device_del(Phase::MachineInit, "gone")
            .unwrap();
        b.done(&small()).unwrap();
        let base = crate::layout::VIRTIO_MMIO_BASE;
        let size = crate::layout::VIRTIO_MMIO_SIZE;
        let listed: Vec<u64> = b.lock().firmware_virtio().iter().map(|d| d.base).collect();
        assert_eq!(listed, [base, base + size]);
        let mem = b.lock().memory().clone();
        let (start, end) = (crate::layout::ACPI_START, crate::layout::ACPI_END);
        let mut tables = vec![0u8; (end - start) as usize];
        mem.read_slice(&mut tables, GuestAddress(start)).unwrap();
        assert_eq!(count(&tables, b"LNRO0005"), 2, "one DSDT node per device");
        // Hot plug stays refused, and the slot count is unchanged.
        assert!(
            b.device_add(
                Phase::MachineReady,
                &DeviceRequest::parse_cli("virtio-blk-device,drive=x").unwrap()
            )
            .is_err()
        );
    }

    /// `acpi=off` with a `-kernel`: the devices go on the kernel command line instead
    /// (QEMU's `auto-kernel-cmdline`, on by default); `auto-kernel-cmdline=off` drops them.
    #[test]
    #[cfg(feature = "demo-guest")]
    fn acpi_off_puts_cold_plugged_devices_on_the_kernel_command_line() {
        use vm_memory::{Bytes, GuestAddress};
        let kernel = std::env::temp_dir().join(format!("keel-vmm-pvh-{}", std::process::id()));
        std::fs::write(&kernel, crate::DEMO_GUEST).unwrap();
        for auto in ["on", "off"] {
            let mut cfg = small();
            cfg.kernel = Some(kernel.clone());
            cfg.append = Some("console=ttyS0".into());
            cfg.props.insert("acpi".into(), "off".into());
            cfg.props.insert("auto-kernel-cmdline".into(), auto.into());
            let (mut b, _) = board_with(&cfg);
            add(&mut b, "virtio-rng-device").unwrap();
            b.done(&cfg).unwrap();
            let d = b.lock().firmware_virtio()[0];
            let mem = b.lock().memory().clone();
            let mut line = vec![0u8; 256];
            mem.read_slice(&mut line, GuestAddress(crate::layout::CMDLINE_ADDR))
                .unwrap();
            let line = String::from_utf8_lossy(&line[..line.iter().position(|&c| c == 0).unwrap()])
                .into_owned();
            let want = format!(
                "console=ttyS0 virtio_mmio.device=512@{:#x}:{}",
                d.base, d.gsi
            );
            if auto == "on" {
                assert_eq!(line, want);
            } else {
                assert_eq!(line, "console=ttyS0");
            }
        }
        std::fs::remove_file(&kernel).ok();
    }

    #[test]
    fn anonymous_serial_devices_get_distinct_port_buses() {
        let (mut b, backends) = board();
        backends.add_chardev("c0", CharBackend::Null).unwrap();
        add(&mut b, "virtio-rng-device").unwrap();
        add(&mut b, "virtio-serial-device").unwrap();
        add(&mut b, "virtio-serial-device").unwrap();
        let names: Vec<String> = b
            .devices()
            .query_tree()
            .into_iter()
            .filter(|n| n.bus_type == "virtio-serial-bus")
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["virtio-serial-bus.1", "virtio-serial-bus.2"]);
        add(&mut b, "virtconsole,chardev=c0,bus=virtio-serial-bus.2").unwrap();
        let base = crate::layout::VIRTIO_MMIO_BASE;
        let size = crate::layout::VIRTIO_MMIO_SIZE;
        assert_eq!(mmio32(&b, base + 2 * size + 8), 3); // VIRTIO_ID_CONSOLE
    }

    #[test]
    fn isa_debug_exit_is_mapped_and_unmapped() {
        let (mut b, _) = board();
        add(&mut b, "isa-debug-exit,id=dbg,iobase=0x520,iosize=1").unwrap();
        assert!(
            b.lock()
                .buses()
                .pio
                .ranges()
                .iter()
                .any(|r| r.base == 0x520)
        );
        // Overlapping ports: the machine refuses, the tree creates nothing.
        assert!(add(&mut b, "isa-debug-exit,id=dbg2,iobase=0x520,iosize=1").is_err());
        assert!(b.devices().find("dbg2").is_none());
        b.devices_mut()
            .device_del(Phase::MachineInit, "dbg")
            .unwrap();
        assert!(
            !b.lock()
                .buses()
                .pio
                .ranges()
                .iter()
                .any(|r| r.base == 0x520)
        );
        // Onboard devices are in the tree.
        let tree = b.devices().query_tree();
        let isa = tree.iter().find(|n| n.name == "isa.0").unwrap();
        assert!(
            isa.devices
                .iter()
                .any(|d| d.driver == "isa-serial" && d.onboard)
        );
    }
}
