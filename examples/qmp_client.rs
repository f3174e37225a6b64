//! A plain QMP client (std and serde_json only) that starts the `vmm` binary in preconfig
//! mode and walks it through the lifecycle phases, printing `query-phase` at each step.
//!
//! ```text
//! cargo run --release --example qmp_client -- [PATH/TO/vmm]
//! ```
//!
//! Without an argument the binary is looked up next to this example's own executable
//! (`target/<profile>/examples/qmp_client` → `target/<profile>/vmm`). Cargo builds a
//! package's binaries for its tests and benchmarks but not for its examples, so under
//! `cargo run` the example first runs `cargo build --bin vmm` in its own profile. The VMM runs
//! `vmm -preconfig -S -qmp unix:SOCK,server=on,wait=off`: it waits in phase no-machine for
//! QMP to choose everything, and `-S` keeps the guest stopped once the machine is ready.
//!
//! Steps: `device_add` in no-machine (refused: out of phase) → `machine-set` → `accel-set` →
//! `machine-init` → `device_add` → `machine-done` → `query-status` → `quit`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, retrying while the VMM starts, and returns the greeting too.
    fn connect(path: &std::path::Path, child: &mut Child) -> Result<(Qmp, Value), String> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(format!("vmm exited ({st}) before accepting QMP"));
                    }
                    if start.elapsed() > Duration::from_secs(20) {
                        return Err(format!("cannot connect to {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read()?;
        Ok((q, greeting))
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the VMM closed the connection".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad JSON {line:?}: {e}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a command and returns its reply (`return` or `error`); events are printed.
    fn execute(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let mut req = json!({ "execute": name });
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            req["arguments"] = args;
        }
        writeln!(self.writer, "{req}").map_err(|e| e.to_string())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                println!("  event: {v}");
                continue;
            }
            return Ok(v);
        }
    }

    /// Runs a command, prints it and its reply, then prints `query-phase`.
    fn step(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let reply = self.execute(name, args.clone())?;
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            println!("-> {name} {args}");
        } else {
            println!("-> {name}");
        }
        println!("<- {reply}");
        if name != "quit" {
            let phase = self.execute("query-phase", json!({}))?;
            println!(
                "   phase: {}",
                phase["return"]["phase"].as_str().unwrap_or("?")
            );
        }
        Ok(reply)
    }
}

fn vmm_path() -> Result<PathBuf, String> {
    if let Some(p) = std::env::args_os().nth(1) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/examples/qmp_client -> target/<profile>/vmm
    let bin = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|profile| profile.join("vmm"))
        .ok_or("cannot locate the target directory")?;
    // Under `cargo run` the binary may be missing or stale (Cargo builds a package's binaries
    // for its tests and benches, not for its examples): build it in the same profile.
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = bin
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "--bin", "vmm"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building vmm failed: {status}"));
        }
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release) or pass its path",
            bin.display()
        ))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmp_client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let bin = vmm_path()?;
    let dir = std::env::temp_dir().join(format!("keel-qmp-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("qmp.sock");
    println!(
        "starting {} -preconfig -S -qmp unix:{},server=on,wait=off",
        bin.display(),
        sock.display()
    );
    let mut child = Command::new(&bin)
        .arg("-preconfig")
        .arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let result = walk(&sock, &mut child);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    println!("vmm exited: {status}");
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn walk(sock: &std::path::Path, child: &mut Child) -> Result<(), String> {
    let (mut qmp, greeting) = Qmp::connect(sock, child)?;
    println!("<- {greeting}");
    qmp.step("qmp_capabilities", json!({}))?;

    // Out of phase: no machine exists yet, so there is nothing to plug into.
    let early = qmp.step("device_add", json!({ "driver": "virtio-rng-device" }))?;
    if early["error"]["class"] != "OutOfPhase" {
        return Err(format!("expected an OutOfPhase error, got {early}"));
    }

    let must_succeed = |reply: Value, what: &str| -> Result<Value, String> {
        if reply.get("return").is_some() {
            Ok(reply)
        } else {
            Err(format!("{what} failed: {reply}"))
        }
    };
    let r = qmp.step(
        "machine-set",
        json!({ "type": "microvm", "memory": 64 << 20 }),
    )?;
    must_succeed(r, "machine-set")?;
    let r = qmp.step("accel-set", json!({ "accel": ["kvm", "tcg"] }))?;
    must_succeed(r, "accel-set")?;
    let r = qmp.step("machine-init", json!({}))?;
    must_succeed(r, "machine-init")?;
    let r = qmp.step(
        "device_add",
        json!({ "driver": "virtio-rng-device", "id": "rng0" }),
    )?;
    must_succeed(r, "device_add")?;
    let r = qmp.step("machine-done", json!({}))?;
    must_succeed(r, "machine-done")?;
    // Out of phase again, the other way: the machine is built.
    qmp.step("machine-init", json!({}))?;
    let r = qmp.step("query-status", json!({}))?;
    must_succeed(r, "query-status")?;
    qmp.step("quit", json!({}))?;
    Ok(())
}
