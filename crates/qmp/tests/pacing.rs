//! The monitor's CPU budget over real sockets: while the guest runs, a flood is paced
//! and every client keeps being served (round robin); while it does not run, the same
//! flood never waits. Assertions count waits and replies, never time.
//!
//! One test per file: the share comes from the process environment, read when the
//! executor starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_qmp::pace::paced_waits;
use keel_qmp::{CommandError, Dispatcher, EventBus, serve_stream};
use serde_json::{Map, Value, json};

/// A VMM whose guest runs or not as the test says.
struct Guest(Arc<AtomicBool>);
impl Dispatcher for Guest {
    fn dispatch(&self, command: &str, _args: Map<String, Value>) -> Result<Value, CommandError> {
        match command {
            "query-status" => Ok(json!({"running": self.0.load(Ordering::SeqCst)})),
            _ => Err(CommandError::CommandNotFound(command.to_owned())),
        }
    }
    fn version(&self) -> Value {
        json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "pacing-test"})
    }
    fn guest_running(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

struct Client {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
}

impl Client {
    fn new(bus: &Arc<EventBus>, running: &Arc<AtomicBool>) -> Client {
        let (ours, theirs) = UnixStream::pair().unwrap();
        serve_stream(theirs, Arc::new(Guest(running.clone())), bus.clone());
        ours.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut c = Client {
            rd: BufReader::new(ours.try_clone().unwrap()),
            wr: ours,
        };
        let greeting = c.line();
        assert!(greeting.starts_with("{\"QMP\""), "{greeting}");
        c.wr.write_all(b"{'execute': 'qmp_capabilities'}").unwrap();
        assert_eq!(c.line(), "{\"return\": {}}");
        c
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        self.rd.read_line(&mut s).unwrap();
        s.trim_end().to_owned()
    }

    /// One `query-status` round trip; returns `running` from the reply.
    fn status(&mut self) -> bool {
        self.wr.write_all(b"{'execute': 'query-status'}").unwrap();
        let reply: Value = serde_json::from_str(&self.line()).unwrap();
        reply["return"]["running"].as_bool().unwrap()
    }
}

#[test]
fn a_flood_is_paced_only_while_the_guest_runs_and_every_client_is_served() {
    // SAFETY: this test is the only one in its process and no other thread runs yet.
    unsafe { std::env::set_var("KEEL_QMP_CPU_SHARE", "1") };
    let running = Arc::new(AtomicBool::new(false));
    let bus = EventBus::new();
    let clients: Vec<Client> = (0..4).map(|_| Client::new(&bus, &running)).collect();

    // Not running (prelaunch or paused): however much the clients ask, nothing waits.
    let before = paced_waits();
    let flood = |clients: Vec<Client>, n: usize| {
        let threads: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let answers: Vec<bool> = (0..n).map(|_| c.status()).collect();
                    (c, answers)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    };
    let served = flood(clients, 3000);
    assert_eq!(paced_waits(), before, "a paused guest's monitor waited");
    assert!(
        served
            .iter()
            .all(|(_, a)| a.len() == 3000 && a.iter().all(|r| !r))
    );

    // Running, with 1% of a CPU: the same flood soon exhausts the budget and the
    // executor waits; each client still gets every reply (round robin, none starves).
    running.store(true, Ordering::SeqCst);
    let mut clients: Vec<Client> = served.into_iter().map(|(c, _)| c).collect();
    let mut rounds = 0;
    while paced_waits() == before {
        rounds += 1;
        assert!(rounds < 200_000, "the monitor was never paced");
        for c in &mut clients {
            assert!(c.status());
        }
    }
    let served = flood(clients, 50);
    assert!(
        served
            .iter()
            .all(|(_, a)| a.len() == 50 && a.iter().all(|r| *r))
    );

    // Paused again: the debt is forgiven and nothing waits any more.
    running.store(false, Ordering::SeqCst);
    let mut clients: Vec<Client> = served.into_iter().map(|(c, _)| c).collect();
    for c in &mut clients {
        assert!(!c.status());
    }
    let after = paced_waits();
    let served = flood(clients, 3000);
    assert_eq!(paced_waits(), after, "a paused guest's monitor waited");
    assert_eq!(served.len(), 4);
}
