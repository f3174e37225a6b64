//! Every command in every phase: accepted where `query-commands` says it is valid,
//! refused with `OutOfPhase` elsewhere, and a refusal changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Client, Vmm};
use serde_json::{Value, json};

const PHASES: [&str; 5] = [
    "no-machine",
    "machine-created",
    "accel-created",
    "machine-init",
    "machine-ready",
];

/// Arguments that pass validation for each command.
fn args_for(cmd: &str) -> Value {
    match cmd {
        "machine-set" => json!({"type": "none"}),
        "accel-set" => json!({"accel": "tcg"}),
        "device_add" => json!({"driver": "virtio-rng-device"}),
        "human-monitor-command" => json!({"command-line": "info status"}),
        "qom-set" => json!({"path": "/machine", "property": "p", "value": 1}),
        "device_del" => json!({"id": "nope"}),
        "qom-list" => json!({"path": "/machine"}),
        "qom-get" => json!({"path": "/machine", "property": "peripheral"}),
        "device-list-properties" => json!({"typename": "virtio-rng-device"}),
        "blockdev-add" => json!({"driver": "file", "node-name": "d0", "filename": "/dev/null"}),
        "netdev_add" => json!({"type": "tap", "id": "n0", "ifname": "tap-keel0",
                               "script": "no", "downscript": "no"}),
        "chardev-add" => json!({"id": "c0", "backend": {"type": "null", "data": {}}}),
        "yank" => json!({"instances": []}),
        "serial-add" => json!({"backend": "null"}),
        "blockdev-del" => json!({"node-name": "nope"}),
        "query-stats" => json!({"target": "vm"}),
        "migrate-set-capabilities" => json!({"capabilities": []}),
        "migrate" | "migrate-incoming" => json!({"uri": "file:/nonexistent/keel-snapshot"}),
        "qom-list-properties" => json!({"typename": "none-machine"}),
        "query-cpu-model-expansion" => json!({"type": "full", "model": {"name": "max"}}),
        _ => Value::Null,
    }
}

/// A VMM (with `-S`) brought to `phase` over QMP only.
fn vmm_in(phase: &str) -> (Vmm, Client) {
    let mut vmm = Vmm::start(&["-preconfig", "-S"]);
    let mut c = vmm.qmp();
    let steps: [(&str, Value); 4] = [
        ("machine-set", json!({"type": "none"})),
        ("accel-set", json!({"accel": "tcg"})),
        ("machine-init", Value::Null),
        ("machine-done", Value::Null),
    ];
    for (i, (cmd, args)) in steps.into_iter().enumerate() {
        if PHASES[i] == phase {
            break;
        }
        c.ok(cmd, args);
    }
    assert_eq!(c.phase(), phase);
    (vmm, c)
}

#[test]
fn every_command_in_every_phase() {
    let (_vmm, mut c) = vmm_in("no-machine");
    let cmds = c.ok("query-commands", Value::Null);
    let cmds: Vec<(String, Vec<String>)> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let phases = e["phases"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_owned())
                .collect();
            (e["name"].as_str().unwrap().to_owned(), phases)
        })
        .collect();
    assert!(cmds.len() >= 20);

    for phase in PHASES {
        // Refusals: one process per phase, whose phase and status must never move.
        let (_vmm, mut c) = vmm_in(phase);
        let status = c.status();
        for (name, phases) in &cmds {
            if phases.iter().any(|p| p == phase) {
                continue;
            }
            let d = c.err(name, args_for(name), "OutOfPhase");
            let needs: Vec<&str> = phases.iter().map(String::as_str).collect();
            assert!(
                d.starts_with(&format!(
                    "'{name}' is not allowed in phase {phase}: it needs "
                )),
                "{d}"
            );
            for p in needs {
                assert!(d.contains(p), "{d} does not name {p}");
            }
            assert_eq!(c.phase(), phase, "{name} changed the phase");
            assert_eq!(c.status(), status, "{name} changed the status");
        }
        assert!(
            c.events.is_empty(),
            "refusals emitted events: {:?}",
            c.events
        );

        // Acceptances: a fresh process per command (some commands move the phase).
        for (name, phases) in &cmds {
            if !phases.iter().any(|p| p == phase) {
                continue;
            }
            let (mut vmm, mut c) = vmm_in(phase);
            let r = c.cmd(name, args_for(name));
            assert_ne!(
                r["error"]["class"], "OutOfPhase",
                "{name} refused in {phase}, where query-commands says it is valid: {r}"
            );
            if name == "qmp_capabilities" {
                assert_eq!(r["error"]["class"], "CommandNotFound");
            } else if [
                "device_add",
                "qom-set",
                "device_del",
                "blockdev-del",
                "query-sev-capabilities",
                "query-sgx-capabilities",
                "migrate",
                "migrate-incoming",
                "getfd",
                "add-fd",
                "closefd",
                "remove-fd",
            ]
            .contains(&name.as_str())
                || (name == "query-cpu-model-expansion"
                    && ["no-machine", "machine-created"].contains(&phase))
            {
                // The none machine has no buses and no settable property, there is no such
                // node, no SEV or SGX, no CPU model before an accelerator, and it cannot be
                // saved (nor was it started with -incoming), and no descriptor came with the
                // request or was kept before: real errors, not phase errors.
                assert!(r["error"]["class"] != Value::Null, "{name} in {phase}: {r}");
            } else {
                assert!(r.get("return").is_some(), "{name} in {phase}: {r}");
            }
            if name == "quit" {
                assert!(vmm.wait().success());
            }
        }
    }
}

#[test]
fn phases_only_move_forward() {
    let (_vmm, mut c) = vmm_in("machine-init");
    for (cmd, args) in [
        ("machine-set", json!({"type": "none"})),
        ("accel-set", json!({"accel": "tcg"})),
        ("machine-init", Value::Null),
    ] {
        c.err(cmd, args, "OutOfPhase");
        assert_eq!(c.phase(), "machine-init");
    }
    // machine-done from accel-created builds the board on the way.
    let (_vmm, mut c) = vmm_in("accel-created");
    c.ok("machine-done", Value::Null);
    assert_eq!(c.phase(), "machine-ready");
    // The DESIGN example, word for word.
    let (_vmm, mut c) = vmm_in("accel-created");
    let d = c.err("device_add", json!({"driver": "x"}), "OutOfPhase");
    assert_eq!(
        d,
        "'device_add' is not allowed in phase accel-created: it needs machine-init or machine-ready"
    );
}
