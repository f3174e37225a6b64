//! Cold and hot plug, the unplug state machine, and introspection, driven through a scripted
//! guest-side controller (no guest needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keel_phase::{Phase, PhaseTracker};
use keel_qdev::*;
use serde_json::json;

fn cli(s: &str) -> DeviceRequest {
    DeviceRequest::parse_cli(s).unwrap()
}

fn qmp(v: serde_json::Value) -> DeviceRequest {
    DeviceRequest::from_qmp_value(&v).unwrap()
}

fn deleted(id: Option<&str>, path: &str) -> DeviceEvent {
    DeviceEvent::DeviceDeleted {
        device: id.map(str::to_owned),
        path: path.to_owned(),
    }
}

fn guest_error(id: Option<&str>, path: &str) -> DeviceEvent {
    DeviceEvent::UnplugGuestError {
        device: id.map(str::to_owned),
        path: path.to_owned(),
    }
}

#[test]
fn phase_decides_cold_hot_or_out_of_phase() {
    let mut r = rig();
    for p in [Phase::NoMachine, Phase::MachineCreated, Phase::AccelCreated] {
        let e = r
            .tree
            .device_add(p, &cli("isa-debug-exit,id=dbg"))
            .unwrap_err();
        assert_eq!(e.qmp_class(), "OutOfPhase");
        assert!(
            matches!(e, QdevError::OutOfPhase { command: "device_add", current, needed }
            if current == p && needed == DEVICE_ADD_PHASES)
        );
        let e = r.tree.device_del(p, "dbg").unwrap_err();
        assert_eq!(e.qmp_class(), "OutOfPhase");
    }
    let e = r
        .tree
        .device_add(Phase::AccelCreated, &cli("isa-debug-exit"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "'device_add' is not allowed in phase accel-created: it needs machine-init or machine-ready"
    );
    assert_eq!(r.tree.len(), 1, "only the onboard i8042");

    let cold = r
        .tree
        .device_add(
            Phase::MachineInit,
            &cli("isa-debug-exit,id=dbg,iobase=0xf4,iosize=0x04"),
        )
        .unwrap();
    assert!(!cold.hotplugged);
    assert_eq!(cold.path, "/machine/peripheral/dbg");
    let blk = r
        .tree
        .device_add(
            Phase::MachineInit,
            &cli("virtio-blk-device,drive=d0,id=vd0"),
        )
        .unwrap();
    assert_eq!((blk.bus.as_str(), blk.slot), ("virtio-mmio-bus", Some(0)));

    // machine-ready: virtio-mmio has no hotplug handler.
    let e = r
        .tree
        .device_add(
            Phase::MachineReady,
            &cli("virtio-blk-device,drive=d1,id=vd1"),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bus 'virtio-mmio-bus' does not support hotplugging"
    );
    assert_eq!(e.qmp_class(), "GenericError");
    let e = r
        .tree
        .device_add(Phase::MachineReady, &cli("isa-debug-exit,id=x"))
        .unwrap_err();
    assert_eq!(e.to_string(), "Bus 'isa.0' does not support hotplugging");
    let e = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-cold-dev"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Device 'test-cold-dev' does not support hotplugging"
    );

    let hot = r
        .tree
        .device_add(
            Phase::MachineReady,
            &cli("test-hp-dev,id=hp0,size=2G,mode=slow"),
        )
        .unwrap();
    assert!(hot.hotplugged);
    let ctrl = r.ctrl.lock().unwrap();
    assert_eq!(ctrl.plugged, vec![(hot.key, true)]);
    drop(ctrl);
    let node = r.tree.query_device("hp0").unwrap();
    assert!(node.hotplugged);
    assert_eq!(node.props.u64("size"), Some(2 << 30));
    assert_eq!(node.props.str("mode"), Some("slow"));
    assert_eq!(
        r.tree
            .qom_get("/machine/peripheral/dbg", "hotplugged")
            .unwrap(),
        json!(false)
    );
    assert_eq!(
        r.tree
            .qom_get("/machine/peripheral/hp0", "hotplugged")
            .unwrap(),
        json!(true)
    );
}

#[test]
fn errors_name_the_problem_and_create_nothing() {
    let mut r = rig();
    r.tree
        .device_add(Phase::MachineInit, &cli("isa-serial,id=s0"))
        .unwrap();
    let before = serde_json::to_value(r.tree.query_tree()).unwrap();
    let realized = r.machine.lock().unwrap().realized.len();
    let cases: Vec<(DeviceRequest, &str)> = vec![
        (cli("isa-serial,id=s0"), "Duplicate device ID 's0'"),
        (
            cli("nope,id=n"),
            "'nope' is not a valid device model name (known: isa-serial, isa-debug-exit, virtio-blk-device, virtio-rng-device, test-hp-dev, test-cold-dev)",
        ),
        (
            cli("i8042"),
            "Parameter 'driver' expects a pluggable device type: 'i8042' is created by the board only",
        ),
        (
            cli("isa-serial,id=s1,foo=1"),
            "Property 'isa-serial.foo' not found (accepted: iobase, irq, chardev)",
        ),
        (
            cli("isa-serial,id=s1,irq=16"),
            "Property 'isa-serial.irq' doesn't take value '16': expects a uint32 between 0 and 15 (0x0..=0xf; decimal, 0x hex or 0 octal)",
        ),
        (
            qmp(json!({"driver": "virtio-blk-device", "ro": 1, "drive": "x"})),
            "Property 'virtio-blk-device.ro' doesn't take value 1: expects 'on' or 'off'",
        ),
        (
            cli("virtio-blk-device"),
            "Property 'virtio-blk-device.drive' is required (expects a string)",
        ),
        (
            cli("isa-serial,id=1bad"),
            "Parameter 'id' expects an identifier: '1bad' must start with a letter and contain only letters, digits, '-', '.' and '_'",
        ),
        (
            cli("isa-serial,bus=nobus"),
            "Bus 'nobus' not found (buses: isa.0, virtio-mmio-bus, test-hp-bus)",
        ),
        (
            cli("isa-serial,bus=virtio-mmio-bus"),
            "Device 'isa-serial' can't go on virtio-mmio-bus bus 'virtio-mmio-bus': it needs a bus of type ISA",
        ),
    ];
    for (req, msg) in cases {
        let e = r.tree.device_add(Phase::MachineInit, &req).unwrap_err();
        assert_eq!(e.to_string(), msg);
        assert_eq!(e.qmp_class(), "GenericError");
        assert_eq!(
            serde_json::to_value(r.tree.query_tree()).unwrap(),
            before,
            "{msg}"
        );
    }
    assert_eq!(r.machine.lock().unwrap().realized.len(), realized);
    assert!(r.events.take().is_empty());

    // Realize failure: nothing is left behind, the id stays free.
    r.machine.lock().unwrap().fail_realize = Some("isa-debug-exit".into());
    let e = r
        .tree
        .device_add(Phase::MachineInit, &cli("isa-debug-exit,id=d"))
        .unwrap_err();
    assert_eq!(
        e.qmp_desc(),
        "Device 'isa-debug-exit' could not be realized: backend unavailable"
    );
    assert!(r.tree.find("d").is_none());
    r.machine.lock().unwrap().fail_realize = None;
    r.tree
        .device_add(Phase::MachineInit, &cli("isa-debug-exit,id=d"))
        .unwrap();

    // A handler refusing a hot plug: realize is undone, the slot is free.
    r.ctrl.lock().unwrap().refuse_plug = true;
    let e = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=h"))
        .unwrap_err();
    assert_eq!(
        e.qmp_desc(),
        "Bus 'test-hp-bus' refused to plug device 'h': no free hotplug slot in the controller"
    );
    assert_eq!(r.machine.lock().unwrap().unrealized.len(), 1);
    assert!(r.tree.find("h").is_none());
}

#[test]
fn slots_fill_and_full_buses_refuse() {
    let mut r = rig();
    for i in 0..4 {
        let a = r
            .tree
            .device_add(Phase::MachineInit, &cli("virtio-rng-device"))
            .unwrap();
        assert_eq!(a.slot, Some(i));
        assert_eq!(a.path, format!("/machine/peripheral-anon/device[{i}]"));
    }
    let e = r
        .tree
        .device_add(Phase::MachineInit, &cli("virtio-rng-device"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "No 'virtio-mmio-bus' bus found for device 'virtio-rng-device' (none exists or all are full)"
    );
    let e = r
        .tree
        .device_add(
            Phase::MachineInit,
            &cli("virtio-rng-device,bus=virtio-mmio-bus"),
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "Bus 'virtio-mmio-bus' is full");
    // machine-init device_del removes at once and frees slot and anon index.
    assert_eq!(
        r.tree
            .device_del(Phase::MachineInit, "/machine/peripheral-anon/device[1]")
            .unwrap(),
        DelOutcome::Removed
    );
    assert_eq!(
        r.events.take(),
        vec![deleted(None, "/machine/peripheral-anon/device[1]")]
    );
    let a = r
        .tree
        .device_add(Phase::MachineInit, &cli("virtio-rng-device"))
        .unwrap();
    assert_eq!(
        (a.slot, a.path.as_str()),
        (Some(1), "/machine/peripheral-anon/device[1]")
    );
    // Onboard devices cannot be removed.
    let e = r
        .tree
        .device_del(Phase::MachineInit, "/machine/unattached/device[0]")
        .unwrap_err();
    assert!(matches!(e, QdevError::Onboard(_)));
}

#[test]
fn unplug_success_releases_id_and_slot_only_when_gone() {
    let mut r = rig();
    let a = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=hp1"))
        .unwrap();
    assert_eq!(
        r.tree.device_del(Phase::MachineReady, "hp1").unwrap(),
        DelOutcome::Pending
    );
    assert_eq!(r.tree.unplug_state(a.key), Some(UnplugState::Pending));
    assert_eq!(
        r.tree.query_device("hp1").unwrap().unplug_state,
        UnplugState::Pending
    );
    let tree = serde_json::to_value(r.tree.query_tree()).unwrap();
    assert_eq!(tree[2]["devices"][0]["unplug-state"], json!("pending"));
    // Second request while pending.
    let e = r.tree.device_del(Phase::MachineReady, "hp1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Device hp1 is already in the process of unplug"
    );
    assert_eq!(r.ctrl.lock().unwrap().request_calls, 1);
    // Id and slot still taken.
    let e = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=hp1"))
        .unwrap_err();
    assert!(matches!(e, QdevError::DuplicateId(_)));
    let b = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=hp2"))
        .unwrap();
    assert_eq!(b.slot, Some(1));
    assert!(r.events.take().is_empty());
    // The guest ejects.
    let key = r.ctrl.lock().unwrap().requests[0];
    r.tree.guest_answer(GuestAnswer::Ejected(key)).unwrap();
    assert_eq!(
        r.events.take(),
        vec![deleted(Some("hp1"), "/machine/peripheral/hp1")]
    );
    assert_eq!(r.events.take(), vec![]);
    assert!(r.tree.find("hp1").is_none());
    assert_eq!(r.machine.lock().unwrap().unrealized, vec![a.key]);
    assert_eq!(r.ctrl.lock().unwrap().unplugged, vec![a.key]);
    // Id and slot free again.
    let c = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=hp1"))
        .unwrap();
    assert_eq!(c.slot, Some(0));
    assert_ne!(c.key, a.key, "keys are never reused");
    // A stale answer is an error, not a crash.
    assert!(matches!(
        r.tree.guest_answer(GuestAnswer::Ejected(key)),
        Err(QdevError::DeviceNotFound(_))
    ));
    // Unknown ids.
    let e = r.tree.device_del(Phase::MachineReady, "ghost").unwrap_err();
    assert_eq!(
        (e.qmp_class(), e.to_string().as_str()),
        ("DeviceNotFound", "Device 'ghost' not found")
    );
}

#[test]
fn guest_refusal_then_retry() {
    let mut r = rig();
    let a = r
        .tree
        .device_add(Phase::MachineInit, &cli("test-hp-dev,id=hp"))
        .unwrap();
    assert_eq!(
        r.ctrl.lock().unwrap().plugged,
        vec![(a.key, false)],
        "cold devices are plugged quietly"
    );
    r.tree.device_del(Phase::MachineReady, "hp").unwrap();
    r.tree.guest_answer(GuestAnswer::Refused(a.key)).unwrap();
    assert_eq!(
        r.events.take(),
        vec![guest_error(Some("hp"), "/machine/peripheral/hp")]
    );
    assert_eq!(r.tree.unplug_state(a.key), Some(UnplugState::GuestError));
    assert!(matches!(
        r.tree.guest_answer(GuestAnswer::Refused(a.key)),
        Err(QdevError::NoPendingUnplug(_))
    ));
    assert!(r.events.take().is_empty());
    // A reset does not remove a device the guest declined to release.
    assert_eq!(r.tree.reset(), 0);
    assert!(r.tree.find("hp").is_some());
    // Retry succeeds.
    assert_eq!(
        r.tree.device_del(Phase::MachineReady, "hp").unwrap(),
        DelOutcome::Pending
    );
    r.tree.guest_answer(GuestAnswer::Ejected(a.key)).unwrap();
    assert_eq!(
        r.events.take(),
        vec![deleted(Some("hp"), "/machine/peripheral/hp")]
    );
}

#[test]
fn timeout_is_visible_and_late_eject_still_works() {
    let mut r = rig();
    r.tree.set_unplug_timeout(Some(Duration::from_secs(5)));
    let a = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev"))
        .unwrap();
    r.tree.device_del(Phase::MachineReady, &a.path).unwrap();
    assert_eq!(r.tree.next_deadline(), Some(Duration::from_secs(5)));
    r.clock.advance(Duration::from_millis(4999));
    assert_eq!(r.tree.poll_timeouts(), 0);
    r.clock.advance(Duration::from_millis(1));
    assert_eq!(r.tree.poll_timeouts(), 1);
    assert_eq!(r.tree.poll_timeouts(), 0, "reported once");
    assert_eq!(
        r.events.take(),
        vec![guest_error(None, "/machine/peripheral-anon/device[0]")]
    );
    assert_eq!(r.tree.unplug_state(a.key), Some(UnplugState::TimedOut));
    assert_eq!(r.tree.next_deadline(), None);
    assert_eq!(
        r.tree.qom_get(&a.path, "x-unplug-state").unwrap(),
        json!("timed-out")
    );
    // The guest answers late: the device goes.
    r.tree.guest_answer(GuestAnswer::Ejected(a.key)).unwrap();
    assert_eq!(
        r.events.take(),
        vec![deleted(None, "/machine/peripheral-anon/device[0]")]
    );

    // With no timeout the request stays pending forever, visibly.
    r.tree.set_unplug_timeout(None);
    let b = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=b"))
        .unwrap();
    r.tree.device_del(Phase::MachineReady, "b").unwrap();
    r.clock.advance(Duration::from_secs(3600));
    assert_eq!(r.tree.poll_timeouts(), 0);
    assert_eq!(r.tree.unplug_state(b.key), Some(UnplugState::Pending));
}

#[test]
fn reset_completes_outstanding_unplugs() {
    let mut r = rig();
    r.tree.set_unplug_timeout(Some(Duration::from_secs(1)));
    let a = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=a"))
        .unwrap();
    let b = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=b"))
        .unwrap();
    let c = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=c"))
        .unwrap();
    r.tree.device_del(Phase::MachineReady, "a").unwrap();
    r.clock.advance(Duration::from_secs(2));
    r.tree.poll_timeouts();
    r.tree.device_del(Phase::MachineReady, "b").unwrap();
    r.events.take();
    assert_eq!(r.tree.reset(), 2);
    let ev = r.events.take();
    assert_eq!(
        ev,
        vec![
            deleted(Some("a"), "/machine/peripheral/a"),
            deleted(Some("b"), "/machine/peripheral/b")
        ]
    );
    assert_eq!(r.tree.unplug_state(c.key), Some(UnplugState::None));
    let resets = r.machine.lock().unwrap().resets.clone();
    assert!(resets.contains(&c.key) && !resets.contains(&a.key) && !resets.contains(&b.key));
    assert_eq!(resets.len(), 2, "i8042 and c");
}

#[test]
fn unplug_refusals() {
    let mut r = rig();
    r.tree
        .device_add(Phase::MachineInit, &cli("isa-debug-exit,id=dbg"))
        .unwrap();
    r.tree
        .device_add(Phase::MachineInit, &cli("virtio-rng-device,id=rng"))
        .unwrap();
    r.tree
        .device_add(Phase::MachineInit, &cli("test-cold-dev,id=cold"))
        .unwrap();
    r.tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=hp"))
        .unwrap();
    let e = r.tree.device_del(Phase::MachineReady, "dbg").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Device 'isa-debug-exit' does not support hotplugging"
    );
    let e = r.tree.device_del(Phase::MachineReady, "rng").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bus 'virtio-mmio-bus' does not support hotplugging"
    );
    let e = r.tree.device_del(Phase::MachineReady, "cold").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Device 'test-cold-dev' does not support hotplugging"
    );
    r.ctrl.lock().unwrap().refuse_request = true;
    let e = r.tree.device_del(Phase::MachineReady, "hp").unwrap_err();
    assert_eq!(
        e.qmp_desc(),
        "Bus 'test-hp-bus' refused to unplug device 'hp': guest is busy (power indicator blinking)"
    );
    assert_eq!(
        r.tree.query_device("hp").unwrap().unplug_state,
        UnplugState::None
    );
    // Immediate unplug (e.g. powered-off slot).
    r.ctrl.lock().unwrap().refuse_request = false;
    r.ctrl.lock().unwrap().mode = Some(UnplugMode::Immediate);
    assert_eq!(
        r.tree.device_del(Phase::MachineReady, "hp").unwrap(),
        DelOutcome::Removed
    );
    assert_eq!(
        r.events.take(),
        vec![deleted(Some("hp"), "/machine/peripheral/hp")]
    );
    assert!(r.events.take().is_empty());
}

#[test]
fn cli_and_qmp_build_the_same_tree() {
    let lines = [
        "isa-serial,id=ser0,chardev=char0",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "virtio-blk-device,id=vd0,drive=disk0,ro=on,serial=a,,b",
        "virtio-rng-device,bus=virtio-mmio-bus",
    ];
    let jsons = [
        json!({"driver": "isa-serial", "id": "ser0", "chardev": "char0"}),
        json!({"driver": "isa-debug-exit", "iobase": 0xf4, "iosize": 4}),
        json!({"driver": "virtio-blk-device", "id": "vd0", "drive": "disk0", "ro": true, "serial": "a,b"}),
        json!({"driver": "virtio-rng-device", "bus": "virtio-mmio-bus"}),
    ];
    let mut a = rig();
    let mut b = rig();
    for (l, j) in lines.iter().zip(jsons) {
        a.tree.device_add(Phase::MachineInit, &cli(l)).unwrap();
        b.tree.device_add(Phase::MachineInit, &qmp(j)).unwrap();
    }
    let ta = serde_json::to_value(a.tree.query_tree()).unwrap();
    assert_eq!(ta, serde_json::to_value(b.tree.query_tree()).unwrap());
    assert_eq!(
        ta[1]["devices"][0]["resources"],
        json!({"mmio": {"base": 0xfeb0_0000u64, "len": 0x200}, "irq": 16})
    );
    assert_eq!(
        ta[0]["devices"][2]["props"],
        json!({"iobase": 0xf4, "iosize": 4})
    );
}

#[test]
fn qom_introspection() {
    let mut r = rig();
    r.tree
        .device_add(
            Phase::MachineInit,
            &cli("isa-debug-exit,id=dbg,iobase=0xf4"),
        )
        .unwrap();
    r.tree
        .device_add(Phase::MachineInit, &cli("virtio-rng-device"))
        .unwrap();
    let names = |path: &str, tree: &DeviceTree| -> Vec<String> {
        tree.qom_list(path)
            .unwrap()
            .into_iter()
            .map(|p| format!("{}:{}", p.name, p.ty))
            .collect()
    };
    assert_eq!(
        names("/machine", &r.tree),
        [
            "type:string",
            "peripheral:child<container>",
            "peripheral-anon:child<container>",
            "unattached:child<container>",
            "isa.0:child<ISA>",
            "virtio-mmio-bus:child<virtio-mmio-bus>",
            "test-hp-bus:child<test-hp>"
        ]
    );
    assert_eq!(
        names("/machine/peripheral", &r.tree),
        ["type:string", "dbg:child<isa-debug-exit>"]
    );
    assert_eq!(
        names("/machine/unattached", &r.tree),
        ["type:string", "device[0]:child<i8042>"]
    );
    assert_eq!(
        names("/machine/peripheral/dbg", &r.tree),
        [
            "type:string",
            "id:string",
            "realized:bool",
            "hotplugged:bool",
            "hotpluggable:bool",
            "parent_bus:link<ISA>",
            "x-unplug-state:string",
            "iobase:uint32",
            "iosize:uint32"
        ]
    );
    assert_eq!(
        names("/machine/virtio-mmio-bus", &r.tree),
        [
            "type:string",
            "realized:bool",
            "hotpluggable:bool",
            "child[0]:link<virtio-rng-device>"
        ]
    );
    let get = |p: &str, k: &str| r.tree.qom_get(p, k).unwrap();
    assert_eq!(
        get("/machine/peripheral/dbg", "type"),
        json!("isa-debug-exit")
    );
    assert_eq!(get("/machine/peripheral/dbg", "id"), json!("dbg"));
    assert_eq!(get("/machine/peripheral/dbg", "realized"), json!(true));
    assert_eq!(
        get("/machine/peripheral/dbg", "parent_bus"),
        json!("/machine/isa.0")
    );
    assert_eq!(get("/machine/peripheral/dbg", "iobase"), json!(0xf4));
    assert_eq!(get("/machine/peripheral/dbg", "iosize"), json!(2));
    assert_eq!(
        get("/machine/virtio-mmio-bus", "child[0]"),
        json!("/machine/peripheral-anon/device[0]")
    );
    assert_eq!(
        get("/machine/virtio-mmio-bus", "hotpluggable"),
        json!(false)
    );
    assert_eq!(get("/machine/test-hp-bus", "hotpluggable"), json!(true));
    assert_eq!(get("/machine", "peripheral"), json!("/machine/peripheral"));
    let e = r
        .tree
        .qom_get("/machine/peripheral/nope", "type")
        .unwrap_err();
    assert_eq!(e.qmp_class(), "DeviceNotFound");
    let e = r
        .tree
        .qom_get("/machine/peripheral/dbg", "nope")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Property '/machine/peripheral/dbg.nope' not found"
    );
    assert!(
        r.tree
            .qom_get("/machine/peripheral-anon/device[0]", "id")
            .is_err()
    );
    assert_eq!(r.tree.qom_list_types(Some("virtio-device"), false).len(), 2);
    let props = serde_json::to_value(r.tree.device_list_properties("isa-serial").unwrap()).unwrap();
    assert_eq!(
        props[0],
        json!({"name": "iobase", "type": "uint32", "description": "I/O base", "default-value": 0x3f8})
    );
}

#[test]
fn init_done_collects_cold_devices_once() {
    let tracker_tree = Arc::new(Mutex::new(rig().tree));
    let mut tracker = PhaseTracker::new();
    let snap = collect_on_machine_ready(
        &tracker,
        tracker_tree.clone(),
        DeviceFilter::BusType(BusType::VirtioMmio),
    );
    let all = collect_on_machine_ready(&tracker, tracker_tree.clone(), DeviceFilter::All);
    for p in [
        Phase::MachineCreated,
        Phase::AccelCreated,
        Phase::MachineInit,
    ] {
        tracker.advance(p).unwrap();
    }
    {
        let mut t = tracker_tree.lock().unwrap();
        t.device_add(tracker.phase(), &cli("virtio-blk-device,drive=a,id=vda"))
            .unwrap();
        t.device_add(tracker.phase(), &cli("virtio-rng-device"))
            .unwrap();
        t.device_add(tracker.phase(), &cli("test-hp-dev,id=coldhp"))
            .unwrap();
    }
    assert!(snap.get().is_none());
    tracker.advance(Phase::MachineReady).unwrap();
    {
        let mut t = tracker_tree.lock().unwrap();
        t.device_add(tracker.phase(), &cli("test-hp-dev,id=hot"))
            .unwrap();
        t.device_del(tracker.phase(), "coldhp").unwrap();
    }
    let got = snap.get().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id.as_deref(), Some("vda"));
    assert_eq!(got[0].resources.unwrap().irq, Some(16));
    assert_eq!(got[1].resources.unwrap().mmio.unwrap().base, 0xfeb0_0200);
    let all = all.get().unwrap();
    assert!(all.iter().all(|d| d.id.as_deref() != Some("hot")));
    assert!(all.iter().any(|d| d.onboard && d.driver == "i8042"));
    // Later calls still see only cold devices.
    let now = tracker_tree
        .lock()
        .unwrap()
        .cold_devices(&DeviceFilter::Bus(TEST_BUS.into()));
    assert_eq!(now.len(), 1, "coldhp (pending unplug) but not hot");
}

#[test]
fn event_shapes() {
    let e = deleted(Some("x"), "/machine/peripheral/x");
    assert_eq!(e.name(), "DEVICE_DELETED");
    assert_eq!(
        e.data(),
        json!({"device": "x", "path": "/machine/peripheral/x"})
    );
    let e = guest_error(None, "/machine/peripheral-anon/device[0]");
    assert_eq!(e.name(), "DEVICE_UNPLUG_GUEST_ERROR");
    assert_eq!(
        e.data(),
        json!({"path": "/machine/peripheral-anon/device[0]"})
    );
}

#[test]
fn guest_cannot_eject_what_cannot_be_unplugged() {
    let mut r = rig();
    let cold = r
        .tree
        .device_add(Phase::MachineInit, &cli("test-cold-dev,id=c"))
        .unwrap();
    let rng = r
        .tree
        .device_add(Phase::MachineInit, &cli("virtio-rng-device"))
        .unwrap();
    let e = r
        .tree
        .guest_answer(GuestAnswer::Ejected(cold.key))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Device 'test-cold-dev' does not support hotplugging"
    );
    let e = r
        .tree
        .guest_answer(GuestAnswer::Ejected(rng.key))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bus 'virtio-mmio-bus' does not support hotplugging"
    );
    assert_eq!(r.tree.len(), 3);
    assert!(r.events.take().is_empty());
    // A hot device the guest ejects on its own (no request) goes, with DEVICE_DELETED.
    let hp = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-dev,id=h"))
        .unwrap();
    r.tree.guest_answer(GuestAnswer::Ejected(hp.key)).unwrap();
    assert_eq!(
        r.events.take(),
        vec![deleted(Some("h"), "/machine/peripheral/h")]
    );
}

#[test]
fn device_limit_and_wrappers() {
    let mut r = rig();
    r.tree.set_max_devices(3);
    r.tree
        .device_add_cli(Phase::MachineInit, "isa-serial")
        .unwrap();
    r.tree
        .device_add_json(
            Phase::MachineInit,
            &json!({"driver": "isa-serial", "iobase": "0x2f8"}),
        )
        .unwrap();
    let e = r
        .tree
        .device_add_cli(Phase::MachineInit, "isa-serial")
        .unwrap_err();
    assert_eq!(e.to_string(), "Too many devices: the limit is 3");
    // Out of phase wins over a malformed request, as the dispatcher checks phases first.
    let e = r.tree.device_add_cli(Phase::AccelCreated, "").unwrap_err();
    assert_eq!(e.qmp_class(), "OutOfPhase");
    let e = r
        .tree
        .device_add_json(Phase::NoMachine, &json!(1))
        .unwrap_err();
    assert_eq!(e.qmp_class(), "OutOfPhase");
    let e = r
        .tree
        .device_add_json(Phase::MachineInit, &json!({"id": "x"}))
        .unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'driver' is missing");
}

#[test]
fn bus_definition_errors() {
    let mut r = rig();
    let e = r
        .tree
        .add_bus(BusSpec::new("isa.0", BusType::Isa))
        .unwrap_err();
    assert_eq!(e.to_string(), "Bus 'isa.0' already exists");
    let e = r
        .tree
        .add_bus(BusSpec::new("a/b", BusType::Isa))
        .unwrap_err();
    assert!(matches!(e, QdevError::InvalidBusName(_)));
    let e = r
        .tree
        .add_bus(BusSpec::new("sub", BusType::Isa).parent("/machine/peripheral/x"))
        .unwrap_err();
    assert!(matches!(e, QdevError::BadBusParent { .. }));
    // A bus hanging off a device: the device cannot go while the bus exists.
    r.tree
        .device_add(Phase::MachineInit, &cli("isa-serial,id=bridge"))
        .unwrap();
    r.tree
        .add_bus(
            BusSpec::new("sub.0", BusType::Other("sub".into()))
                .parent("/machine/peripheral/bridge"),
        )
        .unwrap();
    assert_eq!(
        r.tree
            .qom_get("/machine/peripheral/bridge", "sub.0")
            .unwrap(),
        json!("/machine/peripheral/bridge/sub.0")
    );
    let e = r.tree.device_del(Phase::MachineInit, "bridge").unwrap_err();
    assert!(matches!(e, QdevError::HasChildBuses(_)));
}

#[test]
fn partial_qom_paths() {
    let mut r = rig();
    r.tree
        .device_add(Phase::MachineInit, &cli("isa-debug-exit,id=dbg"))
        .unwrap();
    r.tree
        .device_add(Phase::MachineInit, &cli("virtio-rng-device"))
        .unwrap();
    assert_eq!(
        r.tree.qom_get("dbg", "type").unwrap(),
        json!("isa-debug-exit")
    );
    assert_eq!(
        r.tree.qom_get("peripheral/dbg", "id").unwrap(),
        json!("dbg")
    );
    assert_eq!(r.tree.qom_get("isa.0", "type").unwrap(), json!("ISA"));
    assert_eq!(
        r.tree.qom_get("peripheral", "type").unwrap(),
        json!("container")
    );
    assert!(r.tree.qom_list("machine").is_ok());
    // device[0] exists in peripheral-anon and unattached.
    let e = r.tree.qom_get("device[0]", "type").unwrap_err();
    assert_eq!(
        (e.qmp_class(), e.to_string().as_str()),
        ("GenericError", "Path 'device[0]' is ambiguous")
    );
    assert_eq!(
        r.tree.qom_get("unattached/device[0]", "type").unwrap(),
        json!("i8042")
    );
    assert_eq!(
        r.tree.qom_get("nothing", "type").unwrap_err().qmp_class(),
        "DeviceNotFound"
    );
}

/// `qom-list` shows a type's declared child as QEMU shows a virtio-pci proxy's
/// `virtio-backend` (`child<virtio-rng-device>`), and the child itself can be listed and
/// read; a name the type does not declare is not found.
#[test]
fn qom_shows_the_declared_child_device() {
    let mut r = rig_with(
        registry()
            .with(
                DeviceType::new("test-hp-proxy", BusType::Other("test-hp".into()))
                    .hotpluggable(true)
                    .child_of_type("virtio-backend", "virtio-rng-device"),
            )
            .unwrap(),
    );
    r.tree
        .device_add(Phase::MachineReady, &cli("test-hp-proxy,id=px"))
        .unwrap();
    let list = r.tree.qom_list("/machine/peripheral/px").unwrap();
    assert!(
        list.iter()
            .any(|p| p.name == "virtio-backend" && p.ty == "child<virtio-rng-device>"),
        "{list:?}"
    );
    let child = r
        .tree
        .qom_list("/machine/peripheral/px/virtio-backend")
        .unwrap();
    assert!(child.iter().any(|p| p.name == "type"), "{child:?}");
    assert_eq!(
        r.tree
            .qom_get("/machine/peripheral/px/virtio-backend", "type")
            .unwrap(),
        serde_json::json!("virtio-rng-device")
    );
    assert_eq!(
        r.tree
            .qom_get("/machine/peripheral/px", "virtio-backend")
            .unwrap(),
        serde_json::json!("/machine/peripheral/px/virtio-backend")
    );
    assert!(r.tree.qom_list("/machine/peripheral/px/nothing").is_err());
}

/// A controller that re-sends requests (QEMU 7.2's ACPI PCI hot plug) takes a repeated
/// `device_del` while the unplug is pending: the request goes out again, the timeout
/// restarts, nothing else changes. A type with a child device (a virtio-pci proxy and its
/// `virtio-backend`) reports the child's deletion first, path only, as QEMU does.
#[test]
fn repeated_request_and_the_child_device_event() {
    let mut r = rig_with(
        registry()
            .with(
                DeviceType::new("test-hp-proxy", BusType::Other("test-hp".into()))
                    .hotpluggable(true)
                    .child("virtio-backend"),
            )
            .unwrap(),
    );
    r.ctrl.lock().unwrap().resend = true;
    r.tree.set_unplug_timeout(Some(Duration::from_secs(5)));
    let a = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-proxy,id=px"))
        .unwrap();
    assert_eq!(
        r.tree.device_del(Phase::MachineReady, "px").unwrap(),
        DelOutcome::Pending
    );
    r.clock.advance(Duration::from_secs(4));
    assert_eq!(
        r.tree.device_del(Phase::MachineReady, "px").unwrap(),
        DelOutcome::Pending
    );
    assert_eq!(r.ctrl.lock().unwrap().request_calls, 2);
    assert_eq!(r.tree.unplug_state(a.key), Some(UnplugState::Pending));
    assert_eq!(r.tree.next_deadline(), Some(Duration::from_secs(9)));
    assert!(r.events.take().is_empty());
    r.tree.guest_answer(GuestAnswer::Ejected(a.key)).unwrap();
    assert_eq!(
        r.events.take(),
        vec![
            deleted(None, "/machine/peripheral/px/virtio-backend"),
            deleted(Some("px"), "/machine/peripheral/px"),
        ]
    );
    // An anonymous device's child is under its anonymous path; a reset completes it too.
    let b = r
        .tree
        .device_add(Phase::MachineReady, &cli("test-hp-proxy"))
        .unwrap();
    r.tree.device_del(Phase::MachineReady, &b.path).unwrap();
    assert_eq!(r.tree.reset(), 1);
    assert_eq!(
        r.events.take(),
        vec![
            deleted(None, &format!("{}/virtio-backend", b.path)),
            deleted(None, &b.path),
        ]
    );
}
