//! Costs of the control-plane paths: parsing a `-device` string, a cold add + remove cycle,
//! a hot add + unplug request + guest eject cycle, and a device-tree query.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keel_phase::Phase;
use keel_qdev::*;

struct Hp;

impl HotplugHandler for Hp {
    fn plug(&mut self, _dev: &DeviceView<'_>) -> Result<(), HookError> {
        Ok(())
    }
    fn unplug_request(&mut self, _dev: &DeviceView<'_>) -> Result<UnplugMode, HookError> {
        Ok(UnplugMode::Async)
    }
    fn unplug(&mut self, _dev: &DeviceView<'_>) {}
}

fn tree() -> DeviceTree {
    let mut r = TypeRegistry::new();
    r.register(
        DeviceType::new("isa-debug-exit", BusType::Isa)
            .prop(PropSpec::uint32("iobase").default_u64(0x501))
            .prop(PropSpec::uint32("iosize").default_u64(2).range(1, 4)),
    )
    .unwrap();
    r.register(
        DeviceType::new("hp-dev", BusType::Pci)
            .hotpluggable(true)
            .prop(PropSpec::size("size").default_str("1M")),
    )
    .unwrap();
    let mut t = DeviceTree::new(r, Box::new(NoHooks), Arc::new(NoEvents));
    t.add_bus(BusSpec::new("isa.0", BusType::Isa)).unwrap();
    t.add_bus(
        BusSpec::new("pci.0", BusType::Pci)
            .slots(vec![SlotResources::default(); 32])
            .hotplug(Box::new(Hp)),
    )
    .unwrap();
    t
}

fn benches(c: &mut Criterion) {
    const ARG: &str = "isa-debug-exit,id=dbg,iobase=0xf4,iosize=0x04";
    c.bench_function("parse_cli", |b| {
        b.iter(|| DeviceRequest::parse_cli(std::hint::black_box(ARG)).unwrap())
    });

    let mut t = tree();
    c.bench_function("cold_add_del", |b| {
        b.iter(|| {
            t.device_add_cli(Phase::MachineInit, ARG).unwrap();
            t.device_del(Phase::MachineInit, "dbg").unwrap();
        })
    });

    let mut t = tree();
    let req = DeviceRequest::parse_cli("hp-dev,id=h,size=2G").unwrap();
    c.bench_function("hot_add_unplug_eject", |b| {
        b.iter(|| {
            let a = t.device_add(Phase::MachineReady, &req).unwrap();
            t.device_del(Phase::MachineReady, "h").unwrap();
            t.guest_answer(GuestAnswer::Ejected(a.key)).unwrap();
        })
    });

    let mut t = tree();
    for i in 0..32 {
        t.device_add_cli(Phase::MachineInit, &format!("hp-dev,id=d{i}"))
            .unwrap();
        t.device_add_cli(Phase::MachineInit, "isa-debug-exit")
            .unwrap();
    }
    c.bench_function("query_tree_64_devices", |b| b.iter(|| t.query_tree()));
}

criterion_group!(all, benches);
criterion_main!(all);
