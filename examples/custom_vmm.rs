//! A minimal custom VMM built from keel-machine and the accelerator crates only (no QMP, no
//! `vmm`): boots a microvm and ends with the guest's status.
//!
//! ```text
//! cargo run --release --example custom_vmm -- [-accel kvm|tcg] [-m MiB] [-smp N] [-kernel F] [-initrd F] [-append S] [-no-reboot] [-debug-exit]
//! ```
//! With no `-kernel` it runs the built-in demo guest. COM1 is on stdio (input and output).
//! Without `-accel` it opens KVM if this host offers it (`keel_kvm::KvmProbe`), else the
//! interpreter (`keel_tcg::TcgProbe`).

use std::sync::{Arc, mpsc};

use keel_accel::{AccelProbe, Accelerator, SystemEvent};
use keel_machine::{MachineEvent, Microvm, MicrovmConfig, SerialBackend};

fn main() {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("custom_vmm: {e}");
            let mut src = std::error::Error::source(&*e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            std::process::exit(1);
        }
    }
}

/// Opens the accelerator named `-accel`, or the first of kvm, tcg that this host offers.
fn open_accel(name: Option<&str>) -> Result<Arc<dyn Accelerator>, Box<dyn std::error::Error>> {
    let probes: [Arc<dyn AccelProbe>; 2] =
        [Arc::new(keel_kvm::KvmProbe), Arc::new(keel_tcg::TcgProbe)];
    if let Some(name) = name {
        let probe = probes
            .iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| format!("unknown accelerator {name}: use kvm or tcg"))?;
        return Ok(probe.open()?);
    }
    let mut last = None;
    for p in &probes {
        match p.open() {
            Ok(a) => return Ok(a),
            Err(e) => {
                eprintln!(
                    "custom_vmm: {} not available ({e}), trying the next",
                    p.name()
                );
                last = Some(e);
            }
        }
    }
    Err(last.map_or_else(|| "no accelerator".into(), Into::into))
}

fn run() -> Result<i32, Box<dyn std::error::Error>> {
    let mut cfg = MicrovmConfig {
        serial: SerialBackend::Stdio,
        ..MicrovmConfig::default()
    };
    let mut debug_exit = false;
    let mut accel_name = None;
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
            "-accel" => accel_name = Some(val()?),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let accel = open_accel(accel_name.as_deref())?;
    eprintln!("custom_vmm: accelerator {}", accel.name());
    let (tx, rx) = mpsc::channel();
    let mut vm = Microvm::new(cfg, accel.as_ref(), Arc::new(tx))?;
    if debug_exit {
        vm.add_debug_exit(keel_devices::DebugExitConfig::new(0xf4, 4)?)?;
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
            // Only machines with ACPI PCI hot plug (pc) report ejects.
            MachineEvent::DeviceEjected => continue,
            // A disk's host I/O failed (this example adds none through the board's hooks).
            MachineEvent::BlockIoError(e) => {
                eprintln!("disk {}: {}", e.node_name, e.report.reason());
                continue;
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
