//! QEMU's command line read into an ordered script of commands ([`parse`]): every option
//! is checked first (unknown options, bad values) so that a mistake is reported on one line
//! with no side effect; the `vmm` crate then runs the [`Step`]s left to right, each through
//! the same command handler as its QMP twin.

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_qmp::{CommandError, Endpoint};
use serde_json::{Map, Value};

use crate::block::BlockdevAdd;
use crate::char::ChardevAdd;
use crate::cli as forms;
use crate::machine::{BootSet, MachineSet};
use crate::net::NetdevAdd;
use crate::qdev::DeviceAdd;

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
    /// A human monitor (`-monitor stdio|unix:...|tcp:...`, `-mon mode=readline`).
    HmpMonitor(Endpoint),
    /// `-incoming URI|defer`: the machine is restored from `URI` once it is ready.
    Incoming(String),
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
    /// `-preconfig`.
    Preconfig,
    /// `-object`: a backend object (`secret`, `memory-backend-ram`), from no-machine on.
    Object(forms::ObjectAdd),
    /// `-add-fd fd=FD,set=SET[,opaque=TEXT]`: an inherited descriptor into an fd set, which
    /// later options open as `/dev/fdset/SET`.
    AddFd {
        /// The fd set.
        set: u64,
        /// The inherited descriptor.
        fd: i32,
        /// Free text kept with it (`query-fdsets`).
        opaque: Option<String>,
    },
    /// A `-drive`'s `rerror=`/`werror=`: the error policy of the drive `node`, followed by a
    /// disk on it whose own property is absent or `auto` (QEMU's block backend policy).
    DriveErrors {
        /// The drive's id.
        node: String,
        /// `rerror=`.
        rerror: Option<String>,
        /// `werror=`.
        werror: Option<String>,
    },
    /// `-audiodev none,id=ID`: an audio backend that plays nothing.
    Audiodev {
        /// Its id.
        id: String,
        /// Its driver (`none`).
        driver: String,
    },
    /// `-overcommit mem-lock=on`: lock all of the process's memory, now and from now on.
    MemLock,
    /// `-no-shutdown`: `set-action shutdown=pause`.
    NoShutdown,
    /// `-msg timestamp=on`: error lines start with the time (the binary's job).
    MsgTimestamp,
    /// `-rtc base=utc|localtime|DATE`: where the RTC's clock starts.
    RtcBase(String),
    /// `-action` (and `-watchdog-action`): `set-action`.
    SetAction(crate::misc::SetAction),
    /// `-d ITEMS`: with `guest_errors` or `unimp`, the device models' warnings about the
    /// guest go to the `-D` file (the binary's job).
    LogItems(Vec<String>),
    /// `-D FILE`: where `-d`'s output goes (the binary's job).
    LogFile(PathBuf),
    /// A `-drive` under `-snapshot`: `blockdev-add` of a temporary copy of the image, so
    /// the guest's writes are discarded at exit (QEMU's temporary overlay).
    DriveSnapshot(BlockdevAdd),
    /// `-mem-prealloc`: guest RAM is allocated in full when the machine is built.
    MemPrealloc,
    /// `-echr N`: the mux's escape character (C-a by default).
    Echr(u8),
    /// `-global`: a default property value for the devices of a type (all of them are
    /// moved to the front, as QEMU applies every `-global` before it creates any device).
    Global(keel_qdev::GlobalProp),
    /// Accepted for compatibility, nothing to do (`-display none`, `-boot strict=on`, ...).
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
    /// Print [`LOG_HELP`] and fail (`-d help`, or an item QEMU does not know).
    LogUsage,
}

/// QEMU 7.2's `-d` items (`-d help` lists them; `trace:PATTERN` is accepted too).
pub const LOG_ITEMS: &[&str] = &[
    "out_asm",
    "in_asm",
    "op",
    "op_opt",
    "op_ind",
    "int",
    "exec",
    "cpu",
    "fpu",
    "mmu",
    "pcall",
    "cpu_reset",
    "unimp",
    "guest_errors",
    "page",
    "nochain",
    "plugin",
    "strace",
    "tid",
];

/// What `-d help` (or an unknown item) prints on standard output before exiting with
/// status 1, as QEMU 7.2 does.
pub const LOG_HELP: &str = "Log items (comma separated):
out_asm         show generated host assembly code for each compiled TB
in_asm          show target assembly code for each compiled TB
op              show micro ops for each compiled TB
op_opt          show micro ops after optimization
op_ind          show micro ops before indirect lowering
int             show interrupts/exceptions in short format
exec            show trace before each executed TB (lots of logs)
cpu             show CPU registers before entering a TB (lots of logs)
fpu             include FPU registers in the 'cpu' logging
mmu             log MMU-related activities
pcall           x86 only: show protected mode far calls/returns/exceptions
cpu_reset       show CPU state before CPU resets
unimp           log unimplemented functionality
guest_errors    log when the guest OS does something invalid (eg accessing a
non-existent register)
page            dump pages at beginning of user mode emulation
nochain         do not chain compiled TBs so that \"exec\" and \"cpu\" show
complete traces
plugin          output from TCG plugins

strace          log every user-mode syscall, its input, and its result
tid             open a separate log file per thread; filename must contain '%d'
trace:PATTERN   enable trace events

Use \"-d trace:help\" to get a list of trace events.

";

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
  -serial BACKEND                   serial port backend: stdio, null, none, file:PATH,
                                    chardev:ID, mon:stdio (QEMU's escapes: C-a h help,
                                    C-a x exit, C-a C-a sends C-a; -echr N changes C-a)
  -nographic                        without -serial: -serial mon:stdio
  -parallel none|null               (Keel's machines have no parallel port)
Accelerator (accel-set):
  -accel NAME[,PROP=VALUE...]       repeat for fallbacks: -accel kvm -accel tcg
                                    tcg: jit=on|off (compiling tier), thread=single
Devices (device_add, cold until the machine is ready):
  -device DRIVER[,id=ID][,prop=value...]   (-device help, -device DRIVER,help)
    isa-debug-exit[,iobase=N,iosize=N]  virtio-rng-device
    virtio-blk-device,drive=NODE[,serial=S,read-only=on]
    virtio-net-device,netdev=ID[,mac=MAC]  virtconsole,chardev=ID
    isa-serial,chardev=ID[,index=N]   (after -nodefaults or -serial none)
  -global DRIVER.PROP=VALUE | driver=D,property=P,value=V
                                    default of PROP for every DRIVER device (all
                                    -global options apply before any device is made)
Backends (from the start; devices name them):
  -blockdev driver=file,filename=PATH,node-name=NODE[,read-only=on]
  -drive file=PATH,if=none,id=NODE,format=raw[,readonly=on]
  -drive file=PATH,if=virtio,format=raw  a drive and its virtio-blk (virtio-blk-pci on pc)
  -mem-prealloc                     allocate all guest RAM when the machine is built
  -snapshot                         -drive images are copied to a temporary file the
                                    guest writes to, discarded at exit
  -netdev tap,id=ID,ifname=IF,script=no,downscript=no
  -netdev user,id=ID[,net=ADDR/MASK,host=,dhcpstart=,dns=,hostname=,domainname=,
          restrict=on|off,ipv4=,ipv6=][,hostfwd=[tcp|udp]:[HADDR]:HPORT-[GADDR]:GPORT]...
  -nic user|tap,model=virtio-net-pci|virtio-net-device[,mac=MAC][,netdev options]
  -chardev file,id=ID,path=PATH[,append=on] | pty,id=ID | null,id=ID
                                    (each with [,logfile=PATH,logappend=on])
  -object secret,id=ID,data=S|file=PATH | memory-backend-ram,id=ID,size=SIZE
                                    (or JSON; -machine memory-backend=ID uses one)
  -add-fd fd=FD,set=N[,opaque=S]    later options open /dev/fdset/N
  -audiodev none,id=ID
Monitors (live from the moment they are read):
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off | stdio
  -chardev socket,id=ID,path=PATH,server=on,wait=off  (or host=,port=, or fd=N)
  -mon chardev=ID,mode=control
Lifecycle:
  -enable-kvm                       same as -accel kvm
  -S                                stay paused (prelaunch) when ready
  -incoming file:PATH|exec:CMD|defer restore a saved machine once it is ready
  -no-shutdown                      a guest power-off stops in 'shutdown' state
  -preconfig                        stop early and let QMP finish the machine
                                    (without -machine: wait in no-machine)
Process:
  -pidfile PATH                     write the pid once the command line ran
  -daemonize                        detach once the command line ran
Other:
  -name NAME  -uuid UUID  -nodefaults  -no-user-config  -display none  -nographic
  -vga none  -monitor none  -nic none  -net none  -boot strict=on
  -rtc base=utc|localtime|2006-06-17T16:01:21[,clock=host|rt|vm][,driftfix=none|slew]
  -msg timestamp=on  -overcommit mem-lock=on|off  -k LANG  -vnc none  -no-hpet  -L DIR
  -action shutdown=poweroff|pause,reboot=reset|shutdown,panic=...  (set-action)
  -watchdog-action ACTION           (set-action watchdog=ACTION)
  -d ITEM[,...] -D FILE             QEMU's log items (-d help); with guest_errors or
                                    unimp the device models' warnings go to FILE
Human monitor (HMP: help, info status/version/cpus/kvm/name/qtree/mtree/pci/registers,
  stop, cont, system_reset, system_powerdown, quit):
  -monitor stdio | unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off
  -mon chardev=ID,mode=readline
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
    let mut virtio_drives = 0;
    let mut nics = 0;
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
                | "object"
                | "add-fd"
                | "audiodev"
                | "overcommit"
                | "rtc"
                | "boot"
                | "msg"
                | "nic"
                | "net"
                | "incoming"
                | "global"
                | "parallel"
                | "echr"
                | "k"
                | "vnc"
                | "L"
                | "bios"
                | "hda"
                | "hdb"
                | "hdc"
                | "hdd"
                | "cdrom"
                | "fda"
                | "fdb"
                | "gdb"
                | "action"
                | "watchdog-action"
                | "d"
                | "D"
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
            "preconfig" => Action::Preconfig,
            // `-nodefaults`: no default serial port (see the end of this function).
            // `-nographic`: the default serial port becomes QEMU's mux on stdio (see the end).
            "nodefaults" | "no-user-config" | "nographic" => Action::Nothing,
            // Keel's machines have no parallel port: `none` is what they have, and `null`
            // (a port with nothing attached) is accepted as it (no guest can tell a port
            // with no device behind it from none).
            "parallel" if v == "none" || v == "null" => Action::Nothing,
            "parallel" => {
                return Err(syntax(
                    &option,
                    "Keel's machines have no parallel port; only -parallel none|null are accepted",
                ));
            }
            // Keel has no display (nor VNC server) for a keyboard layout to apply to.
            "k" | "L" | "no-hpet" => Action::Nothing,
            "vnc" if v == "none" => Action::Nothing,
            "vnc" => {
                return Err(syntax(
                    &option,
                    "Keel has no display; only -vnc none is accepted",
                ));
            }
            "usb" => {
                return Err(syntax(
                    &option,
                    "Keel's machines have no USB controller (use virtio devices: -device virtio-*-pci)",
                ));
            }
            "hda" | "hdb" | "hdc" | "hdd" | "cdrom" | "fda" | "fdb" => {
                return Err(syntax(
                    &option,
                    "Keel's machines have no IDE or floppy controller; attach the image as a \
                     virtio disk: -drive file=IMAGE,format=raw,if=virtio",
                ));
            }
            "bios" => {
                return Err(syntax(
                    &option,
                    "Keel has no firmware: it boots the guest with -kernel (-initrd, -append) directly",
                ));
            }
            "s" | "gdb" => {
                return Err(syntax(
                    &option,
                    "Keel has no gdb stub; inspect a guest with HMP 'info registers' or QMP instead",
                ));
            }
            // `-snapshot`: see the end of this function.
            "snapshot" => Action::Nothing,
            "mem-prealloc" => Action::MemPrealloc,
            "d" => {
                let items: Vec<String> = v.split(',').map(str::to_owned).collect();
                if !items
                    .iter()
                    .all(|i| LOG_ITEMS.contains(&i.as_str()) || i.starts_with("trace:"))
                {
                    return Ok(Invocation::LogUsage);
                }
                Action::LogItems(items)
            }
            "D" => Action::LogFile(PathBuf::from(v)),
            "action" => Action::SetAction(forms::action(v).map_err(opt_err(&option))?),
            "watchdog-action" => Action::SetAction(
                forms::action(&format!("watchdog={v}")).map_err(opt_err(&option))?,
            ),
            "echr" => Action::Echr(
                keel_qdev::keyval::parse_int(v)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| syntax(&option, "Bad argument to echr"))?,
            ),
            "no-shutdown" => Action::NoShutdown,
            "object" => Action::Object(forms::object(v).map_err(opt_err(&option))?),
            "add-fd" => {
                let (set, fd, opaque) = forms::add_fd(v).map_err(opt_err(&option))?;
                Action::AddFd { set, fd, opaque }
            }
            "audiodev" => {
                let (id, driver) = forms::audiodev(v).map_err(opt_err(&option))?;
                Action::Audiodev { id, driver }
            }
            "overcommit" if forms::overcommit(v).map_err(opt_err(&option))? => Action::MemLock,
            "msg" if forms::msg(v).map_err(opt_err(&option))? => Action::MsgTimestamp,
            "overcommit" | "msg" => Action::Nothing,
            "rtc" => match forms::rtc(v).map_err(opt_err(&option))? {
                Some(base) => Action::RtcBase(base),
                None => Action::Nothing,
            },
            "boot" => {
                forms::boot(v).map_err(opt_err(&option))?;
                Action::Nothing
            }
            "vga" | "monitor" if v == "none" => Action::Nothing,
            "vga" => {
                return Err(syntax(
                    &option,
                    "Keel has no display; only 'none' is accepted",
                ));
            }
            "monitor" => {
                Action::HmpMonitor(Endpoint::parse(v).map_err(|e| syntax(&option, e.to_string()))?)
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
                let mut maxmem = None;
                for (k, val) in split_opts(&option, v, Some("size"))? {
                    match k.as_str() {
                        "size" => {
                            set.memory = Some(
                                keel_qdev::keyval::parse_size_unit(&val, 1 << 20).ok_or_else(
                                    || syntax(&option, format!("invalid size '{val}'")),
                                )?,
                            )
                        }
                        "slots" if val == "0" => {}
                        "maxmem" => maxmem = Some(val),
                        "slots" => {
                            return Err(syntax(
                                &option,
                                "memory hot plug (slots, maxmem) is not supported: \
                                 give the RAM size alone (-m SIZE)",
                            ));
                        }
                        other => {
                            return Err(syntax(
                                &option,
                                format!("Invalid parameter '{other}' (only a size is supported)"),
                            ));
                        }
                    }
                }
                if let Some(m) = maxmem {
                    let max = keel_qdev::keyval::parse_size_unit(&m, 1 << 20);
                    if max.is_none() || max != set.memory {
                        return Err(syntax(
                            &option,
                            "memory hot plug (maxmem above the size) is not supported: \
                             give the RAM size alone (-m SIZE)",
                        ));
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
            "global" => {
                Action::Global(keel_qdev::GlobalProp::parse(v).map_err(|e| syntax(&option, e))?)
            }
            "incoming" => Action::Incoming(v.to_owned()),
            // No default NIC is what Keel's machines have anyway.
            "nic" | "net" if v == "none" => Action::Nothing,
            "nic" => {
                let (netdev, device) = forms::nic(v, nics).map_err(opt_err(&option))?;
                nics += 1;
                steps.push(Step {
                    option: option.clone(),
                    action: Action::Netdev(netdev),
                });
                Action::Device(device)
            }
            "net" => {
                return Err(syntax(
                    &option,
                    "only '-net none' is supported; use -nic user,model=virtio-net-pci, or \
                     -netdev user,id=N with -device virtio-net-pci,netdev=N (virtio-net-device \
                     on microvm)",
                ));
            }
            "uuid" if forms::uuid_ok(v) => Action::Uuid(v.to_ascii_lowercase()),
            "uuid" => return Err(syntax(&option, "Invalid UUID")),
            "pidfile" => Action::PidFile(PathBuf::from(v)),
            "daemonize" => Action::Daemonize,
            "accel" => {
                let opts = split_opts(&option, v, Some("accel"))?;
                let mut accel = None;
                // The backend's properties ride along as `NAME,PROP=VALUE,...`: the
                // backend checks them when accel-set opens it.
                let mut props = String::new();
                for (k, val) in opts {
                    match k.as_str() {
                        "accel" if val == "help" || val == "?" => {
                            return Ok(Invocation::ListAccels);
                        }
                        "accel" => accel = Some(val),
                        prop => props.push_str(&format!(",{prop}={val}")),
                    }
                }
                let accel = accel.ok_or_else(|| syntax(&option, "Parameter 'accel' is missing"))?;
                let accel = accel + &props;
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
            "drive" => {
                let (drive, device) =
                    match forms::virtio_drive(v, virtio_drives).map_err(opt_err(&option))? {
                        Some((drive, device)) => {
                            virtio_drives += 1;
                            (drive, Some(device))
                        }
                        None => (forms::blockdev(name, v).map_err(opt_err(&option))?, None),
                    };
                let (rerror, werror) = forms::drive_error_policy(v).map_err(opt_err(&option))?;
                let node = drive.node_name.clone();
                steps.push(Step {
                    option: option.clone(),
                    action: Action::Blockdev(drive),
                });
                match device {
                    Some(device) if rerror.is_some() || werror.is_some() => {
                        steps.push(Step {
                            option: option.clone(),
                            action: Action::DriveErrors {
                                node,
                                rerror,
                                werror,
                            },
                        });
                        Action::Device(device)
                    }
                    Some(device) => Action::Device(device),
                    None if rerror.is_some() || werror.is_some() => Action::DriveErrors {
                        node,
                        rerror,
                        werror,
                    },
                    None => Action::Nothing,
                }
            }
            "blockdev" => Action::Blockdev(forms::blockdev(name, v).map_err(opt_err(&option))?),
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
                        // The monitor's own name: nothing refers to it.
                        "id" => {}
                        "mode" => mode = val,
                        "pretty" => {
                            forms::on_off(&k, &val).map_err(opt_err(&option))?;
                        }
                        other => {
                            return Err(syntax(&option, format!("Invalid parameter '{other}'")));
                        }
                    }
                }
                if mode != "control" && mode != "readline" {
                    return Err(syntax(
                        &option,
                        format!("Parameter 'mode' does not accept value '{mode}'"),
                    ));
                }
                let id =
                    chardev.ok_or_else(|| syntax(&option, "Parameter 'chardev' is missing"))?;
                let ep = chardevs
                    .remove(&id)
                    .ok_or_else(|| syntax(&option, format!("chardev \"{id}\" not found")))?;
                if mode == "readline" {
                    Action::HmpMonitor(ep)
                } else {
                    Action::Monitor(ep)
                }
            }
            _ => return Err(syntax(raw, "invalid option")),
        };
        steps.push(Step { option, action });
    }
    // One stdio: a human monitor there takes it from the default serial port (which QEMU
    // would show on its display, i.e. nowhere here); a serial port asked for on stdio too is
    // QEMU's error.
    if let Some(at) = steps
        .iter()
        .position(|s| matches!(s.action, Action::HmpMonitor(Endpoint::Stdio)))
    {
        let stdio =
            |s: &Step| matches!(&s.action, Action::Serial(b) if b == "stdio" || b == "mon:stdio");
        if let Some(s) = steps.iter().find(|s| stdio(s)) {
            return Err(syntax(
                &s.option,
                "cannot use stdio by multiple character devices",
            ));
        }
        if !steps.iter().any(|s| matches!(s.action, Action::Serial(_))) {
            let option = steps[at].option.clone();
            steps.insert(
                at + 1,
                Step {
                    option,
                    action: Action::Serial("null".into()),
                },
            );
        }
    }
    // As QEMU: `-nographic` without `-serial` puts the serial port on stdio through the mux
    // (C-a h, C-a x, ...); `-nodefaults` or a human monitor on stdio leaves it alone.
    let has = |f: &dyn Fn(&Action) -> bool| steps.iter().any(|s| f(&s.action));
    if let Some(at) = steps.iter().position(|s| s.option == "-nographic")
        && !has(&|a| matches!(a, Action::Serial(_) | Action::HmpMonitor(Endpoint::Stdio)))
        && !steps.iter().any(|s| s.option == "-nodefaults")
    {
        steps[at].action = Action::Serial("mon:stdio".into());
    }
    // As QEMU: without `-serial`, `-nodefaults` leaves the machine no serial port (a
    // `-device isa-serial` can then take COM1's place).
    if !steps.iter().any(|s| matches!(s.action, Action::Serial(_)))
        && let Some(nd) = steps.iter_mut().find(|s| s.option == "-nodefaults")
    {
        nd.action = Action::Serial("none".into());
    }
    // As QEMU: `-snapshot` makes every writable -drive (not -blockdev) write to a temporary
    // image, discarded at exit.
    if steps.iter().any(|s| s.option == "-snapshot") {
        for s in steps.iter_mut().filter(|s| s.option.starts_with("-drive ")) {
            if let Action::Blockdev(b) = &s.action
                && b.read_only != Some(true)
            {
                s.action = Action::DriveSnapshot(b.clone());
            }
        }
    }
    // QEMU sets every -global before it creates the machine's devices.
    let (mut globals, rest): (Vec<Step>, Vec<Step>) = steps
        .into_iter()
        .partition(|s| matches!(s.action, Action::Global(_)));
    globals.extend(rest);
    Ok(Invocation::Run(globals))
}

/// Now as QEMU's `-msg timestamp=on` prefix: ISO 8601 UTC with microseconds and a space
/// (`2026-12-06T17:29:40.123456Z `).
pub fn timestamp_prefix() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(now.as_secs()).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z ",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(line: &[&str]) -> Vec<Step> {
        let args: Vec<String> = line.iter().map(|s| s.to_string()).collect();
        match parse(&args) {
            Ok(Invocation::Run(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn libvirts_options_become_steps() {
        let s = steps(&[
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"ram","size":268435456}"#,
            "-object",
            "secret,id=k,data=x,format=raw",
            "-add-fd",
            "set=0,fd=23,opaque=serial0-source",
            "-chardev",
            "pty,id=c1,logfile=/dev/fdset/0,logappend=on",
            "-audiodev",
            r#"{"id":"audio1","driver":"none"}"#,
            "-overcommit",
            "mem-lock=on",
            "-no-shutdown",
            "-msg",
            "timestamp=on",
            "-rtc",
            "base=utc",
            "-boot",
            "strict=on",
            "-chardev",
            "socket,id=m,path=/nonexistent/m.sock,server=on,wait=off",
            "-mon",
            "chardev=m,id=monitor,mode=control",
        ]);
        let Action::Object(o) = &s[0].action else {
            panic!("{:?}", s[0])
        };
        assert_eq!(
            (o.qom_type.as_str(), o.id.as_str(), o.props.clone()),
            (
                "memory-backend-ram",
                "ram",
                vec![("size".to_owned(), "268435456".to_owned())]
            )
        );
        assert!(matches!(&s[1].action, Action::Object(o) if o.qom_type == "secret"));
        assert!(matches!(
            &s[2].action,
            Action::AddFd { set: 0, fd: 23, opaque: Some(o) } if o == "serial0-source"
        ));
        let Action::Chardev(c) = &s[3].action else {
            panic!("{:?}", s[3])
        };
        assert_eq!(
            c.backend,
            serde_json::json!({"type": "pty", "data": {"logfile": "/dev/fdset/0", "logappend": true}})
        );
        assert!(
            matches!(&s[4].action, Action::Audiodev { id, driver } if id == "audio1" && driver == "none")
        );
        assert!(matches!(s[5].action, Action::MemLock));
        assert!(matches!(s[6].action, Action::NoShutdown));
        assert!(matches!(s[7].action, Action::MsgTimestamp));
        assert!(matches!(&s[8].action, Action::RtcBase(b) if b == "utc"));
        assert!(matches!(s[9].action, Action::Nothing));
        assert!(matches!(s[11].action, Action::Monitor(_)));
    }

    #[test]
    fn nodefaults_leaves_no_serial_port_unless_one_is_given() {
        let s = steps(&["-nodefaults"]);
        assert!(matches!(&s[0].action, Action::Serial(b) if b == "none"));
        let s = steps(&["-nodefaults", "-serial", "stdio"]);
        assert!(matches!(s[0].action, Action::Nothing));
    }

    #[test]
    fn unsupported_values_are_refused_with_a_reason() {
        for (line, want) in [
            (["-rtc", "clock=foo"], "invalid option value 'foo'"),
            (["-boot", "order=c"], "no firmware"),
            (["-boot", "foo=1"], "Parameter 'boot.foo' is unexpected"),
            (["-audiodev", "alsa,id=a"], "does not accept value 'alsa'"),
            (["-overcommit", "cpu-pm=on"], "cpu-pm=on"),
            (["-add-fd", "set=1"], "fd option is required"),
            (["-object", "secret,data=x"], "Parameter 'id' is missing"),
            (
                ["-drive", "file=disk.img,format=raw"],
                "if=ide (-drive's default)",
            ),
            (["-hda", "disk.img"], "no IDE or floppy controller"),
            (["-cdrom", "disk.iso"], "no IDE or floppy controller"),
        ] {
            let args: Vec<String> = line.iter().map(|s| s.to_string()).collect();
            let e = parse(&args).unwrap_err().to_string();
            assert!(e.contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn timestamps_are_qemus_iso8601() {
        let t = timestamp_prefix();
        assert_eq!(t.len(), 28, "{t}");
        assert!(t.ends_with("Z "), "{t}");
        assert_eq!(&t[10..11], "T");
    }
}
