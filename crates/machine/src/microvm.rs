//! The `microvm` x86-64 machine (QEMU's name and properties).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_accel::{
    AccelError, Accelerator, BusDevice, BusError, GuestMemory, IoBuses, IrqChip,
    MachineRequirements, SystemEvents, Vm,
};
use keel_devices::{
    ACPI_PM_LEN, AcpiGed, AcpiPm, CmosMemoryLayout, DebugExit, DebugExitConfig, DebugExitError,
    GED_MMIO_LEN, I8042, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042Port, Rtc, Serial, SerialError,
    SerialOutput,
};
use vm_memory::GuestAddress;

use crate::acpi::{self, AcpiConfig, AcpiError, VirtioMmioDevice};
use crate::boot::{self, BootConfig, BootError, BootState, KernelImage};
use crate::config::{MicrovmConfig, SerialBackend};
use crate::core::{CoreSpec, MachineCore};
use crate::layout::{self, ACPI_PM_BASE, GED_MMIO_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::runner::{CpuInfo, MachineEvents};
use keel_phase::Phase;

pub(crate) mod snapshot;

/// The machine type name.
pub const MACHINE_NAME: &str = "microvm";

/// The built-in demo guest (src/demo/demo.S), a PVH ELF assembled at build time with GNU
/// `as`/`ld` (the `demo-guest` feature, on by default; embedders that always pass a kernel
/// can turn it off and need no binutils).
#[cfg(feature = "demo-guest")]
pub static DEMO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// Smallest guest RAM accepted: room for the boot area and a small kernel at 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs (APIC ids are 8-bit in the MADT entries written here).
pub const MAX_CPUS: u32 = 255;
/// virtio-mmio slots: GSIs 16-23 of the IOAPIC, as QEMU's microvm without `ioapic2`.
pub const VIRTIO_MMIO_SLOTS: u32 = 8;
const VIRTIO_MMIO_FIRST_GSI: u32 = 16;
/// ISA IRQs for virtio-mmio devices when the backend has only the 8259 pair (no IOAPIC):
/// the lines no microvm device uses (0 timer, 1 i8042, 2 cascade, 4 COM1, 8 RTC, 9 GED or SCI and 13
/// FPU are taken; 7 and 15 carry the PICs' spurious interrupts).
const VIRTIO_PIC_IRQS: [u32; 7] = [5, 6, 10, 11, 12, 14, 3];

/// Errors creating or running the machine; each names what to change. Wrapped errors of other
/// layers (accelerator, boot, ACPI, devices) display as themselves.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MachineError {
    /// COM1's presence was fixed when the machine was built.
    #[error(
        "whether COM1 exists is decided when the machine is built: give -serial before the first -device"
    )]
    SerialFixed,
    /// No `-kernel` was given and this build has no built-in demo guest.
    #[error("no kernel to boot: give -kernel (this build has no built-in demo guest)")]
    NoKernel,
    /// `-m` out of range.
    #[error("memory size {0:#x} is out of range: microvm and pc need 2 MiB to 1 TiB")]
    MemorySize(u64),
    /// `-smp` out of range.
    #[error("{0} CPUs requested: microvm and pc support 1 to 255")]
    Cpus(u32),
    /// `-cpu` names no model this machine presents, or the backend refused it.
    #[error(transparent)]
    Cpu(#[from] crate::cpu_model::ApplyError),
    /// The accelerator refused or failed.
    #[error(transparent)]
    Accel(AccelError),
    /// Guest RAM could not be allocated.
    #[error("cannot allocate {0:#x} bytes of guest RAM")]
    Ram(u64, #[source] vm_memory::mmap::FromRangesError),
    /// A device range collides with another.
    #[error("cannot map {0}")]
    Bus(String, #[source] BusError),
    /// The serial backend failed.
    #[error(transparent)]
    Serial(SerialError),
    /// The isa-debug-exit properties are invalid.
    #[error(transparent)]
    DebugExit(DebugExitError),
    /// Operation not valid in the machine's current phase.
    #[error("{op} is not possible {when}")]
    Phase {
        /// What was attempted.
        op: &'static str,
        /// Why not now.
        when: &'static str,
    },
    /// A device was added after machine-done on a bus without hot plug (QEMU's message).
    #[error("Bus '{0}' does not support hotplugging")]
    NotHotpluggable(&'static str),
    /// No virtio-mmio slot left.
    #[error("no virtio-mmio slot left: this machine has {0} (one per free interrupt line)")]
    NoVirtioSlot(u32),
    /// Building ACPI tables failed.
    #[error(transparent)]
    Acpi(AcpiError),
    /// The PCI bus refused (an address taken, no room for a BAR, ...).
    #[error("{0}")]
    Pci(String),
    /// Loading the kernel or preparing the boot state failed.
    #[error(transparent)]
    Boot(BootError),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// Where an onboard or added device sits, for device-tree introspection (qdev, `info qtree`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// QEMU's type name (`isa-serial`, `i8042`, `mc146818rtc`, `acpi-ged`, `isa-debug-exit`,
    /// `virtio-mmio`).
    pub type_name: &'static str,
    /// Port ranges (base, length).
    pub pio: Vec<(u16, u32)>,
    /// MMIO ranges (base, length).
    pub mmio: Vec<(u64, u64)>,
    /// GSI it raises, if any.
    pub gsi: Option<u32>,
    /// Created by the machine (onboard) rather than added by the user.
    pub onboard: bool,
}

/// A device added with [`Microvm::add_debug_exit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedDevice {
    /// Driver name.
    pub driver: &'static str,
    /// Port range it occupies (base, length).
    pub pio: (u16, u32),
}

/// Where the model is past machine-ready: the lifecycle itself is `keel_phase`'s
/// (machine-init until [`Microvm::finish_init`], then machine-ready); this only says
/// whether the vCPU threads were started, and whether they were stopped for good.
/// Which optional onboard devices exist, after resolving `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// MC146818 RTC.
    pub rtc: bool,
    /// i8254 PIT.
    pub pit: bool,
    /// i8259 pair.
    pub pic: bool,
    /// ACPI tables and GED.
    pub acpi: bool,
    /// COM1.
    pub isa_serial: bool,
    /// i8042 keyboard controller.
    pub i8042: bool,
    /// Whether the backend has an IOAPIC (known once the VM exists; `true` before).
    pub ioapic: bool,
}

impl Resolved {
    /// Resolves `auto` as QEMU's microvm does: RTC off under kvm (on otherwise), the rest on.
    pub fn new(cfg: &MicrovmConfig, accel: &str) -> Self {
        Self {
            rtc: cfg.rtc.resolve(accel != "kvm"),
            pit: cfg.pit.resolve(true),
            pic: cfg.pic.resolve(true),
            acpi: cfg.acpi.resolve(true),
            isa_serial: cfg.isa_serial.resolve(true) && !matches!(cfg.serial, SerialBackend::None),
            i8042: cfg.i8042.resolve(true),
            ioapic: true,
        }
    }
}

/// What microvm needs from an accelerator (checked before anything is created).
pub fn requirements(cfg: &MicrovmConfig) -> MachineRequirements {
    MachineRequirements {
        machine: MACHINE_NAME.to_string(),
        vcpus: cfg.cpus,
        memory: cfg.memory,
        // microvm always has an IOAPIC (QEMU's too); `pic=off` only drops the MADT flag.
        irqchip: IrqChip::PicIoapic,
        pit: cfg.pit.resolve(true),
    }
}

/// A microvm: RAM, buses, onboard devices, vCPUs and their threads.
///
/// Lifecycle: [`Microvm::new`] (machine-init: RAM, onboard devices, vCPUs) →
/// [`Microvm::add_debug_exit`]* (cold plug) → [`Microvm::finish_init`] (machine-done: ACPI tables
/// and the boot state from the devices added so far) → [`Microvm::start`] →
/// [`Microvm::pause`]/[`Microvm::resume`]/[`Microvm::reset`] → [`Microvm::shutdown`].
pub struct Microvm {
    cfg: MicrovmConfig,
    resolved: Resolved,
    accel_name: &'static str,
    core: MachineCore,
    serial: Option<Arc<Serial>>,
    i8042: Option<Arc<I8042>>,
    rtc: Option<Arc<Rtc>>,
    ged: Option<Arc<AcpiGed>>,
    pm: Option<Arc<AcpiPm>>,
    devices: Vec<AddedDevice>,
    virtio_mmio: Vec<VirtioMmioDevice>,
    firmware_virtio: Vec<VirtioMmioDevice>,
    boot: Option<BootState>,
    phase: Phase,
}

impl std::fmt::Debug for Microvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Microvm")
            .field("accel", &self.accel_name)
            .field("resolved", &self.resolved)
            .field("phase", &self.phase)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

/// Where COM1's bytes go for `backend`.
pub(crate) fn serial_output(backend: &SerialBackend) -> Result<SerialOutput, MachineError> {
    Ok(match backend {
        SerialBackend::Stdio | SerialBackend::Stdout | SerialBackend::MuxStdio => {
            SerialOutput::Stdout
        }
        SerialBackend::File(p) => {
            SerialOutput::file(&p.to_string_lossy()).map_err(MachineError::Serial)?
        }
        SerialBackend::Null | SerialBackend::None | SerialBackend::Chardev(_) => SerialOutput::Null,
        SerialBackend::Capture(c) => SerialOutput::Capture(c.clone()),
        SerialBackend::Writer(w) => SerialOutput::Writer(w.clone()),
    })
}

fn map(
    bus: &keel_accel::Bus,
    what: &str,
    base: u64,
    len: u64,
    dev: Arc<dyn BusDevice>,
) -> Result<(), MachineError> {
    bus.insert(base, len, dev)
        .map_err(|e| MachineError::Bus(what.to_string(), e))
}

impl Microvm {
    /// Machine-init: checks `cfg` against `accel`, allocates RAM, creates the VM, the onboard
    /// devices (COM1 at 0x3f8/IRQ 4, i8042 at 0x60/0x64 unless `i8042=off`, the RTC at 0x70
    /// with IRQ 8 when `rtc` resolves on, the ACPI GED at 0xfea00000 with IRQ 9 when `acpi`
    /// does (without an IOAPIC: also the ACPI PM block at port 0x600 with the SCI on IRQ 9,
    /// the GED then keeping only its reset register), and the backend's platform devices) and the vCPUs. System events and vCPU errors
    /// are delivered to `events`.
    pub fn new(
        cfg: MicrovmConfig,
        accel: &dyn Accelerator,
        events: Arc<dyn MachineEvents>,
    ) -> Result<Self, MachineError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&cfg.memory) {
            return Err(MachineError::MemorySize(cfg.memory));
        }
        if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
            return Err(MachineError::Cpus(cfg.cpus));
        }
        let mut cfg = cfg;
        // Whole pages only.
        cfg.memory &= !0xfff;
        let req = requirements(&cfg);
        accel.check(&req).map_err(MachineError::Accel)?;
        let resolved = Resolved::new(&cfg, accel.name());

        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.memory)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let spec = CoreSpec {
            ranges: &ranges,
            memory: cfg.memory,
            cpus: cfg.cpus,
            no_reboot: cfg.no_reboot,
            dump_guest_core: cfg.dump_guest_core.resolve(true),
            cpu: &cfg.cpu,
        };
        let mut core = MachineCore::new(spec, &req, accel, events)?;
        let vm = core.vm().clone();
        let buses = core.buses().clone();
        let sys = core.system_events();

        // GSIs above 15 exist only behind an IOAPIC: a backend that can wire GSI 16 has one
        // (KVM's in-kernel irqchip, the interpreter with local APICs), one that cannot (the
        // interpreter's 8259 pair alone, its one-vCPU default) does not, and the MADT must
        // then not advertise one.
        let mut resolved = resolved;
        resolved.ioapic = vm.irq_line(VIRTIO_MMIO_FIRST_GSI).is_ok();
        // The interpreter has an IOAPIC only with local APICs, i.e. with more than one vCPU
        // (keel_tcg::ApicMode::Auto); its platform then differs from KVM's in two ways.
        let tcg_smp = accel.name() == "tcg" && cfg.cpus > 1;
        // Without ACPI nothing tells the guest about that IOAPIC (there is no MP table
        // either), so the devices stay on 8259 IRQs.
        if !resolved.acpi && tcg_smp {
            resolved.ioapic = false;
        }

        let serial = if resolved.isa_serial {
            let output = serial_output(&cfg.serial)?;
            let irq = vm.irq_line(4).map_err(MachineError::Accel)?;
            let s = Arc::new(Serial::new(irq, output));
            map(&buses.pio, "COM1", 0x3f8, Serial::LEN, s.clone())?;
            Some(s)
        } else {
            None
        };

        let i8042 = if resolved.i8042 {
            let kbd_irq = vm.irq_line(1).map_err(MachineError::Accel)?;
            let i8042 = Arc::new(I8042::new(sys.clone(), Some(kbd_irq)));
            map(
                &buses.pio,
                "i8042 data port",
                u64::from(I8042_DATA_PORT),
                1,
                Arc::new(I8042Port::data(i8042.clone())),
            )?;
            map(
                &buses.pio,
                "i8042 command port",
                u64::from(I8042_COMMAND_PORT),
                1,
                Arc::new(I8042Port::command(i8042.clone())),
            )?;
            Some(i8042)
        } else {
            None
        };

        let rtc = if resolved.rtc {
            let irq = vm.irq_line(8).map_err(MachineError::Accel)?;
            let rtc = Arc::new(Rtc::with_irq(irq));
            let (below, above) = layout::split_ram(cfg.memory);
            rtc.set_memory_layout(CmosMemoryLayout {
                below_4g: below,
                above_4g: above,
            });
            map(&buses.pio, "RTC", 0x70, Rtc::LEN, rtc.clone())?;
            Some(rtc)
        } else {
            None
        };

        // Without an IOAPIC the FADT is a full one (see crate::acpi) and the PM register block
        // carries the SCI, power button and power-off; the GED then only provides the reset
        // register and raises no interrupt. The interpreter keeps that platform with its
        // IOAPIC too (-smp > 1): it has no paravirtual clock, so Linux needs the PM timer as
        // the reference for TSC calibration and the PIT as its early timer, which a
        // hardware-reduced FADT takes away.
        let pm_block = !resolved.ioapic || tcg_smp;
        let pm = if resolved.acpi && pm_block {
            let sci = vm
                .irq_line(u32::from(acpi::SCI_IRQ))
                .map_err(MachineError::Accel)?;
            let pm = Arc::new(AcpiPm::new(sys.clone(), Some(sci)));
            map(
                &buses.pio,
                "ACPI PM registers",
                u64::from(ACPI_PM_BASE),
                ACPI_PM_LEN,
                pm.clone(),
            )?;
            Some(pm)
        } else {
            None
        };

        let ged = if resolved.acpi {
            let irq = if pm.is_some() {
                None
            } else {
                Some(vm.irq_line(acpi::GED_GSI).map_err(MachineError::Accel)?)
            };
            let ged = Arc::new(AcpiGed::new(sys.clone(), irq));
            map(
                &buses.mmio,
                "ACPI GED",
                GED_MMIO_BASE,
                GED_MMIO_LEN,
                ged.clone(),
            )?;
            Some(ged)
        } else {
            None
        };

        core.create_vcpus(cfg.cpus)?;

        Ok(Self {
            cfg,
            resolved,
            accel_name: accel.name(),
            core,
            serial,
            i8042,
            rtc,
            ged,
            pm,
            devices: Vec::new(),
            virtio_mmio: Vec::new(),
            firmware_virtio: Vec::new(),
            boot: None,
            phase: Phase::MachineInit,
        })
    }

    /// Replaces what is read at machine-done (kernel, initrd, command line) and what a guest
    /// reset does, after [`Microvm::new`]: these are not part of the machine's shape, so a
    /// VMM may take them until the machine is finished. Only before [`Microvm::finish_init`].
    pub fn set_boot(
        &mut self,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        append: String,
        no_reboot: bool,
    ) -> Result<(), MachineError> {
        if self.phase != Phase::MachineInit {
            return Err(MachineError::Phase {
                op: "set_boot",
                when: "after finish_init",
            });
        }
        self.cfg.kernel = kernel;
        self.cfg.initrd = initrd;
        self.cfg.append = append;
        self.cfg.no_reboot = no_reboot;
        self.core
            .hub()
            .no_reboot
            .store(no_reboot, Ordering::Relaxed);
        Ok(())
    }

    /// Connects COM1 to another backend before the machine starts. Whether COM1 exists was
    /// decided when the machine was built (`-serial none` has none), so that cannot change
    /// here: the error says to give `-serial` earlier.
    pub fn set_serial(&mut self, backend: SerialBackend) -> Result<(), MachineError> {
        if self.phase != Phase::MachineInit {
            return Err(MachineError::Phase {
                op: "set_serial",
                when: "after finish_init",
            });
        }
        let would = self.cfg.isa_serial.resolve(true) && !matches!(backend, SerialBackend::None);
        if would != self.resolved.isa_serial {
            return Err(MachineError::SerialFixed);
        }
        if let Some(s) = &self.serial {
            s.set_output(serial_output(&backend)?);
        }
        self.cfg.serial = backend;
        Ok(())
    }

    /// Cold-plugs an `isa-debug-exit` (its one definition, properties and limits, is
    /// `keel_devices::DebugExitConfig`). Only before [`Microvm::finish_init`]: the ISA bus
    /// has no hot plug.
    pub fn add_debug_exit(&mut self, cfg: DebugExitConfig) -> Result<(), MachineError> {
        if self.phase != Phase::MachineInit {
            return Err(MachineError::NotHotpluggable("isa.0"));
        }
        let sys = self.core.system_events();
        let dev = DebugExit::from_config(cfg, sys);
        map(
            &self.core.buses().pio,
            DebugExit::QDEV_TYPE,
            u64::from(cfg.iobase),
            u64::from(cfg.iosize),
            Arc::new(dev),
        )?;
        self.devices.push(AddedDevice {
            driver: DebugExit::QDEV_TYPE,
            pio: (cfg.iobase, cfg.iosize),
        });
        Ok(())
    }

    /// Removes the device added at I/O port `iobase` (unplug while the machine is being
    /// built); `false` if there is none.
    pub fn remove_device_at(&mut self, iobase: u16) -> bool {
        let Some(i) = self.devices.iter().position(|d| d.pio.0 == iobase) else {
            return false;
        };
        self.devices.remove(i);
        if let Err(e) = self.core.buses().pio.remove(u64::from(iobase)) {
            log::warn!("unmapping the device at port {iobase:#x}: {e}");
        }
        true
    }

    /// Maps a virtio-mmio transport in the next free slot (window `0xfeb00000 + 0x200*i`,
    /// GSI `16 + i` as QEMU's microvm; with a backend that has no IOAPIC, one of the free ISA
    /// IRQs 5, 6, 10, 11, 12, 14, 3) and returns where it went; the DSDT lists it as an
    /// `LNRO0005` node. Only before [`Microvm::finish_init`]: microvm's virtio-mmio buses have
    /// no hot-plug, so later calls fail with QEMU's "Bus 'virtio-mmio-bus.N' does not support
    /// hotplugging".
    pub fn add_virtio_mmio(
        &mut self,
        dev: Arc<dyn BusDevice>,
    ) -> Result<VirtioMmioDevice, MachineError> {
        let i = self.virtio_mmio.len() as u32;
        if self.phase != Phase::MachineInit {
            const BUSES: [&str; VIRTIO_MMIO_SLOTS as usize] = [
                "virtio-mmio-bus.0",
                "virtio-mmio-bus.1",
                "virtio-mmio-bus.2",
                "virtio-mmio-bus.3",
                "virtio-mmio-bus.4",
                "virtio-mmio-bus.5",
                "virtio-mmio-bus.6",
                "virtio-mmio-bus.7",
            ];
            let bus = BUSES
                .get(i as usize)
                .copied()
                .unwrap_or("virtio-mmio-bus.0");
            return Err(MachineError::NotHotpluggable(bus));
        }
        let gsi = if self.resolved.ioapic {
            (i < VIRTIO_MMIO_SLOTS).then_some(VIRTIO_MMIO_FIRST_GSI + i)
        } else {
            VIRTIO_PIC_IRQS.get(i as usize).copied()
        };
        let Some(gsi) = gsi else {
            let slots = if self.resolved.ioapic {
                VIRTIO_MMIO_SLOTS
            } else {
                VIRTIO_PIC_IRQS.len() as u32
            };
            return Err(MachineError::NoVirtioSlot(slots));
        };
        let d = VirtioMmioDevice {
            base: VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SIZE,
            size: VIRTIO_MMIO_SIZE,
            gsi,
        };
        map(&self.core.buses().mmio, "virtio-mmio", d.base, d.size, dev)?;
        self.virtio_mmio.push(d);
        Ok(d)
    }

    fn acpi_config(&self) -> AcpiConfig {
        AcpiConfig {
            cpus: self.cfg.cpus,
            ioapic: self.resolved.ioapic,
            pic: self.resolved.pic,
            rtc: self.resolved.rtc,
            i8042: self.resolved.i8042,
            serial: self.serial.is_some(),
            virtio_mmio: self.firmware_virtio.clone(),
            pm_base: self.pm.is_some().then_some(ACPI_PM_BASE),
        }
    }

    /// Writes tables and images and computes the boot state (used by finish_init and reset).
    fn load(&mut self) -> Result<(), MachineError> {
        let rsdp = if self.resolved.acpi {
            let tables = acpi::build(&self.acpi_config()).map_err(MachineError::Acpi)?;
            for (addr, blob) in &tables.blobs {
                vm_memory::Bytes::write_slice(&**self.core.memory(), blob, GuestAddress(*addr))
                    .map_err(|source| {
                        MachineError::Boot(BootError::Memory {
                            what: "ACPI tables",
                            source,
                        })
                    })?;
            }
            Some(tables.rsdp_addr)
        } else {
            None
        };
        let kernel = match &self.cfg.kernel {
            Some(p) => KernelImage::File(p.clone()),
            #[cfg(feature = "demo-guest")]
            None => KernelImage::Bytes("built-in demo guest", DEMO_GUEST),
            #[cfg(not(feature = "demo-guest"))]
            None => return Err(MachineError::NoKernel),
        };
        let e820 = layout::e820_map(self.cfg.memory);
        let initrd: Option<PathBuf> = self.cfg.initrd.clone();
        let cmdline = self.kernel_cmdline();
        let state = boot::prepare(
            self.core.memory(),
            &BootConfig {
                kernel: &kernel,
                initrd: initrd.as_deref(),
                cmdline: &cmdline,
                e820: &e820,
                low_ram_end: layout::split_ram(self.cfg.memory).0,
                rsdp,
            },
        )
        .map_err(MachineError::Boot)?;
        self.core.shared().set_boot_state(0, Some(state));
        self.boot = Some(state);
        Ok(())
    }

    /// `-append` plus, with ACPI off, a `-kernel` and `auto-kernel-cmdline` on (QEMU's
    /// rule), one `virtio_mmio.device=512@0xBASE:GSI` per cold-plugged virtio-mmio device.
    fn kernel_cmdline(&self) -> String {
        let mut cmdline = self.cfg.append.clone();
        if !self.resolved.acpi
            && self.cfg.kernel.is_some()
            && self.cfg.auto_kernel_cmdline.resolve(true)
        {
            for d in &self.firmware_virtio {
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&format!(
                    "virtio_mmio.device={}@{:#x}:{}",
                    d.size, d.base, d.gsi
                ));
            }
        }
        cmdline
    }

    /// Machine-done: gathers the firmware-visible device list (every virtio-mmio window added
    /// so far), writes the ACPI tables, loads the kernel (or the demo guest), initrd and
    /// command line, and prepares the bootstrap processor's entry state. Runs once.
    pub fn finish_init(&mut self) -> Result<(), MachineError> {
        self.finish_init_with(|_| true)
    }

    /// [`Microvm::finish_init`] for a machine whose virtio-mmio windows are mapped eagerly
    /// (QEMU's microvm creates all its transports): the machine-init-done step lists only the
    /// windows for which `cold_plugged` is true (those holding a device at this point) in the
    /// DSDT, and in the kernel command line with `acpi=off` and `auto-kernel-cmdline=on`.
    /// Empty windows stay mapped (they read as device ID 0) but the guest is not told of them.
    pub fn finish_init_with(
        &mut self,
        cold_plugged: impl Fn(&VirtioMmioDevice) -> bool,
    ) -> Result<(), MachineError> {
        if self.phase != Phase::MachineInit {
            return Err(MachineError::Phase {
                op: "finish_init",
                when: "twice",
            });
        }
        self.firmware_virtio = self
            .virtio_mmio
            .iter()
            .filter(|d| cold_plugged(d))
            .copied()
            .collect();
        self.load()?;
        self.phase = Phase::MachineReady;
        Ok(())
    }

    /// The virtio-mmio devices the guest is told of (DSDT nodes, or `virtio_mmio.device=`
    /// entries), fixed at machine-done; empty before.
    pub fn firmware_virtio(&self) -> &[VirtioMmioDevice] {
        &self.firmware_virtio
    }

    /// Starts the RTC's clock `secs` from the host's UTC time (`-rtc base=`), if the
    /// machine has an RTC.
    pub fn set_rtc_offset(&self, secs: i64) {
        if let Some(r) = &self.rtc {
            r.set_offset_secs(secs);
        }
    }

    /// Starts one thread per vCPU (running unless paused before) and, with `-serial stdio`,
    /// the thread that feeds standard input to COM1.
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.phase != Phase::MachineReady {
            return Err(MachineError::Phase {
                op: "start",
                when: "before finish_init",
            });
        }
        self.core.start(&self.cfg.serial, self.serial.as_ref())
    }

    /// Stops guest execution; returns once every vCPU is parked. Idempotent.
    pub fn pause(&self) {
        self.core.pause();
    }

    /// Lets the vCPUs run again after [`Microvm::pause`] (or before `start`, so that start
    /// runs the guest). A machine held by a system event stays held until [`Microvm::reset`].
    pub fn resume(&self) {
        self.core.resume();
    }

    /// Whether [`Microvm::start`] has run (the vCPU threads exist).
    pub fn started(&self) -> bool {
        self.core.started()
    }

    /// Whether [`Microvm::pause`] is in effect.
    pub fn is_paused(&self) -> bool {
        self.core.is_paused()
    }

    /// Machine reset (QEMU `system_reset`): parks the vCPUs, resets the backend's platform
    /// state (`Vm::reset`) and the onboard devices, rewrites the ACPI tables, reloads the
    /// kernel, initrd and command line, and continues: every vCPU is reset (`Vcpu::reset`)
    /// and the bootstrap processor gets its entry state again before it next runs. The machine
    /// stays paused if it was. On error it stays held (no guest code runs) and the caller
    /// should shut it down.
    pub fn reset(&mut self) -> Result<(), MachineError> {
        if self.phase == Phase::MachineInit {
            return Err(MachineError::Phase {
                op: "reset",
                when: "before finish_init",
            });
        }
        self.core.hold_for_reset();
        // On failure the machine stays held: a half-reset machine must not run.
        self.core.vm().reset().map_err(MachineError::Accel)?;
        if let Some(s) = &self.serial {
            s.reset();
        }
        if let Some(k) = &self.i8042 {
            k.reset();
        }
        if let Some(r) = &self.rtc {
            r.reset();
        }
        if let Some(g) = &self.ged {
            g.reset();
        }
        if let Some(p) = &self.pm {
            p.reset();
        }
        self.load()?;
        self.core.release_after_reset();
        Ok(())
    }

    /// Stops and joins every vCPU thread. The machine cannot run again afterwards.
    pub fn shutdown(&mut self) {
        self.core.shutdown();
    }

    /// Presses the ACPI power button (QMP `system_powerdown`): an ACPI-aware guest shuts down
    /// cleanly and powers off. With an IOAPIC this is the GED's power-button event; without
    /// one (full FADT) it sets PWRBTN_STS in the PM block, which raises the SCI (IRQ 9) once
    /// the guest enabled the fixed power-button event. Returns `false` (nothing happens) with `acpi=off`, as QEMU's
    /// microvm without ACPI ignores the request.
    pub fn power_button(&self) -> bool {
        if let Some(p) = &self.pm {
            // Full ACPI (no IOAPIC): the fixed power button, PWRBTN_STS and the SCI.
            p.press_power_button();
            return true;
        }
        match &self.ged {
            Some(g) => {
                g.press_power_button();
                true
            }
            None => false,
        }
    }

    /// The registers of vCPU `index`: read directly before the vCPU threads start, and
    /// afterwards as each thread left them when it parked; `None` while the vCPUs run.
    pub fn registers(&self, index: u32) -> Option<(keel_accel::Regs, keel_accel::SpecialRegs)> {
        self.core.registers(index)
    }

    /// vCPU indexes and host thread ids (`query-cpus-fast`).
    pub fn cpu_info(&self) -> Vec<CpuInfo> {
        self.core.cpu_info()
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.core.memory()
    }

    /// The PIO and MMIO buses.
    pub fn buses(&self) -> &Arc<IoBuses> {
        self.core.buses()
    }

    /// Where devices raise reset, power-off and exit requests for this machine.
    pub fn system_events(&self) -> Arc<dyn SystemEvents> {
        self.core.system_events()
    }

    /// Where this machine's disks report host I/O errors, and which of them to retry.
    pub(crate) fn disk_errors(&self) -> Arc<crate::disk_errors::DiskErrors> {
        self.core.disk_errors()
    }

    /// The backend VM (for backend-specific extras such as irqfds).
    pub fn vm(&self) -> &dyn Vm {
        &**self.core.vm()
    }

    /// COM1, if present (e.g. to feed input from something other than stdin).
    pub fn serial(&self) -> Option<&Arc<Serial>> {
        self.serial.as_ref()
    }

    /// The accelerator's name.
    pub fn accel_name(&self) -> &'static str {
        self.accel_name
    }

    /// The configuration (memory rounded to pages).
    pub fn config(&self) -> &MicrovmConfig {
        &self.cfg
    }

    /// Onboard devices after resolving `auto`.
    pub fn resolved(&self) -> Resolved {
        self.resolved
    }

    /// Every device on the machine's buses that the machine created or was given: onboard
    /// devices first (in creation order), then `add_debug_exit` devices, then virtio-mmio windows.
    /// Backend platform devices (PIC, PIT) are not listed; they belong to the accelerator.
    pub fn device_info(&self) -> Vec<DeviceInfo> {
        let mut v = Vec::new();
        let onboard = |type_name, pio: Vec<(u16, u32)>, mmio: Vec<(u64, u64)>, gsi| DeviceInfo {
            type_name,
            pio,
            mmio,
            gsi,
            onboard: true,
        };
        if self.serial.is_some() {
            v.push(onboard("isa-serial", vec![(0x3f8, 8)], vec![], Some(4)));
        }
        if self.i8042.is_some() {
            v.push(onboard(
                "i8042",
                vec![(0x60, 1), (0x64, 1)],
                vec![],
                Some(1),
            ));
        }
        if self.rtc.is_some() {
            v.push(onboard("mc146818rtc", vec![(0x70, 2)], vec![], Some(8)));
        }
        if self.ged.is_some() {
            v.push(onboard(
                "acpi-ged",
                vec![],
                vec![(GED_MMIO_BASE, GED_MMIO_LEN)],
                self.pm.is_none().then_some(acpi::GED_GSI),
            ));
        }
        if self.pm.is_some() {
            v.push(onboard(
                "acpi-pm",
                vec![(ACPI_PM_BASE, ACPI_PM_LEN as u32)],
                vec![],
                Some(u32::from(acpi::SCI_IRQ)),
            ));
        }
        for d in &self.devices {
            v.push(DeviceInfo {
                type_name: d.driver,
                pio: vec![d.pio],
                mmio: vec![],
                gsi: None,
                onboard: false,
            });
        }
        for d in &self.virtio_mmio {
            v.push(DeviceInfo {
                type_name: "virtio-mmio",
                pio: vec![],
                mmio: vec![(d.base, d.size)],
                gsi: Some(d.gsi),
                onboard: false,
            });
        }
        v
    }

    /// Devices added with [`Microvm::add_debug_exit`].
    pub fn devices(&self) -> &[AddedDevice] {
        &self.devices
    }

    /// The bootstrap processor's entry state, after [`Microvm::finish_init`].
    pub fn boot_state(&self) -> Option<BootState> {
        self.boot
    }
}

impl crate::core::CoreMachine for Microvm {
    fn core(&self) -> &MachineCore {
        &self.core
    }

    fn start(&mut self) -> Result<(), MachineError> {
        Microvm::start(self)
    }
}

impl Drop for Microvm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
