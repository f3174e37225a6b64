//! Property tests: random sequences of device_add / device_del / phase advances / guest
//! answers / clock ticks / resets keep the tree's invariants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use keel_phase::Phase;
use keel_qdev::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Add {
        driver: usize,
        id: Option<u8>,
        bad: bool,
        by_bus: bool,
    },
    DelId(u8),
    DelPath(usize),
    Advance,
    Eject(usize),
    Refuse(usize),
    StaleAnswer(u64, bool),
    Tick(u64),
    Reset,
    Mode(bool),
}

const DRIVERS: [&str; 5] = [
    "test-hp-dev",
    "test-cold-dev",
    "isa-debug-exit",
    "virtio-rng-device",
    "no-such-dev",
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..DRIVERS.len(), proptest::option::of(0u8..6), proptest::bool::weighted(0.1), any::<bool>())
            .prop_map(|(driver, id, bad, by_bus)| Op::Add { driver, id, bad, by_bus }),
        2 => (0u8..7).prop_map(Op::DelId),
        1 => (0usize..8).prop_map(Op::DelPath),
        1 => Just(Op::Advance),
        2 => (0usize..4).prop_map(Op::Eject),
        1 => (0usize..4).prop_map(Op::Refuse),
        1 => (0u64..40, any::<bool>()).prop_map(|(k, e)| Op::StaleAnswer(k, e)),
        2 => (0u64..4000).prop_map(Op::Tick),
        1 => Just(Op::Reset),
        1 => any::<bool>().prop_map(Op::Mode),
    ]
}

/// (path, id, hotplugged, unplug state, bus, slot) of one device.
type DevSnap = (
    String,
    Option<String>,
    bool,
    UnplugState,
    String,
    Option<u32>,
);

#[derive(Debug, Clone, PartialEq)]
struct Snap {
    devices: BTreeMap<DeviceKey, DevSnap>,
    json: serde_json::Value,
    realized: BTreeSet<DeviceKey>,
}

fn snap(r: &Rig) -> Snap {
    let devices = r
        .tree
        .views()
        .map(|v| {
            (
                v.key,
                (
                    v.path.to_owned(),
                    v.id.map(str::to_owned),
                    v.hotplugged,
                    r.tree.unplug_state(v.key).unwrap(),
                    v.bus.to_owned(),
                    v.slot,
                ),
            )
        })
        .collect();
    Snap {
        devices,
        json: serde_json::to_value(r.tree.query_tree()).unwrap(),
        realized: r.machine.lock().unwrap().realized.clone(),
    }
}

fn next(p: Phase) -> Phase {
    p.next().unwrap_or(p)
}

/// Checks the events of one step against the change between two snapshots.
fn check_events(before: &Snap, after: &Snap, events: &[DeviceEvent]) -> Result<(), TestCaseError> {
    let mut expected: Vec<DeviceEvent> = Vec::new();
    for (k, (path, id, _, st, _, _)) in &before.devices {
        match after.devices.get(k) {
            None => expected.push(DeviceEvent::DeviceDeleted {
                device: id.clone(),
                path: path.clone(),
            }),
            Some(a) => {
                if *st == UnplugState::Pending
                    && matches!(a.3, UnplugState::GuestError | UnplugState::TimedOut)
                {
                    expected.push(DeviceEvent::UnplugGuestError {
                        device: id.clone(),
                        path: path.clone(),
                    });
                }
            }
        }
    }
    let mut got = events.to_vec();
    let key = |e: &DeviceEvent| (e.name(), e.path().to_owned());
    got.sort_by_key(key);
    expected.sort_by_key(key);
    prop_assert_eq!(got, expected, "events must match state changes exactly");
    Ok(())
}

fn invariants(r: &Rig, created_hot: &BTreeMap<DeviceKey, bool>) -> Result<(), TestCaseError> {
    let s = snap(r);
    // ids unique, paths unique.
    let ids: Vec<_> = s.devices.values().filter_map(|d| d.1.clone()).collect();
    let uniq: BTreeSet<_> = ids.iter().collect();
    prop_assert_eq!(ids.len(), uniq.len());
    let paths: BTreeSet<_> = s.devices.values().map(|d| d.0.clone()).collect();
    prop_assert_eq!(paths.len(), s.devices.len());
    // The machine's view matches: every device realized exactly once, nothing extra.
    let keys: BTreeSet<_> = s.devices.keys().copied().collect();
    prop_assert_eq!(&keys, &s.realized);
    // hotplugged never changes after creation and follows the phase rule.
    for (k, d) in &s.devices {
        if let Some(h) = created_hot.get(k) {
            prop_assert_eq!(d.2, *h);
        }
    }
    // Slots: unique per bus, within capacity.
    let mut used = BTreeSet::new();
    for d in s.devices.values() {
        if let Some(slot) = d.5 {
            prop_assert!(used.insert((d.4.clone(), slot)), "slot taken twice");
            let cap = if d.4 == TEST_BUS { 3 } else { 4 };
            prop_assert!(slot < cap);
        }
    }
    // Every pending request is known to the controller.
    let ctrl = r.ctrl.lock().unwrap();
    for (k, d) in &s.devices {
        if d.3 == UnplugState::Pending {
            prop_assert!(ctrl.requests.contains(k));
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut r = rig();
    r.tree.set_unplug_timeout(Some(Duration::from_millis(2500)));
    let mut phase = Phase::NoMachine;
    let mut created_hot: BTreeMap<DeviceKey, bool> = BTreeMap::new();
    // The onboard device is cold.
    for v in r.tree.views() {
        created_hot.insert(v.key, false);
    }
    for op in ops {
        let before = snap(&r);
        let outcome: Result<(), QdevError> = match &op {
            Op::Add {
                driver,
                id,
                bad,
                by_bus,
            } => {
                let mut req = DeviceRequest::new(DRIVERS[*driver]);
                req.id = id.map(|n| format!("d{n}"));
                if *bad {
                    req = req.prop("nonexistent", "1");
                }
                if *by_bus && *driver == 0 {
                    req = req.bus(TEST_BUS);
                }
                let res = r.tree.device_add(phase, &req);
                match &res {
                    Ok(a) => {
                        prop_assert!(DEVICE_ADD_PHASES.contains(phase));
                        prop_assert_eq!(a.hotplugged, phase == Phase::MachineReady);
                        prop_assert!(
                            created_hot.insert(a.key, a.hotplugged).is_none(),
                            "key reused"
                        );
                    }
                    Err(e) => {
                        prop_assert_eq!(
                            e.qmp_class() == "OutOfPhase",
                            !DEVICE_ADD_PHASES.contains(phase)
                        );
                    }
                }
                res.map(|_| ())
            }
            Op::DelId(_) | Op::DelPath(_) => {
                let target = if let Op::DelId(n) = &op {
                    format!("d{n}")
                } else if let Op::DelPath(i) = &op {
                    before
                        .devices
                        .values()
                        .nth(*i)
                        .map(|d| d.0.clone())
                        .unwrap_or_else(|| "/machine/peripheral/ghost".to_owned())
                } else {
                    String::new()
                };
                let existed = before
                    .devices
                    .values()
                    .find(|d| d.0 == target || d.1.as_deref() == Some(&target))
                    .cloned();
                let res = r.tree.device_del(phase, &target);
                match (&res, &existed) {
                    (Err(e), _) if !DEVICE_DEL_PHASES.contains(phase) => {
                        prop_assert_eq!(e.qmp_class(), "OutOfPhase");
                    }
                    (Err(e), None) => prop_assert_eq!(e.qmp_class(), "DeviceNotFound"),
                    (Err(QdevError::UnplugPending(_)), Some(d)) => {
                        prop_assert_eq!(d.3, UnplugState::Pending)
                    }
                    (Err(_), Some(d)) => prop_assert_ne!(d.3, UnplugState::Pending),
                    (Ok(DelOutcome::Pending), Some(d)) => {
                        prop_assert_eq!(phase, Phase::MachineReady);
                        prop_assert_eq!(&d.4, TEST_BUS);
                        let k = r.tree.find(&target).unwrap();
                        prop_assert_eq!(r.tree.unplug_state(k), Some(UnplugState::Pending));
                    }
                    (Ok(DelOutcome::Removed), Some(_)) => {
                        prop_assert!(r.tree.find(&target).is_none())
                    }
                    (Ok(_), None) => prop_assert!(false, "deleted a device that did not exist"),
                }
                res.map(|_| ())
            }
            Op::Advance => {
                phase = next(phase);
                Ok(())
            }
            Op::Eject(i) | Op::Refuse(i) => {
                let key = r.ctrl.lock().unwrap().requests.get(*i).copied();
                match key {
                    Some(k) if matches!(op, Op::Eject(_)) => {
                        r.tree.guest_answer(GuestAnswer::Ejected(k))
                    }
                    Some(k) => r.tree.guest_answer(GuestAnswer::Refused(k)),
                    None => Ok(()),
                }
            }
            Op::StaleAnswer(k, eject) => {
                let k = DeviceKey(*k);
                let a = if *eject {
                    GuestAnswer::Ejected(k)
                } else {
                    GuestAnswer::Refused(k)
                };
                r.tree.guest_answer(a)
            }
            Op::Tick(ms) => {
                r.clock.advance(Duration::from_millis(*ms));
                r.tree.poll_timeouts();
                Ok(())
            }
            Op::Reset => {
                r.tree.reset();
                Ok(())
            }
            Op::Mode(immediate) => {
                r.ctrl.lock().unwrap().mode = Some(if *immediate {
                    UnplugMode::Immediate
                } else {
                    UnplugMode::Async
                });
                Ok(())
            }
        };
        let after = snap(&r);
        let events = r.events.take();
        if outcome.is_err() {
            prop_assert_eq!(&before, &after, "a failed {:?} changed the tree", op);
            prop_assert!(events.is_empty());
        } else {
            check_events(&before, &after, &events)?;
        }
        invariants(&r, &created_hot)?;
    }
    // Every request is answered: time runs out for every pending one, and a reset then
    // completes every outstanding one.
    let before = snap(&r);
    r.clock.advance(Duration::from_secs(10));
    r.tree.poll_timeouts();
    let after = snap(&r);
    check_events(&before, &after, &r.events.take())?;
    prop_assert!(after.devices.values().all(|d| d.3 != UnplugState::Pending));
    r.tree.reset();
    let end = snap(&r);
    check_events(&after, &end, &r.events.take())?;
    prop_assert!(
        end.devices
            .values()
            .all(|d| !matches!(d.3, UnplugState::Pending | UnplugState::TimedOut))
    );
    invariants(&r, &created_hot)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_keep_invariants(ops in proptest::collection::vec(op(), 0..80)) {
        run(ops)?;
    }
}

// Sequences that start in machine-ready exercise the hot paths more.
proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn hot_sequences_keep_invariants(ops in proptest::collection::vec(op(), 0..80)) {
        let mut all = vec![Op::Advance; 3];
        all.push(Op::Add { driver: 0, id: Some(0), bad: false, by_bus: false });
        all.push(Op::Advance);
        all.extend(ops);
        run(all)?;
    }
}
