//! Every command's serde struct agrees with its declared QAPI schema, for every command
//! that [`keel_qapi::for_each_command!`] lists (the list the VMM registers from, so no
//! command escapes the check).
//!
//! Arguments: (a) the struct's serde field names are exactly the schema's members (for a
//! struct with a `#[serde(flatten)]` map: each member is a named field, not swallowed by
//! the map, and the schema accepts extra members); (b) a sample built from the schema with
//! every member (and extra member), and one with only the required members, deserialise,
//! and the full one serialises back unchanged; (c) leaving out any required member fails.
//! Results: samples built from `returns()` deserialise into `Output` and serialise back
//! unchanged (enum values the Rust type does not produce are skipped, but at least one
//! full and one minimal sample must pass).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use keel_qmp::{Builtin, Command, Type};
use serde::Serialize;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde_json::{Map, Value, json};

type E = de::value::Error;

fn probe_err() -> E {
    de::Error::custom("probe")
}

/// How a type asks to be deserialised: a struct with these field names, or a map
/// (serde does that for structs with a flattened field).
#[derive(Debug)]
enum Shape {
    Fields(&'static [&'static str]),
    Map,
}

struct ShapeProbe<'a>(&'a RefCell<Option<Shape>>);

impl<'de> de::Deserializer<'de> for ShapeProbe<'_> {
    type Error = E;
    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
        Err(probe_err())
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, E> {
        *self.0.borrow_mut() = Some(Shape::Fields(fields));
        Err(probe_err())
    }
    fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
        *self.0.borrow_mut() = Some(Shape::Map);
        Err(probe_err())
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct enum identifier
        ignored_any
    }
}

fn shape<K: DeserializeOwned>() -> Shape {
    let cell = RefCell::new(None);
    let _ = K::deserialize(ShapeProbe(&cell));
    cell.into_inner()
        .expect("arguments are neither a struct nor a map")
}

/// A map of one key whose value records whether it was read as a named field (a typed
/// `deserialize_*` call) or collected for a flattened map (`deserialize_any`).
struct OneKey<'a> {
    key: Option<&'static str>,
    typed: &'a Cell<Option<bool>>,
}

impl<'de> de::Deserializer<'de> for OneKey<'_> {
    type Error = E;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
        v.visit_map(self)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de> MapAccess<'de> for OneKey<'_> {
    type Error = E;
    fn next_key_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, E> {
        match self.key.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, E> {
        seed.deserialize(ValueProbe(self.typed))
    }
}

struct ValueProbe<'a>(&'a Cell<Option<bool>>);

macro_rules! typed {
    ($($m:ident)*) => {$(
        fn $m<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
            self.0.set(Some(true));
            Err(probe_err())
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueProbe<'_> {
    type Error = E;
    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
        self.0.set(Some(false));
        Err(probe_err())
    }
    typed! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_f32
        deserialize_f64 deserialize_char deserialize_str deserialize_string deserialize_bytes
        deserialize_byte_buf deserialize_option deserialize_unit deserialize_seq
        deserialize_map deserialize_identifier deserialize_ignored_any
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, E> {
        self.deserialize_unit(v)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, E> {
        self.deserialize_unit(v)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, E> {
        self.deserialize_unit(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        v: V,
    ) -> Result<V::Value, E> {
        self.deserialize_unit(v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, E> {
        self.deserialize_unit(v)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, E> {
        self.deserialize_unit(v)
    }
}

/// Whether `K` (a struct with a flattened map) reads `member` into a named field.
fn is_named_field<K: DeserializeOwned>(member: &'static str) -> bool {
    let typed = Cell::new(None);
    let _ = K::deserialize(OneKey {
        key: Some(member),
        typed: &typed,
    });
    typed.get() == Some(true)
}

fn sample_builtin(b: Builtin) -> Value {
    match b {
        Builtin::Str => json!("s"),
        Builtin::Int | Builtin::Size => json!(1),
        Builtin::Number => json!(1.5),
        Builtin::Bool => json!(true),
        Builtin::Null => Value::Null,
        Builtin::Any => json!({"any": [1, "x"]}),
    }
}

/// A value of type `ty`: with every optional member too if `full`; the `k`-th value of
/// enums and the `k`-th branch of alternates.
fn sample(ty: &Type, k: usize, full: bool) -> Value {
    match ty {
        Type::Builtin(b) => sample_builtin(*b),
        Type::Enum { values, .. } => json!(values[k % values.len()]),
        Type::Array(e) => json!([sample(e, k, full)]),
        Type::Object { members, extra, .. } => {
            let mut m = Map::new();
            for mem in members.iter().filter(|m| full || !m.optional) {
                m.insert(mem.name.to_owned(), sample(&mem.ty, k, full));
            }
            if let (true, Some(b)) = (full, extra) {
                m.insert("x-extra".to_owned(), sample_builtin(*b));
            }
            Value::Object(m)
        }
        Type::Alternate { types, .. } => sample(&types[k % types.len()], k, full),
    }
}

/// Enough `k` to visit every enum value and alternate branch.
const VARIANTS: usize = 20;

fn check_arguments<K: Command + Serialize>() -> Result<(), String> {
    let name = K::NAME;
    let args = K::arguments();
    let Type::Object { members, extra, .. } = &args else {
        return Err(format!("{name}: arguments are not an object type"));
    };
    let declared: BTreeSet<&str> = members.iter().map(|m| m.name).collect();
    // (a) field names.
    match shape::<K>() {
        Shape::Fields(fields) => {
            let fields: BTreeSet<&str> = fields.iter().copied().collect();
            if fields != declared {
                return Err(format!(
                    "{name}: struct fields {fields:?} but schema members {declared:?}"
                ));
            }
            if extra.is_some() {
                return Err(format!(
                    "{name}: schema accepts extra members, struct does not"
                ));
            }
        }
        Shape::Map => {
            if extra.is_none() {
                return Err(format!(
                    "{name}: struct flattens a map, schema has no extra"
                ));
            }
            for m in members {
                if !is_named_field::<K>(m.name) {
                    return Err(format!(
                        "{name}: schema member '{}' is no struct field",
                        m.name
                    ));
                }
            }
        }
    }
    // (b) samples deserialise; the full one serialises back unchanged.
    for k in 0..VARIANTS {
        let full = sample(&args, k, true);
        let parsed: K = serde_json::from_value(full.clone())
            .map_err(|e| format!("{name}: full sample {full} rejected: {e}"))?;
        let back = serde_json::to_value(&parsed).map_err(|e| e.to_string())?;
        if back != full {
            return Err(format!("{name}: sample {full} comes back as {back}"));
        }
        let min = sample(&args, k, false);
        serde_json::from_value::<K>(min.clone())
            .map_err(|e| format!("{name}: required-only sample {min} rejected: {e}"))?;
    }
    // (c) a required member left out is an error.
    for m in members.iter().filter(|m| !m.optional) {
        let mut v = sample(&args, 0, true);
        v.as_object_mut().unwrap().remove(m.name);
        if serde_json::from_value::<K>(v).is_ok() {
            return Err(format!("{name}: struct accepts '{}' missing", m.name));
        }
    }
    Ok(())
}

fn check_returns<K: Command>() -> Result<(), String>
where
    K::Output: DeserializeOwned,
{
    let name = K::NAME;
    let Some(ret) = K::returns() else {
        return Ok(());
    };
    for full in [true, false] {
        let mut passed = 0;
        for k in 0..VARIANTS {
            let v = sample(&ret, k, full);
            let Ok(out) = serde_json::from_value::<K::Output>(v.clone()) else {
                continue;
            };
            let back = serde_json::to_value(&out).map_err(|e| e.to_string())?;
            if back != v {
                return Err(format!("{name}: result {v} comes back as {back}"));
            }
            passed += 1;
        }
        if passed == 0 {
            let v = sample(&ret, 0, full);
            let e = serde_json::from_value::<K::Output>(v.clone()).err();
            return Err(format!("{name}: no result sample fits Output ({v}: {e:?})"));
        }
    }
    Ok(())
}

fn check<K: Command + Serialize>(failures: &mut Vec<String>) -> &'static str
where
    K::Output: DeserializeOwned,
{
    failures.extend(check_arguments::<K>().err());
    failures.extend(check_returns::<K>().err());
    K::NAME
}

macro_rules! check_all {
    (
        handlers: [$($h:path),* $(,)?],
        aliases: [$($a:path => $n:literal),* $(,)?],
        context_free: [$($f:path),* $(,)?] $(,)?
    ) => {{
        let mut failures = Vec::new();
        let names = vec![
            $(check::<$h>(&mut failures),)*
            $(check::<$f>(&mut failures),)*
        ];
        (names, failures)
    }};
}

#[test]
fn every_command_struct_agrees_with_its_schema() {
    let (names, failures) = keel_qapi::for_each_command!(check_all);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(unique.len(), names.len(), "a command is listed twice");
    assert_eq!(names.len(), 67);
}

#[test]
fn the_probes_see_flattened_maps() {
    // MachineSet flattens its properties: `memory` is a field, `x-prop` is not.
    assert!(matches!(
        shape::<keel_qapi::machine::MachineSet>(),
        Shape::Map
    ));
    assert!(is_named_field::<keel_qapi::machine::MachineSet>("memory"));
    assert!(!is_named_field::<keel_qapi::machine::MachineSet>("x-prop"));
    assert!(matches!(
        shape::<keel_qapi::qom::QomGet>(),
        Shape::Fields(_)
    ));
}
