//! Shared test fixtures: a microvm-like type set, recording machine hooks, and a scripted
//! guest-side hotplug controller that needs no guest.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use keel_phase::Phase;
use keel_qdev::*;

pub const TEST_BUS: &str = "test-hp-bus";

pub fn registry() -> TypeRegistry {
    let mut r = TypeRegistry::new();
    r.register(
        DeviceType::new("isa-serial", BusType::Isa)
            .description("16550A UART")
            .prop(
                PropSpec::uint32("iobase")
                    .default_u64(0x3f8)
                    .description("I/O base"),
            )
            .prop(PropSpec::uint32("irq").default_u64(4).range(0, 15))
            .prop(PropSpec::string("chardev").default_str("")),
    )
    .unwrap();
    r.register(
        DeviceType::new("isa-debug-exit", BusType::Isa)
            .prop(PropSpec::uint32("iobase").default_u64(0x501))
            .prop(PropSpec::uint32("iosize").default_u64(2).range(1, 4)),
    )
    .unwrap();
    r.register(DeviceType::new("i8042", BusType::Isa).user_creatable(false))
        .unwrap();
    r.register(
        DeviceType::new("virtio-blk-device", BusType::VirtioMmio)
            .hotpluggable(true)
            .prop(PropSpec::string("drive"))
            .prop(PropSpec::bool("ro").default_bool(false))
            .prop(PropSpec::string("serial").default_str("")),
    )
    .unwrap();
    r.register(DeviceType::new("virtio-rng-device", BusType::VirtioMmio).hotpluggable(true))
        .unwrap();
    r.register(
        DeviceType::new("test-hp-dev", BusType::Other("test-hp".into()))
            .hotpluggable(true)
            .prop(PropSpec::size("size").default_str("1M"))
            .prop(PropSpec::enumeration("mode", ["fast", "slow"]).default_str("fast"))
            .prop(PropSpec::int32("prio").default_i64(0).range(-10, 10)),
    )
    .unwrap();
    r.register(DeviceType::new(
        "test-cold-dev",
        BusType::Other("test-hp".into()),
    ))
    .unwrap();
    r
}

/// What the machine saw: realized devices, unrealize and reset calls.
#[derive(Debug, Default)]
pub struct MachineLog {
    pub realized: BTreeSet<DeviceKey>,
    pub unrealized: Vec<DeviceKey>,
    pub resets: Vec<DeviceKey>,
    pub fail_realize: Option<String>,
}

pub struct RecordingHooks(pub Arc<Mutex<MachineLog>>);

impl DeviceHooks for RecordingHooks {
    fn realize(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError> {
        let mut l = self.0.lock().unwrap();
        if l.fail_realize.as_deref() == Some(dev.driver) {
            return Err("backend unavailable".into());
        }
        assert!(l.realized.insert(dev.key), "realized twice");
        Ok(())
    }
    fn unrealize(&mut self, dev: &DeviceView<'_>) {
        let mut l = self.0.lock().unwrap();
        assert!(
            l.realized.remove(&dev.key),
            "unrealize of a device not realized"
        );
        l.unrealized.push(dev.key);
    }
    fn reset(&mut self, dev: &DeviceView<'_>) {
        self.0.lock().unwrap().resets.push(dev.key);
    }
}

/// The guest-side controller state: what the handler was told, what the guest has to answer.
#[derive(Debug, Default)]
pub struct ControllerLog {
    /// (key, hotplugged) per plug call.
    pub plugged: Vec<(DeviceKey, bool)>,
    /// Outstanding requests the scripted guest may answer.
    pub requests: Vec<DeviceKey>,
    /// Every unplug_request call.
    pub request_calls: usize,
    /// Final unplug calls.
    pub unplugged: Vec<DeviceKey>,
    pub mode: Option<UnplugMode>,
    pub refuse_request: bool,
    pub refuse_plug: bool,
    /// Re-send a pending request on a repeated `device_del` (QEMU 7.2's ACPI PCI hot plug).
    pub resend: bool,
}

pub struct ScriptedController(pub Arc<Mutex<ControllerLog>>);

impl HotplugHandler for ScriptedController {
    fn plug(&mut self, dev: &DeviceView<'_>) -> Result<(), HookError> {
        let mut l = self.0.lock().unwrap();
        if l.refuse_plug && dev.hotplugged {
            return Err("no free hotplug slot in the controller".into());
        }
        l.plugged.push((dev.key, dev.hotplugged));
        Ok(())
    }
    fn unplug_request(&mut self, dev: &DeviceView<'_>) -> Result<UnplugMode, HookError> {
        let mut l = self.0.lock().unwrap();
        l.request_calls += 1;
        if l.refuse_request {
            return Err("guest is busy (power indicator blinking)".into());
        }
        let mode = l.mode.unwrap_or(UnplugMode::Async);
        if mode == UnplugMode::Async && !l.requests.contains(&dev.key) {
            l.requests.push(dev.key);
        }
        Ok(mode)
    }
    fn unplug_request_again(&mut self, _dev: &DeviceView<'_>) -> Result<bool, HookError> {
        let mut l = self.0.lock().unwrap();
        if l.resend {
            l.request_calls += 1;
        }
        Ok(l.resend)
    }
    fn unplug(&mut self, dev: &DeviceView<'_>) {
        let mut l = self.0.lock().unwrap();
        l.requests.retain(|k| *k != dev.key);
        l.unplugged.push(dev.key);
    }
}

pub struct Rig {
    pub tree: DeviceTree,
    pub events: Arc<EventLog>,
    pub clock: Arc<ManualClock>,
    pub machine: Arc<Mutex<MachineLog>>,
    pub ctrl: Arc<Mutex<ControllerLog>>,
}

pub fn virtio_slots(n: u64) -> Vec<SlotResources> {
    (0..n)
        .map(|i| SlotResources {
            mmio: Some(Window {
                base: 0xfeb0_0000 + i * 0x200,
                len: 0x200,
            }),
            pio: None,
            irq: Some(u32::try_from(16 + i).unwrap()),
        })
        .collect()
}

/// A microvm-like tree: an ISA bus, a virtio-mmio bus with 4 slots (no hotplug), and a test
/// bus with 3 slots and a scripted hotplug controller. One onboard i8042.
pub fn rig() -> Rig {
    rig_with(registry())
}

/// [`rig`] with another type registry.
pub fn rig_with(registry: TypeRegistry) -> Rig {
    let events = Arc::new(EventLog::new());
    let clock = Arc::new(ManualClock::new());
    let machine = Arc::new(Mutex::new(MachineLog::default()));
    let ctrl = Arc::new(Mutex::new(ControllerLog::default()));
    let mut tree = DeviceTree::new(
        registry,
        Box::new(RecordingHooks(machine.clone())),
        events.clone(),
    )
    .with_clock(clock.clone());
    tree.add_bus(BusSpec::new("isa.0", BusType::Isa)).unwrap();
    tree.add_bus(BusSpec::new("virtio-mmio-bus", BusType::VirtioMmio).slots(virtio_slots(4)))
        .unwrap();
    tree.add_bus(
        BusSpec::new(TEST_BUS, BusType::Other("test-hp".into()))
            .slots(vec![SlotResources::default(); 3])
            .hotplug(Box::new(ScriptedController(ctrl.clone()))),
    )
    .unwrap();
    tree.add_onboard(Phase::AccelCreated, &DeviceRequest::new("i8042"))
        .unwrap();
    Rig {
        tree,
        events,
        clock,
        machine,
        ctrl,
    }
}
