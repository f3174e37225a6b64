//! The JSON dialect QMP speaks, as a streaming parser plus an ASCII writer.
//!
//! Input follows QEMU's monitor parser rather than RFC 8259 alone:
//! * strings may be `'single-quoted'`, and `\'` is an escape in either kind;
//! * a byte that cannot start or continue a token (a control character other than
//!   whitespace, `0xFE`/`0xFF`, `%`, ...) is a lexical error: the tokens queued so far are
//!   dropped, exactly one error is reported, and the lexer skips input until a structural
//!   character (`{ } [ ] , :`), a control character or `0xFE`/`0xFF`, where it resynchronises;
//! * a message ends when its braces and brackets balance (or go negative), so requests may be
//!   split across reads and several may arrive in one read;
//! * a message is bounded: at most [`Limits::max_message_bytes`] bytes of tokens,
//!   [`Limits::max_tokens`] tokens and [`Limits::max_depth`] open brackets. Crossing a bound
//!   is reported as an error and the message is dropped, so the client never makes the
//!   server allocate more than the bounds.
//!
//! Output ([`to_string`]) is one line of ASCII with QEMU's `", "` / `": "` separators; every
//! character outside printable ASCII is written as a `\uXXXX` escape.

use serde_json::{Map, Number, Value};

/// Bounds on one message.
///
/// QEMU's (`qobject/json-streamer.c`) are 64 MiB of token text (`MAX_TOKEN_SIZE`), 2 Mi
/// tokens (`MAX_TOKEN_COUNT`) and depth 1024 (`MAX_NESTING`); [`Limits::QEMU`] has them.
/// Keel's default keeps QEMU's depth and allows 1 MiB and 128 Ki tokens per message: the
/// largest requests a QMP client sends (`blockdev-add`, `object-add`, `device_add` with
/// nested options) are a few KiB, and 64 clients each buffering a 64 MiB message (plus
/// 24 bytes of bookkeeping per token) is the multi-gigabyte peak this bound removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of the token lengths of one message, in bytes (Keel: 1 MiB; QEMU: 64 MiB).
    pub max_message_bytes: usize,
    /// Tokens in one message (Keel: 128 Ki; QEMU: 2 Mi).
    pub max_tokens: usize,
    /// Open braces plus brackets at any point (1024, as QEMU).
    pub max_depth: usize,
}

impl Limits {
    /// QEMU's bounds.
    pub const QEMU: Limits = Limits {
        max_message_bytes: 64 << 20,
        max_tokens: 2 << 20,
        max_depth: 1024,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 1 << 20,
            max_tokens: 128 << 10,
            max_depth: 1024,
        }
    }
}

/// The text of the error for a message over [`Limits::max_message_bytes`].
pub const TOKEN_SIZE_ERROR: &str = "JSON token size limit exceeded";
/// The text of the error for a message over [`Limits::max_tokens`].
pub const TOKEN_COUNT_ERROR: &str = "JSON token count limit exceeded";

/// At most this many bytes of a stray token are echoed in its error (QEMU echoes all of
/// it, so a long malformed string came back whole, and up to six times larger).
pub const MAX_ECHO_BYTES: usize = 64;

/// A message that could not be turned into a JSON value. The text is QEMU's
/// (`JSON parse error, ...`); it becomes the `desc` of a `GenericError` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(pub String);

impl JsonError {
    /// Whether the message was dropped for crossing [`Limits::max_message_bytes`] or
    /// [`Limits::max_tokens`] (a budget), rather than for its syntax or depth.
    pub fn is_over_budget(&self) -> bool {
        self.0 == TOKEN_SIZE_ERROR || self.0 == TOKEN_COUNT_ERROR
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    Str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one input byte does in one lexer state.
enum Step {
    /// Consume the byte and continue in this state.
    Consume(State),
    /// Consume the byte; it completes a token.
    Token(Kind),
    /// The token ended just before this byte; emit it and look at the byte again.
    TokenBefore(Kind),
    /// Consume the byte; the input is not JSON here.
    Error,
    /// Whitespace between tokens: consume and drop.
    Skip,
    /// Recovery found a resynchronisation point: look at the byte again from the start.
    Resync,
}

fn step(state: State, b: u8) -> Step {
    use State as S;
    match state {
        S::Start => match b {
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            b'"' => Step::Consume(S::DqString),
            b'\'' => Step::Consume(S::SqString),
            b'0' => Step::Consume(S::Zero),
            b'1'..=b'9' => Step::Consume(S::Digits),
            b'-' => Step::Consume(S::Sign),
            b'{' => Step::Token(Kind::LCurly),
            b'}' => Step::Token(Kind::RCurly),
            b'[' => Step::Token(Kind::LSquare),
            b']' => Step::Token(Kind::RSquare),
            b',' => Step::Token(Kind::Comma),
            b':' => Step::Token(Kind::Colon),
            b'a'..=b'z' => Step::Consume(S::Keyword),
            _ => Step::Error,
        },
        S::Recovery => match b {
            b'\t' => Step::Consume(S::Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => Step::Consume(S::Recovery),
        },
        S::DqString => match b {
            b'\\' => Step::Consume(S::DqEscape),
            b'"' => Step::Token(Kind::Str),
            0x20..=0xfd => Step::Consume(S::DqString),
            _ => Step::Error,
        },
        S::SqString => match b {
            b'\\' => Step::Consume(S::SqEscape),
            b'\'' => Step::Token(Kind::Str),
            0x20..=0xfd => Step::Consume(S::SqString),
            _ => Step::Error,
        },
        S::DqEscape => match b {
            0x20..=0xfd => Step::Consume(S::DqString),
            _ => Step::Error,
        },
        S::SqEscape => match b {
            0x20..=0xfd => Step::Consume(S::SqString),
            _ => Step::Error,
        },
        S::Zero => match b {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Consume(S::Mantissa),
            _ => Step::TokenBefore(Kind::Integer),
        },
        S::Sign => match b {
            b'0' => Step::Consume(S::Zero),
            b'1'..=b'9' => Step::Consume(S::Digits),
            _ => Step::Error,
        },
        S::Digits => match b {
            b'0'..=b'9' => Step::Consume(S::Digits),
            b'e' | b'E' => Step::Consume(S::ExpE),
            b'.' => Step::Consume(S::Mantissa),
            _ => Step::TokenBefore(Kind::Integer),
        },
        S::Mantissa => match b {
            b'0'..=b'9' => Step::Consume(S::MantissaDigits),
            _ => Step::Error,
        },
        S::MantissaDigits => match b {
            b'0'..=b'9' => Step::Consume(S::MantissaDigits),
            b'e' | b'E' => Step::Consume(S::ExpE),
            _ => Step::TokenBefore(Kind::Float),
        },
        S::ExpE => match b {
            b'-' | b'+' => Step::Consume(S::ExpSign),
            b'0'..=b'9' => Step::Consume(S::ExpDigits),
            _ => Step::Error,
        },
        S::ExpSign => match b {
            b'0'..=b'9' => Step::Consume(S::ExpDigits),
            _ => Step::Error,
        },
        S::ExpDigits => match b {
            b'0'..=b'9' => Step::Consume(S::ExpDigits),
            _ => Step::TokenBefore(Kind::Float),
        },
        S::Keyword => match b {
            b'a'..=b'z' => Step::Consume(S::Keyword),
            _ => Step::TokenBefore(Kind::Keyword),
        },
    }
}

/// A token of the current message: its kind and its byte range in `StreamParser::text`.
#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// Incremental QMP JSON parser: feed it bytes as they arrive, get one result per message.
///
/// Every complete message yields exactly one `Ok(value)` or `Err(error)`; malformed input
/// never panics and never makes it buffer more than [`Limits`] allow.
#[derive(Debug)]
pub struct StreamParser {
    limits: Limits,
    state: State,
    /// Bytes of the token being lexed.
    token: Vec<u8>,
    /// Text of the complete tokens of the current message, back to back.
    text: Vec<u8>,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    /// Estimated memory of the last message delivered (see [`StreamParser::last_cost`]).
    last_cost: usize,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl StreamParser {
    /// A parser with the given bounds.
    pub fn new(limits: Limits) -> Self {
        StreamParser {
            limits,
            state: State::Start,
            token: Vec::new(),
            text: Vec::new(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
            last_cost: 0,
        }
    }

    /// Feeds bytes; calls `out` once per finished message, in input order.
    pub fn feed(&mut self, input: &[u8], out: &mut dyn FnMut(Result<Value, JsonError>)) {
        for &b in input {
            self.feed_byte(b, out);
        }
    }

    /// Feeds bytes up to and including the first byte that finishes a message (one byte
    /// may finish two: `1]`), and returns how many bytes were consumed. A server uses it to
    /// stop taking a client's input while that client's queue is full.
    pub fn feed_some(
        &mut self,
        input: &[u8],
        out: &mut dyn FnMut(Result<Value, JsonError>),
    ) -> usize {
        for (i, &b) in input.iter().enumerate() {
            let mut produced = false;
            self.feed_byte(b, &mut |m| {
                produced = true;
                out(m)
            });
            if produced {
                return i + 1;
            }
        }
        input.len()
    }

    /// Bytes the parser holds for an unfinished message (its buffers' capacity).
    pub fn buffered(&self) -> usize {
        self.token.capacity()
            + self.text.capacity()
            + self.tokens.capacity() * std::mem::size_of::<Token>()
    }

    /// An estimate of the memory the last message delivered occupies as a `Value`: its
    /// token text plus 48 bytes per token. Errors cost their text only.
    pub fn last_cost(&self) -> usize {
        self.last_cost
    }

    /// Ends the input: a pending number or keyword is completed and any unfinished message
    /// is reported as an error. The parser is then ready for new input.
    pub fn flush(&mut self, out: &mut dyn FnMut(Result<Value, JsonError>)) {
        // A space completes numbers and keywords and is otherwise harmless.
        if matches!(
            self.state,
            State::Zero | State::Digits | State::MantissaDigits | State::ExpDigits | State::Keyword
        ) {
            self.feed_byte(b' ', out);
        }
        self.token.clear();
        self.state = State::Start;
        if !self.tokens.is_empty() {
            let result = parse_tokens(&self.text, &self.tokens)
                .and_then(|_| Err(JsonError("JSON parse error, premature EOI".to_owned())));
            self.last_cost = 64;
            self.reset();
            out(result);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut dyn FnMut(Result<Value, JsonError>)) {
        loop {
            match step(self.state, b) {
                Step::Consume(s) => {
                    if s != State::Recovery {
                        self.token.push(b);
                    }
                    self.state = s;
                    break;
                }
                Step::Token(kind) => {
                    self.token.push(b);
                    self.state = State::Start;
                    self.end_token(kind, out);
                    break;
                }
                Step::TokenBefore(kind) => {
                    self.state = State::Start;
                    self.end_token(kind, out);
                }
                Step::Error => {
                    self.token.push(b);
                    let shown = if self.token.len() > MAX_ECHO_BYTES {
                        let mut t =
                            String::from_utf8_lossy(&self.token[..MAX_ECHO_BYTES]).into_owned();
                        t.push_str("...");
                        t
                    } else {
                        String::from_utf8_lossy(&self.token).into_owned()
                    };
                    let msg = format!("JSON parse error, stray '{shown}'");
                    self.last_cost = msg.len();
                    self.token.clear();
                    self.reset();
                    self.state = State::Recovery;
                    out(Err(JsonError(msg)));
                    break;
                }
                Step::Skip => break,
                Step::Resync => self.state = State::Start,
            }
        }
        // One token may not outgrow the message bound either.
        if self.token.len() > self.limits.max_message_bytes {
            self.token = Vec::new();
            self.reset();
            self.state = State::Recovery;
            self.last_cost = TOKEN_SIZE_ERROR.len();
            out(Err(JsonError(TOKEN_SIZE_ERROR.to_owned())));
        }
    }

    fn reset(&mut self) {
        self.text.clear();
        self.tokens.clear();
        if self.text.capacity() > 64 << 10 {
            self.text = Vec::new();
            self.tokens = Vec::new();
        }
        self.braces = 0;
        self.brackets = 0;
    }

    fn end_token(&mut self, kind: Kind, out: &mut dyn FnMut(Result<Value, JsonError>)) {
        match kind {
            Kind::LCurly => self.braces += 1,
            Kind::RCurly => self.braces -= 1,
            Kind::LSquare => self.brackets += 1,
            Kind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let limit_error = if self.text.len() + self.token.len() + 1 > self.limits.max_message_bytes
        {
            Some(TOKEN_SIZE_ERROR)
        } else if self.tokens.len() + 1 > self.limits.max_tokens {
            Some(TOKEN_COUNT_ERROR)
        } else if self.braces + self.brackets > self.limits.max_depth as i64 {
            Some("JSON nesting depth limit exceeded")
        } else {
            None
        };
        if let Some(msg) = limit_error {
            self.token.clear();
            self.reset();
            self.last_cost = msg.len();
            out(Err(JsonError(msg.to_owned())));
            return;
        }
        let start = self.text.len();
        self.text.extend_from_slice(&self.token);
        self.token.clear();
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let result = parse_tokens(&self.text, &self.tokens);
        self.last_cost = self.text.len() + 48 * self.tokens.len();
        self.reset();
        out(result);
    }
}

/// Parses a whole buffer that holds exactly one message (a convenience for tests and
/// embedders; the server uses [`StreamParser`]).
pub fn from_slice(input: &[u8]) -> Result<Value, JsonError> {
    let mut parser = StreamParser::default();
    let mut results = Vec::new();
    parser.feed(input, &mut |r| results.push(r));
    parser.flush(&mut |r| results.push(r));
    let mut it = results.into_iter();
    match (it.next(), it.next()) {
        (Some(r), None) => r,
        (None, _) => Err(JsonError("JSON parse error, premature EOI".to_owned())),
        (Some(Err(e)), Some(_)) => Err(e),
        (Some(Ok(_)), Some(_)) => Err(JsonError(
            "JSON parse error, more than one value".to_owned(),
        )),
    }
}

struct TokenParser<'a> {
    text: &'a [u8],
    tokens: &'a [Token],
    pos: usize,
}

fn perr(msg: impl std::fmt::Display) -> JsonError {
    JsonError(format!("JSON parse error, {msg}"))
}

fn parse_tokens(text: &[u8], tokens: &[Token]) -> Result<Value, JsonError> {
    let mut p = TokenParser {
        text,
        tokens,
        pos: 0,
    };
    p.value()
}

impl TokenParser<'_> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> Result<Token, JsonError> {
        let t = self.peek().ok_or_else(|| perr("premature EOI"))?;
        self.pos += 1;
        Ok(t)
    }

    fn bytes(&self, t: Token) -> &[u8] {
        &self.text[t.start..t.end]
    }

    fn value(&mut self) -> Result<Value, JsonError> {
        let t = self.peek().ok_or_else(|| perr("premature EOI"))?;
        match t.kind {
            Kind::LCurly => self.object(),
            Kind::LSquare => self.array(),
            Kind::Str => {
                self.pos += 1;
                Ok(Value::String(parse_string(self.bytes(t))?))
            }
            Kind::Integer | Kind::Float => {
                self.pos += 1;
                parse_number(self.bytes(t), t.kind == Kind::Integer)
            }
            Kind::Keyword => {
                self.pos += 1;
                match self.bytes(t) {
                    b"true" => Ok(Value::Bool(true)),
                    b"false" => Ok(Value::Bool(false)),
                    b"null" => Ok(Value::Null),
                    other => Err(perr(format_args!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(other)
                    ))),
                }
            }
            _ => Err(perr("expecting value")),
        }
    }

    fn object(&mut self) -> Result<Value, JsonError> {
        self.pop()?; // '{'
        let mut map = Map::new();
        let first = self.peek().ok_or_else(|| perr("premature EOI"))?;
        if first.kind == Kind::RCurly {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            self.pair(&mut map)?;
            let t = self.pop()?;
            match t.kind {
                Kind::RCurly => return Ok(Value::Object(map)),
                Kind::Comma => {}
                _ => return Err(perr("expected separator in dict")),
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> Result<(), JsonError> {
        if self.peek().is_none() {
            return Err(perr("premature EOI"));
        }
        let key = match self.value()? {
            Value::String(s) => s,
            _ => return Err(perr("key is not a string in object")),
        };
        let colon = self.pop()?;
        if colon.kind != Kind::Colon {
            return Err(perr("missing : in object pair"));
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return Err(perr("duplicate key"));
        }
        map.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> Result<Value, JsonError> {
        self.pop()?; // '['
        let mut list = Vec::new();
        let first = self.peek().ok_or_else(|| perr("premature EOI"))?;
        if first.kind == Kind::RSquare {
            self.pos += 1;
            return Ok(Value::Array(list));
        }
        loop {
            list.push(self.value()?);
            let t = self.pop()?;
            match t.kind {
                Kind::RSquare => return Ok(Value::Array(list)),
                Kind::Comma => {}
                _ => return Err(perr("expected separator in list")),
            }
        }
    }
}

fn parse_number(text: &[u8], integer: bool) -> Result<Value, JsonError> {
    // The lexer only lets ASCII digits, signs, '.' and exponents through.
    let s = std::str::from_utf8(text).map_err(|_| perr("invalid number"))?;
    if integer {
        if let Ok(i) = s.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = s.parse::<u64>() {
            return Ok(Value::Number(u.into()));
        }
    }
    let f: f64 = s.parse().map_err(|_| perr("invalid number"))?;
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| perr(format_args!("number '{s}' is out of range")))
}

fn hex4(s: &[u8]) -> Option<u32> {
    let digits = s.get(..4)?;
    let mut v = 0u32;
    for &d in digits {
        v = (v << 4) | (d as char).to_digit(16)?;
    }
    Some(v)
}

/// Decodes a string token, quotes included.
fn parse_string(tok: &[u8]) -> Result<String, JsonError> {
    let (quote, body) = match tok.split_first() {
        Some((&q, rest)) if q == b'"' || q == b'\'' => (q, rest),
        _ => return Err(perr("invalid string")),
    };
    let body = match body.split_last() {
        Some((&q, inner)) if q == quote => inner,
        _ => return Err(perr("invalid string")),
    };
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b != b'\\' {
            // Copy the run up to the next escape, checking that it is UTF-8.
            let end = body[i..]
                .iter()
                .position(|&c| c == b'\\')
                .map_or(body.len(), |p| i + p);
            // Modified UTF-8 (QEMU's input encoding) spells U+0000 as C0 80.
            for (k, part) in body[i..end].split(|&c| c == 0xc0).enumerate() {
                let part = if k == 0 {
                    part
                } else if let Some(rest) = part.strip_prefix(&[0x80]) {
                    out.push('\0');
                    rest
                } else {
                    return Err(perr("invalid UTF-8 sequence in string"));
                };
                let run = std::str::from_utf8(part)
                    .map_err(|_| perr("invalid UTF-8 sequence in string"))?;
                out.push_str(run);
            }
            i = end;
            continue;
        }
        let esc = body.get(i + 1).copied().unwrap_or(0);
        i += 2;
        match esc {
            b'"' => out.push('"'),
            b'\'' => out.push('\''),
            b'\\' => out.push('\\'),
            b'/' => out.push('/'),
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let start = i - 2;
                let mut cp = hex4(&body[i..]);
                i += 4;
                if let Some(hi @ 0xd800..=0xdbff) = cp
                    && body.get(i) == Some(&b'\\')
                    && body.get(i + 1) == Some(&b'u')
                {
                    match body.get(i + 2..).and_then(hex4) {
                        Some(lo @ 0xdc00..=0xdfff) => {
                            cp = Some(0x10000 + ((hi & 0x3ff) << 10) + (lo & 0x3ff));
                            i += 6;
                        }
                        _ => cp = None,
                    }
                }
                match cp.and_then(char::from_u32) {
                    Some(c) => out.push(c),
                    None => {
                        let end = i.min(body.len());
                        return Err(perr(format_args!(
                            "{} is not a valid Unicode character",
                            String::from_utf8_lossy(&body[start..end])
                        )));
                    }
                }
            }
            _ => return Err(perr("invalid escape sequence in string")),
        }
    }
    Ok(out)
}

/// Writes `v` as one line of ASCII JSON in QEMU's style (`{"a": 1, "b": [1, 2]}`).
pub fn to_string(v: &Value) -> String {
    let mut s = String::new();
    write_value(&mut s, v);
    s
}

/// Appends `v` to `out`; see [`to_string`].
pub fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => match n.as_f64() {
            // Integral doubles print without a fraction, as QEMU's "%.17g" does.
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e17 => {
                if f == 0.0 && f.is_sign_negative() {
                    // "-0" would read back as the integer 0.
                    out.push_str("-0.0");
                } else {
                    out.push_str(&format!("{}", f as i64));
                }
            }
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, e);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, e)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, e);
            }
            out.push('}');
        }
    }
}

/// Appends a quoted, escaped, ASCII-only JSON string.
pub fn write_str(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04X}", unit);
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(input: &[u8]) -> Vec<Result<Value, JsonError>> {
        let mut p = StreamParser::default();
        let mut v = Vec::new();
        p.feed(input, &mut |r| v.push(r));
        v
    }

    fn errs(input: &[u8]) -> Vec<String> {
        all(input)
            .into_iter()
            .map(|r| match r {
                Ok(v) => format!("ok {v}"),
                Err(e) => e.0,
            })
            .collect()
    }

    #[test]
    fn single_quotes_and_escapes() {
        let v = all(br#"{'execute': 'a\'b', "x": "q\"\u00e9\ud83d\ude00", 'n': -1.5e3, 'b': [true, false, null]}"#);
        assert_eq!(
            v,
            vec![Ok(
                json!({"execute": "a'b", "x": "q\"é😀", "n": -1500.0, "b": [true, false, null]})
            )]
        );
    }

    #[test]
    fn qmp_test_malformed_inputs_give_one_error_each() {
        assert_eq!(errs(b"{]\n"), vec!["JSON parse error, expecting value"]);
        assert_eq!(errs(b"{\xff"), vec!["JSON parse error, stray '\u{fffd}'"]);
        assert_eq!(errs(b"{\x01"), vec!["JSON parse error, stray '\u{1}'"]);
        assert_eq!(
            errs(b"{'bad \xff"),
            vec!["JSON parse error, stray ''bad \u{fffd}'"]
        );
        assert_eq!(
            errs(b"{'execute': 'nonexistent', 'id':'\n"),
            vec!["JSON parse error, stray ''\n'"]
        );
        assert_eq!(errs(b"%p"), vec!["JSON parse error, stray '%'"]);
        assert_eq!(errs(b"null\n"), vec!["ok null"]);
    }

    #[test]
    fn recovers_at_structural_characters() {
        let r = errs(b"{\x01 garbage here {'execute': 'x'}");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1], r#"ok {"execute":"x"}"#);
        // 0xFF forces a resync even in the middle of a string.
        let r = errs(b"{'abc\xff{}");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1], "ok {}");
    }

    #[test]
    fn split_and_batched_messages() {
        let mut p = StreamParser::default();
        let mut v = Vec::new();
        for chunk in [&b"{\"exe"[..], b"cute\": 1", b"}{}[1,", b"2]"] {
            p.feed(chunk, &mut |r| v.push(r));
        }
        assert_eq!(
            v,
            vec![Ok(json!({"execute": 1})), Ok(json!({})), Ok(json!([1, 2]))]
        );
    }

    #[test]
    fn parser_messages() {
        assert_eq!(
            errs(b"{'a' 1}"),
            vec!["JSON parse error, missing : in object pair"]
        );
        assert_eq!(
            errs(b"{1: 1}"),
            vec!["JSON parse error, key is not a string in object"]
        );
        assert_eq!(
            errs(b"[1 2]"),
            vec!["JSON parse error, expected separator in list"]
        );
        assert_eq!(
            errs(b"{'a':1 'b':2}"),
            vec!["JSON parse error, expected separator in dict"]
        );
        assert_eq!(
            errs(b"{'a':1, 'a':2}"),
            vec!["JSON parse error, duplicate key"]
        );
        assert_eq!(
            errs(b"[nul]"),
            vec!["JSON parse error, invalid keyword 'nul'"]
        );
        assert_eq!(
            errs(br"['\x']"),
            vec!["JSON parse error, invalid escape sequence in string"]
        );
        assert_eq!(
            errs(br"['\ud800']"),
            vec![r"JSON parse error, \ud800 is not a valid Unicode character"]
        );
        assert_eq!(errs(b"]"), vec!["JSON parse error, expecting value"]);
        assert_eq!(errs(b"01"), vec!["JSON parse error, stray '01'"]);
        assert_eq!(errs(b"['a\xc0\x80b']"), vec!["ok [\"a\\u0000b\"]"]);
        assert_eq!(
            errs(b"['\xc0']"),
            vec!["JSON parse error, invalid UTF-8 sequence in string"]
        );
        assert_eq!(to_string(&json!([100.0, 1.5, -0.0])), "[100, 1.5, -0.0]");
        assert_eq!(
            errs(b"[18446744073709551615, -9223372036854775808]"),
            vec!["ok [18446744073709551615,-9223372036854775808]"]
        );
    }

    #[test]
    fn nesting_bound() {
        let deep = vec![b'['; 1025];
        let r = errs(&deep);
        assert_eq!(r, vec!["JSON nesting depth limit exceeded"]);
        let mut ok = vec![b'['; 1024];
        ok.extend(vec![b']'; 1024]);
        assert_eq!(all(&ok).len(), 1);
        assert!(all(&ok)[0].is_ok());
    }

    #[test]
    fn size_bounds() {
        let limits = Limits {
            max_message_bytes: 100,
            max_tokens: 10,
            max_depth: 4,
        };
        let mut p = StreamParser::new(limits);
        let mut v = Vec::new();
        let mut big = b"['".to_vec();
        big.extend(vec![b'x'; 500]);
        big.extend(b"'] {}");
        p.feed(&big, &mut |r| v.push(r));
        assert_eq!(
            v[0],
            Err(JsonError("JSON token size limit exceeded".into()))
        );
        assert_eq!(v.last(), Some(&Ok(json!({}))));
        v.clear();
        p.feed(b"[1,2,3,4,5,6,7] {}", &mut |r| v.push(r));
        assert_eq!(
            v[0],
            Err(JsonError("JSON token count limit exceeded".into()))
        );
        assert_eq!(v.last(), Some(&Ok(json!({}))));
    }

    #[test]
    fn flush_completes_pending() {
        let mut p = StreamParser::default();
        let mut v = Vec::new();
        p.feed(b"12", &mut |r| v.push(r));
        assert!(v.is_empty());
        p.flush(&mut |r| v.push(r));
        assert_eq!(v, vec![Ok(json!(12))]);
        v.clear();
        p.feed(b"{'a':", &mut |r| v.push(r));
        p.flush(&mut |r| v.push(r));
        assert_eq!(v.len(), 1);
        assert!(v[0].is_err());
    }

    #[test]
    fn ascii_output() {
        let v = json!({"return": {"a": "é\u{1}😀\"/"}, "id": [1, null]});
        assert_eq!(
            to_string(&v),
            r#"{"id": [1, null], "return": {"a": "\u00E9\u0001\uD83D\uDE00\"/"}}"#
        );
        assert_eq!(from_slice(to_string(&v).as_bytes()), Ok(v));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..16)) {
            let mut p = StreamParser::new(Limits { max_message_bytes: 256, max_tokens: 32, max_depth: 8 });
            let mut n = 0usize;
            for c in &chunks {
                p.feed(c, &mut |_| n += 1);
            }
            p.flush(&mut |_| n += 1);
            // After a resync byte and a complete object the parser is always back in step.
            let mut last = None;
            p.feed(b"\xff{'execute': 'x'}", &mut |r| last = Some(r));
            proptest::prop_assert_eq!(last, Some(Ok(json!({"execute": "x"}))));
        }

        #[test]
        fn round_trip_through_writer(v in arb_json()) {
            let text = to_string(&v);
            proptest::prop_assert!(text.is_ascii());
            proptest::prop_assert_eq!(from_slice(text.as_bytes()), Ok(v.clone()));
            // Any split of the text into two reads gives the same value.
            let cut = text.len() / 3;
            let mut p = StreamParser::default();
            let mut got = Vec::new();
            p.feed(&text.as_bytes()[..cut], &mut |r| got.push(r));
            p.feed(&text.as_bytes()[cut..], &mut |r| got.push(r));
            p.flush(&mut |r| got.push(r));
            proptest::prop_assert_eq!(got, vec![Ok(v)]);
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<u64>().prop_map(|i| json!(i)),
            "\\PC*".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z\\-é]{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
