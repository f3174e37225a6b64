//! One client's protocol state: greeting, capabilities negotiation, request checks and
//! replies. Pure bytes in, bytes out; the transports in [`crate::server`] move the bytes.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::events::Outbox;
use crate::json::{JsonError, Limits, StreamParser, write_str, write_value};
use crate::registry::{capabilities_arguments, run_out_of_band};
use crate::{CommandError, ErrorClass};

/// In-band requests one client may have queued while OOB is enabled (QEMU's
/// `QMP_REQ_QUEUE_LEN_MAX`); the server stops reading that client while the queue is full.
pub const REQ_QUEUE_LEN_MAX: usize = 8;

/// One message from the client as the parser delivers it: a JSON value or a parse error.
pub type Message = Result<Value, JsonError>;

/// What the server needs from the VMM: run a command, tell the version.
pub trait Dispatcher: Send + Sync + 'static {
    /// Runs one command (command mode only). Phase checks and argument validation are
    /// the dispatcher's (normally [`crate::Registry::dispatch`]).
    fn dispatch(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError>;
    /// Runs one `exec-oob` request, possibly while an in-band command of the same client
    /// is still running on another thread. The default runs [`Dispatcher::dispatch`]
    /// inside [`crate::run_out_of_band`], so a [`crate::Registry`] refuses commands not
    /// declared [`crate::Command::ALLOW_OOB`]. A dispatcher that serialises commands
    /// behind a lock should override this so OOB commands do not wait for that lock.
    fn dispatch_oob(&self, command: &str, args: Map<String, Value>) -> Result<Value, CommandError> {
        run_out_of_band(|| self.dispatch(command, args))
    }
    /// The `version` member of the greeting: `query-version`'s result.
    fn version(&self) -> Value;
    /// Called before each request is handled, negotiation included; may block (a VMM
    /// still running its command line holds requests here).
    fn before_request(&self) {}
    /// Called once the reply to `command` has been written to the client (e.g. `quit`
    /// may now end the process).
    fn after_reply(&self, _command: &str) {}
    /// Whether the guest's vCPUs run now. While they do, the monitor keeps within its CPU
    /// budget ([`crate::pace`]) so busy clients cannot slow the guest; otherwise requests
    /// are never delayed. Called before each in-band request; must not block.
    fn guest_running(&self) -> bool {
        false
    }
}

/// Protocol state of one connection.
#[derive(Debug)]
pub struct Session {
    parser: StreamParser,
    negotiated: bool,
    /// `oob` is offered in the greeting.
    oob_offered: bool,
    /// The client enabled `oob` in `qmp_capabilities`.
    oob: bool,
    outbox: Option<Arc<Outbox>>,
    /// Commands answered by the last [`Session::input`], for [`Dispatcher::after_reply`].
    answered: Vec<String>,
}

impl Session {
    /// A session in capabilities-negotiation mode that offers no capability. Events are
    /// queued in `outbox` (if any) once negotiation completes.
    pub fn new(outbox: Option<Arc<Outbox>>) -> Session {
        Session::with_oob(outbox, false)
    }

    /// Like [`Session::new`]; with `offer_oob` the client may enable out-of-band
    /// execution. Offer it only where the transport runs `exec-oob` requests while an
    /// in-band command executes (the socket transports in [`crate::server`] do).
    pub fn with_oob(outbox: Option<Arc<Outbox>>, offer_oob: bool) -> Session {
        Session {
            parser: StreamParser::new(Limits::default()),
            negotiated: false,
            oob_offered: offer_oob,
            oob: false,
            outbox,
            answered: Vec::new(),
        }
    }

    /// Whether `qmp_capabilities` succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Whether the client enabled the `oob` capability.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// The greeting line (CRLF-terminated); `offer_oob` lists `"oob"` in its
    /// capabilities (it must match the session's [`Session::with_oob`]).
    pub fn greeting(dispatcher: &dyn Dispatcher, offer_oob: bool) -> Vec<u8> {
        let mut s = String::from("{\"QMP\": {\"version\": ");
        write_value(&mut s, &dispatcher.version());
        s.push_str(if offer_oob {
            ", \"capabilities\": [\"oob\"]}}\r\n"
        } else {
            ", \"capabilities\": []}}\r\n"
        });
        s.into_bytes()
    }

    /// Consumes client bytes and appends every reply (and events queued meanwhile, each
    /// before the reply of the command that caused it) to `out`. Everything runs in
    /// order on the caller's thread, `exec-oob` requests included; a transport that
    /// lets OOB replies overtake uses [`Session::parse`] and [`Session::respond`].
    pub fn input(&mut self, bytes: &[u8], dispatcher: &dyn Dispatcher, out: &mut Vec<u8>) {
        let mut msgs = Vec::new();
        self.parse(bytes, &mut msgs);
        self.answer_all(msgs, dispatcher, out);
    }

    /// Ends the input (end of file): a trailing number or keyword is completed.
    pub fn finish(&mut self, dispatcher: &dyn Dispatcher, out: &mut Vec<u8>) {
        let mut msgs = Vec::new();
        self.parse_end(&mut msgs);
        self.answer_all(msgs, dispatcher, out);
    }

    fn answer_all(&mut self, msgs: Vec<Message>, dispatcher: &dyn Dispatcher, out: &mut Vec<u8>) {
        for m in msgs {
            let reply = self.respond(m, dispatcher);
            if let Some(o) = &self.outbox {
                o.drain_into(out);
            }
            out.extend_from_slice(reply.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Splits client bytes into messages without running anything.
    pub fn parse(&mut self, bytes: &[u8], msgs: &mut Vec<Message>) {
        self.parser.feed(bytes, &mut |m| msgs.push(m));
    }

    /// Ends the input: completes a trailing number or keyword.
    pub fn parse_end(&mut self, msgs: &mut Vec<Message>) {
        self.parser.flush(&mut |m| msgs.push(m));
    }

    /// Whether `m` is an out-of-band request (QEMU's `qmp_is_oob`: an object with
    /// `exec-oob` and without `execute`). Everything else, malformed input included, is
    /// answered in-band, in order.
    pub fn is_out_of_band(m: &Message) -> bool {
        matches!(m, Ok(Value::Object(o)) if o.contains_key("exec-oob") && !o.contains_key("execute"))
    }

    /// Answers one message (negotiation or command mode) and returns the reply without
    /// line ending.
    pub fn respond(&mut self, m: Message, dispatcher: &dyn Dispatcher) -> String {
        if self.negotiated {
            let (reply, name) = respond_command(m, self.oob, dispatcher);
            self.answered.extend(name);
            return reply;
        }
        match m {
            Ok(v) => self.negotiation_request(v, dispatcher),
            Err(e) => reply_error(&CommandError::generic(e.0), None),
        }
    }

    /// Names of the commands answered since the last call, for
    /// [`Dispatcher::after_reply`] once their replies are written.
    pub fn take_answered(&mut self) -> Vec<String> {
        std::mem::take(&mut self.answered)
    }

    fn negotiation_request(&mut self, v: Value, dispatcher: &dyn Dispatcher) -> String {
        dispatcher.before_request();
        let Value::Object(mut obj) = v else {
            return reply_error(
                &CommandError::generic("QMP input must be a JSON object"),
                None,
            );
        };
        let id = obj.remove("id");
        let (name, args) = match check_request(obj, false) {
            Ok((name, args, _)) => (name, args),
            Err(e) => return reply_error(&e, id.as_ref()),
        };
        let result = self.negotiate(&name, args);
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
        let mut oob = false;
        if let Some(Value::Array(caps)) = args.get("enable") {
            // The schema admits only known capabilities; `oob` is the only one.
            for c in caps.iter().filter_map(Value::as_str) {
                if c == "oob" && self.oob_offered {
                    oob = true;
                } else {
                    return Err(CommandError::generic(format!(
                        "Capability {c} not available"
                    )));
                }
            }
        }
        self.negotiated = true;
        self.oob = oob;
        if let Some(o) = &self.outbox {
            o.set_negotiated();
        }
        Ok(Value::Object(Map::new()))
    }
}

/// Answers one message in command mode (after negotiation) and returns the reply without
/// line ending plus the name of the command that ran, if one did. With `oob_enabled`,
/// `exec-oob` requests run through [`Dispatcher::dispatch_oob`]; without it they are
/// rejected as QEMU does. It needs no session state, so a transport's worker thread
/// runs in-band requests with it while the reader answers `exec-oob` ones.
pub fn respond_command(
    m: Message,
    oob_enabled: bool,
    dispatcher: &dyn Dispatcher,
) -> (String, Option<String>) {
    let v = match m {
        Ok(v) => v,
        Err(e) => return (reply_error(&CommandError::generic(e.0), None), None),
    };
    dispatcher.before_request();
    let Value::Object(mut obj) = v else {
        return (
            reply_error(
                &CommandError::generic("QMP input must be a JSON object"),
                None,
            ),
            None,
        );
    };
    let id = obj.remove("id");
    let (name, args, oob) = match check_request(obj, oob_enabled) {
        Ok(x) => x,
        Err(e) => return (reply_error(&e, id.as_ref()), None),
    };
    let result = if oob {
        dispatcher.dispatch_oob(&name, args)
    } else {
        dispatcher.dispatch(&name, args)
    };
    let reply = match result {
        Ok(v) => reply_return(&v, id.as_ref()),
        Err(e) => reply_error(&e, id.as_ref()),
    };
    (reply, Some(name))
}

/// QEMU's `qmp_dispatch_check_obj`: returns the command name, its arguments and whether
/// it came as `exec-oob` (accepted only with `allow_oob`).
fn check_request(
    obj: Map<String, Value>,
    allow_oob: bool,
) -> Result<(String, Map<String, Value>, bool), CommandError> {
    let mut exec: Option<(String, &'static str)> = None;
    let mut args = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            key @ ("execute" | "exec-oob") if key == "execute" || allow_oob => {
                let key: &'static str = if key == "execute" {
                    "execute"
                } else {
                    "exec-oob"
                };
                let Value::String(s) = v else {
                    return Err(CommandError::generic(format!(
                        "QMP input member '{key}' must be a string"
                    )));
                };
                if let Some((_, first)) = &exec {
                    return Err(CommandError::generic(format!(
                        "QMP input member '{key}' clashes with '{first}'"
                    )));
                }
                exec = Some((s, key));
            }
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
    let (name, key) =
        exec.ok_or_else(|| CommandError::generic("QMP input lacks member 'execute'"))?;
    Ok((name, args, key == "exec-oob"))
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
        let g: Value = serde_json::from_slice(&Session::greeting(&Echo, false)).unwrap();
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

    #[test]
    fn oob_capability_when_offered() {
        let g: Value = serde_json::from_slice(&Session::greeting(&Echo, true)).unwrap();
        assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
        let mut s = Session::with_oob(None, true);
        let r = talk(
            &mut s,
            b"{'execute': 'qmp_capabilities', 'arguments': {'enable': ['bogus']}}",
        );
        assert_eq!(
            r[0]["error"]["desc"],
            "Parameter 'null' does not accept value 'bogus'"
        );
        assert!(!s.negotiated());
        let r = talk(
            &mut s,
            b"{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}",
        );
        assert_eq!(r[0], json!({"return": {}}));
        assert!(s.oob_enabled());
        // The synchronous path runs exec-oob in order; Echo has no registry, so the
        // default dispatch_oob lets it through.
        let r = talk(
            &mut s,
            b"{'exec-oob': 'echo', 'arguments': {'a': 1}, 'id': 7}",
        );
        assert_eq!(r[0], json!({"return": {"a": 1}, "id": 7}));
    }

    #[test]
    fn oob_classification() {
        let is = |v: Value| Session::is_out_of_band(&Ok(v));
        assert!(is(json!({"exec-oob": "x"})));
        assert!(is(json!({"exec-oob": 1, "id": 1})));
        assert!(!is(json!({"exec-oob": "x", "execute": "y"})));
        assert!(!is(json!({"id": "err-2"})));
        assert!(!is(json!(["exec-oob"])));
        assert!(!Session::is_out_of_band(&Err(crate::json::JsonError(
            "x".into()
        ))));
    }
}
