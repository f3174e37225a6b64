//! The human monitor's texts in QEMU 7.2's formats (`human-monitor-command`): `help`,
//! `info` and the `info` subcommands whose output is more than one line.
//!
//! Pure formatting from the device model (`keel-qdev`) and the vCPU registers
//! (`keel-accel`): the VMM answers `human-monitor-command` by reading its state and handing
//! it to these functions, so the texts are tested here without a machine.

#![deny(missing_docs)]

pub mod monitor;

use keel_accel::{Regs, Segment, SpecialRegs};

/// The HMP commands Keel understands, with QEMU's argument synopsis and help text.
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("cont|c", "", "resume emulation"),
    ("help|?", "[cmd]", "show the help"),
    (
        "hostfwd_add",
        "[netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport",
        "redirect TCP or UDP connections from host to guest (requires -net user)",
    ),
    (
        "hostfwd_remove",
        "[netdev_id] [tcp|udp]:[hostaddr]:hostport",
        "remove host-to-guest TCP or UDP redirection",
    ),
    (
        "info",
        "[subcommand]",
        "show various information about the system state",
    ),
    ("quit|q", "", "quit the emulator"),
    ("stop|s", "", "stop emulation"),
    ("system_powerdown", "", "send system power down event"),
    ("system_reset", "", "reset the system"),
];

/// The `info` subcommands Keel understands, as [`COMMANDS`].
pub const INFO: &[(&str, &str, &str)] = &[
    ("cpus", "", "show infos for each CPU"),
    ("kvm", "", "show KVM information"),
    (
        "mtree",
        "",
        "show memory tree (the regions of Keel's device tree)",
    ),
    ("name", "", "show the current VM name"),
    ("pci", "", "show PCI info"),
    ("qtree", "", "show device tree"),
    (
        "registers",
        "[-a|vcpu]",
        "show the cpu registers (-a: show register info for all cpus; vcpu: specific vCPU \
         to query; show the current CPU's registers if no argument is specified)",
    ),
    ("status", "", "show the current VM status (running|paused)"),
    ("version", "", "show the version of QEMU"),
];

/// Which vCPUs `info registers` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cpus {
    /// The monitor's current CPU (the one the client named, else the first).
    Current,
    /// `-a`: every vCPU.
    All,
    /// One vCPU by index.
    One(u32),
}

/// A human monitor command line, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// An empty line: no output.
    Empty,
    /// A text answered without the VMM's state (help, unknown commands, argument errors).
    Text(String),
    /// `info status`.
    Status,
    /// `info version`.
    Version,
    /// `info kvm`.
    Kvm,
    /// `info cpus`.
    CpuList,
    /// `info name`.
    Name,
    /// `info qtree`.
    Qtree,
    /// `info mtree`.
    Mtree,
    /// `info pci`.
    Pci,
    /// `info registers`.
    Registers(Cpus),
    /// `cont`.
    Cont,
    /// `stop`.
    Stop,
    /// `system_reset`.
    Reset,
    /// `system_powerdown`.
    Powerdown,
    /// `quit`.
    Quit,
    /// `hostfwd_add [netdev_id] rule`.
    HostfwdAdd {
        /// The user network (`None`: the first one).
        netdev: Option<String>,
        /// `[tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport`.
        rule: String,
    },
    /// `hostfwd_remove [netdev_id] rule`.
    HostfwdRemove {
        /// The user network (`None`: the first one).
        netdev: Option<String>,
        /// `[tcp|udp]:[hostaddr]:hostport`.
        rule: String,
    },
    /// A known command with arguments Keel does not take.
    Unsupported,
}

/// Reads a command line as QEMU's monitor does (words separated by blanks).
pub fn parse(command_line: &str) -> Request {
    let words: Vec<&str> = command_line.split_whitespace().collect();
    match words.as_slice() {
        [] => Request::Empty,
        ["help" | "?"] => Request::Text(help(None)),
        ["help" | "?", topic] => Request::Text(help(Some(topic))),
        ["info"] => Request::Text(help(Some("info"))),
        ["info", "status"] => Request::Status,
        ["info", "version"] => Request::Version,
        ["info", "kvm"] => Request::Kvm,
        ["info", "cpus"] => Request::CpuList,
        ["info", "name"] => Request::Name,
        ["info", "qtree"] => Request::Qtree,
        ["info", "mtree"] => Request::Mtree,
        ["info", "pci"] => Request::Pci,
        ["info", "registers"] => Request::Registers(Cpus::Current),
        ["info", "registers", "-a"] => Request::Registers(Cpus::All),
        ["info", "registers", n] => match n.parse::<u32>() {
            Ok(i) => Request::Registers(Cpus::One(i)),
            Err(_) => Request::Text(format!("CPU#{n} not available\r\n")),
        },
        ["info", "registers", ..] => {
            Request::Text("registers: extraneous characters at the end of line\r\n".into())
        }
        ["cont" | "c"] => Request::Cont,
        ["stop" | "s"] => Request::Stop,
        ["system_reset"] => Request::Reset,
        ["system_powerdown"] => Request::Powerdown,
        ["quit" | "q"] => Request::Quit,
        [cmd @ ("hostfwd_add" | "hostfwd_remove"), rest @ ..] if matches!(rest.len(), 1 | 2) => {
            let (netdev, rule) = match rest {
                [rule] => (None, (*rule).to_owned()),
                [id, rule, ..] => (Some((*id).to_owned()), (*rule).to_owned()),
                [] => return Request::Unsupported,
            };
            if *cmd == "hostfwd_add" {
                Request::HostfwdAdd { netdev, rule }
            } else {
                Request::HostfwdRemove { netdev, rule }
            }
        }
        ["info", sub, ..] if !INFO.iter().any(|(n, _, _)| n == sub) => {
            Request::Text(format!("unknown command: 'info {sub}'\r\n"))
        }
        [cmd, ..]
            if !COMMANDS
                .iter()
                .any(|(n, _, _)| n.split('|').any(|a| a == *cmd)) =>
        {
            Request::Text(format!("unknown command: '{cmd}'\r\n"))
        }
        _ => Request::Unsupported,
    }
}

/// `info status`: QEMU's line for a run state (`running`, `paused`, or `paused (STATE)`).
pub fn status(running: bool, paused: bool, state: &str) -> String {
    if running {
        "VM status: running\r\n".into()
    } else if paused {
        "VM status: paused\r\n".into()
    } else {
        format!("VM status: paused ({state})\r\n")
    }
}

/// `info kvm`.
pub fn kvm(present: bool, enabled: bool) -> String {
    let state = match (present, enabled) {
        (false, _) => "not compiled",
        (true, true) => "enabled",
        (true, false) => "disabled",
    };
    format!("kvm support: {state}\r\n")
}

/// `info cpus`: (index, host thread id) per vCPU; the monitor's current CPU (the first)
/// is starred, as QEMU does.
pub fn cpus(list: &[(u32, i64)]) -> String {
    list.iter()
        .enumerate()
        .map(|(i, (index, tid))| {
            let mark = if i == 0 { '*' } else { ' ' };
            format!("{mark} CPU #{index}: thread_id={tid}\r\n")
        })
        .collect()
}

fn line(prefix: &str, (name, args, help): &(&str, &str, &str)) -> String {
    format!("{prefix}{name} {args} -- {help}\r\n")
}

/// `help` (or `help info` with `info`): QEMU's `name args -- help` lines.
pub fn help(topic: Option<&str>) -> String {
    match topic {
        None => COMMANDS.iter().map(|c| line("", c)).collect(),
        Some("info") => INFO.iter().map(|c| line("info ", c)).collect(),
        Some(cmd) => match COMMANDS
            .iter()
            .find(|(n, _, _)| n.split('|').any(|a| a == cmd))
        {
            Some(c) => line("", c),
            None => format!("unknown command: '{cmd}'\r\n"),
        },
    }
}

/// A device in `info qtree`: type, id, properties (already formatted values) and the
/// buses it brings.
#[derive(Debug, Clone, Default)]
pub struct QtreeDev {
    /// Device type.
    pub driver: String,
    /// User id (`""` if none).
    pub id: String,
    /// `name = value` pairs, values formatted as QEMU prints them.
    pub props: Vec<(String, String)>,
    /// MMIO windows (base, size).
    pub mmio: Vec<(u64, u64)>,
    /// Child buses.
    pub buses: Vec<QtreeBus>,
}

/// A bus in `info qtree`.
#[derive(Debug, Clone, Default)]
pub struct QtreeBus {
    /// Bus name.
    pub name: String,
    /// Bus type.
    pub bus_type: String,
    /// Its devices.
    pub devices: Vec<QtreeDev>,
}

/// A property value as `info qtree` prints it.
pub fn qtree_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => format!("\"{s}\""),
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(u) => format!("{u} (0x{u:x})"),
            None => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn qtree_bus(out: &mut String, b: &QtreeBus, indent: usize) {
    let pad = " ".repeat(indent);
    out.push_str(&format!(
        "{pad}bus: {}\r\n{pad}  type {}\r\n",
        b.name, b.bus_type
    ));
    for d in &b.devices {
        out.push_str(&format!("{pad}  dev: {}, id \"{}\"\r\n", d.driver, d.id));
        for (k, v) in &d.props {
            out.push_str(&format!("{pad}    {k} = {v}\r\n"));
        }
        for (base, size) in &d.mmio {
            out.push_str(&format!("{pad}    mmio {base:016x}/{size:016x}\r\n"));
        }
        for c in &d.buses {
            qtree_bus(out, c, indent + 4);
        }
    }
}

/// `info qtree`: QEMU's layout under `main-system-bus`.
pub fn qtree(root: &QtreeBus) -> String {
    let mut out = String::new();
    qtree_bus(&mut out, root, 0);
    out
}

/// `info qtree` of a device tree: the buses under `main-system-bus` with their devices and
/// properties.
pub fn qtree_of(t: &keel_qdev::DeviceTree) -> String {
    fn bus(t: &keel_qdev::DeviceTree, b: &keel_qdev::BusNode) -> QtreeBus {
        QtreeBus {
            name: b.name.clone(),
            bus_type: b.bus_type.clone(),
            devices: b
                .devices
                .iter()
                .map(|d| {
                    let view = t.find(&d.path).and_then(|k| t.view(k));
                    QtreeDev {
                        driver: d.driver.clone(),
                        id: d.id.clone().unwrap_or_default(),
                        props: view.map_or_else(Vec::new, |v| {
                            v.props
                                .iter()
                                .map(|(k, p)| {
                                    let j =
                                        serde_json::to_value(p).unwrap_or(serde_json::Value::Null);
                                    (k.to_owned(), qtree_value(&j))
                                })
                                .collect()
                        }),
                        mmio: d
                            .resources
                            .as_ref()
                            .and_then(|r| r.mmio.as_ref())
                            .map(|w| vec![(w.base, w.len)])
                            .unwrap_or_default(),
                        buses: Vec::new(),
                    }
                })
                .collect(),
        }
    }
    let mut root = QtreeBus {
        name: "main-system-bus".into(),
        bus_type: "System".into(),
        devices: Vec::new(),
    };
    for b in t.query_tree() {
        let mut qb = bus(t, &b);
        if b.path == "/machine" || b.name == "main-system-bus" {
            root.devices.append(&mut qb.devices);
        } else {
            root.devices.push(QtreeDev {
                driver: b.bus_type.clone(),
                buses: vec![qb],
                ..Default::default()
            });
        }
    }
    qtree(&root)
}

/// `info mtree` of a device tree: the port and MMIO windows its devices occupy.
pub fn mtree_of(t: &keel_qdev::DeviceTree) -> String {
    let (mut io, mut mem) = (Vec::new(), Vec::new());
    for d in t.views() {
        if let Some(r) = d.resources {
            if let Some(w) = &r.pio {
                io.push((w.base, w.len, "i/o", d.driver.to_owned()));
            }
            if let Some(w) = &r.mmio {
                mem.push((w.base, w.len, "i/o", d.driver.to_owned()));
            }
        }
    }
    mtree(&io, &mem)
}

/// A region in `info mtree`: (start, size, kind `i/o` or `ram`, name).
pub type Region = (u64, u64, &'static str, String);

/// `info mtree`: the I/O and memory address spaces with the regions Keel knows.
pub fn mtree(io: &[Region], memory: &[Region]) -> String {
    let mut out = String::from(
        "address-space: I/O\r\n  0000000000000000-000000000000ffff (prio 0, i/o): io\r\n",
    );
    let region = |out: &mut String, (start, size, kind, name): &Region| {
        let end = start.saturating_add(size.saturating_sub(1));
        out.push_str(&format!(
            "    {start:016x}-{end:016x} (prio 0, {kind}): {name}\r\n"
        ));
    };
    let mut io = io.to_vec();
    io.sort_by_key(|r| r.0);
    for r in &io {
        region(&mut out, r);
    }
    out.push_str(
        "\r\naddress-space: memory\r\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\r\n",
    );
    let mut memory = memory.to_vec();
    memory.sort_by_key(|r| r.0);
    for r in &memory {
        region(&mut out, r);
    }
    out.push_str("\r\n");
    out
}

/// The descriptor flags word QEMU keeps for a segment (bits 8-23 of the high dword).
fn seg_flags(s: &Segment) -> u32 {
    (u32::from(s.type_) << 8)
        | (u32::from(s.s) << 12)
        | (u32::from(s.dpl & 3) << 13)
        | (u32::from(s.present) << 15)
        | (u32::from(s.avl) << 20)
        | (u32::from(s.l) << 21)
        | (u32::from(s.db) << 22)
        | (u32::from(s.g) << 23)
}

fn seg_line(name: &str, s: &Segment, long: bool, cs64: bool, pe: bool) -> String {
    let flags = seg_flags(s);
    let mut out = if cs64 {
        format!(
            "{name:<3}={:04x} {:016x} {:08x} {:08x}",
            s.selector, s.base, s.limit, flags
        )
    } else {
        format!(
            "{name:<3}={:04x} {:08x} {:08x} {:08x}",
            s.selector, s.base as u32, s.limit, flags
        )
    };
    if pe && s.present {
        out.push_str(&format!(" DPL={} ", s.dpl & 3));
        if s.s {
            if s.type_ & 8 != 0 {
                out.push_str(if s.l {
                    "CS64"
                } else if s.db {
                    "CS32"
                } else {
                    "CS16"
                });
                out.push_str(&format!(
                    " [{}{}",
                    if s.type_ & 4 != 0 { 'C' } else { '-' },
                    if s.type_ & 2 != 0 { 'R' } else { '-' }
                ));
            } else {
                out.push_str(if s.db || long { "DS  " } else { "DS16" });
                out.push_str(&format!(
                    " [{}{}",
                    if s.type_ & 4 != 0 { 'E' } else { '-' },
                    if s.type_ & 2 != 0 { 'W' } else { '-' }
                ));
            }
            out.push_str(if s.type_ & 1 != 0 { "A]" } else { "-]" });
        } else {
            const SYS32: [&str; 16] = [
                "Reserved",
                "TSS16-avl",
                "LDT",
                "TSS16-busy",
                "CallGate16",
                "TaskGate",
                "IntGate16",
                "TrapGate16",
                "Reserved",
                "TSS32-avl",
                "Reserved",
                "TSS32-busy",
                "CallGate32",
                "Reserved",
                "IntGate32",
                "TrapGate32",
            ];
            const SYS64: [&str; 16] = [
                "<hiword>",
                "Reserved",
                "LDT",
                "Reserved",
                "Reserved",
                "Reserved",
                "Reserved",
                "Reserved",
                "Reserved",
                "TSS64-avl",
                "Reserved",
                "TSS64-busy",
                "CallGate64",
                "Reserved",
                "IntGate64",
                "TrapGate64",
            ];
            let t = usize::from(s.type_ & 0xf);
            out.push_str(if long { SYS64[t] } else { SYS32[t] });
        }
    }
    out + "\r\n"
}

/// `info registers` for one vCPU: QEMU's `x86_cpu_dump_state` lines for what the
/// accelerator reports (general, segment, descriptor-table and control registers, EFER).
/// Keel reads no debug, x87 or SSE registers, so those lines are left out, and `HLT` says 0.
pub fn registers(index: u32, r: &Regs, s: &SpecialRegs) -> String {
    let pe = s.cr0 & 1 != 0;
    let long = s.efer & (1 << 10) != 0; // EFER.LMA
    let cs64 = long && s.cs.l;
    let fl = r.rflags;
    let flag = |bit: u32, c: char| if fl & (1 << bit) != 0 { c } else { '-' };
    let flags: String = [
        flag(10, 'D'),
        flag(11, 'O'),
        flag(7, 'S'),
        flag(6, 'Z'),
        flag(4, 'A'),
        flag(2, 'P'),
        flag(0, 'C'),
    ]
    .iter()
    .collect();
    let cpl = if pe { s.cs.dpl & 3 } else { 0 };
    let tail = format!("[{flags}] CPL={cpl} II=0 A20=1 SMM=0 HLT=0");
    let mut out = format!("\r\nCPU#{index}\r\n");
    if cs64 {
        out.push_str(&format!(
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\r\n\
             RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\r\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\r\n\
             R12={:016x} R13={:016x} R14={:016x} R15={:016x}\r\n\
             RIP={:016x} RFL={:08x} {tail}\r\n",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.rsp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15,
            r.rip,
            fl as u32
        ));
    } else {
        out.push_str(&format!(
            "EAX={:08x} EBX={:08x} ECX={:08x} EDX={:08x}\r\n\
             ESI={:08x} EDI={:08x} EBP={:08x} ESP={:08x}\r\n\
             EIP={:08x} EFL={:08x} {tail}\r\n",
            r.rax as u32,
            r.rbx as u32,
            r.rcx as u32,
            r.rdx as u32,
            r.rsi as u32,
            r.rdi as u32,
            r.rbp as u32,
            r.rsp as u32,
            r.rip as u32,
            fl as u32
        ));
    }
    for (name, seg) in [
        ("ES", &s.es),
        ("CS", &s.cs),
        ("SS", &s.ss),
        ("DS", &s.ds),
        ("FS", &s.fs),
        ("GS", &s.gs),
        ("LDT", &s.ldt),
        ("TR", &s.tr),
    ] {
        out.push_str(&seg_line(name, seg, long, cs64, pe));
    }
    if long {
        out.push_str(&format!(
            "GDT=     {:016x} {:08x}\r\nIDT=     {:016x} {:08x}\r\n\
             CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x}\r\n",
            s.gdt.base,
            s.gdt.limit,
            s.idt.base,
            s.idt.limit,
            s.cr0 as u32,
            s.cr2,
            s.cr3,
            s.cr4 as u32
        ));
    } else {
        out.push_str(&format!(
            "GDT=     {:08x} {:08x}\r\nIDT=     {:08x} {:08x}\r\n\
             CR0={:08x} CR2={:08x} CR3={:08x} CR4={:08x}\r\n",
            s.gdt.base as u32,
            s.gdt.limit,
            s.idt.base as u32,
            s.idt.limit,
            s.cr0 as u32,
            s.cr2 as u32,
            s.cr3 as u32,
            s.cr4 as u32
        ));
    }
    out.push_str(&format!("EFER={:016x}\r\n", s.efer));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lines_are_qemus() {
        let h = help(None);
        assert!(h.contains("cont|c  -- resume emulation\r\n"), "{h}");
        assert!(h.contains("system_reset  -- reset the system\r\n"));
        assert!(
            help(Some("info"))
                .contains("info status  -- show the current VM status (running|paused)\r\n")
        );
        assert_eq!(help(Some("c")), "cont|c  -- resume emulation\r\n");
        assert_eq!(help(Some("nosuch")), "unknown command: 'nosuch'\r\n");
    }

    #[test]
    fn hostfwd_commands_take_an_optional_netdev() {
        assert_eq!(
            parse("hostfwd_add tcp::2222-:22"),
            Request::HostfwdAdd {
                netdev: None,
                rule: "tcp::2222-:22".into()
            }
        );
        assert_eq!(
            parse("hostfwd_remove n0 tcp::2222"),
            Request::HostfwdRemove {
                netdev: Some("n0".into()),
                rule: "tcp::2222".into()
            }
        );
        assert_eq!(parse("hostfwd_add"), Request::Unsupported);
        assert!(help(None).contains("hostfwd_add [netdev_id] [tcp|udp]:"));
    }

    #[test]
    fn registers_in_real_mode_match_qemus_reset_state() {
        // QEMU 7.2's dump of a vCPU at reset (measured, FPU lines left out).
        let seg = |sel: u16, base: u64, type_: u8| Segment {
            base,
            limit: 0xffff,
            selector: sel,
            type_,
            present: true,
            s: true,
            ..Default::default()
        };
        let s = SpecialRegs {
            cs: seg(0xf000, 0xffff_0000, 0xb),
            ds: seg(0, 0, 3),
            es: seg(0, 0, 3),
            fs: seg(0, 0, 3),
            gs: seg(0, 0, 3),
            ss: seg(0, 0, 3),
            ldt: Segment {
                limit: 0xffff,
                type_: 2,
                present: true,
                ..Default::default()
            },
            tr: Segment {
                limit: 0xffff,
                type_: 0xb,
                present: true,
                ..Default::default()
            },
            gdt: keel_accel::DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: keel_accel::DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: 0x6000_0010,
            ..Default::default()
        };
        let r = Regs {
            rdx: 0x60fb1,
            rip: 0xfff0,
            rflags: 2,
            ..Default::default()
        };
        let want = "\r\nCPU#0\r\nEAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1\r\n\
            ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000\r\n\
            EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n\
            ES =0000 00000000 0000ffff 00009300\r\nCS =f000 ffff0000 0000ffff 00009b00\r\n\
            SS =0000 00000000 0000ffff 00009300\r\nDS =0000 00000000 0000ffff 00009300\r\n\
            FS =0000 00000000 0000ffff 00009300\r\nGS =0000 00000000 0000ffff 00009300\r\n\
            LDT=0000 00000000 0000ffff 00008200\r\nTR =0000 00000000 0000ffff 00008b00\r\n\
            GDT=     00000000 0000ffff\r\nIDT=     00000000 0000ffff\r\n\
            CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000\r\n\
            EFER=0000000000000000\r\n";
        assert_eq!(registers(0, &r, &s), want);
    }

    #[test]
    fn registers_in_long_mode_use_the_64_bit_layout() {
        let cs = Segment {
            present: true,
            s: true,
            l: true,
            type_: 0xb,
            dpl: 0,
            ..Default::default()
        };
        let s = SpecialRegs {
            cs,
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        let r = Regs {
            rip: 0x1000,
            rflags: 0x246,
            ..Default::default()
        };
        let out = registers(1, &r, &s);
        assert!(
            out.contains("RIP=0000000000001000 RFL=00000246 [---Z-P-] CPL=0"),
            "{out}"
        );
        assert!(
            out.contains("CS =0000 0000000000000000 00000000 00209b00 DPL=0 CS64 [-RA]"),
            "{out}"
        );
        assert!(out.contains("R8 =0000000000000000"));
    }

    #[test]
    fn qtree_and_mtree_layouts() {
        let root = QtreeBus {
            name: "main-system-bus".into(),
            bus_type: "System".into(),
            devices: vec![QtreeDev {
                driver: "virtio-mmio".into(),
                mmio: vec![(0xfeb0_0000, 0x200)],
                buses: vec![QtreeBus {
                    name: "virtio-mmio-bus.0".into(),
                    bus_type: "virtio-mmio-bus".into(),
                    devices: vec![QtreeDev {
                        driver: "virtio-blk-device".into(),
                        id: "vd0".into(),
                        props: vec![("drive".into(), qtree_value(&serde_json::json!("d0")))],
                        ..Default::default()
                    }],
                }],
                ..Default::default()
            }],
        };
        assert_eq!(
            qtree(&root),
            "bus: main-system-bus\r\n  type System\r\n  dev: virtio-mmio, id \"\"\r\n    \
             mmio 00000000feb00000/0000000000000200\r\n    bus: virtio-mmio-bus.0\r\n      \
             type virtio-mmio-bus\r\n      dev: virtio-blk-device, id \"vd0\"\r\n        \
             drive = \"d0\"\r\n"
        );
        assert_eq!(qtree_value(&serde_json::json!(16)), "16 (0x10)");
        assert_eq!(
            mtree(&[(0x3f8, 8, "i/o", "serial".into())], &[]),
            "address-space: I/O\r\n  0000000000000000-000000000000ffff (prio 0, i/o): io\r\n    \
             00000000000003f8-00000000000003ff (prio 0, i/o): serial\r\n\r\naddress-space: \
             memory\r\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\r\n\r\n"
        );
    }
}
