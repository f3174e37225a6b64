//! The compatibility suite: real clients of QEMU driving `vmm` and, as the reference,
//! `qemu-system-x86_64` (QEMU 7.2 from Debian). Each scenario is a Python script in
//! `tests/compat/` (see `tests/compat/compat_common.py` for its output); this file runs
//! each one against both emulators.
//!
//! * Against QEMU every step must pass: that proves the scenario.
//! * Against Keel the failing steps must be exactly those listed in [`KNOWN_GAPS`]: a step
//!   that fails and is not listed fails the test, and so does a listed step that passes
//!   (remove it from the list when the feature lands). A listed step that is not reached
//!   because an earlier listed step failed is fine.
//!
//! A scenario skips, with its reason printed, where a client cannot be found (python3,
//! qemu.qmp, qemu.machine, libvirt, QEMU, the reference guest); with
//! `KEEL_REQUIRE_COMPAT=1` (set by `.ci/run`, which installs them all through
//! `tests/compat/setup.sh`) a skip is a failure. `KEEL_COMPAT_PYTHON` and
//! `KEEL_COMPAT_QEMU` override `python3` and `qemu-system-x86_64`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_vmm");

/// (scenario, step, why): the steps that fail against today's Keel, each with the error
/// it fails with. A scenario stops at its first failing step unless the step is
/// independent (the qmp-shell ones are), so a fix may reveal the next gap: list it then.
const KNOWN_GAPS: &[(&str, &str, &str)] = &[];

const TIMEOUT: Duration = Duration::from_secs(360);

fn required() -> bool {
    std::env::var("KEEL_REQUIRE_COMPAT").as_deref() == Ok("1")
}

/// Prints why the scenario cannot run; a failure under `KEEL_REQUIRE_COMPAT=1`.
fn skip(what: &str, reason: &str) {
    assert!(!required(), "{what}: {reason} (KEEL_REQUIRE_COMPAT=1)");
    eprintln!("skipped {what}: {reason}");
}

fn in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).exists().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Pass,
    Fail,
    Skip(String),
}

struct Outcome {
    result: Verdict,
    /// (step, None if it passed, Some(error) if it failed), in order.
    steps: Vec<(String, Option<String>)>,
    output: String,
}

impl Outcome {
    fn failed(&self) -> Vec<&str> {
        self.steps
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(s, _)| s.as_str())
            .collect()
    }
}

/// Runs `python3 tests/compat/SCENARIO.py --emulator EMULATOR` in a process group of its
/// own (killed whole on timeout) and parses its STEP/RESULT lines.
fn run(python: &Path, scenario: &str, emulator: &str) -> Outcome {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/compat")
        .join(format!("{scenario}.py"));
    let mut child = Command::new(python)
        .arg(&script)
        .arg("--emulator")
        .arg(emulator)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    let full = format!("{output}{stderr}");
    let Some(status) = status else {
        panic!("{scenario} on {emulator}: timed out after {TIMEOUT:?}\n{full}");
    };
    let mut steps = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("STEP ") {
            if let Some(name) = rest.strip_suffix(" ok") {
                steps.push((name.to_owned(), None));
            } else if let Some((name, e)) = rest.split_once(" FAIL: ") {
                steps.push((name.to_owned(), Some(e.to_owned())));
            }
        }
    }
    let result = match status.code() {
        Some(0) => Verdict::Pass,
        Some(77) => Verdict::Skip(
            output
                .lines()
                .find_map(|l| l.strip_prefix("RESULT skip: "))
                .unwrap_or("no reason printed")
                .to_owned(),
        ),
        Some(1) if output.contains("RESULT fail") => Verdict::Fail,
        _ => panic!("{scenario} on {emulator}: the script ended with {status}\n{full}"),
    };
    Outcome {
        result,
        steps,
        output: full,
    }
}

fn python() -> Option<PathBuf> {
    let name = std::env::var("KEEL_COMPAT_PYTHON").unwrap_or_else(|_| "python3".into());
    in_path(&name)
}

/// The scenario against QEMU: every step passes.
fn against_qemu(scenario: &str) {
    let what = format!("{scenario} on QEMU");
    let Some(py) = python() else {
        return skip(&what, "python3 not found");
    };
    let qemu = std::env::var("KEEL_COMPAT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let Some(qemu) = in_path(&qemu) else {
        return skip(
            &what,
            &format!("{qemu} not found (apt-get install qemu-system-x86)"),
        );
    };
    let o = run(&py, scenario, qemu.to_str().unwrap());
    eprintln!("{}", o.output);
    match o.result {
        Verdict::Pass => {}
        Verdict::Skip(r) => skip(&what, &r),
        Verdict::Fail => panic!("{what}: steps failed: {:?}", o.failed()),
    }
}

/// The scenario against Keel: the failing steps are exactly the known gaps.
fn against_keel(scenario: &str) {
    let what = format!("{scenario} on Keel");
    let Some(py) = python() else {
        return skip(&what, "python3 not found");
    };
    let o = run(&py, scenario, BIN);
    eprintln!("{}", o.output);
    if let Verdict::Skip(r) = &o.result {
        return skip(&what, r);
    }
    let gaps: Vec<&str> = KNOWN_GAPS
        .iter()
        .filter(|(s, _, _)| *s == scenario)
        .map(|(_, step, _)| *step)
        .collect();
    let mut problems = Vec::new();
    for (step, err) in &o.steps {
        match (err, gaps.contains(&step.as_str())) {
            (Some(e), false) => {
                problems.push(format!("step {step} fails and is not a known gap: {e}"))
            }
            (None, true) => problems.push(format!(
                "step {step} now passes: remove it from KNOWN_GAPS in tests/compat.rs"
            )),
            _ => {}
        }
    }
    if o.result == Verdict::Fail && o.failed().is_empty() {
        problems.push("the scenario failed without a failing step".into());
    }
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
    let known: Vec<&str> = o.failed();
    if !known.is_empty() {
        eprintln!("{what}: known gaps still open: {known:?}");
    }
}

#[test]
fn libvirt_domain_qemu() {
    against_qemu("libvirt_domain");
}

#[test]
fn libvirt_domain_keel() {
    against_keel("libvirt_domain");
}

#[test]
fn libvirt_pc_disk_qemu() {
    against_qemu("libvirt_pc_disk");
}

#[test]
fn libvirt_pc_disk_keel() {
    against_keel("libvirt_pc_disk");
}

#[test]
fn libvirt_save_qemu() {
    against_qemu("libvirt_save");
}

#[test]
fn libvirt_save_keel() {
    against_keel("libvirt_save");
}

#[test]
fn qemu_machine_qemu() {
    against_qemu("qemu_machine");
}

#[test]
fn qemu_machine_keel() {
    against_keel("qemu_machine");
}

#[test]
fn qmp_client_qemu() {
    against_qemu("qmp_client");
}

#[test]
fn qmp_client_keel() {
    against_keel("qmp_client");
}

#[test]
fn qmp_shell_qemu() {
    against_qemu("qmp_shell");
}

#[test]
fn qmp_shell_keel() {
    against_keel("qmp_shell");
}

/// Every known gap names a scenario and a step that exist, so a renamed step cannot leave
/// a stale entry behind.
#[test]
fn known_gaps_name_real_steps() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat");
    for (scenario, step, why) in KNOWN_GAPS {
        let src = std::fs::read_to_string(dir.join(format!("{scenario}.py")))
            .unwrap_or_else(|e| panic!("KNOWN_GAPS names scenario {scenario}: {e}"));
        let bare = step
            .strip_prefix("path-")
            .or_else(|| step.strip_prefix("fd-"))
            .unwrap_or(step);
        assert!(
            src.contains(&format!("\"{step}\"")) || src.contains(&format!("-{bare}\"")),
            "KNOWN_GAPS: no step {step} in {scenario}.py ({why})"
        );
    }
}
