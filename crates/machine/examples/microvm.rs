//! A minimal custom VMM built from keel-machine and one backend (keel-kvm or keel-tcg) only (no QMP, no `vmm`):
//! boots a microvm and ends with the guest's status.
//!
//! ```text
//! cargo run -p keel-machine --example microvm -- [-accel kvm|tcg] [-m MiB] [-smp N] [-kernel F] [-initrd F] [-append S] [-no-reboot] [-debug-exit]
//! ```
//! With no `-kernel` it runs the built-in demo guest. COM1 is on stdio (input and output).

use std::sync::{Arc, mpsc};

use keel_accel::SystemEvent;
use keel_machine::{MachineEvent, Microvm, MicrovmConfig, SerialBackend};

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("microvm: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            std::process::exit(1);
        }
    }
}

fn run() -> Result<i32, Box<dyn std::error::Error>> {
    let mut cfg = MicrovmConfig {
        serial: SerialBackend::Stdio,
        ..MicrovmConfig::default()
    };
    let mut debug_exit = false;
    let mut accel_name = String::from("kvm");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "-m" => cfg.memory = val()?.parse::<u64>()? << 20,
            "-smp" => cfg.cpus = val()?.parse()?,
            "-kernel" => cfg.kernel = Some(val()?.into()),
            "-initrd" => cfg.initrd = Some(val()?.into()),
            "-append" => cfg.append = val()?,
            "-no-reboot" => cfg.no_reboot = true,
            "-debug-exit" => debug_exit = true,
            "-accel" => accel_name = val()?,
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let accel: Box<dyn keel_accel::Accelerator> = match accel_name.as_str() {
        "kvm" => Box::new(keel_kvm::KvmAccel::new()?),
        "tcg" => Box::new(keel_tcg::TcgAccel::new()),
        other => return Err(format!("unknown accelerator {other}: use kvm or tcg").into()),
    };
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, &*accel, Arc::new(tx))?;
    if debug_exit {
        vm.add_device(
            "isa-debug-exit",
            &[
                ("iobase".into(), "0xf4".into()),
                ("iosize".into(), "4".into()),
            ],
        )?;
    }
    vm.finish_init()?;
    vm.start()?;
    loop {
        let code = match rx.recv()? {
            MachineEvent::System(SystemEvent::Reset) => {
                vm.reset()?;
                continue;
            }
            MachineEvent::System(SystemEvent::Shutdown) => 0,
            MachineEvent::System(SystemEvent::Exit(code)) => code,
            MachineEvent::System(SystemEvent::Panic) => 1,
            MachineEvent::System(other) => {
                eprintln!("unexpected system event {other:?}");
                1
            }
            MachineEvent::VcpuError { index, error } => {
                eprintln!("vCPU {index}: {error}");
                1
            }
        };
        vm.shutdown();
        return Ok(code);
    }
}
