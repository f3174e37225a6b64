//! One client's protocol state: greeting, capabilities negotiation, request checks and
//! replies. Pure bytes in, bytes out; the transports in [`crate::server`] move the bytes.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::events::Outbox;
use crate::json::{Limits, StreamParser, write_str, write_value};
use crate::registry::capabilities_arguments;
use crate::{CommandError, ErrorClass};

/// What the server needs from the VMM: run a command, tell the version.
pub trait Dispatcher: Send + Sync + 'static {
    /// Runs one command (command mode only). Phase checks and argument validation are
    /// the dispatcher's (normally [`crate::Registry::dispatch`]).
    fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError>;
    /// The `version` member of the greeting: `query-version`'s result.
    fn version(&self) -> Value;
    /// Called before each request is handled, negotiation included; may block (a VMM
    /// still running its command line holds requests here).
    fn before_request(&self) {}
    /// Called once the reply to `command` has been written to the client (e.g. `quit`
    /// may now end the process).
    fn after_reply(&self, _command: &str) {}
}

/// Protocol state of one connection.
#[derive(Debug)]
pub struct Session {
    parser: StreamParser,
    negotiated: bool,
    outbox: Option<Arc<Outbox>>,
    /// Commands answered by the last [`Session::input`], for [`Dispatcher::after_reply`].
    answered: Vec<String>,
}

impl Session {
    /// A session in capabilities-negotiation mode. Events are queued in `outbox` (if any)
    /// once negotiation completes.
    pub fn new(outbox: Option<Arc<Outbox>>) -> Session {
        Session {
            parser: StreamParser::new(Limits::default()),
            negotiated: false,
            outbox,
            answered: Vec::new(),
        }
    }

    /// Whether `qmp_capabilities` succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The greeting line (CRLF-terminated). No capability is offered: Keel has no
    /// out-of-band execution yet, so it does not claim `oob`.
    pub fn greeting(dispatcher: &dyn Dispatcher) -> Vec<u8> {
        let mut s = String::from("{\"QMP\": {\"version\": ");
        write_value(&mut s, &dispatcher.version());
        s.push_str(", \"capabilities\": []}}\r\n");
        s.into_bytes()
    }

    /// Consumes client bytes and appends every reply (and events queued meanwhile, each
    /// before the reply of the command that caused it) to `out`.
    pub fn input(&mut self, bytes: &[u8], dispatcher: &dyn Dispatcher, out: &mut Vec<u8>) {
        let mut msgs = Vec::new();
        self.parser.feed(bytes, &mut |m| msgs.push(m));
        for m in msgs {
            let reply = match m {
                Err(e) => reply_error(&CommandError::generic(e.0), None),
                Ok(v) => self.request(v, dispatcher),
            };
            if let Some(o) = &self.outbox {
                o.drain_into(out);
            }
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Ends the input (end of file): a trailing number or keyword is completed.
    pub fn finish(&mut self, dispatcher: &dyn Dispatcher, out: &mut Vec<u8>) {
        let mut msgs = Vec::new();
        self.parser.flush(&mut |m| msgs.push(m));
        for m in msgs {
            let reply = match m {
                Err(e) => reply_error(&CommandError::generic(e.0), None),
                Ok(v) => self.request(v, dispatcher),
            };
            if let Some(o) = &self.outbox {
                o.drain_into(out);
            }
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Names of the commands answered since the last call, for
    /// [`Dispatcher::after_reply`] once their replies are written.
    pub fn take_answered(&mut self) -> Vec<String> {
        std::mem::take(&mut self.answered)
    }

    fn request(&mut self, v: Value, dispatcher: &dyn Dispatcher) -> String {
        dispatcher.before_request();
        let Value::Object(mut obj) = v else {
            return reply_error(
                &CommandError::generic("QMP input must be a JSON object"),
                None,
            );
        };
        let id = obj.remove("id");
        let (name, args) = match check_request(obj) {
            Ok(x) => x,
            Err(e) => return reply_error(&e, id.as_ref()),
        };
        let result = if self.negotiated {
            dispatcher.dispatch(&name, args)
        } else {
            self.negotiate(&name, args)
        };
        self.answered.push(name);
        match result {
            Ok(v) => reply_return(&v, id.as_ref()),
            Err(e) => reply_error(&e, id.as_ref()),
        }
    }

    fn negotiate(&mut self, name: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        if name != "qmp_capabilities" {
            return Err(CommandError::with_class(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        capabilities_arguments().validate_members(&args, "")?;
        if let Some(Value::Array(caps)) = args.get("enable")
            && let Some(c) = caps.first().and_then(Value::as_str)
        {
            // Every known capability is currently not offered.
            return Err(CommandError::generic(format!(
                "Capability {c} not available"
            )));
        }
        self.negotiated = true;
        if let Some(o) = &self.outbox {
            o.set_negotiated();
        }
        Ok(Value::Object(Map::new()))
    }
}

/// QEMU's `qmp_dispatch_check_obj`: returns the command name and its arguments.
fn check_request(obj: Map<String, Value>) -> Result<(String, Map<String, Value>), CommandError> {
    let mut name = None;
    let mut args = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "execute" => match v {
                Value::String(s) => name = Some(s),
                _ => {
                    return Err(CommandError::generic(
                        "QMP input member 'execute' must be a string",
                    ));
                }
            },
            "arguments" => match v {
                Value::Object(m) => args = m,
                _ => {
                    return Err(CommandError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            },
            other => {
                return Err(CommandError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )));
            }
        }
    }
    let name = name.ok_or_else(|| CommandError::generic("QMP input lacks member 'execute'"))?;
    Ok((name, args))
}

fn reply_return(v: &Value, id: Option<&Value>) -> String {
    let mut s = String::from("{\"return\": ");
    write_value(&mut s, v);
    finish_reply(s, id)
}

/// The wire form of an error reply (without line ending).
pub fn reply_error(e: &CommandError, id: Option<&Value>) -> String {
    let mut s = String::from("{\"error\": {\"class\": \"");
    s.push_str(e.class().as_str());
    s.push_str("\", \"desc\": ");
    write_str(&mut s, &e.to_string());
    s.push('}');
    finish_reply(s, id)
}

fn finish_reply(mut s: String, id: Option<&Value>) -> String {
    if let Some(id) = id {
        s.push_str(", \"id\": ");
        write_value(&mut s, id);
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Echo;
    impl Dispatcher for Echo {
        fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
            match command {
                "echo" => Ok(Value::Object(args)),
                _ => Err(CommandError::CommandNotFound(command.to_owned())),
            }
        }
        fn version(&self) -> Value {
            json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"})
        }
    }

    fn talk(s: &mut Session, input: &[u8]) -> Vec<Value> {
        let mut out = Vec::new();
        s.input(input, &Echo, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\r\n"));
        text.split_terminator("\r\n")
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn negotiation_then_commands() {
        let mut s = Session::new(None);
        let g: Value = serde_json::from_slice(&Session::greeting(&Echo)).unwrap();
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        let r = talk(&mut s, b"{'execute': 'echo'}");
        assert_eq!(r[0]["error"]["class"], "CommandNotFound");
        assert_eq!(
            r[0]["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let r = talk(
            &mut s,
            b"{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}",
        );
        assert_eq!(r[0]["error"]["desc"], "Capability oob not available");
        let r = talk(
            &mut s,
            b"{'execute': 'qmp_capabilities', 'id': [1, {'a': null}]}",
        );
        assert_eq!(r[0], json!({"return": {}, "id": [1, {"a": null}]}));
        let r = talk(
            &mut s,
            b"{'execute': 'echo', 'arguments': {'x': 1}, 'id': 'c'}{'execute': 'nope'}",
        );
        assert_eq!(r[0], json!({"return": {"x": 1}, "id": "c"}));
        assert_eq!(r[1]["error"]["desc"], "The command nope has not been found");
    }

    #[test]
    fn request_checks() {
        let mut s = Session::new(None);
        let cases: [(&[u8], &str); 6] = [
            (b"null\n", "QMP input must be a JSON object"),
            (b"{}", "QMP input lacks member 'execute'"),
            (
                b"{ 'execute': true }",
                "QMP input member 'execute' must be a string",
            ),
            (
                b"{ 'execute': 'x', 'arguments': [] }",
                "QMP input member 'arguments' must be an object",
            ),
            (
                b"{ 'execute': 'x', 'extra': true }",
                "QMP input member 'extra' is unexpected",
            ),
            (
                b"{ 'exec-oob': 'x', 'id': 5 }",
                "QMP input member 'exec-oob' is unexpected",
            ),
        ];
        for (input, desc) in cases {
            let r = talk(&mut s, input);
            assert_eq!(r.len(), 1, "{desc}");
            assert_eq!(r[0]["error"]["class"], "GenericError");
            assert_eq!(r[0]["error"]["desc"], desc);
        }
        let r = talk(&mut s, b"{ 'exec-oob': 'x', 'id': 5 }");
        assert_eq!(r[0]["id"], 5);
        // A parse error never carries the id.
        let r = talk(&mut s, b"{'execute': 'nonexistent', 'id':'\n");
        assert_eq!(r.len(), 1);
        assert!(r[0].get("id").is_none());
    }
}
