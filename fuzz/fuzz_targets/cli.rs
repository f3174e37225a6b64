//! The command line: arbitrary argv (the input split at NUL bytes, or at whitespace when it
//! has none) through `vmm::cli::parse`, which checks the whole line and turns it into steps.
//! Nothing is executed: no machine, no file, no socket.
//!
//! Checks: no panic; parsing is deterministic (the same argv gives the same answer).
//!
//! Run (nightly): `cargo +nightly fuzz run --fuzz-dir fuzz cli`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let args: Vec<String> = if text.contains('\0') {
        text.split('\0').map(str::to_owned).collect()
    } else {
        text.split_whitespace().map(str::to_owned).collect()
    };
    let first = vmm::cli::parse(&args);
    let again = vmm::cli::parse(&args);
    assert_eq!(format!("{first:?}"), format!("{again:?}"), "{args:?}");
});
