//! Machine-init and machine-done behaviour of microvm against a fake accelerator (no
//! /dev/kvm needed): device maps, cold plug errors, ACPI tables and boot data in guest memory,
//! and system events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, mpsc};

use keel_accel::{
    AccelError, Accelerator, BusDevice, BusRange, GuestMemory, IoBuses, IrqLine, Kick,
    MachineRequirements, MmioAddress, PioAddress, Regs, SpecialRegs, SystemEvent, SystemEvents,
    Vcpu, VcpuExit, Vm,
};
use keel_devices::DebugExitConfig;
use keel_machine::layout::{ACPI_START, PVH_INFO_ADDR};
use keel_machine::{
    BootProtocol, MachineError, MachineEvent, Microvm, MicrovmConfig, OnOffAuto, SerialBackend,
};
use vm_memory::{Bytes, GuestAddress};

struct FakeAccel {
    name: &'static str,
    refuse: bool,
}
struct FakeVm;
struct FakeVcpu(u32);
struct NoIrq;
struct NoKick;
struct Port61;

impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}
impl Kick for NoKick {
    fn kick(&self) {}
}
impl BusDevice for Port61 {
    fn read(&self, _o: u64, d: &mut [u8]) {
        d.fill(0x20);
    }
    fn write(&self, _o: u64, _d: &[u8]) {}
}

impl Accelerator for FakeAccel {
    fn name(&self) -> &'static str {
        self.name
    }
    fn check(&self, req: &MachineRequirements) -> Result<(), AccelError> {
        if self.refuse {
            return Err(AccelError::Incompatible {
                accel: "fake",
                machine: req.machine.clone(),
                reason: "refused for the test".into(),
            });
        }
        Ok(())
    }
    fn create_vm(
        &self,
        _req: &MachineRequirements,
        _memory: Arc<GuestMemory>,
        _buses: Arc<IoBuses>,
        _events: Arc<dyn SystemEvents>,
    ) -> Result<Box<dyn Vm>, AccelError> {
        Ok(Box::new(FakeVm))
    }
}

impl Vm for FakeVm {
    fn create_vcpu(&self, index: u32) -> Result<Box<dyn Vcpu>, AccelError> {
        Ok(Box::new(FakeVcpu(index)))
    }
    fn irq_line(&self, _gsi: u32) -> Result<Arc<dyn IrqLine>, AccelError> {
        Ok(Arc::new(NoIrq))
    }
    fn platform_devices(&self) -> Vec<(BusRange, Arc<dyn BusDevice>)> {
        vec![(BusRange::new(0x61, 1).unwrap(), Arc::new(Port61))]
    }
}

impl Vcpu for FakeVcpu {
    fn index(&self) -> u32 {
        self.0
    }
    fn run(&mut self) -> Result<VcpuExit, AccelError> {
        Ok(VcpuExit::Halted)
    }
    fn complete_read(&mut self, _data: u64) {}
    fn regs(&self) -> Result<Regs, AccelError> {
        Ok(Regs::default())
    }
    fn set_regs(&mut self, _regs: &Regs) -> Result<(), AccelError> {
        Ok(())
    }
    fn sregs(&self) -> Result<SpecialRegs, AccelError> {
        Ok(SpecialRegs::default())
    }
    fn set_sregs(&mut self, _sregs: &SpecialRegs) -> Result<(), AccelError> {
        Ok(())
    }
    fn kicker(&self) -> Arc<dyn Kick> {
        Arc::new(NoKick)
    }
    fn reset(&mut self) -> Result<(), AccelError> {
        Ok(())
    }
}

fn accel(name: &'static str) -> FakeAccel {
    FakeAccel {
        name,
        refuse: false,
    }
}

fn machine(cfg: MicrovmConfig, name: &'static str) -> (Microvm, mpsc::Receiver<MachineEvent>) {
    let (tx, rx) = mpsc::channel();
    let vm = Microvm::new(cfg, &accel(name), Arc::new(tx)).unwrap();
    (vm, rx)
}

fn quiet() -> MicrovmConfig {
    MicrovmConfig {
        serial: SerialBackend::Null,
        ..MicrovmConfig::default()
    }
}

fn inb(vm: &Microvm, port: u16) -> u8 {
    let mut b = [0u8];
    vm.buses().pio_read(PioAddress(port), &mut b);
    b[0]
}

#[test]
fn microvm_can_move_between_threads() {
    fn send<T: Send>() {}
    send::<Microvm>();
}

#[test]
fn serial_output_to_an_embedder_writer() {
    let cap = keel_machine::Capture::new();
    let cfg = MicrovmConfig {
        serial: SerialBackend::Writer(keel_machine::SharedWriter::new(Box::new(cap.clone()))),
        ..MicrovmConfig::default()
    };
    let (vm, _rx) = machine(cfg, "tcg");
    vm.buses().pio_write(PioAddress(0x3f8), b"k");
    assert_eq!(cap.text(), "k");
}

#[test]
fn requirements_and_bad_configs() {
    let req = keel_machine::requirements(&MicrovmConfig::default());
    assert_eq!(req.machine, "microvm");
    assert_eq!((req.vcpus, req.memory, req.pit), (1, 128 << 20, true));
    let (tx, _rx) = mpsc::channel();
    let tx = Arc::new(tx);
    let small = MicrovmConfig {
        memory: 1 << 20,
        ..quiet()
    };
    assert!(matches!(
        Microvm::new(small, &accel("tcg"), tx.clone()),
        Err(MachineError::MemorySize(_))
    ));
    let no_cpu = MicrovmConfig { cpus: 0, ..quiet() };
    assert!(matches!(
        Microvm::new(no_cpu, &accel("tcg"), tx.clone()),
        Err(MachineError::Cpus(0))
    ));
    let refusing = FakeAccel {
        name: "fake",
        refuse: true,
    };
    let e = Microvm::new(quiet(), &refusing, tx).unwrap_err();
    assert!(matches!(e, MachineError::Accel(_)));
}

#[test]
fn onboard_devices_and_unassigned_ports() {
    let (vm, _rx) = machine(quiet(), "tcg");
    // COM1 line status: transmitter empty and idle.
    assert_eq!(inb(&vm, 0x3fd) & 0x60, 0x60);
    // i8042 status: command/data flag and keyboard unlocked, nothing pending.
    assert_eq!(inb(&vm, 0x64) & 0x01, 0);
    // The backend's platform device is on the PIO bus.
    assert_eq!(inb(&vm, 0x61), 0x20);
    // RTC present under tcg by default (auto), register D reports valid RAM and time.
    vm.buses().pio_write(PioAddress(0x70), &[0x0d]);
    assert_eq!(inb(&vm, 0x71), 0x80);
    // Unassigned ports read all ones.
    assert_eq!(inb(&vm, 0x80), 0xff);
    assert_eq!(inb(&vm, 0x2f8), 0xff);

    // Under kvm, rtc=auto means no RTC (as QEMU); isa-serial=off removes COM1.
    let cfg = MicrovmConfig {
        isa_serial: OnOffAuto::Off,
        ..quiet()
    };
    let (vm, _rx) = machine(cfg, "kvm");
    assert_eq!(inb(&vm, 0x71), 0xff);
    assert_eq!(inb(&vm, 0x3fd), 0xff);
    assert!(!vm.resolved().rtc);

    // i8042=off: QEMU's microvm port map (no keyboard controller).
    let cfg = MicrovmConfig {
        i8042: OnOffAuto::Off,
        ..quiet()
    };
    let (vm, rx) = machine(cfg, "tcg");
    assert_eq!(inb(&vm, 0x64), 0xff);
    vm.buses().pio_write(PioAddress(0x64), &[0xfe]);
    assert!(rx.try_recv().is_err());
}

#[test]
fn cold_plug_isa_debug_exit_and_errors() {
    let (mut vm, rx) = machine(quiet(), "tcg");
    // Property parsing and limits are the device type's (keel_devices::DebugExitConfig);
    // the machine refuses what collides on its bus and creates nothing then.
    assert!(
        DebugExitConfig::new(0xffff, 4).is_err(),
        "past the port space"
    );
    let e = vm
        .add_debug_exit(DebugExitConfig::new(0x3f8, 1).unwrap())
        .unwrap_err();
    assert!(matches!(e, MachineError::Bus(..)), "{e}");
    assert!(vm.devices().is_empty(), "failed adds create nothing");
    vm.add_debug_exit(DebugExitConfig::new(0xf4, 4).unwrap())
        .unwrap();
    assert_eq!(vm.devices().len(), 1);
    let names: Vec<&str> = vm.device_info().iter().map(|d| d.type_name).collect();
    assert_eq!(
        names,
        [
            "isa-serial",
            "i8042",
            "mc146818rtc",
            "acpi-ged",
            "isa-debug-exit"
        ]
    );
    assert_eq!(vm.device_info()[4].pio, [(0xf4, 4)]);
    vm.buses().pio_write(PioAddress(0xf7), &[3]);
    assert_eq!(
        rx.try_recv().unwrap(),
        MachineEvent::System(SystemEvent::Exit(7))
    );
    vm.finish_init().unwrap();
    let e = vm.add_debug_exit(DebugExitConfig::default()).unwrap_err();
    assert_eq!(e.to_string(), "Bus 'isa.0' does not support hotplugging");
}

#[test]
fn machine_done_writes_tables_and_pvh_start_info() {
    let cfg = MicrovmConfig {
        cpus: 2,
        append: "hello=1".into(),
        ..quiet()
    };
    let (mut vm, _rx) = machine(cfg, "tcg");
    struct Window;
    impl BusDevice for Window {
        fn read(&self, _o: u64, d: &mut [u8]) {
            d.fill(0);
        }
        fn write(&self, _o: u64, _d: &[u8]) {}
    }
    let cold = vm.add_virtio_mmio(Arc::new(Window)).unwrap();
    assert_eq!((cold.base, cold.gsi), (0xfeb0_0000, 16));
    vm.finish_init().unwrap();
    let e = vm.add_virtio_mmio(Arc::new(Window)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bus 'virtio-mmio-bus.1' does not support hotplugging"
    );
    let mut data = [0u8; 4];
    vm.buses().mmio_read(MmioAddress(0xfeb0_0000), &mut data);
    assert_eq!(data, [0; 4], "the cold-plugged window is mapped");
    vm.buses().mmio_read(MmioAddress(0xfeb0_0200), &mut data);
    assert_eq!(data, [0xff; 4], "nothing mapped for the refused one");

    let st = vm.boot_state().unwrap();
    assert_eq!(st.protocol, BootProtocol::Pvh);
    let mem = vm.memory();
    let mut info = [0u8; 56];
    mem.read_slice(&mut info, GuestAddress(PVH_INFO_ADDR))
        .unwrap();
    let rsdp_addr = u64::from_le_bytes(info[32..40].try_into().unwrap());
    assert_eq!(rsdp_addr, ACPI_START);
    let mut rsdp = [0u8; 36];
    mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!(sum(&rsdp), 0);
    // Walk XSDT → FADT → DSDT and XSDT → MADT in guest memory; check every checksum.
    let read_table = |addr: u64| {
        let mut hdr = [0u8; 8];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "{}", String::from_utf8_lossy(&t[..4]));
        t
    };
    let xsdt = read_table(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
    let fadt = read_table(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
    let madt = read_table(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
    let dsdt = read_table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
    assert_eq!(&madt[..4], b"APIC");
    assert_eq!(madt.iter().skip(44).step_by(8).take(2).count(), 2);
    // Only the virtio device added before machine-done is in the DSDT.
    assert_eq!(dsdt.windows(8).filter(|w| w == b"LNRO0005").count(), 1);
    assert!(dsdt.windows(8).any(|w| w == b"PNP0501") || dsdt.windows(4).any(|w| w == b"COM1"));
}

#[test]
fn reset_line_and_power_off_reach_the_owner() {
    let (vm, rx) = machine(quiet(), "tcg");
    vm.buses().pio_write(PioAddress(0x64), &[0xfe]);
    assert_eq!(
        rx.try_recv().unwrap(),
        MachineEvent::System(SystemEvent::Reset)
    );
    vm.buses().mmio_write(MmioAddress(0xfea0_0200), &[0x34]);
    assert_eq!(
        rx.try_recv().unwrap(),
        MachineEvent::System(SystemEvent::Shutdown)
    );
    assert!(vm.power_button());
    let mut sel = [0u8; 4];
    vm.buses().mmio_read(MmioAddress(0xfea0_0000), &mut sel);
    assert_eq!(sel, [2, 0, 0, 0], "power-button event pending for _EVT");

    let cfg = MicrovmConfig {
        no_reboot: true,
        ..quiet()
    };
    let (vm, rx) = machine(cfg, "tcg");
    vm.buses().pio_write(PioAddress(0x64), &[0xfe]);
    assert_eq!(
        rx.try_recv().unwrap(),
        MachineEvent::System(SystemEvent::Shutdown)
    );

    // acpi=off: no GED, the write goes nowhere.
    let cfg = MicrovmConfig {
        acpi: OnOffAuto::Off,
        ..quiet()
    };
    let (mut vm, rx) = machine(cfg, "tcg");
    vm.buses().mmio_write(MmioAddress(0xfea0_0200), &[0x34]);
    assert!(rx.try_recv().is_err());
    vm.finish_init().unwrap();
    let mut info = [0u8; 56];
    vm.memory()
        .read_slice(&mut info, GuestAddress(PVH_INFO_ADDR))
        .unwrap();
    assert_eq!(&info[32..40], &[0; 8], "no RSDP without ACPI");
}

#[test]
fn start_pause_reset_with_a_halting_vcpu() {
    let (mut vm, _rx) = machine(quiet(), "tcg");
    vm.pause(); // like -S: start parked
    vm.finish_init().unwrap();
    assert!(!vm.started());
    vm.start().unwrap();
    assert!(vm.started());
    vm.pause();
    assert!(vm.cpu_info()[0].thread_id.is_some());
    vm.resume();
    vm.reset().unwrap();
    vm.shutdown();
}
