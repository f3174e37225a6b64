//! The VMM's command dispatcher with the phase model: a fresh `vmm::Vmm` runs the QMP
//! commands of the input (one JSON request a line, `{"execute": NAME, "arguments": {...}}`)
//! through `Vmm::execute_json`, exactly as a QMP client's requests are run, across the
//! phases no-machine → machine-created → accel-created → machine-init → machine-ready.
//!
//! The machine is always `none` (`machine-set`'s `type` is replaced), so that no guest
//! runs; commands that reach outside the process (`quit`, backends that open files or tap
//! devices, HMP which can name them) are skipped. At most 32 commands an input.
//!
//! Checks: no panic; after every command the phase is readable and never goes back.
//!
//! Run (nightly): `cargo +nightly fuzz run --fuzz-dir fuzz qmp_dispatch`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use vmm::Vmm;
use vmm::commands::QueryPhase;

const SKIPPED: [&str; 6] = [
    "quit",
    "human-monitor-command",
    "blockdev-add",
    "netdev_add",
    "chardev-add",
    "serial-add",
];

fuzz_target!(|data: &[u8]| {
    let vmm = Vmm::new();
    let mut phase = vmm.execute(QueryPhase {}).expect("query-phase").phase;
    for line in data.split(|b| *b == b'\n').take(32) {
        let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        let Some(Value::String(name)) = req.remove("execute") else {
            continue;
        };
        if SKIPPED.contains(&name.as_str()) {
            continue;
        }
        let mut args = match req.remove("arguments") {
            Some(Value::Object(a)) => a,
            _ => Map::new(),
        };
        if name == "machine-set" {
            args.insert("type".into(), Value::String("none".into()));
        }
        let _ = vmm.execute_json(&name, args);
        let now = vmm.execute(QueryPhase {}).expect("query-phase").phase;
        assert!(
            now >= phase,
            "{name}: phase went back from {phase:?} to {now:?}"
        );
        phase = now;
    }
});
