//! Out-of-band execution over a socketpair, against QEMU's qmp-test `oob` cases (O1-O6):
//! an in-band command that blocks on a channel, in-band requests queued behind it, and
//! `exec-oob` requests whose replies overtake them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_phase::{Phase, PhaseSet};
use keel_qmp::{
    Command, CommandError, Dispatcher, EventBus, Handler, PhaseSource, Registry, Type, serve_stream,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Per-request context: the gate that `block` waits on.
struct Ctx {
    gate: Arc<Mutex<Receiver<()>>>,
    started: Sender<()>,
}

impl PhaseSource for Ctx {
    fn phase(&self) -> Phase {
        Phase::MachineReady
    }
}

/// In-band; returns once the test sends on the gate.
#[derive(Deserialize)]
struct Block {}
impl Command for Block {
    const NAME: &'static str = "block";
    const PHASES: PhaseSet = PhaseSet::ANY;
    type Output = ();
}
impl Handler<Ctx> for Block {
    fn handle(self, ctx: &mut Ctx, _: &Registry<Ctx>) -> Result<(), CommandError> {
        let _ = ctx.started.send(());
        let gate = ctx.gate.lock().unwrap();
        gate.recv()
            .map_err(|_| CommandError::generic("gate closed"))
    }
}

/// In-band, returns at once.
#[derive(Deserialize)]
struct Quick {}
impl Command for Quick {
    const NAME: &'static str = "quick";
    const PHASES: PhaseSet = PhaseSet::ANY;
    type Output = &'static str;
    fn returns() -> Option<Type> {
        Some(Type::str())
    }
}
impl Handler<Ctx> for Quick {
    fn handle(self, _: &mut Ctx, _: &Registry<Ctx>) -> Result<&'static str, CommandError> {
        Ok("quick")
    }
}

/// OOB-capable.
#[derive(Deserialize)]
struct Ping {}
impl Command for Ping {
    const NAME: &'static str = "ping";
    const PHASES: PhaseSet = PhaseSet::ANY;
    const ALLOW_OOB: bool = true;
    type Output = &'static str;
    fn returns() -> Option<Type> {
        Some(Type::str())
    }
}
impl Handler<Ctx> for Ping {
    fn handle(self, _: &mut Ctx, _: &Registry<Ctx>) -> Result<&'static str, CommandError> {
        Ok("pong")
    }
}

struct TestVmm {
    registry: Registry<Ctx>,
    gate: Arc<Mutex<Receiver<()>>>,
    started: Mutex<Sender<()>>,
}

impl Dispatcher for TestVmm {
    fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        let mut ctx = Ctx {
            gate: self.gate.clone(),
            started: self.started.lock().unwrap().clone(),
        };
        self.registry.dispatch(&mut ctx, command, args)
    }
    fn version(&self) -> Value {
        json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "oob-test"})
    }
}

struct Client {
    bus: Arc<EventBus>,
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    unblock: Sender<()>,
    started: Receiver<()>,
}

impl Client {
    fn connect() -> (Client, Value) {
        let (gate_tx, gate_rx) = channel();
        let (started_tx, started_rx) = channel();
        let mut registry = Registry::new();
        registry.register::<Block>();
        registry.register::<Quick>();
        registry.register::<Ping>();
        let vmm = Arc::new(TestVmm {
            registry,
            gate: Arc::new(Mutex::new(gate_rx)),
            started: Mutex::new(started_tx),
        });
        let (ours, theirs) = UnixStream::pair().unwrap();
        let bus = EventBus::new();
        serve_stream(theirs, vmm, bus.clone());
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut c = Client {
            bus,
            rd: BufReader::new(ours.try_clone().unwrap()),
            wr: ours,
            unblock: gate_tx,
            started: started_rx,
        };
        let greeting = c.recv();
        (c, greeting)
    }

    fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.rd.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(&line).unwrap()
    }

    /// Asserts that no line arrives for a while (a missing reply can only be shown by
    /// waiting; a slow machine can make this pass wrongly, never fail wrongly).
    fn expect_silence(&mut self) {
        self.wr
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut line = String::new();
        let r = self.rd.read_line(&mut line);
        assert!(
            matches!(&r, Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "unexpected {r:?} {line:?}"
        );
        self.wr
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
    }

    fn negotiate_oob(&mut self) {
        self.send("{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}");
        assert_eq!(self.recv(), json!({"return": {}}));
    }
}

#[test]
fn greeting_and_capability_negotiation() {
    let (mut c, g) = Client::connect();
    // O1
    assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
    // O2: an unknown capability fails in the argument visitor, as in QEMU.
    c.send("{'execute': 'qmp_capabilities', 'arguments': {'enable': ['cap-does-not-exist']}}");
    let r = c.recv();
    assert_eq!(r["error"]["class"], "GenericError");
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'null' does not accept value 'cap-does-not-exist'"
    );
    // exec-oob is not accepted before OOB is enabled.
    c.send("{'exec-oob': 'qmp_capabilities', 'id': 1}");
    let r = c.recv();
    assert_eq!(
        r["error"]["desc"],
        "QMP input member 'exec-oob' is unexpected"
    );
    assert_eq!(r["id"], 1);
    // O3
    c.negotiate_oob();
    // O4: only commands declared ALLOW_OOB run out of band; lookup comes first.
    c.send("{'exec-oob': 'quick', 'id': 'o4'}");
    assert_eq!(
        c.recv(),
        json!({"error": {"class": "GenericError", "desc": "The command quick does not support OOB"}, "id": "o4"})
    );
    c.send("{'exec-oob': 'nope'}");
    assert_eq!(c.recv()["error"]["class"], "CommandNotFound");
    c.send("{'exec-oob': 'ping', 'id': 2}{'execute': 'ping', 'id': 3}");
    assert_eq!(c.recv(), json!({"return": "pong", "id": 2}));
    assert_eq!(c.recv(), json!({"return": "pong", "id": 3}));
    // QEMU's request checks with both keys.
    c.send("{'execute': 'quick', 'exec-oob': 'ping'}");
    let desc = c.recv()["error"]["desc"].clone();
    assert!(
        desc == "QMP input member 'exec-oob' clashes with 'execute'"
            || desc == "QMP input member 'execute' clashes with 'exec-oob'",
        "{desc}"
    );
    c.send("{'exec-oob': 5}");
    assert_eq!(
        c.recv()["error"]["desc"],
        "QMP input member 'exec-oob' must be a string"
    );
}

#[test]
fn oob_reply_overtakes_blocked_in_band_commands() {
    let (mut c, _) = Client::connect();
    c.negotiate_oob();
    // O5: a blocked in-band command, a quick one queued behind it, then exec-oob.
    c.send("{'execute': 'block', 'id': 'ib-blocks-1'}");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    c.send("{'execute': 'quick', 'id': 'ib-quick-1'}");
    c.send("{'exec-oob': 'ping', 'id': 'oob-1'}");
    assert_eq!(c.recv(), json!({"return": "pong", "id": "oob-1"}));
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv(), json!({"return": {}, "id": "ib-blocks-1"}));
    assert_eq!(c.recv(), json!({"return": "quick", "id": "ib-quick-1"}));

    // O6: a malformed request is answered in-band, in order, with its id; an exec-oob
    // sent after it still overtakes both.
    c.send("{'execute': 'block', 'id': 'blocks-2'}{ 'id': 'err-2' }");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    c.send("{'exec-oob': 'ping', 'id': 'oob-2'}");
    assert_eq!(c.recv()["id"], "oob-2");
    c.expect_silence();
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv(), json!({"return": {}, "id": "blocks-2"}));
    assert_eq!(
        c.recv(),
        json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": "err-2"})
    );
    // A JSON parse error is in-band too (and never carries an id).
    c.send("{'execute': 'block'}{]\n");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    c.send("{'exec-oob': 'ping', 'id': 'oob-3'}");
    assert_eq!(c.recv()["id"], "oob-3");
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv(), json!({"return": {}}));
    let r = c.recv();
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(r.get("id").is_none());
}

#[test]
fn full_queue_pauses_reading() {
    let (mut c, _) = Client::connect();
    c.negotiate_oob();
    c.send("{'execute': 'block', 'id': 'b'}");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    // Eight queued plus one the reader holds: nothing more is read, so the exec-oob
    // behind them waits.
    let n = keel_qmp::REQ_QUEUE_LEN_MAX + 1;
    for i in 0..n {
        c.send(&format!("{{'execute': 'quick', 'id': {i}}}"));
    }
    c.send("{'exec-oob': 'ping', 'id': 'late'}");
    c.expect_silence();
    c.unblock.send(()).unwrap();
    let mut ids = Vec::new();
    for _ in 0..n + 2 {
        ids.push(c.recv()["id"].clone());
    }
    assert_eq!(ids[0], "b");
    let in_band: Vec<Value> = ids.iter().filter(|v| v.is_number()).cloned().collect();
    let expected: Vec<Value> = (0..n).map(|i| json!(i)).collect();
    assert_eq!(in_band, expected, "in-band replies keep their order");
    assert!(ids.contains(&json!("late")));
}

#[test]
fn without_oob_everything_is_in_order() {
    let (mut c, _) = Client::connect();
    c.send("{'execute': 'qmp_capabilities'}");
    assert_eq!(c.recv(), json!({"return": {}}));
    c.send("{'execute': 'block', 'id': 1}");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    c.send("{'exec-oob': 'ping', 'id': 2}{'execute': 'quick', 'id': 3}");
    c.expect_silence();
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv()["id"], 1);
    let r = c.recv();
    assert_eq!(r["id"], 2);
    assert_eq!(
        r["error"]["desc"],
        "QMP input member 'exec-oob' is unexpected"
    );
    assert_eq!(c.recv()["id"], 3);
}

#[test]
fn capabilities_and_oob_in_one_write() {
    // Requests after the enabling qmp_capabilities in the same chunk already use OOB.
    let (mut c, _) = Client::connect();
    c.send(
        "{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}\
         {'execute': 'block', 'id': 'b'}{'exec-oob': 'ping', 'id': 'o'}",
    );
    assert_eq!(c.recv(), json!({"return": {}}));
    assert_eq!(c.recv()["id"], "o");
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv()["id"], "b");
}

#[test]
fn events_flow_while_an_in_band_command_blocks() {
    let (mut c, _) = Client::connect();
    c.negotiate_oob();
    c.send("{'execute': 'block', 'id': 'b'}");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    c.bus.emit("TEST_EVENT", Some(json!({"n": 1})));
    let e = c.recv();
    assert_eq!(e["event"], "TEST_EVENT");
    assert_eq!(e["data"], json!({"n": 1}));
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv()["id"], "b");
}

#[test]
fn queued_requests_are_answered_after_end_of_input() {
    let (mut c, _) = Client::connect();
    c.negotiate_oob();
    c.send("{'execute': 'block', 'id': 'b'}{'execute': 'quick', 'id': 'q'}");
    c.started.recv_timeout(Duration::from_secs(20)).unwrap();
    c.wr.shutdown(std::net::Shutdown::Write).unwrap();
    c.unblock.send(()).unwrap();
    assert_eq!(c.recv()["id"], "b");
    assert_eq!(c.recv()["id"], "q");
    let mut rest = String::new();
    assert_eq!(c.rd.read_line(&mut rest).unwrap(), 0, "{rest:?}");
}

#[test]
fn closing_the_bus_ends_an_oob_connection() {
    let (mut c, _) = Client::connect();
    c.negotiate_oob();
    c.send("{'exec-oob': 'ping', 'id': 1}");
    assert_eq!(c.recv()["id"], 1);
    assert!(c.bus.close_all(Duration::from_secs(20)));
    let mut rest = String::new();
    assert_eq!(c.rd.read_line(&mut rest).unwrap(), 0, "{rest:?}");
}
