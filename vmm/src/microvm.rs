//! The `microvm` machine type: `keel-machine`'s [`Microvm`] behind the VMM's
//! [`MachineType`] / [`Board`] traits, on the real accelerators (`keel-kvm`, `keel-tcg`).
//!
//! The machine's system events (power-off, reset, `isa-debug-exit`, panic, vCPU errors)
//! arrive on vCPU threads; they are forwarded as [`BoardEvent`]s over a channel, so the VMM
//! handles them on its own thread and never takes its lock on a vCPU thread.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use keel_accel::{Accelerator, SystemEvent};
use keel_machine::{
    MACHINE_PROPERTIES, MachineEvent, MachineEvents, Microvm, MicrovmConfig, SerialBackend,
    requirements,
};
use serde_json::{Map, Value};

use crate::board::{Board, BoardError, BoardEvent, CpuInfo, MachineConfig, MachineType};
use crate::board::{MachineTypeInfo, prop_string};

/// The accelerator backends this build has, by `-accel` name.
pub fn make_accel(name: &str) -> Result<Box<dyn Accelerator>, String> {
    match name {
        "kvm" => keel_kvm::KvmAccel::new()
            .map(|a| Box::new(a) as Box<dyn Accelerator>)
            .map_err(|e| e.to_string()),
        "tcg" => Ok(Box::new(keel_tcg::TcgAccel::new())),
        other => Err(format!("no accelerator named '{other}' (known: kvm, tcg)")),
    }
}

/// QEMU's `microvm`: a minimal x86-64 machine without PCI, booting a kernel directly.
#[derive(Debug, Default)]
pub struct MicrovmType;

fn serial_backend(list: &[String]) -> Result<SerialBackend, BoardError> {
    let Some(first) = list.first() else {
        return Ok(SerialBackend::Stdio);
    };
    if list.len() > 1 {
        return Err(BoardError::Invalid(
            "microvm has one serial port (COM1); give -serial once".into(),
        ));
    }
    Ok(match first.as_str() {
        "stdio" | "mon:stdio" => SerialBackend::Stdio,
        "null" => SerialBackend::Null,
        "none" => SerialBackend::None,
        s => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => SerialBackend::File(PathBuf::from(p)),
            _ => {
                return Err(BoardError::Invalid(format!(
                    "-serial '{s}': use stdio, null, none or file:PATH"
                )));
            }
        },
    })
}

/// Turns the VMM's accumulated `machine-set` into a microvm configuration.
pub fn microvm_config(cfg: &MachineConfig) -> Result<MicrovmConfig, BoardError> {
    let mut m = MicrovmConfig::default();
    if let Some(mem) = cfg.memory {
        m.memory = mem;
    }
    if let Some(n) = cfg.cpus {
        m.cpus = n;
    }
    for (what, path) in [("kernel", &cfg.kernel), ("initrd", &cfg.initrd)] {
        if let Some(p) = path
            && !p.is_file()
        {
            return Err(BoardError::Invalid(format!(
                "could not open {what} file '{}': no such file",
                p.display()
            )));
        }
    }
    m.kernel = cfg.kernel.clone();
    m.initrd = cfg.initrd.clone();
    m.append = cfg.append.clone().unwrap_or_default();
    m.no_reboot = cfg.no_reboot;
    m.serial = serial_backend(&cfg.serial)?;
    for (k, v) in &cfg.props {
        if !MACHINE_PROPERTIES.contains(&k.as_str()) {
            return Err(BoardError::UnknownProperty {
                machine: "microvm".into(),
                property: k.clone(),
            });
        }
        m.set_property(k, v).map_err(BoardError::Invalid)?;
    }
    Ok(m)
}

impl MachineType for MicrovmType {
    fn name(&self) -> &'static str {
        keel_machine::MACHINE_NAME
    }

    fn info(&self) -> MachineTypeInfo {
        MachineTypeInfo {
            name: "microvm".into(),
            description: "microvm (i386)".into(),
            is_default: false,
            cpu_max: 288,
            hotpluggable_cpus: false,
            numa_mem_supported: false,
            deprecated: false,
            acpi: true,
        }
    }

    fn check_config(&self, cfg: &MachineConfig) -> Result<(), BoardError> {
        microvm_config(cfg).map(|_| ())
    }

    fn check_accel(&self, cfg: &MachineConfig, accel: &str) -> Result<(), String> {
        let m = microvm_config(cfg).map_err(|e| e.to_string())?;
        let a = make_accel(accel)?;
        a.check(&requirements(&m)).map_err(|e| e.to_string())
    }

    fn create(&self, cfg: &MachineConfig, accel: &str) -> Result<Box<dyn Board>, BoardError> {
        let m = microvm_config(cfg)?;
        let a = make_accel(accel).map_err(|reason| BoardError::Unavailable {
            machine: "microvm".into(),
            reason,
        })?;
        let (tx, rx) = channel();
        let sink: Arc<dyn MachineEvents> = Arc::new(Forward(tx));
        let vm = Microvm::new(m, a.as_ref(), sink).map_err(|e| BoardError::Invalid(chain(&e)))?;
        Ok(Box::new(MicrovmBoard {
            vm,
            events: Some(rx),
            started: false,
        }))
    }
}

/// The error and its sources on one line, as a QMP `desc`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct Forward(Sender<BoardEvent>);

impl MachineEvents for Forward {
    fn machine_event(&self, event: MachineEvent) {
        let ev = match event {
            MachineEvent::System(SystemEvent::Shutdown) => BoardEvent::GuestShutdown,
            MachineEvent::System(SystemEvent::Reset) => BoardEvent::GuestReset,
            MachineEvent::System(SystemEvent::Exit(code)) => BoardEvent::GuestExit(code),
            MachineEvent::System(SystemEvent::Panic) => BoardEvent::GuestPanic,
            MachineEvent::VcpuError { index, error } => {
                BoardEvent::InternalError(format!("vCPU {index}: {error}"))
            }
        };
        // Nobody listening any more means the VMM is going away.
        let _ = self.0.send(ev);
    }
}

/// A running (or ready) microvm.
struct MicrovmBoard {
    vm: Microvm,
    events: Option<Receiver<BoardEvent>>,
    started: bool,
}

impl Board for MicrovmBoard {
    fn add_device(
        &mut self,
        driver: &str,
        id: Option<&str>,
        props: &Map<String, Value>,
        hotplug: bool,
    ) -> Result<(), BoardError> {
        if hotplug {
            return Err(BoardError::Device(format!(
                "Bus 'isa.0' does not support hotplugging (device '{}', driver '{driver}')",
                id.unwrap_or("")
            )));
        }
        let mut list = Vec::with_capacity(props.len());
        for (k, v) in props {
            list.push((k.clone(), prop_string(k, v).map_err(BoardError::Device)?));
        }
        self.vm
            .add_device(driver, &list)
            .map_err(|e| BoardError::Device(chain(&e)))
    }

    fn done(&mut self) -> Result<(), BoardError> {
        self.vm
            .finish_init()
            .map_err(|e| BoardError::Invalid(chain(&e)))
    }

    fn resume(&mut self) -> Result<(), BoardError> {
        if self.started {
            self.vm.resume();
            Ok(())
        } else {
            self.started = true;
            self.vm.start().map_err(|e| BoardError::Invalid(chain(&e)))
        }
    }

    fn pause(&mut self) -> Result<(), BoardError> {
        if self.started {
            self.vm.pause();
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BoardError> {
        self.vm.reset().map_err(|e| BoardError::Invalid(chain(&e)))
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.vm
            .cpu_info()
            .into_iter()
            .map(|c| CpuInfo {
                cpu_index: c.index,
                qom_path: format!("/machine/unattached/device[{}]", c.index),
                thread_id: c.thread_id.map(i64::from).unwrap_or(0),
                target: "x86_64".into(),
            })
            .collect()
    }

    fn take_events(&mut self) -> Option<Receiver<BoardEvent>> {
        self.events.take()
    }

    fn power_button(&mut self) -> bool {
        self.vm.power_button()
    }

    fn shutdown(&mut self) {
        self.vm.shutdown();
    }
}
