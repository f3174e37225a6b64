//! The `pc` x86-64 machine (a subset of QEMU's i440FX/PIIX `pc`): RAM laid out as QEMU's
//! `pc` lays it out, the legacy devices Linux expects, a PCI root bus with the i440FX host
//! bridge at 00.0 and the PIIX3 ISA bridge and PIIX4 power-management function at 01.0 and
//! 01.3, firmware-less BAR placement (Keel plays SeaBIOS) and ACPI tables with the PCI host
//! bridge's windows and interrupt routing.
//!
//! ```text
//! RAM         0 .. below_4g (up to 0xe0000000; from 3.5 GiB of RAM on, 0xc0000000 and
//!             the rest from 4 GiB: QEMU's `lowmem` rule with gigabyte alignment)
//! PCI hole    below_4g .. 0xfec00000 (32-bit window; BARs placed from 0xe0000000)
//! 0xfec00000  IOAPIC        0xfee00000  local APICs
//! 64-bit      from 4 GiB + RAM above 4 GiB rounded up to 1 GiB, 32 GiB (QEMU's pci-hole64)
//! ports       0x60/0x64 i8042, 0x70 RTC, 0x3f8 COM1, 0xcf8 config / 0xcf9 reset control,
//!             0xae00 PCI hot plug (0x18 bytes), 0xafe0 GPE0 (4 bytes),
//!             0xb000 PM1a event / control / PM timer,
//!             0x1000-0xadff and 0xc000-0xffff PCI I/O BARs (hot-added, cold-plugged)
//! ```
//!
//! Interrupts: the SCI is ISA IRQ 9, level-triggered, active high. PCI INTx is routed as
//! the PIIX routes it through PIRQ A-D (pin P of slot S on link `(S + P - 1) mod 4`, INTA
//! = 0), with the links fixed on the IRQs SeaBIOS gives them (10, 10, 11, 11); the DSDT's
//! `_PRT` names those GSIs directly, which Linux takes alike with the 8259 pair alone (the
//! interpreter with one vCPU) and with an IOAPIC. Message-signalled interrupts go to
//! [`keel_accel::Vm::signal_msi`].

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use keel_accel::{
    Accelerator, BusDevice, GuestMemory, IoBuses, IrqChip, IrqLine, MachineRequirements,
    SystemEvent, SystemEvents, Vm,
};
use keel_devices::{
    ACPI_PM_LEN, AcpiPm, CmosMemoryLayout, DebugExit, DebugExitConfig, I8042, I8042_COMMAND_PORT,
    I8042_DATA_PORT, I8042Port, Rtc, Serial,
};
use keel_pci::config::{command, regs, status};
use keel_pci::{
    AddressSpace, BarAllocator, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN, MsiMessage, MsiSink,
    PciAddress, PciBus, PciConfig, PciConfigIo, PciDevice, PciFunction, PciIds, SLOTS,
};
use vm_memory::GuestAddress;

use crate::boot::{self, BootConfig, BootError, BootState, KernelImage};
use crate::config::SerialBackend;
use crate::core::{CoreSpec, MachineCore};
use crate::layout::{self, E820Entry, E820Type};
use crate::pc_hotplug::{PCI_HOTPLUG_BASE, PCI_HOTPLUG_LEN, PciHotplug};
use crate::runner::{CpuInfo, MachineEvent, MachineEvents};
use crate::{AddedDevice, MachineError};

/// The machine type name.
pub const PC_MACHINE_NAME: &str = "pc";
/// QEMU's `lowmem` for `pc` with gigabyte alignment, used once RAM reaches 0xe0000000.
pub const PC_LOWMEM_LARGE: u64 = 0xc000_0000;
/// The most RAM below 4 GiB on `pc`.
pub const PC_LOWMEM: u64 = 0xe000_0000;
/// End of the 32-bit PCI window (the IOAPIC follows).
pub const PCI_HOLE_END: u64 = 0xfec0_0000;
/// Where firmware-less BAR placement starts in the 32-bit window.
pub const PCI_MEM32_ALLOC_BASE: u64 = 0xe000_0000;
/// Size of the 64-bit PCI window (QEMU's default `pci-hole64-size`).
pub const PCI_HOLE64_SIZE: u64 = 32 << 30;
/// First port of the PCI I/O BAR window.
pub const PCI_IO_BASE: u64 = 0xc000;
/// Length of the PCI I/O BAR window (to 0xffff).
pub const PCI_IO_LEN: u64 = 0x4000;
/// Start of the lower PCI I/O window, which reaches up to the hot plug registers (Linux
/// assigns hot-added I/O BARs there).
pub const PCI_HOTPLUG_IO_BASE: u64 = 0x1000;
/// PIIX4 PM I/O base (SeaBIOS's `PORT_ACPI_PM_BASE`): PM1a event, control, PM timer.
pub const PC_PM_BASE: u16 = 0xb000;
/// GPE0 block of the PIIX4 PM function (status bytes at +0, enable bytes at +2).
pub const PC_GPE0_BASE: u16 = 0xafe0;
/// Length of the GPE0 block.
pub const PC_GPE0_LEN: u8 = 4;
/// The reset control register (PIIX3 RCR).
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// The IRQs of PIIX links A-D (as SeaBIOS programs them).
pub const LINK_GSIS: [u32; 4] = [10, 10, 11, 11];
/// The SCI (ISA IRQ 9).
pub const PC_SCI_IRQ: u32 = 9;
/// Most vCPUs.
pub const PC_MAX_CPUS: u32 = 255;

/// The GSI that pin `pin` (1 = INTA .. 4 = INTD) of `slot` reaches through the PIIX links.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    let link = (usize::from(slot) + usize::from(pin.clamp(1, 4)) - 2) & 3;
    LINK_GSIS[link]
}

/// RAM below 4 GiB and above, for `mem` bytes (QEMU's `pc_piix` rule).
pub fn pc_split_ram(mem: u64) -> (u64, u64) {
    let lowmem = if mem >= PC_LOWMEM {
        PC_LOWMEM_LARGE
    } else {
        PC_LOWMEM
    };
    let below = mem.min(lowmem);
    (below, mem - below)
}

/// Where the PCI windows are for `mem` bytes of RAM: (32-bit window base, 64-bit window
/// base). The 32-bit window ends at [`PCI_HOLE_END`], the 64-bit one is [`PCI_HOLE64_SIZE`].
pub fn pci_windows(mem: u64) -> (u64, u64) {
    let (below, above) = pc_split_ram(mem);
    let gib = 1u64 << 30;
    let hi = (layout::FOUR_GIB + above).div_ceil(gib) * gib;
    (below, hi)
}

/// The memory map of a `pc` with `mem` bytes of RAM.
pub fn pc_e820(mem: u64) -> Vec<E820Entry> {
    let (low, high) = pc_split_ram(mem);
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: 0xa_0000 - layout::EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: layout::ACPI_START,
            size: layout::ACPI_END - layout::ACPI_START,
            kind: E820Type::Reserved,
        },
    ];
    if low > layout::HIMEM_START {
        v.push(E820Entry {
            addr: layout::HIMEM_START,
            size: low - layout::HIMEM_START,
            kind: E820Type::Ram,
        });
    }
    if high > 0 {
        v.push(E820Entry {
            addr: layout::FOUR_GIB,
            size: high,
            kind: E820Type::Ram,
        });
    }
    v
}

/// Everything a `pc` is built from.
#[derive(Debug, Clone)]
pub struct PcConfig {
    /// Guest RAM in bytes (`-m`).
    pub memory: u64,
    /// Number of vCPUs (`-smp`).
    pub cpus: u32,
    /// `-kernel`: PVH ELF, ELF vmlinux or bzImage (required: there is no firmware).
    pub kernel: Option<PathBuf>,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub append: String,
    /// Turn a guest reset into a shutdown (`-no-reboot`).
    pub no_reboot: bool,
    /// COM1's backend.
    pub serial: SerialBackend,
    /// `dump-guest-core=` (QEMU's machine property, default on): `off` leaves guest RAM
    /// out of the process's core dumps (`MADV_DONTDUMP`).
    pub dump_guest_core: crate::OnOffAuto,
    /// `-cpu`: the CPU model (see [`crate::cpu_model::present`]); `qemu64` by default, as
    /// QEMU's.
    pub cpu: String,
}

impl Default for PcConfig {
    /// QEMU's defaults: 128 MiB, one CPU, COM1 on stdio.
    fn default() -> Self {
        Self {
            memory: 128 << 20,
            cpus: 1,
            kernel: None,
            initrd: None,
            append: String::new(),
            no_reboot: false,
            serial: SerialBackend::Stdio,
            dump_guest_core: crate::OnOffAuto::Auto,
            cpu: crate::cpu_model::QEMU64.name.to_owned(),
        }
    }
}

/// What `pc` needs from an accelerator.
pub fn pc_requirements(cfg: &PcConfig) -> MachineRequirements {
    MachineRequirements {
        machine: PC_MACHINE_NAME.to_string(),
        vcpus: cfg.cpus,
        memory: cfg.memory,
        irqchip: IrqChip::PicIoapic,
        pit: true,
    }
}

/// An interrupt line shared by several sources (PCI INTx on one link, the SCI of the PM
/// block and the GPE block): asserted while any source asserts it.
pub(crate) struct SharedIrq {
    line: Arc<dyn IrqLine>,
    asserted: Mutex<BTreeSet<usize>>,
}

impl SharedIrq {
    pub(crate) fn new(line: Arc<dyn IrqLine>) -> Arc<Self> {
        Arc::new(Self {
            line,
            asserted: Mutex::new(BTreeSet::new()),
        })
    }

    /// The input of source `id` (distinct per source).
    pub(crate) fn source(self: &Arc<Self>, id: usize) -> Arc<dyn IrqLine> {
        Arc::new(IrqSource {
            share: self.clone(),
            id,
        })
    }
}

struct IrqSource {
    share: Arc<SharedIrq>,
    id: usize,
}

impl IrqLine for IrqSource {
    fn set_level(&self, high: bool) {
        let mut set = self
            .share
            .asserted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if high {
            set.insert(self.id);
        } else {
            set.remove(&self.id);
        }
        self.share.line.set_level(!set.is_empty());
    }
}

/// Source ids on the SCI line.
const SCI_SOURCE_PM: usize = 0x100;
const SCI_SOURCE_GPE: usize = 0x101;

/// The GPE0 block of the PIIX4 PM function: two status bytes (write 1 to clear) and two
/// enable bytes; the SCI is asserted while a status bit has its enable bit set (recomputed on
/// every status and enable write). ACPI PCI hot plug raises GPE 1.
pub struct Gpe0 {
    regs: Mutex<[u8; 4]>,
    sci: Arc<dyn IrqLine>,
}

impl std::fmt::Debug for Gpe0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpe0").finish_non_exhaustive()
    }
}

impl Gpe0 {
    pub(crate) fn new(sci: Arc<dyn IrqLine>) -> Self {
        Self {
            regs: Mutex::new([0; 4]),
            sci,
        }
    }

    fn update(&self, r: &[u8; 4]) {
        self.sci.set_level(r[0] & r[2] != 0 || r[1] & r[3] != 0);
    }

    /// Sets status bit `gpe` (0..16) and raises the SCI if it is enabled.
    pub fn raise(&self, gpe: u8) {
        let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = r.get_mut(usize::from(gpe / 8) & 1) {
            *b |= 1 << (gpe % 8);
        }
        self.update(&r);
    }

    /// Machine reset: everything clear.
    pub fn reset(&self) {
        let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        *r = [0; 4];
        self.update(&r);
    }

    /// The status and enable bytes (a snapshot).
    pub fn registers(&self) -> [u8; 4] {
        *self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts back saved status and enable bytes, with the SCI level they imply.
    pub fn restore_registers(&self, regs: [u8; 4]) {
        let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        *r = regs;
        self.update(&r);
    }
}

impl BusDevice for Gpe0 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| r.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        for (i, &v) in data.iter().enumerate() {
            match offset as usize + i {
                o @ 0..=1 => r[o] &= !v,
                o @ 2..=3 => r[o] = v,
                _ => {}
            }
        }
        self.update(&r);
    }
}

/// The PIIX3 reset control register at 0xCF9: a write with RST_CPU (bit 2) set resets the
/// machine (QEMU's rule); bits 1-3 read back.
pub(crate) struct ResetControl {
    value: Mutex<u8>,
    events: Arc<dyn SystemEvents>,
}

impl ResetControl {
    /// The bits that read back (a snapshot).
    pub(crate) fn value(&self) -> u8 {
        *self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts back saved bits (no reset is requested).
    pub(crate) fn set_value(&self, v: u8) {
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = v & 0x0e;
    }
}

impl BusDevice for ResetControl {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = *self.value.lock().unwrap_or_else(|p| p.into_inner());
        }
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        *self.value.lock().unwrap_or_else(|p| p.into_inner()) = v & 0x0e;
        if v & 0x04 != 0 {
            self.events.request(SystemEvent::Reset);
        }
    }
}

/// Delivers a PCI function's messages through the accelerator.
struct VmMsi {
    vm: Arc<dyn Vm>,
    warned: AtomicBool,
}

impl MsiSink for VmMsi {
    fn deliver(&self, msg: MsiMessage) {
        if let Err(e) = self.vm.signal_msi(msg.address, msg.data)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            log::warn!("MSI {:#x}/{:#x} dropped: {e}", msg.address, msg.data);
        }
    }
}

/// The PIIX3 ISA bridge (8086:7000) at 01.0, multifunction (the PM function is 01.3),
/// with its PIRQ route registers showing the links' IRQs.
fn piix3() -> PciFunction {
    let mut c = PciConfig::new(PciIds {
        vendor: 0x8086,
        device: 0x7000,
        class: 0x06_01_00,
        revision: 0,
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
    });
    c.set_multifunction(true);
    // DEVSEL medium timing, as QEMU's PIIX3.
    c.set_u16(regs::STATUS, status::DEVSEL_MEDIUM);
    for (i, gsi) in LINK_GSIS.iter().enumerate() {
        c.set_u8(0x60 + i, *gsi as u8);
    }
    PciFunction::new(c)
}

/// The PIIX4 power-management function (8086:7113) at 01.3: its PMBA (0x40) names the PM
/// block at [`PC_PM_BASE`], PMREGMISC (0x80) has it enabled, SCI on its interrupt pin.
fn piix4_pm() -> PciFunction {
    let mut c = PciConfig::new(PciIds {
        vendor: 0x8086,
        device: 0x7113,
        class: 0x06_80_00,
        revision: 3,
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
    });
    c.set_interrupt_pin(1);
    // Fast back-to-back capable, DEVSEL medium timing, as QEMU's PIIX4 PM.
    c.set_u16(regs::STATUS, status::FAST_BACK | status::DEVSEL_MEDIUM);
    c.set_u8(0x3c, PC_SCI_IRQ as u8);
    c.set_u32(0x40, u32::from(PC_PM_BASE) | 1);
    c.set_u8(0x80, 1);
    PciFunction::new(c)
}

/// What SeaBIOS writes to every function's command register at boot: I/O and memory
/// decoding and SERR# reporting on (the bits the function implements stay).
fn enable_decoding(pci: &PciBus, address: PciAddress) {
    if let Some(dev) = pci.function(address) {
        let mut cmd = [0u8; 2];
        dev.config_read(regs::COMMAND as u16, &mut cmd);
        let cmd = u16::from_le_bytes(cmd) | command::IO | command::MEMORY | command::SERR;
        dev.config_write(regs::COMMAND as u16, &cmd.to_le_bytes());
        pci.refresh_routes(address.slot());
    }
}

/// The functions on the board from machine-init on.
const ONBOARD: [(u8, u8); 3] = [(0, 0), (1, 0), (1, 3)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Init,
    Ready,
    Running,
    Stopped,
}

/// A PCI function the machine placed: where, and whether it was there at machine-done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacedFunction {
    /// Its address on bus 0.
    pub address: PciAddress,
    /// The GSI its INTA pin is routed to.
    pub gsi: u32,
}

/// A `pc`: RAM, buses, onboard devices, PCI, vCPUs and their threads. The lifecycle is
/// microvm's ([`crate::Microvm`]): [`Pc::new`] → cold plug ([`Pc::add_pci_function`],
/// [`Pc::add_debug_exit`]) → [`Pc::finish_init`] → [`Pc::start`] → pause / resume / reset →
/// [`Pc::shutdown`].
pub struct Pc {
    cfg: PcConfig,
    accel_name: &'static str,
    core: MachineCore,
    serial: Option<Arc<Serial>>,
    i8042: Arc<I8042>,
    rtc: Arc<Rtc>,
    pm: Arc<AcpiPm>,
    gpe: Arc<Gpe0>,
    pci: Arc<PciBus>,
    config_io: Arc<PciConfigIo>,
    reset_control: Arc<ResetControl>,
    hotplug: Arc<PciHotplug>,
    allocator: BarAllocator,
    links: Vec<(u32, Arc<SharedIrq>)>,
    msi: Arc<dyn MsiSink>,
    ioapic: bool,
    msi_capable: bool,
    devices: Vec<AddedDevice>,
    boot: Option<BootState>,
    phase: Phase,
}

impl std::fmt::Debug for Pc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pc")
            .field("accel", &self.accel_name)
            .field("phase", &self.phase)
            .field("pci", &self.pci)
            .finish_non_exhaustive()
    }
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

impl Pc {
    /// Machine-init: checks `cfg` against `accel`, allocates RAM, creates the VM, the onboard
    /// devices and PCI functions 00.0, 01.0 and 01.3, maps the PCI windows, and creates the
    /// vCPUs. System events and vCPU errors go to `events`.
    pub fn new(
        cfg: PcConfig,
        accel: &dyn Accelerator,
        events: Arc<dyn MachineEvents>,
    ) -> Result<Self, MachineError> {
        if !(crate::MIN_MEMORY..=crate::MAX_MEMORY).contains(&cfg.memory) {
            return Err(MachineError::MemorySize(cfg.memory));
        }
        if cfg.cpus == 0 || cfg.cpus > PC_MAX_CPUS {
            return Err(MachineError::Cpus(cfg.cpus));
        }
        let mut cfg = cfg;
        cfg.memory &= !0xfff;
        let req = pc_requirements(&cfg);
        accel.check(&req).map_err(MachineError::Accel)?;
        let (below, above) = pc_split_ram(cfg.memory);
        let mut ranges = vec![(GuestAddress(0), below as usize)];
        if above > 0 {
            ranges.push((GuestAddress(layout::FOUR_GIB), above as usize));
        }
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
        // An IOAPIC exists when GSI 16 can be wired (see Microvm::new).
        let ioapic = vm.irq_line(16).is_ok();
        let irq = |gsi: u32| vm.irq_line(gsi).map_err(MachineError::Accel);

        let serial = if matches!(cfg.serial, SerialBackend::None) {
            None
        } else {
            let s = Arc::new(Serial::new(
                irq(4)?,
                crate::microvm::serial_output(&cfg.serial)?,
            ));
            map(&buses.pio, "COM1", 0x3f8, Serial::LEN, s.clone())?;
            Some(s)
        };
        let i8042 = Arc::new(I8042::new(sys.clone(), Some(irq(1)?)));
        for (port, dev) in [
            (I8042_DATA_PORT, I8042Port::data(i8042.clone())),
            (I8042_COMMAND_PORT, I8042Port::command(i8042.clone())),
        ] {
            map(&buses.pio, "i8042", u64::from(port), 1, Arc::new(dev))?;
        }
        let rtc = Arc::new(Rtc::with_irq(irq(8)?));
        rtc.set_memory_layout(CmosMemoryLayout {
            below_4g: below,
            above_4g: above,
        });
        map(&buses.pio, "RTC", 0x70, Rtc::LEN, rtc.clone())?;

        let sci = SharedIrq::new(irq(PC_SCI_IRQ)?);
        let pm = Arc::new(AcpiPm::new(sys.clone(), Some(sci.source(SCI_SOURCE_PM))));
        map(
            &buses.pio,
            "ACPI PM registers",
            u64::from(PC_PM_BASE),
            ACPI_PM_LEN,
            pm.clone(),
        )?;
        let gpe = Arc::new(Gpe0::new(sci.source(SCI_SOURCE_GPE)));
        map(
            &buses.pio,
            "GPE0 block",
            u64::from(PC_GPE0_BASE),
            u64::from(PC_GPE0_LEN),
            gpe.clone(),
        )?;

        let pci = Arc::new(PciBus::new());
        let reset_control = Arc::new(ResetControl {
            value: Mutex::new(0),
            events: sys.clone(),
        });
        let rcr: Arc<dyn BusDevice> = reset_control.clone();
        let config_io = Arc::new(PciConfigIo::new(pci.clone()).with_cf9(rcr));
        map(
            &buses.pio,
            "PCI configuration ports",
            u64::from(CONFIG_ADDRESS_PORT),
            CONFIG_IO_LEN,
            config_io.clone(),
        )?;
        let sink = core.hub().sink.clone();
        let hotplug = Arc::new(PciHotplug::new(
            gpe.clone(),
            pci.clone(),
            Box::new(move || sink.machine_event(MachineEvent::DeviceEjected)),
        ));
        map(
            &buses.pio,
            "PCI hot plug registers",
            u64::from(PCI_HOTPLUG_BASE),
            PCI_HOTPLUG_LEN,
            hotplug.clone(),
        )?;
        let (mem32, mem64) = pci_windows(cfg.memory);
        map(
            &buses.pio,
            "PCI I/O window",
            PCI_IO_BASE,
            PCI_IO_LEN,
            pci.window(AddressSpace::Io, PCI_IO_BASE),
        )?;
        // The DSDT gives the guest I/O from 0x0d00 up; Linux places the I/O BARs of
        // hot-added functions from 0x1000 (as with QEMU), below the hot plug registers.
        map(
            &buses.pio,
            "PCI I/O window (hot plug)",
            PCI_HOTPLUG_IO_BASE,
            u64::from(PCI_HOTPLUG_BASE) - PCI_HOTPLUG_IO_BASE,
            pci.window(AddressSpace::Io, PCI_HOTPLUG_IO_BASE),
        )?;
        map(
            &buses.mmio,
            "PCI 32-bit window",
            mem32,
            PCI_HOLE_END - mem32,
            pci.window(AddressSpace::Memory, mem32),
        )?;
        map(
            &buses.mmio,
            "PCI 64-bit window",
            mem64,
            PCI_HOLE64_SIZE,
            pci.window(AddressSpace::Memory, mem64),
        )?;
        let window = |base, len| {
            keel_pci::Window::new(base, len).ok_or(MachineError::MemorySize(cfg.memory))
        };
        let alloc_base = mem32.max(PCI_MEM32_ALLOC_BASE);
        let allocator = BarAllocator::new(
            window(PCI_IO_BASE, PCI_IO_LEN)?,
            window(alloc_base, PCI_HOLE_END - alloc_base)?,
            Some(window(mem64, PCI_HOLE64_SIZE)?),
        );
        let onboard: [(u8, u8, Arc<dyn PciDevice>); 3] = [
            (0, 0, Arc::new(PciFunction::host_bridge())),
            (1, 3, Arc::new(piix4_pm())),
            (1, 0, Arc::new(piix3())),
        ];
        for (slot, function, dev) in onboard {
            if let Some(a) = PciAddress::new(slot, function) {
                pci.add_function(a, dev)
                    .map_err(|e| MachineError::Pci(e.to_string()))?;
                enable_decoding(&pci, a);
            }
        }
        let mut links: Vec<(u32, Arc<SharedIrq>)> = Vec::new();
        for gsi in LINK_GSIS {
            if !links.iter().any(|(g, _)| *g == gsi) {
                links.push((gsi, SharedIrq::new(irq(gsi)?)));
            }
        }
        // Messages need local APICs, which come with the IOAPIC on both backends (the
        // interpreter has neither with one vCPU).
        let msi_capable = ioapic;
        let msi: Arc<dyn MsiSink> = Arc::new(VmMsi {
            vm: vm.clone(),
            warned: AtomicBool::new(false),
        });

        core.create_vcpus(cfg.cpus)?;
        Ok(Self {
            cfg,
            accel_name: accel.name(),
            core,
            serial,
            i8042,
            rtc,
            pm,
            gpe,
            pci,
            config_io,
            reset_control,
            hotplug,
            allocator,
            links,
            msi,
            ioapic,
            msi_capable,
            devices: Vec::new(),
            boot: None,
            phase: Phase::Init,
        })
    }

    /// Replaces the boot inputs read at machine-done (only before [`Pc::finish_init`]).
    pub fn set_boot(
        &mut self,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        append: String,
        no_reboot: bool,
    ) -> Result<(), MachineError> {
        if self.phase != Phase::Init {
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

    /// Connects COM1 to another backend before the machine starts (whether COM1 exists
    /// was fixed at machine-init).
    pub fn set_serial(&mut self, backend: SerialBackend) -> Result<(), MachineError> {
        if self.phase != Phase::Init {
            return Err(MachineError::Phase {
                op: "set_serial",
                when: "after finish_init",
            });
        }
        if matches!(backend, SerialBackend::None) != self.serial.is_none() {
            return Err(MachineError::SerialFixed);
        }
        if let Some(s) = &self.serial {
            s.set_output(crate::microvm::serial_output(&backend)?);
        }
        self.cfg.serial = backend;
        Ok(())
    }

    /// The line pin INTA of a function in `slot` drives (shared with the other functions on
    /// its link); `source` tells the sources on a link apart (its devfn).
    pub fn intx_line(&self, slot: u8, source: usize) -> Result<Arc<dyn IrqLine>, MachineError> {
        let gsi = intx_gsi(slot, 1);
        self.links
            .iter()
            .find(|(g, _)| *g == gsi)
            .map(|(_, l)| l.source(source))
            .ok_or(MachineError::Pci(format!("no PCI link on GSI {gsi}")))
    }

    /// Where PCI functions deliver MSI and MSI-X messages.
    pub fn msi_sink(&self) -> Arc<dyn MsiSink> {
        self.msi.clone()
    }

    /// The first address a new function can take at `wanted` (or, if `None`, function 0 of
    /// the first free slot from 2 on, as QEMU picks for `pc`).
    pub fn free_address(&self, wanted: Option<PciAddress>) -> Result<PciAddress, MachineError> {
        match wanted {
            Some(a) if self.pci.function(a).is_some() => Err(MachineError::Pci(format!(
                "PCI: slot {} function {} not available",
                a.slot(),
                a.function()
            ))),
            Some(a) => Ok(a),
            None => (2..SLOTS)
                .find(|&s| self.pci.occupancy(s) == 0)
                .and_then(|s| PciAddress::new(s, 0))
                .ok_or(MachineError::Pci("PCI: no free slot on pci.0".into())),
        }
    }

    /// Adds `dev` at `address`. Before [`Pc::finish_init`] (cold plug) its BARs are placed
    /// as firmware would; afterwards (hot plug, the bus in staged mode) they are left for the
    /// guest to assign, and the caller tells the guest through [`Pc::hotplug`].
    pub fn add_pci_function(
        &mut self,
        address: PciAddress,
        dev: Arc<dyn PciDevice>,
    ) -> Result<(), MachineError> {
        if self.phase != Phase::Init {
            return self
                .pci
                .add_function(address, dev)
                .map_err(|e| MachineError::Pci(e.to_string()));
        }
        self.pci
            .add_function(address, dev)
            .map_err(|e| MachineError::Pci(e.to_string()))?;
        if let Err(e) = self.firmware_setup(address) {
            self.pci.remove_function(address);
            self.allocator.release(address);
            return Err(MachineError::Pci(e.to_string()));
        }
        Ok(())
    }

    /// What SeaBIOS does for a function at boot: the interrupt line register names the IRQ
    /// its pin is routed to, the BARs are placed and decoding is on.
    fn firmware_setup(&mut self, address: PciAddress) -> Result<(), keel_pci::PciError> {
        if let Some(dev) = self.pci.function(address) {
            let mut pin = [0u8];
            dev.config_read(0x3d, &mut pin);
            if pin[0] != 0 {
                dev.config_write(0x3c, &[intx_gsi(address.slot(), pin[0]) as u8]);
            }
        }
        self.pci.assign_bars(address, &mut self.allocator)?;
        enable_decoding(&self.pci, address);
        Ok(())
    }

    /// Removes the function at `address` (unplug while the machine is being built, or a
    /// port change of a virtio console); its BARs are released.
    pub fn remove_pci_function(&mut self, address: PciAddress) -> Option<Arc<dyn PciDevice>> {
        let d = self.pci.remove_function(address);
        self.allocator.release(address);
        d
    }

    /// Cold-plugs an `isa-debug-exit`.
    pub fn add_debug_exit(&mut self, cfg: DebugExitConfig) -> Result<(), MachineError> {
        if self.phase != Phase::Init {
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

    /// Removes the device added at I/O port `iobase`; `false` if there is none.
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

    fn acpi_config(&self) -> crate::pc_acpi::PcAcpiConfig {
        let (mem32, mem64) = pci_windows(self.cfg.memory);
        crate::pc_acpi::PcAcpiConfig {
            cpus: self.cfg.cpus,
            ioapic: self.ioapic,
            serial: self.serial.is_some(),
            msi: self.msi_capable,
            pci_mem32: (mem32, PCI_HOLE_END - mem32),
            pci_mem64: (mem64 + PCI_HOLE64_SIZE <= 1 << 40).then_some((mem64, PCI_HOLE64_SIZE)),
        }
    }

    fn load(&mut self) -> Result<(), MachineError> {
        let tables = crate::pc_acpi::build(&self.acpi_config()).map_err(MachineError::Acpi)?;
        for (addr, blob) in &tables.blobs {
            vm_memory::Bytes::write_slice(&**self.core.memory(), blob, GuestAddress(*addr))
                .map_err(|source| {
                    MachineError::Boot(BootError::Memory {
                        what: "ACPI tables",
                        source,
                    })
                })?;
        }
        let kernel = match &self.cfg.kernel {
            Some(p) => KernelImage::File(p.clone()),
            #[cfg(feature = "demo-guest")]
            None => KernelImage::Bytes("built-in demo guest", crate::DEMO_GUEST),
            #[cfg(not(feature = "demo-guest"))]
            None => return Err(MachineError::NoKernel),
        };
        let e820 = pc_e820(self.cfg.memory);
        let state = boot::prepare(
            self.core.memory(),
            &BootConfig {
                kernel: &kernel,
                initrd: self.cfg.initrd.as_deref(),
                cmdline: &self.cfg.append,
                e820: &e820,
                low_ram_end: pc_split_ram(self.cfg.memory).0,
                rsdp: Some(tables.rsdp_addr),
            },
        )
        .map_err(MachineError::Boot)?;
        self.core.shared().set_boot_state(0, Some(state));
        self.boot = Some(state);
        Ok(())
    }

    /// Machine-done: writes the ACPI tables, loads the kernel, initrd and command line and
    /// prepares the bootstrap processor. Runs once.
    pub fn finish_init(&mut self) -> Result<(), MachineError> {
        if self.phase != Phase::Init {
            return Err(MachineError::Phase {
                op: "finish_init",
                when: "twice",
            });
        }
        self.load()?;
        // From now on functions are hot-plugged: "function 0 last" (see keel_pci::PciBus).
        self.pci.set_staged(true);
        self.phase = Phase::Ready;
        Ok(())
    }

    /// Starts the RTC's clock `secs` from the host's UTC time (`-rtc base=`).
    pub fn set_rtc_offset(&self, secs: i64) {
        self.rtc.set_offset_secs(secs);
    }

    /// Starts one thread per vCPU (and, with `-serial stdio`, COM1's input thread).
    pub fn start(&mut self) -> Result<(), MachineError> {
        if self.phase != Phase::Ready {
            return Err(MachineError::Phase {
                op: "start",
                when: "before finish_init or after start",
            });
        }
        self.core.start(&self.cfg.serial, self.serial.as_ref())?;
        self.phase = Phase::Running;
        Ok(())
    }

    /// Stops guest execution; returns once every vCPU is parked.
    pub fn pause(&self) {
        self.core.pause();
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.core.resume();
    }

    /// Machine reset: the backend's platform state, the onboard devices and every PCI
    /// function go back to power-on state (BARs as firmware placed them), tables and kernel
    /// are loaded again, and the vCPUs restart.
    pub fn reset(&mut self) -> Result<(), MachineError> {
        if self.phase == Phase::Init {
            return Err(MachineError::Phase {
                op: "reset",
                when: "before finish_init",
            });
        }
        self.core.hold_for_reset();
        self.core.vm().reset().map_err(MachineError::Accel)?;
        if let Some(s) = &self.serial {
            s.reset();
        }
        self.i8042.reset();
        self.rtc.reset();
        self.pm.reset();
        self.gpe.reset();
        self.hotplug.reset();
        self.pci.reset();
        for (slot, function) in ONBOARD {
            if let Some(a) = PciAddress::new(slot, function) {
                enable_decoding(&self.pci, a);
            }
        }
        for slot in 0..SLOTS {
            for f in 0..keel_pci::FUNCTIONS {
                if let Some(a) = PciAddress::new(slot, f)
                    && self.pci.function(a).is_some()
                    && slot >= 2
                {
                    self.allocator.release(a);
                    if let Err(e) = self.firmware_setup(a) {
                        log::warn!("placing the BARs of {a} again: {e}");
                    }
                }
            }
        }
        self.load()?;
        self.core.release_after_reset();
        Ok(())
    }

    /// Stops and joins every vCPU thread.
    pub fn shutdown(&mut self) {
        self.core.shutdown();
        self.phase = Phase::Stopped;
    }

    /// Presses the ACPI power button (PWRBTN_STS and the SCI).
    pub fn power_button(&self) -> bool {
        self.pm.press_power_button();
        true
    }

    /// The registers of vCPU `index` while it does not run.
    pub fn registers(&self, index: u32) -> Option<(keel_accel::Regs, keel_accel::SpecialRegs)> {
        self.core.registers(index)
    }

    /// vCPU indexes and host thread ids.
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

    /// The backend VM.
    pub fn vm(&self) -> &dyn Vm {
        &**self.core.vm()
    }

    /// Where devices raise reset, power-off and exit requests.
    pub fn system_events(&self) -> Arc<dyn SystemEvents> {
        self.core.system_events()
    }

    /// Where this machine's disks report host I/O errors, and which of them to retry.
    pub(crate) fn disk_errors(&self) -> Arc<crate::disk_errors::DiskErrors> {
        self.core.disk_errors()
    }

    /// The PCI root bus.
    pub fn pci_bus(&self) -> &Arc<PciBus> {
        &self.pci
    }

    /// The GPE0 block (ACPI hot plug raises GPE 1 here).
    pub fn gpe(&self) -> &Arc<Gpe0> {
        &self.gpe
    }

    /// The ACPI PCI hot plug controller.
    pub fn hotplug(&self) -> &Arc<PciHotplug> {
        &self.hotplug
    }

    /// COM1, if present.
    pub fn serial(&self) -> Option<&Arc<Serial>> {
        self.serial.as_ref()
    }

    /// Whether the backend has an IOAPIC (the MADT lists it).
    pub fn has_ioapic(&self) -> bool {
        self.ioapic
    }

    /// The configuration (memory rounded to pages).
    pub fn config(&self) -> &PcConfig {
        &self.cfg
    }

    /// The bootstrap processor's entry state, after [`Pc::finish_init`].
    pub fn boot_state(&self) -> Option<BootState> {
        self.boot
    }
}

/// What the snapshot code (`crate::pc_snapshot`) reaches inside the machine.
impl Pc {
    pub(crate) fn accel_name(&self) -> &'static str {
        self.accel_name
    }

    pub(crate) fn core_ref(&self) -> &MachineCore {
        &self.core
    }

    pub(crate) fn core_mut(&mut self) -> &mut MachineCore {
        &mut self.core
    }

    /// COM1 (if present), the RTC, the i8042 and the ACPI PM block.
    pub(crate) fn onboard(&self) -> (Option<Arc<Serial>>, Arc<Rtc>, Arc<I8042>, Arc<AcpiPm>) {
        (
            self.serial.clone(),
            self.rtc.clone(),
            self.i8042.clone(),
            self.pm.clone(),
        )
    }

    /// The configuration address latch (0xCF8) and the reset control bits (0xCF9).
    pub(crate) fn port_registers(&self) -> (u32, u8) {
        (self.config_io.address(), self.reset_control.value())
    }

    /// Puts back [`Pc::port_registers`].
    pub(crate) fn restore_ports(&self, config_address: u32, reset_control: u8) {
        self.config_io.set_address(config_address);
        self.reset_control.set_value(reset_control);
    }
}

impl crate::core::CoreMachine for Pc {
    fn core(&self) -> &MachineCore {
        &self.core
    }

    fn start(&mut self) -> Result<(), MachineError> {
        Pc::start(self)
    }
}

impl Drop for Pc {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowmem_follows_qemu_pc() {
        assert_eq!(pc_split_ram(512 << 20), (512 << 20, 0));
        assert_eq!(pc_split_ram(0xdfff_f000), (0xdfff_f000, 0));
        assert_eq!(pc_split_ram(0xe000_0000), (0xc000_0000, 0x2000_0000));
        assert_eq!(
            pc_split_ram(8 << 30),
            (0xc000_0000, (8 << 30) - 0xc000_0000)
        );
        assert_eq!(pci_windows(1 << 30).1, 4 << 30);
        assert_eq!(pci_windows(8 << 30).1, 9 << 30);
    }

    #[test]
    fn intx_routes_like_piix() {
        // Slot 1 INTA is link A, slot 2 INTA link B, slot 3 link C, slot 4 link D.
        assert_eq!(intx_gsi(1, 1), 10);
        assert_eq!(intx_gsi(2, 1), 10);
        assert_eq!(intx_gsi(3, 1), 11);
        assert_eq!(intx_gsi(4, 1), 11);
        assert_eq!(intx_gsi(5, 1), 10);
        assert_eq!(intx_gsi(2, 3), 11);
    }
}
