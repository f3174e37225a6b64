//! A whole QMP session (negotiation, request checks, replies) on arbitrary client bytes.
//!
//! Checks: no panic; every output line is CRLF-terminated ASCII JSON.
#![no_main]

use keel_qmp::{CommandError, Dispatcher, Session};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

struct Echo;

impl Dispatcher for Echo {
    fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        match command {
            "echo" => Ok(Value::Object(args)),
            _ => Err(CommandError::CommandNotFound(command.to_owned())),
        }
    }
    fn version(&self) -> Value {
        json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fuzz"})
    }
}

fuzz_target!(|data: &[u8]| {
    let mut s = Session::new(None);
    let mut out = Vec::new();
    for chunk in data.chunks(7) {
        s.input(chunk, &Echo, &mut out);
    }
    s.finish(&Echo, &mut out);
    let text = std::str::from_utf8(&out).expect("output is ASCII");
    for line in text.split_terminator("\r\n") {
        assert!(line.is_ascii());
        let v: Value = serde_json::from_str(line).expect("output is JSON");
        assert!(v.get("return").is_some() || v.get("error").is_some());
    }
});
