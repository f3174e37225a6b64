//! `bootindex` is unique among devices, as QEMU's boot order registry keeps it.

use std::sync::Arc;

use keel_phase::Phase;
use keel_qdev::{
    BusSpec, BusType, DeviceTree, DeviceType, NoEvents, NoHooks, PropSpec, TypeRegistry,
};

#[test]
fn a_bootindex_is_used_once() {
    let mut types = TypeRegistry::new();
    types
        .register(
            DeviceType::new("disk", BusType::Isa).prop(
                PropSpec::int32("bootindex")
                    .default_i64(-1)
                    .range(-1, i32::MAX.into()),
            ),
        )
        .unwrap();
    let mut t = DeviceTree::new(types, Box::new(NoHooks), Arc::new(NoEvents));
    t.add_bus(BusSpec::new("isa.0", BusType::Isa)).unwrap();
    let init = Phase::MachineInit;
    t.device_add_cli(init, "disk,id=a,bootindex=1").unwrap();
    let e = t.device_add_cli(init, "disk,id=b,bootindex=1").unwrap_err();
    assert_eq!(e.to_string(), "The bootindex 1 has already been used");
    // The default (-1, none) and other indices are fine; below -1 is out of range.
    t.device_add_cli(init, "disk,id=c").unwrap();
    t.device_add_cli(init, "disk,id=d").unwrap();
    t.device_add_cli(init, "disk,id=e,bootindex=2").unwrap();
    assert!(t.device_add_cli(init, "disk,id=f,bootindex=-2").is_err());
}
