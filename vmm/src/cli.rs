//! The command line, in QEMU's syntax, as an ordered script of commands.
//!
//! [`parse`] checks the whole command line first (unknown options, bad values) so that a
//! mistake is reported on one line with no side effect. [`execute`] then runs the options
//! strictly left to right, each through the same command handler as its QMP twin: an
//! option that needs a later phase first advances with defaults (and logs it), one that
//! needs an earlier phase fails with the command's own `OutOfPhase` message. A monitor is
//! live from the moment its option runs. At the end the machine is finished and started,
//! unless `-S` (stay in prelaunch) or `-preconfig` (stop early; QMP finishes the job).

use keel_machine::backends::DriveErrors;
use keel_phase::Phase;
use keel_qmp::CommandError;

pub use keel_qapi::cmdline::{
    Action, CliError, HELP, Invocation, LOG_HELP, Step, parse, split_opts, timestamp_prefix,
};

use crate::Vmm;
use crate::commands::{AccelList, AccelSet, MachineSet, SerialAdd, SetAction};

/// Where [`execute`] left the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The phase at the end of the command line.
    pub phase: Phase,
    /// Whether `-preconfig` was given.
    pub preconfig: bool,
}

fn cmd(option: &str) -> impl FnOnce(CommandError) -> CliError + '_ {
    move |source| CliError::Command {
        option: option.to_owned(),
        source,
    }
}

/// Runs the steps left to right on `vmm`, then finishes the machine (see the module
/// documentation). Defaults filled in are logged at `info` (a quiet run stays silent, as
/// QEMU's does); an accelerator the user asked for but that had to be skipped is a warning,
/// as in QEMU.
pub fn execute(vmm: &Vmm, steps: &[Step]) -> Result<Outcome, CliError> {
    // Monitors opened below accept and greet clients at once, but their commands run
    // only once the whole command line has been processed.
    let _hold = vmm.hold_qmp();
    let mut preconfig = false;
    // Machine values (`-m`, `-smp`, `-cpu`, `-machine` without a type) read before any
    // `-machine TYPE` wait for the machine instead of creating the default one, and `-accel`
    // options (each one a fallback for the ones before, wherever they stand, as in QEMU)
    // wait until something needs the accelerator.
    let mut pending = Pending::default();
    for step in steps {
        let opt = step.option.as_str();
        match &step.action {
            Action::Machine(set, accel)
                if set.type_name.is_none() && vmm.phase() == Phase::NoMachine =>
            {
                pending.machine(opt, set.clone());
                if let Some(list) = accel {
                    pending.accel(opt, list);
                }
                continue;
            }
            Action::Machine(set, accel) if set.type_name.is_some() => {
                let set = match pending.values.take() {
                    Some((_, earlier)) => merge(earlier, set.clone()),
                    None => set.clone(),
                };
                vmm.execute(set).map_err(order(opt, SIZE_HINT))?;
                if let Some(list) = accel {
                    pending.accel(opt, list);
                }
                continue;
            }
            Action::Accel(list) if vmm.phase() <= Phase::MachineCreated => {
                pending.accel(opt, list);
                continue;
            }
            Action::Accel(_) | Action::Device(_) => pending.flush(vmm)?,
            _ => {}
        }
        let mut log_opt = |m: String| log::info!("{opt}: {m}");
        match &step.action {
            Action::Monitor(ep) => vmm.serve(ep).map_err(|source| CliError::Monitor {
                option: opt.to_owned(),
                source,
            })?,
            Action::HmpMonitor(ep) => vmm.serve_hmp(ep).map_err(|source| CliError::Monitor {
                option: opt.to_owned(),
                source,
            })?,
            Action::Machine(set, _) => {
                vmm.execute(set.clone()).map_err(order(opt, SIZE_HINT))?;
            }
            Action::Accel(list) => {
                vmm.execute(AccelSet {
                    accel: AccelList::Many(list.clone()),
                })
                .map_err(order(opt, "give -accel before the first -device"))?;
            }
            Action::Device(dev) => {
                if vmm.phase() < Phase::MachineInit {
                    vmm.advance_to(Phase::MachineInit, &mut log_opt)
                        .map_err(cmd(opt))?;
                }
                vmm.execute(dev.clone()).map_err(cmd(opt))?;
            }
            Action::Boot(b) => vmm.execute(b.clone()).map_err(cmd(opt))?,
            Action::Serial(backend) => vmm
                .execute(SerialAdd {
                    backend: backend.clone(),
                })
                .map_err(cmd(opt))?,
            Action::Blockdev(b) => {
                vmm.execute(b.clone()).map_err(cmd(opt))?;
            }
            Action::DriveSnapshot(b) => {
                let mut b = b.clone();
                if let Some(f) = &b.filename {
                    let copy = keel_machine::backends::temporary_copy(f);
                    b.filename = Some(copy.map_err(|e| syntax_err(opt, e))?);
                }
                vmm.execute(b).map_err(cmd(opt))?;
            }
            Action::DriveErrors {
                node,
                rerror,
                werror,
            } => {
                let policy = DriveErrors {
                    read: rerror.clone(),
                    write: werror.clone(),
                };
                vmm.backends().set_drive_errors(node, policy);
            }
            Action::Netdev(n) => vmm.execute(n.clone()).map_err(cmd(opt))?,
            Action::Chardev(c) => {
                if let Some(pty) = vmm.execute(c.clone()).map_err(cmd(opt))?.pty {
                    // As QEMU: the one line a run with a pty prints.
                    println!("char device redirected to {pty} (label {})", c.id);
                }
            }
            Action::Name(n) => vmm.set_name(Some(n.clone())),
            Action::Uuid(u) => vmm.set_uuid(Some(u.clone())),
            Action::NoAutostart => vmm.set_autostart(false),
            Action::Incoming(u) => vmm.set_incoming(Some(u.clone())),
            Action::Preconfig => preconfig = true,
            Action::Object(o) => {
                backend(opt, vmm.backends().add_object(&o.qom_type, &o.id, &o.props))?
            }
            Action::AddFd { set, fd, opaque } => {
                backend(opt, vmm.backends().add_fd(*set, *fd, opaque.clone()))?
            }
            Action::Audiodev { id, driver } => {
                backend(opt, vmm.backends().add_audiodev(id, driver))?
            }
            Action::Global(g) => vmm.backends().add_global(g.clone()),
            Action::RtcBase(b) => backend(opt, vmm.backends().set_rtc_base(b))?,
            Action::MemPrealloc => vmm.backends().set_mem_prealloc(),
            Action::Echr(c) => keel_machine::set_mux_escape(*c),
            Action::MemLock => backend(opt, keel_machine::backends::lock_all_memory())?,
            Action::SetAction(a) => vmm.execute(a.clone()).map_err(cmd(opt))?,
            Action::NoShutdown => vmm
                .execute(SetAction {
                    shutdown: Some("pause".into()),
                    ..SetAction::default()
                })
                .map_err(cmd(opt))?,
            Action::PidFile(_)
            | Action::Daemonize
            | Action::MsgTimestamp
            | Action::LogItems(_)
            | Action::LogFile(_)
            | Action::Nothing => {}
        }
    }
    pending.flush(vmm)?;
    let phase = vmm.phase();
    if preconfig {
        // Like QEMU's --preconfig: with a machine, stop once its accelerator exists; with
        // none, wait in no-machine for a pure-QMP configuration.
        if phase == Phase::MachineCreated {
            vmm.advance_to(Phase::AccelCreated, &mut |_| {})
                .map_err(cmd("-preconfig"))?;
        }
    } else {
        vmm.advance_to(Phase::MachineReady, &mut |_| {})
            .map_err(cmd("(end of command line)"))?;
    }
    Ok(Outcome {
        phase: vmm.phase(),
        preconfig,
    })
}

/// A backend store error as the option's error.
fn backend(
    option: &str,
    r: Result<(), keel_machine::backends::BackendError>,
) -> Result<(), CliError> {
    r.map_err(|e| syntax_err(option, e))
}

fn syntax_err(option: &str, e: keel_machine::backends::BackendError) -> CliError {
    CliError::Syntax {
        option: option.to_owned(),
        message: e.to_string(),
    }
}

/// `later` over `earlier`: what the later option sets wins, machine properties are merged.
fn merge(earlier: MachineSet, later: MachineSet) -> MachineSet {
    let mut props = earlier.props;
    props.extend(later.props);
    MachineSet {
        type_name: later.type_name.or(earlier.type_name),
        memory: later.memory.or(earlier.memory),
        cpus: later.cpus.or(earlier.cpus),
        kernel: later.kernel.or(earlier.kernel),
        initrd: later.initrd.or(earlier.initrd),
        append: later.append.or(earlier.append),
        serial: later.serial.or(earlier.serial),
        no_reboot: later.no_reboot.or(earlier.no_reboot),
        props,
    }
}

/// What to move where when a machine-sizing option comes too late.
const SIZE_HINT: &str = "the machine is sized when it is built: give -machine, -m, -smp and -cpu before the first -device";

/// Options [`execute`] holds until something needs what they configure.
#[derive(Default)]
struct Pending {
    /// Machine values before any `-machine TYPE`, with the first such option (for messages).
    values: Option<(String, MachineSet)>,
    /// `-accel` fallbacks in order, with the first such option.
    accels: Option<(String, Vec<String>)>,
}

impl Pending {
    fn machine(&mut self, opt: &str, set: MachineSet) {
        self.values = Some(match self.values.take() {
            Some((first, earlier)) => (first, merge(earlier, set)),
            None => (opt.to_owned(), set),
        });
    }

    fn accel(&mut self, opt: &str, list: &[String]) {
        match &mut self.accels {
            Some((_, all)) => all.extend_from_slice(list),
            None => self.accels = Some((opt.to_owned(), list.to_vec())),
        }
    }

    /// Creates the machine (the default type, with the values given) if none exists yet,
    /// then chooses the accelerator among the `-accel` fallbacks given.
    fn flush(&mut self, vmm: &Vmm) -> Result<(), CliError> {
        if let Some((first, set)) = self.values.take() {
            if set.type_name.is_none() {
                log::info!("{first}: no -machine given; using the default machine type");
            }
            vmm.execute(set).map_err(order(&first, SIZE_HINT))?;
        }
        let Some((first, list)) = self.accels.take() else {
            return Ok(());
        };
        if vmm.phase() < Phase::MachineCreated {
            vmm.advance_to(Phase::MachineCreated, &mut |m| log::info!("{first}: {m}"))
                .map_err(cmd(&first))?;
        }
        let choice = vmm
            .execute(AccelSet {
                accel: AccelList::Many(list),
            })
            .map_err(order(&first, "give -accel before the first -device"))?;
        for r in &choice.rejected {
            log::warn!(
                "{first}: accelerator '{}' rejected ({}); falling back to '{}'",
                r.accel,
                r.reason,
                choice.accel
            );
        }
        Ok(())
    }
}

/// A command's error; out of phase, with `hint` saying what to move where.
fn order<'a>(option: &'a str, hint: &'static str) -> impl FnOnce(CommandError) -> CliError + 'a {
    move |source| match source {
        CommandError::OutOfPhase { .. } => CliError::Order {
            option: option.to_owned(),
            source,
            hint,
        },
        source => CliError::Command {
            option: option.to_owned(),
            source,
        },
    }
}
