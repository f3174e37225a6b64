//! Random configuration-space access sequences never panic (the fuzz target's harness on
//! stable), and a bare `PciConfig` keeps its read-only fields under random writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use keel_pci::{BarSpec, PciConfig, PciIds};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn machine_survives_random_accesses(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        harness::run(&data);
    }

    #[test]
    fn config_space_writes_keep_read_only_fields(
        ops in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..12), any::<bool>()), 0..200)
    ) {
        let mut c = PciConfig::new(PciIds { vendor: 0x1af4, device: 0x1001, class: 0x010000, revision: 0, subsystem_vendor: 0x1af4, subsystem: 2 });
        c.add_bar(1, BarSpec::mem32(0x1000, false)).unwrap();
        c.add_bar(4, BarSpec::mem64(0x4000, true)).unwrap();
        c.add_bar(0, BarSpec::io(0x40)).unwrap();
        for (offset, bytes, narrow) in ops {
            let offset = if narrow { offset % 0x110 } else { offset };
            c.write(offset, &bytes);
            let mut out = vec![0u8; bytes.len()];
            c.read(offset, &mut out);
        }
        prop_assert_eq!(c.read_u32(0), 0x1001_1af4);
        prop_assert_eq!(c.read_u32(8), 0x0100_0000);
        prop_assert_eq!(c.read_u32(0x10) & 3, 1, "I/O BAR type bits");
        prop_assert_eq!(c.read_u32(0x20) & 0xfff, 0xc, "64-bit prefetchable, low bits zero");
        prop_assert_eq!(c.read_u32(0x14) & 0xfff, 0, "size bits of BAR1 read zero");
        for r in c.bar_regions() {
            prop_assert!(r.base != 0 && r.base % r.size == 0);
        }
    }
}
