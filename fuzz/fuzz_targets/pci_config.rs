//! Configuration-space access sequences against a small PCI machine: config mechanism #1
//! at any port and width, BAR windows, a virtio-pci function with MSI-X, a multifunction
//! slot, machine-side hot plug (staged or not), unplug and reset.
//!
//! Checks: no panic; afterwards the host bridge still answers, absent or hidden functions
//! read all ones, every decoding BAR lies where its kind allows. The driver is
//! `crates/pci/tests/harness`, shared with the stable `random_config` test, so a crash
//! found here replays there as a plain test.
//!
//! Run (nightly): `cd fuzz && cargo +nightly fuzz run pci_config`.
#![no_main]

#[path = "../../crates/pci/tests/harness/mod.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
