//! The command line, in QEMU's syntax, as an ordered script of commands.
//!
//! [`parse`] checks the whole command line first (unknown options, bad values) so that a
//! mistake is reported on one line with no side effect. [`execute`] then runs the options
//! strictly left to right, each through the same command handler as its QMP twin: an
//! option that needs a later phase first advances with defaults (and logs it), one that
//! needs an earlier phase fails with the command's own `OutOfPhase` message. A monitor is
//! live from the moment its option runs. At the end the machine is finished and started,
//! unless `-S` (stay in prelaunch) or `-preconfig` (stop early; QMP finishes the job).

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_phase::Phase;
use keel_qapi::cli as forms;
use keel_qmp::{CommandError, Endpoint};
use serde_json::{Map, Value};

use crate::Vmm;
use crate::commands::{
    AccelList, AccelSet, BlockdevAdd, BootSet, ChardevAdd, DeviceAdd, MachineSet, NetdevAdd,
    SerialAdd,
};

/// A command-line error: the option as written and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The option or its value is malformed; nothing has been done.
    #[error("{option}: {message}")]
    Syntax {
        /// The option as written (`-m 12Q`).
        option: String,
        /// What is wrong.
        message: String,
    },
    /// The option's command failed.
    #[error("{option}: {source}")]
    Command {
        /// The option as written.
        option: String,
        /// The command's error (the same text QMP would give).
        #[source]
        source: CommandError,
    },
    /// The option came after something that fixed what it changes; nothing was done.
    #[error("{option}: {source}; {hint}")]
    Order {
        /// The option as written.
        option: String,
        /// The command's out-of-phase error.
        #[source]
        source: CommandError,
        /// What to move where.
        hint: &'static str,
    },
    /// A monitor could not be opened.
    #[error("{option}: {source}")]
    Monitor {
        /// The option as written.
        option: String,
        /// Why.
        #[source]
        source: keel_qmp::ServerError,
    },
}

/// What one option does.
#[derive(Debug, Clone)]
pub enum Action {
    /// `machine-set` (`-machine`, `-m`, `-smp`, `-cpu`): what sizes the machine, consumed
    /// when it is built; then `accel-set` for a legacy `-machine ...,accel=a:b`. Without
    /// `-machine` before it, the values wait for the machine rather than create one.
    Machine(MachineSet, Option<Vec<String>>),
    /// `boot-set` (`-kernel`, `-initrd`, `-append`, `-no-reboot`): read when the machine
    /// becomes ready, so valid until then.
    Boot(BootSet),
    /// `serial-add` (`-serial`): a backend; it never creates a machine.
    Serial(String),
    /// `-uuid`.
    Uuid(String),
    /// `-pidfile PATH`: the process's pid is written there once the command line ran (the
    /// binary's job; [`execute`] ignores it).
    PidFile(PathBuf),
    /// `-daemonize`: detach once the command line ran (the binary's job).
    Daemonize,
    /// `accel-set` with the accelerators of consecutive `-accel` options.
    Accel(Vec<String>),
    /// `device_add`.
    Device(DeviceAdd),
    /// `blockdev-add` (`-blockdev`, `-drive`).
    Blockdev(BlockdevAdd),
    /// `netdev_add` (`-netdev`).
    Netdev(NetdevAdd),
    /// `chardev-add` (`-chardev file|null|stdio`; socket chardevs serve `-mon`).
    Chardev(ChardevAdd),
    /// `-name`.
    Name(String),
    /// `-qmp`, or `-mon` on a `-chardev`.
    Monitor(Endpoint),
    /// `-S`.
    NoAutostart,
    /// `-incoming URI|defer`.
    Incoming(String),
    /// `-preconfig`.
    Preconfig,
    /// Accepted for compatibility, nothing to do (`-nodefaults`, `-display none`, ...).
    Nothing,
}

/// One option with its action.
#[derive(Debug, Clone)]
pub struct Step {
    /// The option as written, for messages.
    pub option: String,
    /// What it does.
    pub action: Action,
}

/// What the command line asks for.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// Run these steps.
    Run(Vec<Step>),
    /// Print the usage.
    Help,
    /// Print the version.
    Version,
    /// List the machine types (`-machine help`).
    ListMachines,
    /// List the accelerators (`-accel help`).
    ListAccels,
}

/// The usage text.
pub const HELP: &str = "\
usage: vmm [options]

Keel's VMM. Options are QEMU's and are run strictly left to right; each is the
same command as its QMP twin and fails the same way when it comes in the wrong
lifecycle phase (no-machine, machine-created, accel-created, machine-init,
machine-ready).

Machine (machine-set; sizes the machine, so before the first -device):
  -machine|-M TYPE[,prop=value...]  machine type (`-machine help` lists them)
  -m SIZE                           RAM (default unit MiB; suffixes K M G T)
  -smp N                            vCPUs
  -cpu MODEL                        max, host (kvm only), qemu64, kvm64: one model
Boot (boot-set; read when the machine is ready, so anywhere before that):
  -kernel PATH  -initrd PATH  -append CMDLINE
  -no-reboot                        a guest reset shuts down instead
  -serial BACKEND                   serial port backend: stdio, null, none, file:PATH
Accelerator (accel-set):
  -accel NAME                       repeat for fallbacks: -accel kvm -accel tcg
Devices (device_add, cold until the machine is ready):
  -device DRIVER[,id=ID][,prop=value...]
    isa-debug-exit[,iobase=N,iosize=N]  virtio-rng-device
    virtio-blk-device,drive=NODE[,serial=S,read-only=on]
    virtio-net-device,netdev=ID[,mac=MAC]  virtconsole,chardev=ID
Backends (from the start; devices name them):
  -blockdev driver=file,filename=PATH,node-name=NODE[,read-only=on]
  -drive file=PATH,if=none,id=NODE,format=raw[,readonly=on]
  -netdev tap,id=ID,ifname=IF,script=no,downscript=no
  -chardev file,id=ID,path=PATH | -chardev null,id=ID
Monitors (live from the moment they are read):
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off | stdio
  -chardev socket,id=ID,path=PATH,server=on,wait=off  (or host=,port=, or fd=N)
  -mon chardev=ID,mode=control
Lifecycle:
  -enable-kvm                       same as -accel kvm
  -S                                stay paused (prelaunch) when ready
  -preconfig                        stop early and let QMP finish the machine
                                    (without -machine: wait in no-machine)
Process:
  -pidfile PATH                     write the pid once the command line ran
  -daemonize                        detach once the command line ran
Other:
  -name NAME  -uuid UUID  -nodefaults  -no-user-config  -display none  -nographic
  -vga none  -monitor none
  -h, --help  --version
";

fn syntax(option: &str, message: impl Into<String>) -> CliError {
    CliError::Syntax {
        option: option.to_owned(),
        message: message.into(),
    }
}

/// An option value's error, named by the option as written.
fn opt_err(option: &str) -> impl FnOnce(forms::OptionError) -> CliError + '_ {
    move |e| syntax(option, e.0)
}

/// Splits QEMU option text `a=b,c=d` with the one option parser (`keel_qdev::keyval`,
/// QemuOpts dialect): `,,` is a literal comma, the first item may be a bare value for
/// `implied`, a bare `key` elsewhere means `key=on` (`nokey`: `key=off`).
pub fn split_opts(
    option: &str,
    text: &str,
    implied: Option<&str>,
) -> Result<Vec<(String, String)>, CliError> {
    forms::split_opts(text, implied).map_err(opt_err(option))
}

fn machine_field(key: &str, v: &str, set: &mut MachineSet) {
    match key {
        // QEMU's machine properties of the same names are the boot options.
        "kernel" => set.kernel = Some(PathBuf::from(v)),
        "initrd" => set.initrd = Some(PathBuf::from(v)),
        "append" => set.append = Some(v.to_owned()),
        _ => {
            set.props.insert(key.to_owned(), v.to_owned());
        }
    }
}

/// Checks the whole command line and turns it into steps; nothing is executed.
pub fn parse(args: &[String]) -> Result<Invocation, CliError> {
    let mut steps: Vec<Step> = Vec::new();
    let mut chardevs: BTreeMap<String, Endpoint> = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let raw = &args[i];
        i += 1;
        if !raw.starts_with('-') || raw == "-" {
            return Err(syntax(
                raw,
                "unexpected argument (disk images are not supported; options start with '-')",
            ));
        }
        let name = raw.strip_prefix("--").unwrap_or(&raw[1..]);
        let takes_value = matches!(
            name,
            "machine"
                | "M"
                | "m"
                | "smp"
                | "accel"
                | "name"
                | "qmp"
                | "chardev"
                | "mon"
                | "display"
                | "kernel"
                | "initrd"
                | "append"
                | "serial"
                | "device"
                | "blockdev"
                | "drive"
                | "netdev"
                | "cpu"
                | "vga"
                | "monitor"
                | "uuid"
                | "pidfile"
                | "incoming"
        );
        let value = if takes_value {
            let v = args
                .get(i)
                .ok_or_else(|| syntax(raw, "requires an argument"))?;
            i += 1;
            Some(v.as_str())
        } else {
            None
        };
        let option = match value {
            Some(v) => format!("{raw} {v}"),
            None => raw.clone(),
        };
        let v = value.unwrap_or_default();
        let action = match name {
            "h" | "help" => return Ok(Invocation::Help),
            "version" => return Ok(Invocation::Version),
            "S" => Action::NoAutostart,
            "incoming" => Action::Incoming(v.to_string()),
            "preconfig" => Action::Preconfig,
            "nodefaults" | "no-user-config" | "nographic" => Action::Nothing,
            "vga" | "monitor" if v == "none" => Action::Nothing,
            "vga" => {
                return Err(syntax(
                    &option,
                    "Keel has no display; only 'none' is accepted",
                ));
            }
            "monitor" => {
                return Err(syntax(
                    &option,
                    "the human monitor is not supported; use -qmp (only '-monitor none' is accepted)",
                ));
            }
            "enable-kvm" => {
                if let Some(Step {
                    action: Action::Accel(list),
                    option: prev,
                }) = steps.last_mut()
                {
                    list.push("kvm".into());
                    prev.push(' ');
                    prev.push_str(&option);
                    continue;
                }
                Action::Accel(vec!["kvm".into()])
            }
            "cpu" => {
                let mut set = MachineSet::default();
                set.props.insert("cpu".into(), v.to_owned());
                Action::Machine(set, None)
            }
            "display" => {
                let opts = split_opts(&option, v, Some("type"))?;
                match opts.first() {
                    Some((k, t)) if k == "type" && t == "none" => Action::Nothing,
                    _ => {
                        return Err(syntax(
                            &option,
                            "Keel has no display; only '-display none' is accepted",
                        ));
                    }
                }
            }
            "machine" | "M" => {
                let mut set = MachineSet::default();
                let mut accel = None;
                for (k, val) in split_opts(&option, v, Some("type"))? {
                    match k.as_str() {
                        "type" if val == "help" || val == "?" => {
                            return Ok(Invocation::ListMachines);
                        }
                        "type" => set.type_name = Some(val),
                        "accel" => {
                            accel = Some(val.split(':').map(str::to_owned).collect::<Vec<_>>())
                        }
                        _ => machine_field(&k, &val, &mut set),
                    }
                }
                Action::Machine(set, accel)
            }
            "m" => {
                let mut set = MachineSet::default();
                for (k, val) in split_opts(&option, v, Some("size"))? {
                    match k.as_str() {
                        "size" => {
                            set.memory = Some(
                                keel_qdev::keyval::parse_size_unit(&val, 1 << 20).ok_or_else(
                                    || syntax(&option, format!("invalid size '{val}'")),
                                )?,
                            )
                        }
                        other => {
                            return Err(syntax(
                                &option,
                                format!("Invalid parameter '{other}' (only a size is supported)"),
                            ));
                        }
                    }
                }
                Action::Machine(set, None)
            }
            "smp" => {
                let mut set = MachineSet::default();
                let mut max = None;
                let mut topology: Option<u32> = None;
                for (k, val) in split_opts(&option, v, Some("cpus"))? {
                    let n: u32 = val.parse().map_err(|_| {
                        syntax(&option, format!("Parameter '{k}' expects a number"))
                    })?;
                    match k.as_str() {
                        "cpus" => set.cpus = Some(n),
                        "maxcpus" => max = Some(n),
                        "sockets" | "dies" | "clusters" | "cores" | "threads" => {
                            topology = Some(topology.unwrap_or(1).saturating_mul(n));
                        }
                        other => {
                            return Err(syntax(&option, format!("Invalid parameter '{other}'")));
                        }
                    }
                }
                let cpus = set.cpus.or(max).or(topology);
                if let Some(c) = cpus {
                    if max.is_some_and(|m| m != c) {
                        return Err(syntax(
                            &option,
                            "CPU hot plug is not supported: maxcpus must equal cpus",
                        ));
                    }
                    if topology.is_some_and(|t| t != c) {
                        return Err(syntax(
                            &option,
                            format!("the topology does not give {c} CPUs"),
                        ));
                    }
                }
                set.cpus = cpus;
                Action::Machine(set, None)
            }
            "kernel" => Action::Boot(BootSet {
                kernel: Some(PathBuf::from(v)),
                ..BootSet::default()
            }),
            "initrd" => Action::Boot(BootSet {
                initrd: Some(PathBuf::from(v)),
                ..BootSet::default()
            }),
            "append" => Action::Boot(BootSet {
                append: Some(v.to_owned()),
                ..BootSet::default()
            }),
            "no-reboot" => Action::Boot(BootSet {
                no_reboot: Some(true),
                ..BootSet::default()
            }),
            "serial" => Action::Serial(v.to_owned()),
            "uuid" if forms::uuid_ok(v) => Action::Uuid(v.to_ascii_lowercase()),
            "uuid" => return Err(syntax(&option, "Invalid UUID")),
            "pidfile" => Action::PidFile(PathBuf::from(v)),
            "daemonize" => Action::Daemonize,
            "accel" => {
                let opts = split_opts(&option, v, Some("accel"))?;
                let mut accel = None;
                for (k, val) in opts {
                    match k.as_str() {
                        "accel" if val == "help" || val == "?" => {
                            return Ok(Invocation::ListAccels);
                        }
                        "accel" => accel = Some(val),
                        other => {
                            return Err(syntax(&option, format!("Invalid parameter '{other}'")));
                        }
                    }
                }
                let accel = accel.ok_or_else(|| syntax(&option, "Parameter 'accel' is missing"))?;
                // Consecutive -accel options are one list of fallbacks.
                if let Some(Step {
                    action: Action::Accel(list),
                    option: prev,
                }) = steps.last_mut()
                {
                    list.push(accel);
                    prev.push(' ');
                    prev.push_str(&option);
                    continue;
                }
                Action::Accel(vec![accel])
            }
            "device" if v.trim_start().starts_with('{') => {
                Action::Device(forms::device_json(v).map_err(opt_err(&option))?)
            }
            "device" => {
                let mut dev = DeviceAdd::default();
                let mut props = Map::new();
                for (k, val) in split_opts(&option, v, Some("driver"))? {
                    match k.as_str() {
                        "driver" => dev.driver = val,
                        "id" => dev.id = Some(val),
                        "bus" => dev.bus = Some(val),
                        _ => {
                            props.insert(k, Value::String(val));
                        }
                    }
                }
                if dev.driver.is_empty() {
                    return Err(syntax(&option, "Parameter 'driver' is missing"));
                }
                dev.props = props;
                Action::Device(dev)
            }
            "name" => {
                let mut guest = None;
                for (k, val) in split_opts(&option, v, Some("guest"))? {
                    match k.as_str() {
                        "guest" => guest = Some(val),
                        "process" | "debug-threads" => {}
                        other => {
                            return Err(syntax(&option, format!("Invalid parameter '{other}'")));
                        }
                    }
                }
                Action::Name(guest.unwrap_or_default())
            }
            "qmp" => {
                Action::Monitor(Endpoint::parse(v).map_err(|e| syntax(&option, e.to_string()))?)
            }
            "blockdev" | "drive" => {
                Action::Blockdev(forms::blockdev(name, v).map_err(opt_err(&option))?)
            }
            "netdev" => Action::Netdev(forms::netdev(v).map_err(opt_err(&option))?),
            "chardev" => match forms::char_backend(v).map_err(opt_err(&option))? {
                Some(c) => Action::Chardev(c),
                None => {
                    let (id, ep) = forms::chardev_endpoint(v).map_err(opt_err(&option))?;
                    if chardevs.contains_key(&id) {
                        return Err(syntax(&option, format!("Duplicate ID '{id}' for chardev")));
                    }
                    chardevs.insert(id, ep);
                    Action::Nothing
                }
            },
            "mon" => {
                let mut chardev = None;
                let mut mode = "readline".to_owned();
                for (k, val) in split_opts(&option, v, Some("chardev"))? {
                    match k.as_str() {
                        "chardev" => chardev = Some(val),
                        "mode" => mode = val,
                        "pretty" => {
                            forms::on_off(&k, &val).map_err(opt_err(&option))?;
                        }
                        other => {
                            return Err(syntax(&option, format!("Invalid parameter '{other}'")));
                        }
                    }
                }
                if mode != "control" {
                    return Err(syntax(
                        &option,
                        format!(
                            "mode={mode} is not supported: Keel serves QMP only (mode=control)"
                        ),
                    ));
                }
                let id =
                    chardev.ok_or_else(|| syntax(&option, "Parameter 'chardev' is missing"))?;
                let ep = chardevs
                    .remove(&id)
                    .ok_or_else(|| syntax(&option, format!("chardev \"{id}\" not found")))?;
                Action::Monitor(ep)
            }
            _ => return Err(syntax(raw, "invalid option")),
        };
        steps.push(Step { option, action });
    }
    Ok(Invocation::Run(steps))
}

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
            Action::Netdev(n) => vmm.execute(n.clone()).map_err(cmd(opt))?,
            Action::Chardev(c) => {
                vmm.execute(c.clone()).map_err(cmd(opt))?;
            }
            Action::Name(n) => vmm.set_name(Some(n.clone())),
            Action::Uuid(u) => vmm.set_uuid(Some(u.clone())),
            Action::NoAutostart => vmm.set_autostart(false),
            Action::Incoming(u) => vmm.set_incoming(Some(u.clone())),
            Action::Preconfig => preconfig = true,
            Action::PidFile(_) | Action::Daemonize | Action::Nothing => {}
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
