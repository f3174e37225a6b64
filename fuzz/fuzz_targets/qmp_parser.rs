//! The streaming JSON parser on arbitrary bytes, split into arbitrary reads.
//!
//! Checks: no panic; at most one result per input byte (every malformed input gives one
//! error, never a flood); after a resync byte and a complete object the parser is back in
//! step; the writer's output parses back to a value that it writes identically.
#![no_main]

use keel_qmp::json::{Limits, StreamParser, from_slice, to_string};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cuts, input) = match data.split_first() {
        Some((c, rest)) => (*c as usize, rest),
        None => return,
    };
    let limits = Limits {
        max_message_bytes: 4096,
        max_tokens: 512,
        max_depth: 64,
    };
    let mut p = StreamParser::new(limits);
    let mut results = Vec::new();
    let step = cuts.max(1);
    for chunk in input.chunks(step) {
        p.feed(chunk, &mut |r| results.push(r));
    }
    p.flush(&mut |r| results.push(r));
    assert!(results.len() <= input.len() + 1);
    for v in results.into_iter().flatten() {
        let text = to_string(&v);
        assert!(text.is_ascii());
        let again = from_slice(text.as_bytes()).expect("the writer's output parses");
        assert_eq!(to_string(&again), text);
    }
    let mut last = None;
    p.feed(b"\xff{'execute': 'x'}", &mut |r| last = Some(r));
    assert_eq!(last, Some(Ok(serde_json::json!({"execute": "x"}))));
});
