//! Client-controlled input never panics and a rejected request changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use keel_phase::Phase;
use keel_qdev::*;
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[a-z0-9,=.x-]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("driver".to_owned()),
        Just("id".to_owned()),
        Just("bus".to_owned()),
        Just("iobase".to_owned()),
        Just("size".to_owned()),
        Just("mode".to_owned()),
        Just("prio".to_owned()),
        "[a-z]{1,6}",
    ]
}

fn driver() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::json!("test-hp-dev")),
        Just(serde_json::json!("isa-serial")),
        Just(serde_json::json!("virtio-blk-device")),
        json_value(),
    ]
}

proptest! {
    #[test]
    fn cli_strings_never_panic(s in "[a-z0-9,=.x_-]{0,40}", phase in 0usize..5) {
        let mut r = rig();
        let before = serde_json::to_value(r.tree.query_tree()).unwrap();
        let res = r.tree.device_add_cli(Phase::ALL[phase], &format!("test-hp-dev,{s}"));
        if res.is_err() {
            prop_assert_eq!(serde_json::to_value(r.tree.query_tree()).unwrap(), before);
        }
        let _ = DeviceRequest::parse_cli(&s);
    }

    #[test]
    fn json_arguments_never_panic(
        drv in driver(),
        props in proptest::collection::btree_map(key(), json_value(), 0..5),
        phase in 3usize..5,
    ) {
        let mut r = rig();
        let mut args = serde_json::Map::new();
        args.insert("driver".into(), drv);
        args.extend(props);
        let before = serde_json::to_value(r.tree.query_tree()).unwrap();
        let res = r.tree.device_add_json(Phase::ALL[phase], &serde_json::Value::Object(args));
        match res {
            Ok(a) => prop_assert_eq!(a.hotplugged, Phase::ALL[phase] == Phase::MachineReady),
            Err(e) => {
                prop_assert_eq!(serde_json::to_value(r.tree.query_tree()).unwrap(), before);
                prop_assert!(matches!(e.qmp_class(), "GenericError" | "DeviceNotFound"));
            }
        }
    }

    #[test]
    fn numbers_round_trip(v in any::<u64>(), hex in any::<bool>()) {
        let s = if hex { format!("{v:#x}") } else { v.to_string() };
        prop_assert_eq!(parse_int(&s), Some(i128::from(v)));
        prop_assert_eq!(parse_size(&s), Some(v));
        prop_assert_eq!(PropSpec::uint64("x").parse_str(&s), Ok(PropValue::Uint(v)));
    }

    #[test]
    fn qom_paths_never_panic(p in "(/machine)?(/[a-z\\[\\]0-9-]{0,12}){0,3}", prop in "[a-z_\\[\\]0-9-]{0,12}") {
        let mut r = rig();
        r.tree.device_add_cli(Phase::MachineInit, "virtio-rng-device").unwrap();
        let _ = r.tree.qom_list(&p);
        let _ = r.tree.qom_get(&p, &prop);
        let _ = r.tree.device_del(Phase::MachineReady, &p);
    }
}

/// A key the option syntax can carry: non-empty, no `,` or `=` (QEMU ends a key at either).
fn kv_key() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9._-]{0,8}"
}

proptest! {
    /// Escaping round-trips: `Options` printed with `keyval::escape` parse back to the same
    /// pairs in both dialects, whatever commas and `=` the values hold.
    #[test]
    fn keyval_escaping_round_trips(
        pairs in proptest::collection::vec((kv_key(), "[a-z0-9,=. ]{0,10}"), 0..6),
    ) {
        let opts: keyval::Options = pairs.iter().cloned().collect();
        let text = opts.to_string();
        for syntax in [keyval::Syntax::qemu_opts(None), keyval::Syntax::BLOCKDEV, keyval::Syntax::DEVICE] {
            prop_assert_eq!(syntax.parse(&text), Ok(opts.clone()), "{}", text);
        }
        // With an implied key, an escaped first value comes back under that key.
        if let Some((_, v)) = pairs.first() {
            let implied = format!("{}{}", keyval::escape(v), if pairs.len() > 1 { "," } else { "" });
            let rest: keyval::Options = pairs[1..].iter().cloned().collect();
            let parsed = keyval::Syntax::OBJECT.parse(&format!("{implied}{rest}"));
            if !v.is_empty() && !v.contains('=') {
                let parsed = parsed.unwrap();
                prop_assert_eq!(parsed.iter().next(), Some(("qom-type", v.as_str())));
            }
        }
    }

    /// No input makes the parser or the value helpers panic.
    #[test]
    fn keyval_never_panics(s in any::<String>(), t in "[a-z0-9,=.x+ -]{0,24}") {
        for text in [s.as_str(), t.as_str()] {
            for syntax in [keyval::Syntax::DEVICE, keyval::Syntax::OBJECT, keyval::Syntax::BLOCKDEV] {
                if let Ok(o) = syntax.parse(text) {
                    // What parses, prints, and parses again to the same options.
                    prop_assert_eq!(keyval::Syntax::BLOCKDEV.parse(&o.to_string()), Ok(o));
                }
            }
            let _ = keyval::parse_bool(text);
            let _ = keyval::parse_int(text);
            let _ = keyval::parse_size(text);
            let _ = keyval::parse_size_unit(text, 1 << 20);
            let _ = DeviceRequest::parse_cli(text);
        }
    }
}
