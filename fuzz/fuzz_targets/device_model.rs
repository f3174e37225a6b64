//! Feeds arbitrary `-device` strings, `device_add` JSON, `device_del` targets, guest answers,
//! phase advances, clock ticks and resets to a device tree, and checks after every step that
//! a failed operation changed nothing and that ids and paths stay unique.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_phase::Phase;
use keel_qdev::*;
use libfuzzer_sys::fuzz_target;

struct Ctrl(Arc<Mutex<Vec<DeviceKey>>>);

impl HotplugHandler for Ctrl {
    fn plug(&mut self, _dev: &DeviceView<'_>) -> Result<(), HookError> {
        Ok(())
    }
    fn unplug_request(&mut self, dev: &DeviceView<'_>) -> Result<UnplugMode, HookError> {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !r.contains(&dev.key) {
            r.push(dev.key);
        }
        Ok(UnplugMode::Async)
    }
    fn unplug(&mut self, dev: &DeviceView<'_>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| *k != dev.key);
    }
}

fn tree(clock: Arc<ManualClock>, requests: Arc<Mutex<Vec<DeviceKey>>>) -> Option<DeviceTree> {
    let mut r = TypeRegistry::new();
    r.register(
        DeviceType::new("isa-debug-exit", BusType::Isa)
            .prop(PropSpec::uint32("iobase").default_u64(0x501))
            .prop(PropSpec::uint32("iosize").default_u64(2).range(1, 4)),
    )
    .ok()?;
    r.register(
        DeviceType::new("hp", BusType::Other("hp".into()))
            .hotpluggable(true)
            .prop(PropSpec::size("size").default_str("1M"))
            .prop(PropSpec::bool("on").default_bool(false))
            .prop(PropSpec::int32("prio").default_i64(0).range(-8, 8))
            .prop(PropSpec::enumeration("mode", ["a", "b"]).default_str("a"))
            .prop(PropSpec::string("name").default_str("")),
    )
    .ok()?;
    r.register(DeviceType::new("virtio-rng-device", BusType::VirtioMmio).hotpluggable(true))
        .ok()?;
    let mut t = DeviceTree::new(r, Box::new(NoHooks), Arc::new(NoEvents)).with_clock(clock);
    t.set_max_devices(64);
    t.add_bus(BusSpec::new("isa.0", BusType::Isa)).ok()?;
    t.add_bus(BusSpec::new("vmmio", BusType::VirtioMmio).slots(vec![SlotResources::default(); 4]))
        .ok()?;
    t.add_bus(
        BusSpec::new("hp.0", BusType::Other("hp".into()))
            .slots(vec![SlotResources::default(); 4])
            .hotplug(Box::new(Ctrl(requests))),
    )
    .ok()?;
    Some(t)
}

fuzz_target!(|data: &[u8]| {
    let clock = Arc::new(ManualClock::new());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let Some(mut t) = tree(clock.clone(), requests.clone()) else {
        return;
    };
    let mut phase = Phase::NoMachine;
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        let text = String::from_utf8_lossy(payload);
        let before = serde_json::to_string(&t.query_tree()).unwrap_or_default();
        let failed = match op % 7 {
            0 => t.device_add_cli(phase, &text).is_err(),
            1 => match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(v) => t.device_add_json(phase, &v).is_err(),
                Err(_) => false,
            },
            2 => t.device_del(phase, &text).is_err(),
            3 => {
                phase = phase.next().unwrap_or(phase);
                false
            }
            4 => {
                let key = {
                    let r = requests.lock().unwrap_or_else(|p| p.into_inner());
                    payload
                        .first()
                        .and_then(|i| r.get(usize::from(*i) % r.len().max(1)).copied())
                };
                let key = key.unwrap_or(DeviceKey(payload.first().map_or(0, |b| u64::from(*b))));
                let answer = if n % 2 == 0 {
                    GuestAnswer::Ejected(key)
                } else {
                    GuestAnswer::Refused(key)
                };
                t.guest_answer(answer).is_err()
            }
            5 => {
                clock.advance(Duration::from_millis(u64::from(*len) * 64));
                t.poll_timeouts();
                false
            }
            _ => {
                t.reset();
                false
            }
        };
        if failed {
            assert_eq!(
                before,
                serde_json::to_string(&t.query_tree()).unwrap_or_default()
            );
        }
        let mut ids = std::collections::HashSet::new();
        let mut paths = std::collections::HashSet::new();
        for v in t.views() {
            assert!(paths.insert(v.path.to_owned()));
            if let Some(id) = v.id {
                assert!(ids.insert(id.to_owned()));
            }
            assert_eq!(v.hotplugged, v.bus == "hp.0" && v.hotplugged);
        }
        let _ = t.qom_list(&text);
        let _ = t.qom_get(&text, "type");
    }
});
