//! Embedding Keel: a `Vmm` with a device type, a QMP command and a machine type of its own,
//! none of them known to the `vmm` crate.
//!
//! ```text
//! cargo run --release --example embed -- [-accel kvm|tcg]
//! ```
//!
//! * **Device type** `keel-counter` (ISA, property `iobase`, default 0x510): a guest `in`
//!   reads a counter that goes up by one per read; a guest `out` is recorded as the last
//!   write. It is a [`DeviceFactory`]: the board validates its properties and maps it
//!   through a [`DeviceHost`], so `device_add`, `qom-list-types`, `device-list-properties`
//!   and `x-query-device-tree` treat it like a built-in device.
//! * **QMP command** `x-counter-get [id]`: the state of the counters. A handler runs on the
//!   VMM's own context (`VmmCore`), which knows nothing about this example, so the counters
//!   are kept in a process-wide registry ([`COUNTERS`]) that the factory fills at realize
//!   time and the command reads.
//! * **Machine type** `tiny-microvm`: the built-in microvm with other defaults (32 MiB,
//!   one vCPU) and an `isa-debug-exit` at 0xf4 on every board; made the default machine.
//!
//! The example then walks the phases through `Vmm::execute_json` (machine-set, accel-set,
//! machine-init, device_add of a `keel-counter`, machine-done) with a tiny guest (built
//! here as a PVH ELF) that prints a line, reads the counter three times, writes the last
//! value + 0x1000 back and ends through `isa-debug-exit`. Afterwards `x-counter-get` runs
//! both in process and through a real QMP socket served by the same `Vmm`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use keel_accel::{Accelerator, BusDevice};
use keel_machine::MicrovmType;
use keel_machine::board::{
    Board, BoardContext, BoardError, MachineConfig, MachineType, MachineTypeInfo,
};
use keel_machine::factory::{DeviceFactory, DeviceHost};
use keel_phase::{Phase, PhaseSet};
use keel_qdev::{BusType, DeviceRequest, DeviceType, DeviceView, HookError, PropSpec};
use keel_qmp::schema::{opt, req};
use keel_qmp::{Command, CommandError, Endpoint, Handler, Registry, Type};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use vmm::{Vmm, VmmCore};

// ------------------------------------------------------------------ the device

/// Driver name of the example's device.
const COUNTER: &str = "keel-counter";
/// Its default first port.
const COUNTER_IOBASE: u64 = 0x510;
/// Ports it decodes.
const COUNTER_PORTS: u64 = 4;

#[derive(Debug, Default)]
struct CounterRegs {
    reads: u64,
    writes: u64,
    last_write: Option<u32>,
}

/// One `keel-counter` instance as the bus sees it.
#[derive(Debug)]
struct Counter {
    path: String,
    id: Option<String>,
    iobase: u64,
    regs: Mutex<CounterRegs>,
}

impl BusDevice for Counter {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        let mut r = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        r.reads += 1;
        let v = r.reads.to_le_bytes();
        let n = data.len().min(v.len());
        data[..n].copy_from_slice(&v[..n]);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let mut r = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        r.writes += 1;
        r.last_write = Some(u32::from_le_bytes(v));
    }
}

/// Every realized counter by QOM path: the factory adds, `x-counter-get` reads.
static COUNTERS: LazyLock<Mutex<BTreeMap<String, Arc<Counter>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

/// The `keel-counter` device type.
#[derive(Debug)]
struct CounterType;

impl DeviceFactory for CounterType {
    fn qdev_type(&self) -> DeviceType {
        DeviceType::new(COUNTER, BusType::Isa)
            .description("example counter: reads count up by one, the last write is kept")
            .prop(
                PropSpec::uint32("iobase")
                    .default_u64(COUNTER_IOBASE)
                    .range(0, 0x1_0000 - i128::from(COUNTER_PORTS))
                    .description("first I/O port (4 ports)"),
            )
    }

    fn realize(&self, dev: &DeviceView<'_>, host: &mut DeviceHost<'_>) -> Result<(), HookError> {
        let iobase = dev.props.u64("iobase").ok_or("iobase missing")?;
        let counter = Arc::new(Counter {
            path: dev.path.to_owned(),
            id: dev.id.map(str::to_owned),
            iobase,
            regs: Mutex::new(CounterRegs::default()),
        });
        host.map_pio(iobase, COUNTER_PORTS, counter.clone())?;
        COUNTERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(counter.path.clone(), counter);
        Ok(())
    }
}

// ------------------------------------------------------------------ the command

/// `x-counter-get`: the state of every `keel-counter`, or of the one with `id`.
#[derive(Debug, Clone, Default, Deserialize)]
struct CounterGet {
    id: Option<String>,
}

/// One counter in `x-counter-get`'s answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
struct CounterInfo {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    iobase: u64,
    reads: u64,
    writes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_write: Option<u32>,
}

impl Command for CounterGet {
    const NAME: &'static str = "x-counter-get";
    const PHASES: PhaseSet = PhaseSet::ANY;
    type Output = Vec<CounterInfo>;
    fn arguments() -> Type {
        Type::object("q_obj_x-counter-get-arg", vec![opt("id", Type::str())])
    }
    fn returns() -> Option<Type> {
        Some(Type::array(Type::object(
            "x-CounterInfo",
            vec![
                req("path", Type::str()),
                opt("id", Type::str()),
                req("iobase", Type::int()),
                req("reads", Type::int()),
                req("writes", Type::int()),
                opt("last-write", Type::int()),
            ],
        )))
    }
}

impl Handler<VmmCore> for CounterGet {
    fn handle(
        self,
        _core: &mut VmmCore,
        _: &Registry<VmmCore>,
    ) -> Result<Vec<CounterInfo>, CommandError> {
        let all = COUNTERS.lock().unwrap_or_else(PoisonError::into_inner);
        let out: Vec<CounterInfo> = all
            .values()
            .filter(|c| self.id.is_none() || c.id == self.id)
            .map(|c| {
                let r = c.regs.lock().unwrap_or_else(PoisonError::into_inner);
                CounterInfo {
                    path: c.path.clone(),
                    id: c.id.clone(),
                    iobase: c.iobase,
                    reads: r.reads,
                    writes: r.writes,
                    last_write: r.last_write,
                }
            })
            .collect();
        match &self.id {
            Some(id) if out.is_empty() => Err(CommandError::generic(format!(
                "Device '{id}' not found (or not a {COUNTER})"
            ))),
            _ => Ok(out),
        }
    }
}

// ------------------------------------------------------------------ the machine type

/// `tiny-microvm`: microvm with 32 MiB and one vCPU unless told otherwise, and an
/// `isa-debug-exit` (iobase 0xf4, 4 ports) on every board.
#[derive(Debug)]
struct TinyMicrovm;

impl TinyMicrovm {
    const NAME: &'static str = "tiny-microvm";

    /// The configuration handed to microvm: this type's defaults for what is unset.
    fn with_defaults(cfg: &MachineConfig) -> MachineConfig {
        let mut c = cfg.clone();
        c.memory.get_or_insert(32 << 20);
        c.cpus.get_or_insert(1);
        c
    }
}

impl MachineType for TinyMicrovm {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn info(&self) -> MachineTypeInfo {
        MachineTypeInfo {
            name: Self::NAME.into(),
            description: "microvm, 32 MiB, 1 vCPU, isa-debug-exit at 0xf4 (example)".into(),
            ..MicrovmType.info()
        }
    }

    fn check_config(&self, cfg: &MachineConfig) -> Result<(), BoardError> {
        MicrovmType.check_config(&Self::with_defaults(cfg))
    }

    fn check_accel(&self, cfg: &MachineConfig, accel: &dyn Accelerator) -> Result<(), BoardError> {
        MicrovmType.check_accel(&Self::with_defaults(cfg), accel)
    }

    fn create(
        &self,
        cfg: &MachineConfig,
        accel: Arc<dyn Accelerator>,
        ctx: &BoardContext,
    ) -> Result<Box<dyn Board>, BoardError> {
        let mut board = MicrovmType.create(&Self::with_defaults(cfg), accel, ctx)?;
        let exit = DeviceRequest::new("isa-debug-exit")
            .id("debug-exit")
            .prop("iobase", "0xf4")
            .prop("iosize", "4");
        board
            .device_add(Phase::MachineInit, &exit)
            .map_err(BoardError::Qdev)?;
        Ok(board)
    }
}

// ------------------------------------------------------------------ the guest

/// A 32-bit PVH guest: prints a line on COM1, reads the counter at 0x510 three times,
/// writes the last value + 0x1000 back, then writes 0 to `isa-debug-exit` (status 1).
fn counter_guest() -> Vec<u8> {
    let load = keel_testguest::layout::LOAD;
    let msg = b"tiny guest: reading keel-counter at 0x510 three times\n\0";
    let msg_addr = u32::try_from(load + 40).unwrap_or(0);
    let mut code = vec![0xbe]; // 0: mov esi, msg
    code.extend_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(&[
        0xac, // 5: lodsb
        0x84, 0xc0, // 6: test al, al
        0x74, 0x07, // 8: jz 17
        0x66, 0xba, 0xf8, 0x03, // 10: mov dx, 0x3f8
        0xee, // 14: out dx, al
        0xeb, 0xf4, // 15: jmp 5
        0x66, 0xba, 0x10, 0x05, // 17: mov dx, 0x510
        0xed, 0xed, 0xed, // 21: in eax, dx (x3)
        0x05, 0x00, 0x10, 0x00, 0x00, // 24: add eax, 0x1000
        0xef, // 29: out dx, eax
        0x66, 0xba, 0xf4, 0x00, // 30: mov dx, 0xf4
        0x31, 0xc0, // 34: xor eax, eax
        0xee, // 36: out dx, al
        0xf4, // 37: hlt
        0xeb, 0xfd, // 38: jmp 37
    ]);
    debug_assert_eq!(code.len(), 40);
    code.extend_from_slice(msg);
    keel_testguest::TestGuest {
        name: "counter".into(),
        image: code,
        load_addr: load,
        entry: keel_testguest::EntryState::pvh(load, 0),
        expected_serial: None,
        expected_exit: 0,
        ends_in_triple_fault: false,
        results: None,
        instructions: None,
        uses_pic_pit: false,
    }
    .pvh_elf()
}

// ------------------------------------------------------------------ driving it

fn args(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Runs one command in process and prints it with its reply.
fn run(vmm: &Vmm, name: &str, a: Value) -> Result<Value, CommandError> {
    if a.as_object().is_some_and(Map::is_empty) {
        println!("> {name}");
    } else {
        println!("> {name} {a}");
    }
    let r = vmm.execute_json(name, args(a));
    match &r {
        Ok(v) => println!("  {v}"),
        Err(e) => println!("  error ({}): {e}", e.class().as_str()),
    }
    r
}

/// A minimal QMP client: negotiates, runs `command`, returns the reply line.
fn qmp_over_socket(path: &Path, command: &Value) -> std::io::Result<String> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    r.read_line(&mut line)?; // greeting
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
    let mut reply = String::new();
    for req in [None, Some(command)] {
        if let Some(c) = req {
            writeln!(w, "{c}")?;
        }
        loop {
            reply.clear();
            if r.read_line(&mut reply)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if !reply.contains("\"event\"") {
                break;
            }
        }
    }
    Ok(reply.trim_end().to_owned())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("embed: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<(), Box<dyn std::error::Error>> {
    let accel: Vec<String> = match std::env::args().nth(1).as_deref() {
        Some("-accel") => vec![std::env::args().nth(2).ok_or("-accel needs a value")?],
        Some(other) => return Err(format!("unknown option {other}").into()),
        None => vec!["kvm".into(), "tcg".into()],
    };
    let dir = std::env::temp_dir().join(format!("keel-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel: PathBuf = dir.join("counter.elf");
    std::fs::write(&kernel, counter_guest())?;
    let sock = dir.join("qmp.sock");

    let vmm = Vmm::builder()
        .machine(Arc::new(TinyMicrovm))
        .default_machine(TinyMicrovm::NAME)
        .device_type(Arc::new(CounterType))
        .command::<CounterGet>()
        .build();
    vmm.serve(&Endpoint::Unix {
        path: sock.clone(),
        server: true,
        wait: false,
    })?;
    println!("QMP on {}", sock.display());

    // The machine type: ours is the default, listed next to the built-in ones.
    run(&vmm, "query-machines", json!({}))?;
    // No type given: the default (tiny-microvm) is used.
    run(&vmm, "machine-set", json!({ "kernel": kernel }))?;
    run(&vmm, "query-phase", json!({}))?;
    run(&vmm, "accel-set", json!({ "accel": accel }))?;
    run(&vmm, "machine-init", json!({}))?;
    run(
        &vmm,
        "device_add",
        json!({ "driver": COUNTER, "id": "ctr0" }),
    )?;
    // A second one on the same ports is refused by the bus.
    let _ = run(
        &vmm,
        "device_add",
        json!({ "driver": COUNTER, "id": "ctr1", "iobase": COUNTER_IOBASE + 2 }),
    );

    let types = run(&vmm, "qom-list-types", json!({}))?;
    let ours: Vec<Value> = types
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["name"] == COUNTER)
        .cloned()
        .collect();
    let ours = Value::Array(ours);
    println!(
        "  (qom-list-types: {} types; ours: {ours})",
        types.as_array().map_or(0, Vec::len)
    );
    run(
        &vmm,
        "device-list-properties",
        json!({ "typename": COUNTER }),
    )?;
    let tree = vmm.execute_json("x-query-device-tree", Map::new())?;
    for bus in tree.as_array().into_iter().flatten() {
        for dev in bus["devices"].as_array().into_iter().flatten() {
            if dev["type"] == COUNTER || dev["type"] == "isa-debug-exit" {
                println!("> x-query-device-tree (bus {}): {dev}", bus["name"]);
            }
        }
    }
    run(&vmm, "x-counter-get", json!({}))?;

    // machine-done starts the guest; it ends by writing isa-debug-exit.
    run(&vmm, "machine-done", json!({}))?;
    let cause = vmm.wait_for_shutdown();
    println!(
        "guest ended: cause {}, exit status {}",
        cause.as_str(),
        vmm.exit_status()
    );

    let after = run(&vmm, "x-counter-get", json!({ "id": "ctr0" }))?;
    // The guest read 1, 2, 3 and wrote 3 + 0x1000 back.
    if after[0]["reads"] != 3 || after[0]["last-write"] != 0x1003 {
        return Err(format!("the guest did not drive keel-counter as expected: {after}").into());
    }
    let _ = run(&vmm, "x-counter-get", json!({ "id": "nope" }));
    let reply = qmp_over_socket(
        &sock,
        &json!({ "execute": "x-counter-get", "arguments": { "id": "ctr0" }, "id": 1 }),
    )?;
    println!("QMP socket: x-counter-get -> {reply}");
    let schema = qmp_over_socket(&sock, &json!({ "execute": "query-commands" }))?;
    println!(
        "QMP socket: query-commands lists x-counter-get: {}",
        schema.contains("\"x-counter-get\"")
    );

    vmm.close_monitors(std::time::Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
