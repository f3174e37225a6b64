//! Round trip of one request over a socketpair monitor: in-band without OOB (the
//! reader runs it), in-band with OOB enabled (handed to the worker thread), and
//! `exec-oob` (run on the reader). Shows what the worker hand-off costs.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use keel_qmp::{CommandError, Dispatcher, EventBus, run_out_of_band, serve_stream};
use serde_json::{Map, Value, json};

struct Pong;
impl Dispatcher for Pong {
    fn dispatch(&self, _: &str, _: Map<String, Value>) -> Result<Value, CommandError> {
        Ok(json!("pong"))
    }
    fn dispatch_oob(&self, c: &str, a: Map<String, Value>) -> Result<Value, CommandError> {
        run_out_of_band(|| self.dispatch(c, a))
    }
    fn version(&self) -> Value {
        json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "bench"})
    }
}

fn client(enable_oob: bool) -> (BufReader<UnixStream>, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    serve_stream(theirs, Arc::new(Pong), EventBus::new());
    let mut rd = BufReader::new(ours.try_clone().unwrap());
    let mut wr = ours;
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    let caps = if enable_oob {
        "{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}"
    } else {
        "{'execute': 'qmp_capabilities'}"
    };
    wr.write_all(caps.as_bytes()).unwrap();
    line.clear();
    rd.read_line(&mut line).unwrap();
    assert!(line.contains("return"), "{line}");
    (rd, wr)
}

fn round_trips(c: &mut Criterion) {
    let cases = [
        ("in-band, oob off", false, "{'execute': 'ping', 'id': 1}"),
        (
            "in-band, oob on (worker)",
            true,
            "{'execute': 'ping', 'id': 1}",
        ),
        ("exec-oob (reader)", true, "{'exec-oob': 'ping', 'id': 1}"),
    ];
    let mut g = c.benchmark_group("qmp-round-trip");
    for (name, oob, req) in cases {
        let (mut rd, mut wr) = client(oob);
        let mut line = String::new();
        g.bench_function(name, |b| {
            b.iter(|| {
                wr.write_all(req.as_bytes()).unwrap();
                line.clear();
                rd.read_line(&mut line).unwrap();
            })
        });
        assert!(line.contains("pong"), "{line}");
    }
    g.finish();
}

criterion_group!(benches, round_trips);
criterion_main!(benches);
