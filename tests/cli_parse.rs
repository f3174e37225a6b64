//! The command line's parser and executor through the library API (`vmm::cli`): sizes,
//! option syntax, the left-to-right phase rules, fallbacks and `-preconfig`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keel_phase::Phase;
use keel_qdev::keyval;
use vmm::Vmm;
use vmm::cli::*;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn run_err(s: &str) -> String {
    match parse(&args(s)) {
        Ok(Invocation::Run(steps)) => {
            let vmm = Vmm::new();
            execute(&vmm, &steps).unwrap_err().to_string()
        }
        Ok(other) => panic!("{other:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sizes() {
    let size = |t| keyval::parse_size_unit(t, 1 << 20);
    assert_eq!(size("256M"), Some(256 << 20));
    assert_eq!(size("256"), Some(256 << 20));
    assert_eq!(size("1.5G"), Some(3 << 29));
    assert_eq!(size("2k"), Some(2048));
    assert_eq!(size("12Q"), None);
    assert_eq!(size(""), None);
    assert_eq!(size("99999999999999E"), None);
}

#[test]
fn smp_topology() {
    let one = |s: &str| match parse(&args(s)) {
        Ok(Invocation::Run(steps)) => match &steps[0].action {
            Action::Machine(set, _) => Ok(set.cpus),
            other => panic!("{other:?}"),
        },
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.to_string()),
    };
    assert_eq!(one("-smp 2"), Ok(Some(2)));
    assert_eq!(one("-smp sockets=1,cores=2,threads=2"), Ok(Some(4)));
    assert_eq!(one("-smp 4,sockets=1,cores=4"), Ok(Some(4)));
    assert!(one("-smp 4,cores=2").is_err());
    assert!(one("-smp 2,maxcpus=4").is_err());
}

#[test]
fn opts_and_commas() {
    let o = split_opts("-x", "none,a=b,,c,flag", Some("type")).unwrap();
    assert_eq!(
        o,
        vec![
            ("type".into(), "none".into()),
            ("a".into(), "b,c".into()),
            ("flag".into(), "on".into())
        ]
    );
}

#[test]
fn syntax_errors_name_the_option() {
    assert_eq!(run_err("-bogus"), "-bogus: invalid option");
    assert_eq!(run_err("--m 12Q"), "--m 12Q: invalid size '12Q'");
    assert_eq!(run_err("-machine"), "-machine: requires an argument");
    assert!(run_err("-mon chardev=nope,mode=control").contains("chardev \"nope\" not found"));
    assert!(run_err("-display gtk").starts_with("-display gtk:"));
}

#[test]
fn left_to_right_phase_errors() {
    assert!(
        run_err("-machine none -device virtio-rng-device")
            .contains("bus found for device 'virtio-rng-device'")
    );
    assert_eq!(
        run_err("-machine microvm -m 16M -device isa-debug-exit -accel kvm")
            .split(';')
            .next_back(),
        Some(" give -accel before the first -device")
    );
    assert!(run_err("-machine microvm,bogus=on").contains("bogus"));
}

#[test]
fn accel_and_machine_values_wait_for_the_machine() {
    // -accel before -machine, and -m before it: QEMU's orders.
    let Invocation::Run(steps) =
        parse(&args("-accel tcg -m 64M -machine none -S -accel kvm")).unwrap()
    else {
        panic!()
    };
    let vmm = Vmm::new();
    execute(&vmm, &steps).unwrap();
    let cfg = vmm.execute(vmm::commands::QueryAccels {}).unwrap();
    assert!(cfg.iter().any(|a| a.name == "tcg" && a.selected), "{cfg:?}");
}

#[test]
fn consecutive_accels_are_fallbacks() {
    let Invocation::Run(steps) = parse(&args("-M none -accel nope -accel tcg -S")).unwrap() else {
        panic!()
    };
    assert_eq!(steps.len(), 3);
    let vmm = Vmm::new();
    let out = execute(&vmm, &steps).unwrap();
    assert_eq!(out.phase, Phase::MachineReady);
    let s = vmm.execute(vmm::commands::QueryStatus {}).unwrap();
    assert_eq!(s.status, keel_phase::RunState::Prelaunch);
}

#[test]
fn preconfig_stops_early() {
    let Invocation::Run(steps) = parse(&args("-preconfig")).unwrap() else {
        panic!()
    };
    let vmm = Vmm::new();
    assert_eq!(execute(&vmm, &steps).unwrap().phase, Phase::NoMachine);
    let Invocation::Run(steps) = parse(&args("--preconfig -machine none")).unwrap() else {
        panic!()
    };
    let vmm = Vmm::new();
    assert_eq!(execute(&vmm, &steps).unwrap().phase, Phase::AccelCreated);
}
