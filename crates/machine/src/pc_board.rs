//! The `pc` machine type: the [`Pc`] model behind the [`MachineType`] / [`Board`] seam, its
//! device tree (`pci.0` with the onboard functions, `isa.0`) and the realize hooks that put
//! virtio-pci devices on the PCI bus.
//!
//! `pci.0` takes hot plug (ACPI PCI hot plug, [`crate::pc_hotplug`]): in machine-ready a
//! `device_add` realizes the function in staged mode and raises GPE 1, and `device_del` asks
//! the guest, whose eject comes back as [`BoardEvent::DeviceEjected`] and completes in
//! `Board::guest_ejected`. `isa.0` has none.
//!
//! Queue notifications of virtio-pci devices are processed on the vCPU thread that writes
//! the notify register (keel-pci's inline path): `keel_virtio::IoWorker` serves virtio-mmio
//! only, and the inline path is correct under both accelerators without ioeventfd
//! bookkeeping for BARs that move. Interrupts go out as MSI-X messages through
//! [`keel_accel::Vm::signal_msi`] when the guest enables MSI-X, else as INTx on the GSI the
//! DSDT's `_PRT` names for the slot.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, MutexGuard};

use keel_accel::Accelerator;
use keel_devices::{DebugExit, DebugExitConfig};
use keel_pci::{PciAddress, PciDevice, PciDeviceProps, VirtioPci};
use keel_phase::Phase;
use keel_qdev::{
    Added, BusSpec, BusType, DeviceHooks, DeviceKey, DeviceRequest, DeviceTree, DeviceType,
    DeviceView, GuestAnswer, HookError, HotplugHandler, PropSpec, QdevError, SlotResources,
    UnplugMode,
};
use keel_virtio::{Block, Console, ConsolePortProps, Net, Rng};
use serde::Serialize;

use crate::MachineEvents;
use crate::backends::Backends;
use crate::board::{Board, BoardContext, BoardError, BoardEvent, CpuInfo, MachineConfig};
use crate::board::{MachineType, MachineTypeInfo};
use crate::device_types::registry;
use crate::factory::{DeviceFactory, DeviceHost, Space, unmap};
use crate::microvm_board::{
    CPU_PROPERTY, Forward, Keep, SharedVirtio, chain, console_device, cpu_model, serial_backend,
    virtio_backend,
};
use crate::pc::{Pc, PcConfig, pc_requirements};
use crate::pc_hotplug::PciHotplug;

/// QEMU's `pc` (i440FX + PIIX), the subset Keel has: see [`crate::pc`].
#[derive(Debug, Default)]
pub struct PcType;

/// Turns the VMM's accumulated `machine-set` into a `pc` configuration.
pub fn pc_config(cfg: &MachineConfig) -> Result<PcConfig, BoardError> {
    let mut m = PcConfig::default();
    if let Some(mem) = cfg.memory {
        m.memory = mem;
    }
    crate::board::check_host_memory("pc.ram", m.memory)?;
    if let Some(n) = cfg.cpus {
        m.cpus = n;
    }
    for (what, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if let Some(p) = path
            && !p.is_file()
        {
            return Err(BoardError::Invalid(format!(
                "could not open {what} file '{}': not a readable regular file",
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
        if k == "dump-guest-core" {
            // QEMU's MachineState boolean: on/off, yes/no, true/false.
            m.dump_guest_core = match keel_qdev::keyval::parse_bool(v) {
                Some(true) => crate::OnOffAuto::On,
                Some(false) => crate::OnOffAuto::Off,
                None => {
                    return Err(BoardError::Invalid(
                        "Parameter 'dump-guest-core' expects 'on' or 'off'".into(),
                    ));
                }
            };
            continue;
        }
        return Err(BoardError::UnknownProperty {
            machine: "pc-i440fx".into(),
            property: k.clone(),
        });
    }
    Ok(m)
}

impl MachineType for PcType {
    fn name(&self) -> &'static str {
        crate::pc::PC_MACHINE_NAME
    }

    fn info(&self) -> MachineTypeInfo {
        MachineTypeInfo {
            name: "pc".into(),
            description: "Standard PC (i440FX + PIIX, 1996)".into(),
            is_default: false,
            cpu_max: crate::pc::PC_MAX_CPUS,
            hotpluggable_cpus: false,
            numa_mem_supported: false,
            deprecated: false,
            acpi: true,
            default_cpu_type: Some("qemu64-x86_64-cpu".into()),
            default_ram_id: Some("pc.ram".into()),
        }
    }

    fn check_config(&self, cfg: &MachineConfig) -> Result<(), BoardError> {
        pc_config(cfg).map(|_| ())
    }

    fn check_accel(&self, cfg: &MachineConfig, accel: &dyn Accelerator) -> Result<(), BoardError> {
        let m = pc_config(cfg)?;
        if let Some(spec) = cfg.props.get(CPU_PROPERTY)
            && cpu_model(spec)? == "host"
            && accel.name() != "kvm"
        {
            return Err(BoardError::Invalid("CPU model 'host' requires KVM".into()));
        }
        Ok(accel.check(&pc_requirements(&m))?)
    }

    fn create(
        &self,
        cfg: &MachineConfig,
        accel: Arc<dyn Accelerator>,
        ctx: &BoardContext,
    ) -> Result<Box<dyn Board>, BoardError> {
        let mut m = pc_config(cfg)?;
        m.serial = crate::microvm_board::resolve_serial(m.serial, &ctx.backends)?;
        let (tx, rx) = channel();
        let sink: Arc<dyn MachineEvents> = Arc::new(Forward {
            tx,
            guest_exit: ctx.guest_exit,
        });
        let pc = Pc::new(m, accel.as_ref(), sink)?;
        if let Some(secs) = ctx.backends.rtc_offset() {
            pc.set_rtc_offset(secs);
        }
        if ctx.backends.mem_prealloc() {
            crate::backends::prealloc(pc.memory());
        }
        let mut board = PcBoard::new(pc, ctx, rx)?;
        board.serial = cfg.serial.clone();
        Ok(Box::new(board))
    }
}

/// The onboard PCI functions as qdev types (not user-creatable), so `info qtree` and
/// `query-pci` name them as QEMU does.
fn onboard_types() -> Vec<DeviceType> {
    vec![
        DeviceType::new("i440FX-pcihost", BusType::System)
            .description("i440FX host bridge (PCI root)")
            .user_creatable(false),
        DeviceType::new("i440FX", BusType::Pci)
            .description("i440FX host bridge function (00.0)")
            .user_creatable(false),
        DeviceType::new("PIIX3", BusType::Pci)
            .description("PIIX3 PCI-ISA bridge (01.0)")
            .user_creatable(false),
        DeviceType::new("PIIX4_PM", BusType::Pci)
            .description("PIIX4 power management and ACPI (01.3)")
            .user_creatable(false)
            .prop(
                PropSpec::bool(ROOT_HOTPLUG)
                    .default_bool(true)
                    .description("ACPI hot plug on pci.0 (off: device_add there fails)"),
            )
            .prop(PropSpec::bool("acpi-pci-hotplug-with-bridge-support").default_bool(true))
            // QEMU's S3/S4 switches (libvirt sets both): Keel's ACPI tables offer only S5,
            // so the guest sees neither whatever the value.
            .prop(PropSpec::uint8("disable_s3").default_u64(0))
            .prop(PropSpec::uint8("disable_s4").default_u64(0)),
    ]
}

/// PIIX4_PM's switch for ACPI hot plug on the root bus.
const ROOT_HOTPLUG: &str = "acpi-root-pci-hotplug";

/// The keel-virtio back end a virtio-pci type stands for.
fn backend_kind(driver: &str) -> Option<&'static str> {
    Some(match driver {
        "virtio-blk-pci" => Block::QDEV_TYPE,
        "virtio-net-pci" => Net::QDEV_TYPE,
        "virtio-rng-pci" => Rng::QDEV_TYPE,
        "virtio-serial-pci" => Console::QDEV_TYPE,
        _ => return None,
    })
}

/// One PCI function as `query-pci` reports it (QAPI `PciDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciDeviceInfo {
    /// Bus number (0).
    pub bus: u8,
    /// Slot.
    pub slot: u8,
    /// Function.
    pub function: u8,
    /// Class code.
    pub class_info: PciClassInfo,
    /// Identification.
    pub id: PciIdInfo,
    /// Interrupt line (the IRQ the pin is routed to), if it has a pin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irq: Option<u32>,
    /// Interrupt pin (0: none, 1: INTA ..).
    pub irq_pin: u8,
    /// The qdev id (empty without one).
    pub qdev_id: String,
    /// The BARs that decode.
    pub regions: Vec<PciRegionInfo>,
}

/// QAPI `PciDeviceClass`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciClassInfo {
    /// What QEMU calls the class, where it has a name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    /// Base class and subclass.
    pub class: u16,
}

/// QAPI `PciDeviceId`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciIdInfo {
    /// Device ID.
    pub device: u16,
    /// Vendor ID.
    pub vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Subsystem vendor ID.
    #[serde(rename = "subsystem-vendor")]
    pub subsystem_vendor: u16,
}

/// QAPI `PciMemoryRegion`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciRegionInfo {
    /// BAR index.
    pub bar: u8,
    /// `io` or `memory`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Base address.
    pub address: u64,
    /// Size.
    pub size: u64,
    /// Prefetchable (memory only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<bool>,
    /// 64-bit (memory only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_type_64: Option<bool>,
}

/// One bus as `query-pci` reports it (QAPI `PciInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciBusInfo {
    /// Bus number.
    pub bus: u8,
    /// Its functions.
    pub devices: Vec<PciDeviceInfo>,
}

fn class_desc(class: u16) -> Option<&'static str> {
    Some(match class {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0200 => "Ethernet controller",
        0x0600 => "Host bridge",
        0x0601 => "ISA bridge",
        0x0680 => "Bridge",
        0x0780 => "Communication controller",
        _ => return None,
    })
}

/// What `query-pci` says about `bus`, naming functions by the qdev ids in `ids`.
pub fn pci_info(bus: &keel_pci::PciBus, ids: &HashMap<u8, String>) -> Vec<PciBusInfo> {
    let mut devices = Vec::new();
    let regions = bus.regions();
    for devfn in 0..=255u8 {
        let a = PciAddress::from_devfn(devfn);
        let Some(d) = bus.visible(a) else { continue };
        let r8 = |o: u16| {
            let mut b = [0u8];
            d.config_read(o, &mut b);
            b[0]
        };
        let r16 = |o: u16| {
            let mut b = [0u8; 2];
            d.config_read(o, &mut b);
            u16::from_le_bytes(b)
        };
        let class = r16(0x0a);
        let pin = r8(0x3d);
        devices.push(PciDeviceInfo {
            bus: 0,
            slot: a.slot(),
            function: a.function(),
            class_info: PciClassInfo {
                desc: class_desc(class).map(str::to_owned),
                class,
            },
            id: PciIdInfo {
                device: r16(2),
                vendor: r16(0),
                subsystem: r16(0x2e),
                subsystem_vendor: r16(0x2c),
            },
            irq: (pin != 0).then(|| u32::from(r8(0x3c))),
            irq_pin: pin,
            qdev_id: ids.get(&devfn).cloned().unwrap_or_default(),
            regions: regions
                .iter()
                .filter(|(f, _)| *f == a)
                .map(|(_, r)| {
                    let io = r.kind == keel_pci::BarKind::Io;
                    PciRegionInfo {
                        bar: r.bar,
                        kind: if io { "io" } else { "memory" }.into(),
                        address: r.base,
                        size: r.size,
                        prefetch: (!io).then_some(matches!(
                            r.kind,
                            keel_pci::BarKind::Memory32 { prefetchable: true }
                                | keel_pci::BarKind::Memory64 { prefetchable: true }
                        )),
                        mem_type_64: (!io)
                            .then_some(matches!(r.kind, keel_pci::BarKind::Memory64 { .. })),
                    }
                })
                .collect(),
        });
    }
    vec![PciBusInfo { bus: 0, devices }]
}

/// HMP `info pci`: QEMU 7.2's listing of every function of `buses` (HMP line ends).
pub fn info_pci(buses: &[PciBusInfo]) -> String {
    let mut out = String::new();
    for d in buses.iter().flat_map(|b| &b.devices) {
        out.push_str(&format!(
            "  Bus {:2}, device {:3}, function {}:\r\n    ",
            d.bus, d.slot, d.function
        ));
        match &d.class_info.desc {
            Some(desc) => out.push_str(desc),
            None => out.push_str(&format!("Class {:04}", d.class_info.class)),
        }
        out.push_str(&format!(
            ": PCI device {:04x}:{:04x}\r\n      PCI subsystem {:04x}:{:04x}\r\n",
            d.id.vendor, d.id.device, d.id.subsystem_vendor, d.id.subsystem
        ));
        if let Some(irq) = d.irq {
            let pin = char::from(b'A'.wrapping_add(d.irq_pin.wrapping_sub(1)));
            out.push_str(&format!("      IRQ {irq}, pin {pin}\r\n"));
        }
        for r in &d.regions {
            let end = r.address.wrapping_add(r.size).wrapping_sub(1);
            out.push_str(&format!("      BAR{}: ", r.bar));
            if r.kind == "io" {
                out.push_str(&format!("I/O at 0x{:04x} [0x{end:04x}].\r\n", r.address));
            } else {
                out.push_str(&format!(
                    "{} bit{} memory at 0x{:08x} [0x{end:08x}].\r\n",
                    if r.mem_type_64 == Some(true) { 64 } else { 32 },
                    if r.prefetch == Some(true) {
                        " prefetchable"
                    } else {
                        ""
                    },
                    r.address
                ));
            }
        }
        out.push_str(&format!("      id \"{}\"\r\n", d.qdev_id));
    }
    out
}

/// Where each realized PCI device is, by its device-tree key.
type Addresses = Arc<Mutex<HashMap<DeviceKey, PciAddress>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `pci.0`'s hot plug handler: ACPI PCI hot plug through [`PciHotplug`] (PCIU/PCID and
/// GPE 1); the guest's eject comes back as `Board::guest_ejected`.
struct PciHotplugHandler {
    hotplug: Arc<PciHotplug>,
    pci: Arc<keel_pci::PciBus>,
    addresses: Addresses,
}

impl PciHotplugHandler {
    fn address(&self, dev: &DeviceView<'_>) -> Result<PciAddress, HookError> {
        lock(&self.addresses)
            .get(&dev.key)
            .copied()
            .ok_or_else(|| format!("'{}' is not on a PCI slot", dev.name()).into())
    }
}

impl HotplugHandler for PciHotplugHandler {
    /// A hot-plugged function tells the guest once its slot's function 0 is there (a
    /// function 1-7 added first waits for it, as the guest scans only through function 0).
    fn plug(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError> {
        if !dev.hotplugged {
            return Ok(());
        }
        let a = self.address(dev)?;
        if PciAddress::new(a.slot(), 0).is_some_and(|f0| self.pci.function(f0).is_some()) {
            self.hotplug.plugged(a.slot());
        }
        Ok(())
    }

    fn unplug_request(&mut self, dev: &DeviceView<'_>) -> Result<UnplugMode, HookError> {
        let a = self.address(dev)?;
        self.hotplug.unplug_requested(a.slot());
        Ok(UnplugMode::Async)
    }

    /// QEMU 7.2 raises the GPE again on a repeated `device_del` (the guest may have missed
    /// the first one: Linux drops a GPE that arrives while it is disabled).
    fn unplug_request_again(&mut self, dev: &DeviceView<'_>) -> Result<bool, HookError> {
        let a = self.address(dev)?;
        self.hotplug.unplug_requested(a.slot());
        Ok(true)
    }

    fn unplug(&mut self, dev: &DeviceView<'_>) {
        if let Ok(a) = self.address(dev) {
            self.hotplug.slot_emptied(a.slot());
        }
    }
}

/// A hot-added function 1-7 of a slot whose function 0 the guest already sees: the guest
/// would never scan it (QEMU refuses it with this message, given as is).
#[derive(Debug, thiserror::Error)]
#[error(
    "PCI: slot {slot} function 0 already occupied by {present}, new func {new} cannot be exposed to guest."
)]
struct FunctionZeroPresent {
    slot: u8,
    present: String,
    new: String,
}

/// `acpi-index` values are unique on the machine (QEMU's message, given as is).
#[derive(Debug, thiserror::Error)]
#[error("a PCI device with acpi-index = {0} already exist")]
struct AcpiIndexTaken(u32);

/// What a realized user device holds on to until it is unrealized.
enum Realized {
    DebugExit {
        iobase: u16,
    },
    Factory(Vec<(Space, u64)>),
    Pci {
        address: PciAddress,
        _keep: Option<Keep>,
    },
    Port {
        address: PciAddress,
    },
}

struct PcHooks {
    pc: Arc<Mutex<Pc>>,
    backends: Arc<Backends>,
    realized: HashMap<DeviceKey, Realized>,
    /// Port buses of `virtio-serial-pci` devices: bus name → the function's address.
    serial_buses: HashMap<String, PciAddress>,
    /// qdev ids by devfn, shared with the board for `query-pci`.
    ids: Arc<Mutex<HashMap<u8, String>>>,
    /// Device types of the user's PCI functions by devfn (QEMU's refusal names them).
    drivers: HashMap<u8, String>,
    /// The PCI properties of the user's PCI functions by devfn.
    pci_props: HashMap<u8, PciDeviceProps>,
    /// The address of the last PCI function realized (the board names port buses by it).
    last: Arc<Mutex<Option<PciAddress>>>,
    /// Where each realized virtio-pci device is (shared with the hot plug handler).
    addresses: Addresses,
    factories: HashMap<String, Arc<dyn DeviceFactory>>,
}

impl PcHooks {
    fn lock(&self) -> MutexGuard<'_, Pc> {
        self.pc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds a virtio-pci function for `device` at `address` and cold-plugs it.
    fn plug(
        &self,
        address: PciAddress,
        pci: PciDeviceProps,
        device: SharedVirtio,
    ) -> Result<(), HookError> {
        let mut pc = self.lock();
        let intx = pc.intx_line(address.slot(), usize::from(address.devfn()))?;
        let device_type = device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .device_type();
        let t = VirtioPci::with_interfaces(
            device,
            pc.memory().clone(),
            intx,
            pc.msi_sink(),
            pci.interfaces(device_type),
        )
        .map_err(|e| chain(&e))?;
        t.set_multifunction(pci.multifunction);
        let dev: Arc<dyn PciDevice> = Arc::new(t);
        pc.add_pci_function(address, dev).map_err(|e| chain(&e))?;
        Ok(())
    }

    fn set_id(&self, address: PciAddress, id: Option<&str>) {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        match id {
            Some(id) => ids.insert(address.devfn(), id.to_owned()),
            None => ids.remove(&address.devfn()),
        };
    }

    /// The PCI properties the function at `address` was built with (a virtconsole port
    /// rebuilds it with them).
    fn props_of(&self, address: PciAddress) -> PciDeviceProps {
        self.pci_props
            .get(&address.devfn())
            .copied()
            .unwrap_or(PciDeviceProps {
                multifunction: self.multifunction_of(address),
                ..PciDeviceProps::default()
            })
    }

    fn multifunction_of(&self, address: PciAddress) -> bool {
        let Some(d) = self.lock().pci_bus().function(address) else {
            return false;
        };
        let mut h = [0u8];
        d.config_read(0x0e, &mut h);
        h[0] & 0x80 != 0
    }
}

impl DeviceHooks for PcHooks {
    fn realize(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError> {
        if dev.onboard {
            return Ok(());
        }
        if let Some(factory) = self.factories.get(dev.driver).cloned() {
            let pc = self.lock();
            let mut host = DeviceHost::new(pc.buses(), pc.memory(), pc.vm(), pc.system_events());
            let r = factory.realize(dev, &mut host);
            let mappings = host.into_mappings();
            if let Err(e) = r {
                unmap(pc.buses(), &mappings);
                return Err(e);
            }
            drop(pc);
            self.realized.insert(dev.key, Realized::Factory(mappings));
            return Ok(());
        }
        if dev.driver == keel_devices::Serial::QDEV_TYPE {
            let pc = self.lock();
            let mut host = DeviceHost::new(pc.buses(), pc.memory(), pc.vm(), pc.system_events());
            crate::microvm_board::realize_isa_serial(&mut host, &self.backends, dev.props)?;
            let mappings = host.into_mappings();
            drop(pc);
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
            let address = *self
                .serial_buses
                .get(dev.bus)
                .ok_or_else(|| format!("bus '{}' is not a virtio-serial bus", dev.bus))?;
            let props = ConsolePortProps::from_props(dev.props)?;
            let console = console_device(&self.backends, &props.chardev)?;
            // The console's function is rebuilt with the port's back end, where it was.
            let props = self.props_of(address);
            self.lock().remove_pci_function(address);
            self.plug(address, props, console)?;
            self.realized.insert(dev.key, Realized::Port { address });
            return Ok(());
        }
        let kind = backend_kind(dev.driver)
            .ok_or_else(|| format!("pc cannot realize '{}'", dev.driver))?;
        let pci = PciDeviceProps::from_props(dev.props)?;
        if pci.acpi_index != 0
            && self
                .pci_props
                .values()
                .any(|p| p.acpi_index == pci.acpi_index)
        {
            return Err(Box::new(AcpiIndexTaken(pci.acpi_index)));
        }
        let address = self.lock().free_address(pci.addr).map_err(|e| chain(&e))?;
        if dev.hotplugged && address.function() != 0 {
            let f0 = PciAddress::new(address.slot(), 0).map(PciAddress::devfn);
            if let Some(present) = f0.and_then(|f0| self.drivers.get(&f0)) {
                return Err(Box::new(FunctionZeroPresent {
                    slot: address.slot(),
                    present: present.clone(),
                    new: dev.driver.to_owned(),
                }));
            }
        }
        let disks = self.lock().disk_errors();
        let (device, keep) = virtio_backend(&self.backends, &disks, kind, dev.props)?;
        self.plug(address, pci, device)?;
        self.pci_props.insert(address.devfn(), pci);
        self.lock()
            .hotplug()
            .set_acpi_index(address.devfn(), pci.acpi_index);
        if kind == Console::QDEV_TYPE {
            self.serial_buses.insert(
                Console::port_bus_name(dev.id, Some(usize::from(address.devfn()))),
                address,
            );
        }
        self.set_id(address, dev.id);
        self.drivers.insert(address.devfn(), dev.driver.to_owned());
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(address);
        lock(&self.addresses).insert(dev.key, address);
        self.realized.insert(
            dev.key,
            Realized::Pci {
                address,
                _keep: keep,
            },
        );
        Ok(())
    }

    /// System reset: the machine resets every PCI function itself.
    fn reset(&mut self, _dev: &DeviceView<'_>) {}

    fn unrealize(&mut self, dev: &DeviceView<'_>) {
        match self.realized.remove(&dev.key) {
            Some(Realized::Factory(mappings)) => unmap(self.lock().buses(), &mappings),
            Some(Realized::DebugExit { iobase }) => {
                self.lock().remove_device_at(iobase);
            }
            Some(Realized::Pci { address, _keep }) => {
                lock(&self.addresses).remove(&dev.key);
                self.lock().remove_pci_function(address);
                self.set_id(address, None);
                self.drivers.remove(&address.devfn());
                self.pci_props.remove(&address.devfn());
                self.lock().hotplug().set_acpi_index(address.devfn(), 0);
                self.serial_buses.retain(|_, a| *a != address);
            }
            Some(Realized::Port { address }) => {
                let idle: SharedVirtio =
                    Arc::new(Mutex::new(Console::new(Box::new(std::io::sink()))));
                let props = self.props_of(address);
                self.lock().remove_pci_function(address);
                if let Err(e) = self.plug(address, props, idle) {
                    log::warn!("detaching virtconsole: {e}");
                }
            }
            None => {}
        }
    }
}

/// A running (or ready) `pc`.
struct PcBoard {
    pc: Arc<Mutex<Pc>>,
    tree: DeviceTree,
    ids: Arc<Mutex<HashMap<u8, String>>>,
    last: Arc<Mutex<Option<PciAddress>>>,
    addresses: Addresses,
    hotplug: Arc<PciHotplug>,
    events: Option<Receiver<BoardEvent>>,
    serial: Vec<String>,
}

impl PcBoard {
    fn lock(&self) -> MutexGuard<'_, Pc> {
        self.pc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the device tree: `i440FX-pcihost` on the system bus with `pci.0` (the host
    /// bridge function, PIIX3 and PIIX4_PM on it), `isa.0` under PIIX3 with the legacy
    /// devices.
    fn new(pc: Pc, ctx: &BoardContext, events: Receiver<BoardEvent>) -> Result<Self, BoardError> {
        let serial = pc.serial().is_some();
        let hotplug = pc.hotplug().clone();
        let pci = pc.pci_bus().clone();
        let addresses: Addresses = Arc::new(Mutex::new(HashMap::new()));
        let pc = Arc::new(Mutex::new(pc));
        let ids = Arc::new(Mutex::new(HashMap::new()));
        let last = Arc::new(Mutex::new(None));
        let hooks = PcHooks {
            pc: pc.clone(),
            backends: ctx.backends.clone(),
            realized: HashMap::new(),
            serial_buses: HashMap::new(),
            ids: ids.clone(),
            drivers: HashMap::new(),
            pci_props: HashMap::new(),
            last: last.clone(),
            addresses: addresses.clone(),
            factories: ctx
                .device_types
                .iter()
                .map(|f| (f.qdev_type().name().to_owned(), f.clone()))
                .collect(),
        };
        let mut types = registry();
        let e = BoardError::Qdev;
        for t in onboard_types().into_iter().chain(keel_pci::qdev_types()) {
            if types.get(t.name()).is_none() {
                types.register(t).map_err(e)?;
            }
        }
        for f in &ctx.device_types {
            types.register(f.qdev_type()).map_err(e)?;
        }
        let mut tree = DeviceTree::new(types, Box::new(hooks), ctx.events.clone());
        tree.set_globals(ctx.backends.globals());
        let init = Phase::MachineInit;
        tree.add_bus(BusSpec::new("main-system-bus", BusType::System))
            .map_err(e)?;
        let host = tree
            .add_onboard(init, &DeviceRequest::new("i440FX-pcihost"))
            .map_err(e)?;
        let handler = PciHotplugHandler {
            hotplug: hotplug.clone(),
            pci,
            addresses: addresses.clone(),
        };
        tree.add_bus(
            BusSpec::new("pci.0", BusType::Pci)
                .parent(host.path)
                .hotplug(Box::new(handler)),
        )
        .map_err(e)?;
        tree.add_onboard(init, &DeviceRequest::new("i440FX"))
            .map_err(e)?;
        let piix3 = tree
            .add_onboard(init, &DeviceRequest::new("PIIX3"))
            .map_err(e)?;
        let pm = tree
            .add_onboard(init, &DeviceRequest::new("PIIX4_PM"))
            .map_err(e)?;
        // As QEMU: without root hot plug, pci.0 has no hotplug handler.
        if tree.view(pm.key).and_then(|v| v.props.bool(ROOT_HOTPLUG)) == Some(false) {
            tree.disable_hotplug("pci.0");
        }
        tree.add_bus(BusSpec::new("isa.0", BusType::Isa).parent(piix3.path))
            .map_err(e)?;
        let mut isa = vec!["i8042", "mc146818rtc"];
        if serial {
            isa.insert(0, "isa-serial");
        }
        for name in isa {
            if tree.registry().get(name).is_some() {
                tree.add_onboard(init, &DeviceRequest::new(name))
                    .map_err(e)?;
            }
        }
        Ok(Self {
            pc,
            tree,
            ids,
            last,
            addresses,
            hotplug,
            events: Some(events),
            serial: Vec::new(),
        })
    }
}

impl Board for PcBoard {
    fn devices(&self) -> &DeviceTree {
        &self.tree
    }

    fn devices_mut(&mut self) -> &mut DeviceTree {
        &mut self.tree
    }

    /// A `virtio-serial-pci` brings its port bus (one slot).
    /// A refusal the machine words as QEMU does comes back as is.
    fn device_add(&mut self, phase: Phase, req: &DeviceRequest) -> Result<Added, QdevError> {
        let added = self.tree.device_add(phase, req).map_err(|e| match e {
            QdevError::Realize { source, .. }
                if source.downcast_ref::<FunctionZeroPresent>().is_some()
                    || source.downcast_ref::<AcpiIndexTaken>().is_some() =>
            {
                QdevError::MachineRefused(source.to_string())
            }
            e => e,
        })?;
        if added.driver == "virtio-serial-pci" {
            let devfn = self
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .map(|a| a.devfn());
            let bus = BusSpec::new(
                Console::port_bus_name(req.id.as_deref(), devfn.map(usize::from)),
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

    fn done(&mut self, cfg: &MachineConfig) -> Result<(), BoardError> {
        let m = pc_config(cfg)?;
        let mut pc = self.lock();
        pc.set_boot(m.kernel, m.initrd, m.append, m.no_reboot)?;
        if cfg.serial != self.serial {
            crate::microvm_board::late_chardev(&m.serial)?;
            pc.set_serial(m.serial)?;
        }
        pc.finish_init()?;
        pc.pause();
        pc.start()?;
        drop(pc);
        self.serial = cfg.serial.clone();
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
        self.tree.reset();
        Ok(())
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        crate::core::cpus(&*self.lock())
    }

    fn cpu_registers(&self, index: u32) -> Option<crate::board::CpuRegisters> {
        crate::core::cpu_registers(&*self.lock(), index)
    }

    fn pci(&self) -> Vec<PciBusInfo> {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        pci_info(self.lock().pci_bus(), &ids)
    }

    fn take_events(&mut self) -> Option<Receiver<BoardEvent>> {
        self.events.take()
    }

    /// Every function of each ejected slot leaves the tree, the last created first (QEMU
    /// walks the bus's children, newest first).
    fn guest_ejected(&mut self) {
        let slots = self.hotplug.take_ejected();
        let mut keys: Vec<(PciAddress, DeviceKey)> = lock(&self.addresses)
            .iter()
            .filter(|(_, a)| slots & (1 << a.slot()) != 0)
            .map(|(k, a)| (*a, *k))
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.1));
        for (a, key) in keys {
            if let Err(e) = self.tree.guest_answer(GuestAnswer::Ejected(key)) {
                log::warn!("completing the eject of {a}: {}", e.qmp_desc());
            }
        }
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
        let pci = self.pci_sections()?;
        self.lock()
            .save_stream(out, running, &pci, true)?
            .ok_or_else(|| BoardError::Invalid("the RAM section was not written".into()))
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
        let pci = self.pci_sections()?;
        self.lock().save_stream(out, running, &pci, false)?;
        Ok(())
    }

    fn restore_state(&mut self, snap: &keel_snapshot::Snapshot) -> Result<bool, BoardError> {
        self.restore_stream(snap, false)
    }
}

impl PcBoard {
    /// Every PCI function's section, each quiesced first; a function that cannot be saved
    /// is named by its address and qdev id.
    fn pci_sections(&self) -> Result<Vec<crate::snapshot::ExtraSection>, BoardError> {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let name = |a: PciAddress| match ids.get(&a.devfn()) {
            Some(id) => format!("id '{id}'"),
            None => "no id".to_string(),
        };
        let pc = self.lock();
        let r = pc.pci_sections(&name);
        drop(pc);
        r.map_err(BoardError::Invalid)
    }

    /// Restores `snap` (its RAM too with `ram`), every section checked first.
    fn restore_stream(
        &mut self,
        snap: &keel_snapshot::Snapshot,
        ram: bool,
    ) -> Result<bool, BoardError> {
        let mut pc = self.lock();
        pc.pause();
        let r = pc.check_snapshot(snap)?;
        let running = r.running();
        pc.apply_stream(snap, r, ram)?;
        Ok(running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::BlockBackend;

    fn board(backends: Arc<Backends>) -> PcBoard {
        let cfg = MachineConfig {
            type_name: "pc".into(),
            memory: Some(64 << 20),
            serial: vec!["null".into()],
            ..MachineConfig::default()
        };
        let (tx, rx) = channel();
        let sink: Arc<dyn MachineEvents> = Arc::new(Forward {
            tx,
            guest_exit: crate::board::GuestExitPolicy::Shutdown,
        });
        let pc = Pc::new(pc_config(&cfg).unwrap(), &keel_tcg::TcgAccel::new(), sink).unwrap();
        let ctx = BoardContext {
            backends,
            ..BoardContext::default()
        };
        PcBoard::new(pc, &ctx, rx).unwrap()
    }

    /// Config mechanism #1 through the board's own port bus.
    fn cfg_read32(b: &PcBoard, slot: u8, function: u8, reg: u8) -> u32 {
        let buses = b.lock().buses().clone();
        let addr =
            0x8000_0000u32 | (u32::from(slot) << 11) | (u32::from(function) << 8) | u32::from(reg);
        buses.pio_write(keel_accel::PioAddress(0xcf8), &addr.to_le_bytes());
        let mut d = [0u8; 4];
        buses.pio_read(keel_accel::PioAddress(0xcfc), &mut d);
        u32::from_le_bytes(d)
    }

    /// What Linux's scan finds through 0xCF8/0xCFC on the real board: the i440FX, the
    /// PIIX3 (multifunction) and PIIX4 PM functions, then the cold-plugged virtio-pci
    /// functions with their BARs placed in the 32-bit window, decoding enabled, and the
    /// interrupt line the `_PRT` names; the qdev tree and `query-pci` agree.
    #[test]
    fn enumeration_through_the_config_ports() {
        let backends = Arc::new(Backends::new());
        let img = std::env::temp_dir().join(format!("keel-pc-enum-{}", std::process::id()));
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        backends
            .add_block(
                "d0",
                BlockBackend {
                    filename: img.clone(),
                    read_only: true,
                },
            )
            .unwrap();
        let mut b = board(backends);
        for dev in [
            "virtio-blk-pci,drive=d0,id=disk0",
            "virtio-rng-pci,id=rng0,addr=4.0,multifunction=on",
            "virtio-rng-pci,id=rng1,addr=04.1",
        ] {
            b.device_add(Phase::MachineInit, &DeviceRequest::parse_cli(dev).unwrap())
                .unwrap();
        }
        // A taken address, and an unknown drive, are refused and leave nothing behind.
        for dev in ["virtio-rng-pci,addr=04.1", "virtio-blk-pci,drive=nope,id=x"] {
            assert!(
                b.device_add(Phase::MachineInit, &DeviceRequest::parse_cli(dev).unwrap())
                    .is_err()
            );
        }
        assert!(b.devices().find("x").is_none());

        assert_eq!(cfg_read32(&b, 0, 0, 0), 0x1237_8086);
        assert_eq!(cfg_read32(&b, 1, 0, 0), 0x7000_8086);
        assert_eq!(
            cfg_read32(&b, 1, 0, 0x0c) >> 16 & 0x80,
            0x80,
            "PIIX3 multifunction"
        );
        assert_eq!(cfg_read32(&b, 1, 3, 0), 0x7113_8086);
        assert_eq!(cfg_read32(&b, 1, 3, 0x40), 0xb001, "PMBA");
        assert_eq!(cfg_read32(&b, 1, 1, 0), 0xffff_ffff, "no IDE function");
        assert_eq!(cfg_read32(&b, 2, 0, 0), 0x1001_1af4);
        assert_eq!(cfg_read32(&b, 3, 0, 0), 0xffff_ffff);
        assert_eq!(cfg_read32(&b, 4, 0, 0), 0x1005_1af4);
        assert_eq!(cfg_read32(&b, 4, 1, 0), 0x1005_1af4);
        // Memory decoding on, INTA routed to GSI 10 (slot 2) and 11 (slot 4).
        assert_eq!(cfg_read32(&b, 2, 0, 4) & 2, 2);
        assert_eq!(cfg_read32(&b, 2, 0, 0x3c) & 0xffff, 0x010a);
        assert_eq!(cfg_read32(&b, 4, 0, 0x3c) & 0xffff, 0x010b);
        // BAR1 (MSI-X, 32-bit) and BAR4 (64-bit prefetchable) placed from 0xe0000000.
        let bar1 = cfg_read32(&b, 2, 0, 0x14);
        let bar4 = cfg_read32(&b, 2, 0, 0x20);
        assert!(bar1 >= 0xe000_0000 && bar1 & 0xf == 0, "{bar1:#x}");
        assert_eq!(bar4 & 0xf, 0xc, "64-bit prefetchable");
        // The BAR decodes: the common configuration's num_queues (offset 0x12) reads 1.
        let base = u64::from(bar4 & !0xf) | u64::from(cfg_read32(&b, 2, 0, 0x24)) << 32;
        let mut q = [0u8; 2];
        b.lock().buses().mmio.read(base + 0x12, &mut q);
        assert_eq!(u16::from_le_bytes(q), 1);

        let info = b.pci();
        let devs = &info[0].devices;
        let at: Vec<(u8, u8, &str)> = devs
            .iter()
            .map(|d| (d.slot, d.function, d.qdev_id.as_str()))
            .collect();
        assert_eq!(
            at,
            [
                (0, 0, ""),
                (1, 0, ""),
                (1, 3, ""),
                (2, 0, "disk0"),
                (4, 0, "rng0"),
                (4, 1, "rng1")
            ]
        );
        assert_eq!(devs[3].irq, Some(10));
        let text = info_pci(&info);
        assert!(
            text.contains(
                "  Bus  0, device   2, function 0:\r\n    SCSI controller: PCI device \
                 1af4:1001\r\n      PCI subsystem 1af4:0002\r\n      IRQ 10, pin A\r\n"
            ),
            "{text}"
        );
        assert!(text.contains("Class 0255: PCI device 1af4:1005"), "{text}");
        // Transitional: the legacy I/O BAR0 (128 bytes for blk, placed from 0xc000), the
        // MSI-X BAR1 and the modern BAR4.
        assert_eq!(devs[3].regions.len(), 3);
        assert!(
            text.contains("      BAR0: I/O at 0xc000 [0xc07f].\r\n"),
            "{text}"
        );
        assert_eq!(cfg_read32(&b, 2, 0, 0x10), 0xc001);
        let tree = b.devices().query_tree();
        let pci = tree.iter().find(|n| n.name == "pci.0").unwrap();
        let drivers: Vec<&str> = pci.devices.iter().map(|d| d.driver.as_str()).collect();
        assert!(drivers.contains(&"PIIX3") && drivers.contains(&"virtio-blk-pci"));

        // Unplug in machine-init frees the address and the BARs.
        b.devices_mut()
            .device_del(Phase::MachineInit, "disk0")
            .unwrap();
        assert_eq!(cfg_read32(&b, 2, 0, 0), 0xffff_ffff);
        std::fs::remove_file(&img).ok();
    }
}
