//! The server's budgets through its public API over real sockets: an oversized message, a
//! malformed-input flood, a client that stops reading, lost events, and a fair share for
//! a well-behaved client meanwhile. Assertions are about bytes and disconnections, never
//! about timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use keel_qmp::server::{CLIENT_OUTPUT_BUDGET, ERROR_REPLY_ALLOWANCE, ERROR_REPLY_FACTOR};
use keel_qmp::{CommandError, Dispatcher, EventBus, serve_stream};
use serde_json::{Map, Value, json};

struct Echo;
impl Dispatcher for Echo {
    fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        match command {
            "echo" => Ok(Value::Object(args)),
            // A large reply, to fill a non-reading client's output quickly.
            "big" => Ok(Value::String("x".repeat(64 << 10))),
            _ => Err(CommandError::CommandNotFound(command.to_owned())),
        }
    }
    fn version(&self) -> Value {
        json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "budget-test"})
    }
}

fn connect(bus: &Arc<EventBus>) -> (BufReader<UnixStream>, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    serve_stream(theirs, Arc::new(Echo), bus.clone());
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    ours.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rd = BufReader::new(ours.try_clone().unwrap());
    let mut greeting = String::new();
    rd.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("{\"QMP\""), "{greeting}");
    (rd, ours)
}

fn recv(rd: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn negotiate(rd: &mut BufReader<UnixStream>, wr: &mut UnixStream) {
    wr.write_all(b"{'execute': 'qmp_capabilities'}").unwrap();
    assert_eq!(recv(rd), json!({"return": {}}));
}

/// Reads everything until the server closes; returns the byte count.
fn drain_to_eof(rd: &mut BufReader<UnixStream>) -> usize {
    let mut total = 0;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match rd.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return total,
            Err(e) => panic!("the server did not disconnect: {e}"),
        }
    }
}

/// Writes `chunk` up to `times` times; stops quietly once the server has gone.
fn write_until_gone(wr: &mut UnixStream, chunk: &[u8], times: usize) -> usize {
    let mut sent = 0;
    for _ in 0..times {
        match wr.write_all(chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                return sent;
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    sent
}

#[test]
fn oversized_message_gets_one_error_and_a_disconnect() {
    let bus = EventBus::new();
    let (mut rd, mut wr) = connect(&bus);
    negotiate(&mut rd, &mut wr);
    wr.write_all(b"{'execute': 'echo', 'arguments': {'s': '")
        .unwrap();
    // 100 MiB of string: the server must not keep it, and must hang up long before.
    let sent = write_until_gone(&mut wr, &[b'a'; 64 << 10], 1600);
    assert!(sent < 100 << 20, "the server read all {sent} bytes");
    let r = recv(&mut rd);
    assert_eq!(r["error"]["desc"], "JSON token size limit exceeded");
    assert_eq!(drain_to_eof(&mut rd), 0);
}

#[test]
fn nesting_too_deep_is_an_error_not_a_disconnect() {
    let bus = EventBus::new();
    let (mut rd, mut wr) = connect(&bus);
    negotiate(&mut rd, &mut wr);
    wr.write_all(&[b'['; 1025]).unwrap();
    assert_eq!(
        recv(&mut rd)["error"]["desc"],
        "JSON nesting depth limit exceeded"
    );
    wr.write_all(b"{'execute': 'echo', 'arguments': {'a': 1}}")
        .unwrap();
    assert_eq!(recv(&mut rd), json!({"return": {"a": 1}}));
}

#[test]
fn malformed_flood_output_is_bounded() {
    let bus = EventBus::new();
    let (mut rd, mut wr) = connect(&bus);
    negotiate(&mut rd, &mut wr);
    // 4 MiB of ']': each one alone is a message and an error (QEMU answers every one,
    // about 75 bytes per input byte).
    let reader = std::thread::spawn(move || drain_to_eof(&mut rd));
    let sent = write_until_gone(&mut wr, &[b']'; 64 << 10], 64);
    let got = reader.join().unwrap();
    assert!(
        got <= ERROR_REPLY_ALLOWANCE + ERROR_REPLY_FACTOR * sent + 4096,
        "{got} bytes of errors for {sent} bytes of input"
    );
    assert!(got < 1 << 20, "{got} bytes of errors");
}

#[test]
fn long_stray_token_is_echoed_in_part() {
    let bus = EventBus::new();
    let (mut rd, mut wr) = connect(&bus);
    negotiate(&mut rd, &mut wr);
    let mut bad = b"'".to_vec();
    bad.extend(std::iter::repeat_n(b'a', 100_000));
    bad.push(0x01);
    wr.write_all(&bad).unwrap();
    let r = recv(&mut rd);
    let desc = r["error"]["desc"].as_str().unwrap();
    assert!(desc.starts_with("JSON parse error, stray ''aaa"), "{desc}");
    assert!(desc.len() < 200, "{} bytes echoed", desc.len());
    wr.write_all(b"{'execute': 'echo'}").unwrap();
    assert_eq!(recv(&mut rd), json!({"return": {}}));
}

#[test]
fn client_that_stops_reading_is_disconnected_and_others_keep_working() {
    let bus = EventBus::new();
    let (mut rd, mut wr) = connect(&bus);
    negotiate(&mut rd, &mut wr);
    let (mut good_rd, mut good_wr) = connect(&bus);
    negotiate(&mut good_rd, &mut good_wr);
    // Pipelined requests with 64 KiB replies, none read: the server hangs up once the
    // output budget is reached, which the writer sees as a broken pipe.
    let writer = std::thread::spawn(move || {
        let times = 100_000;
        let sent = write_until_gone(&mut wr, b"{'execute': 'big'}", times);
        assert!(sent < times * 18, "never disconnected");
        wr
    });
    for i in 0..50 {
        good_wr
            .write_all(format!("{{'execute': 'echo', 'arguments': {{'i': {i}}}}}").as_bytes())
            .unwrap();
        assert_eq!(recv(&mut good_rd), json!({"return": {"i": i}}));
    }
    let _wr = writer.join().unwrap();
    // What the non-reader finds when it finally reads: at most its budget plus what the
    // kernel buffered, then the end.
    let got = drain_to_eof(&mut rd);
    assert!(
        got < CLIENT_OUTPUT_BUDGET + (4 << 20),
        "{got} bytes queued for a client that does not read"
    );
    good_wr.write_all(b"{'execute': 'echo'}").unwrap();
    assert_eq!(recv(&mut good_rd), json!({"return": {}}));
}

#[test]
fn lost_events_end_the_connection_and_readers_get_all() {
    let bus = EventBus::new();
    let (mut slow_rd, mut slow_wr) = connect(&bus);
    negotiate(&mut slow_rd, &mut slow_wr);
    let (mut rd, mut wr) = connect(&bus);
    negotiate(&mut rd, &mut wr);
    let n = 100_000;
    let reader = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < 2000 {
            let v = recv(&mut rd);
            assert_eq!(v["event"], "TICK");
            seen += 1;
        }
        seen
    });
    for i in 0..n {
        bus.emit("TICK", Some(json!({"i": i})));
        if i == 2000 {
            // The reading client has its first 2000 before the flood goes on.
            while !reader.is_finished() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert_eq!(reader.join().unwrap(), 2000);
    // The client that never read was disconnected (its output or event queue went over
    // budget), not silently served a subset: the stream ends after what it was sent.
    let mut events = 0;
    let mut line = String::new();
    loop {
        line.clear();
        match slow_rd.read_line(&mut line) {
            Ok(0) => break,
            // The last line may be cut where the server stopped writing.
            Ok(_) => events += usize::from(line.ends_with("\r\n")),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the non-reading client was not disconnected: {e}"),
        }
    }
    assert!(events < n, "{events} events");
}
