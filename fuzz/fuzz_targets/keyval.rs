//! Arbitrary option strings against the one parser of QEMU's option syntax
//! (`keel_qdev::keyval`) in both dialects, the value helpers, and `-device` parsing.
//!
//! Checks: no panic; whatever parses prints (`Options`' `Display`, values escaped) and parses
//! back to the same options; `DeviceRequest::parse_cli` agrees with `Syntax::DEVICE`.
#![no_main]

use keel_qdev::DeviceRequest;
use keel_qdev::keyval::{self, Syntax};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for syntax in [
        Syntax::DEVICE,
        Syntax::OBJECT,
        Syntax::BLOCKDEV,
        Syntax::qemu_opts(None),
    ] {
        if let Ok(opts) = syntax.parse(text) {
            let printed = opts.to_string();
            assert_eq!(
                Syntax::BLOCKDEV.parse(&printed).as_ref(),
                Ok(&opts),
                "{text:?}"
            );
        }
    }
    match (Syntax::DEVICE.parse(text), DeviceRequest::parse_cli(text)) {
        (Err(_), Ok(r)) => panic!("parse_cli accepted what keyval refused: {r:?}"),
        (Ok(o), Ok(r)) => assert_eq!(o.get("driver"), Some(r.driver.as_str())),
        _ => {}
    }
    let _ = keyval::parse_bool(text);
    let _ = keyval::parse_int(text);
    let _ = keyval::parse_size(text);
    let _ = keyval::parse_size_unit(text, 1 << 20);
});
