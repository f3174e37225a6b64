//! Guest-controlled virtio rings against every device (blk, net, console, rng): guest memory,
//! descriptor tables, available rings and register writes all come from the input.
//!
//! Checks: no panic, no hang (every queue pass is bounded by the queue size), no unbounded
//! allocation. The driver is `crates/virtio/tests/harness`, shared with the stable
//! `random_rings` test, so a crash found here replays there as a plain test.
//!
//! Run (nightly): `cd fuzz && cargo +nightly fuzz run virtio_queue`.
#![no_main]

#[path = "../../crates/virtio/tests/harness/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
