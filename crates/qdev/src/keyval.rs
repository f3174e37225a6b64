//! THE parser for QEMU's option syntax, `[implied-value,]key=value,key2=value2`, and the
//! value helpers every option uses ([`parse_bool`], [`parse_int`], [`parse_size`]).
//!
//! QEMU 7.2 has two dialects of the same syntax and Keel follows both through [`Syntax`]:
//!
//! * **QemuOpts** (`util/qemu-option.c`), used by `-device`, `-machine`, `-chardev`,
//!   `-netdev`, `-accel`, `-smp`: a bare `key` means `key=on` and a bare `nokey` means
//!   `key=off` (QEMU accepts both with a "short-form boolean option" deprecation warning;
//!   Keel logs the same warning through `log`). Only the *first* element may omit its key,
//!   and only when the syntax has an implied key.
//! * **keyval** (`util/keyval.c`), used by `-object`, `-blockdev`, `-audiodev`: every
//!   element but an implied first one needs `=`; a bare `key` is an error
//!   ("Expected '=' after parameter 'key'").
//!
//! In both, `,,` inside a key or value is a literal comma, a value runs to the next single
//! comma (so it may contain `=`), a trailing comma is ignored, and an empty key is an error.
//!
//! **Repeated keys**: [`Options`] keeps every element in the order given; [`Options::get`]
//! returns the *last* one, which is what QEMU does for both dialects (QemuOpts looks options
//! up from the tail; keyval replaces a scalar). `-device` therefore takes the last value of a
//! repeated property.
//!
//! ```
//! use keel_qdev::keyval::{self, Syntax};
//!
//! let o = Syntax::DEVICE.parse("virtio-blk-device,drive=d0,serial=a,,b,ro,noquiet")?;
//! assert_eq!(o.get("driver"), Some("virtio-blk-device"));
//! assert_eq!(o.get("serial"), Some("a,b"));
//! assert_eq!(o.get("ro"), Some("on"));
//! assert_eq!(o.get("quiet"), Some("off"));
//! assert_eq!(o.to_string(), "driver=virtio-blk-device,drive=d0,serial=a,,b,ro=on,quiet=off");
//!
//! assert!(Syntax::OBJECT.parse("memory-backend-ram,id=m,share").is_err());
//! assert_eq!(keyval::parse_size("1.5G"), Some(3 << 29));
//! # Ok::<(), keyval::KeyvalError>(())
//! ```

use std::fmt;

/// What a key without `=` (other than an implied first value) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BareKeys {
    /// QemuOpts: `key` is `key=on`, `nokey` is `key=off` (deprecated in QEMU, logged).
    OnOff,
    /// keyval: an error.
    Reject,
}

/// One option syntax: the dialect's rule for bare keys and the key an initial value without
/// `=` belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syntax {
    implied_key: Option<&'static str>,
    bare_keys: BareKeys,
}

impl Syntax {
    /// `-device DRIVER,...` (QemuOpts, implied `driver`).
    pub const DEVICE: Syntax = Syntax::qemu_opts(Some("driver"));
    /// `-machine TYPE,...` (QemuOpts, implied `type`).
    pub const MACHINE: Syntax = Syntax::qemu_opts(Some("type"));
    /// `-chardev BACKEND,...` (QemuOpts, implied `backend`).
    pub const CHARDEV: Syntax = Syntax::qemu_opts(Some("backend"));
    /// `-netdev TYPE,...` (QemuOpts, implied `type`).
    pub const NETDEV: Syntax = Syntax::qemu_opts(Some("type"));
    /// `-accel ACCEL,...` (QemuOpts, implied `accel`).
    pub const ACCEL: Syntax = Syntax::qemu_opts(Some("accel"));
    /// `-object QOM-TYPE,...` (keyval, implied `qom-type`).
    pub const OBJECT: Syntax = Syntax::keyval(Some("qom-type"));
    /// `-blockdev ...` (keyval, no implied key).
    pub const BLOCKDEV: Syntax = Syntax::keyval(None);

    /// The QemuOpts dialect with an optional implied first key.
    pub const fn qemu_opts(implied_key: Option<&'static str>) -> Self {
        Self {
            implied_key,
            bare_keys: BareKeys::OnOff,
        }
    }

    /// The keyval dialect with an optional implied first key.
    pub const fn keyval(implied_key: Option<&'static str>) -> Self {
        Self {
            implied_key,
            bare_keys: BareKeys::Reject,
        }
    }

    /// The implied first key, if any.
    pub const fn implied_key(&self) -> Option<&'static str> {
        self.implied_key
    }

    /// The rule for bare keys.
    pub const fn bare_keys(&self) -> BareKeys {
        self.bare_keys
    }

    /// Parses `text`. Never panics; the empty string gives no options.
    pub fn parse(&self, text: &str) -> Result<Options, KeyvalError> {
        parse_with(text, self.implied_key, self.bare_keys)
    }
}

/// Parses `text` in the QemuOpts dialect ([`Syntax::qemu_opts`]) with `implied_key`.
pub fn parse(text: &str, implied_key: Option<&str>) -> Result<Options, KeyvalError> {
    parse_with(text, implied_key, BareKeys::OnOff)
}

/// A syntax error in an option string. Messages are QEMU's where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyvalError {
    /// An element with an empty key (`,=1`, `a,,b` read as `a` then `,b`).
    #[error("empty parameter name")]
    EmptyKey,
    /// keyval dialect: a key without `=`.
    #[error("Expected '=' after parameter '{0}'")]
    MissingValue(String),
}

impl KeyvalError {
    /// The error in a few words, without the offending text.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyvalError::EmptyKey => "empty parameter name",
            KeyvalError::MissingValue(_) => "expected '=' after a parameter name",
        }
    }
}

/// Parsed options: `(key, value)` in the order given, repeats kept, escapes resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options(Vec<(String, String)>);

impl Options {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }
    /// Appends `key=value`.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }
    /// The value of the last `key` given (QEMU's rule for repeated keys).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// Removes every `key` and returns the last value given.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let mut last = None;
        self.0.retain_mut(|(k, v)| {
            if k == key {
                last = Some(std::mem::take(v));
                false
            } else {
                true
            }
        });
        last
    }
    /// All elements in order, repeats included.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    /// Number of elements, repeats included.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The elements as pairs.
    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }
}

impl IntoIterator for Options {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<(String, String)> for Options {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// `key=value` elements joined by `,`, commas in values escaped; parsing the text with any
/// syntax gives the same options back for keys the syntax can carry (non-empty, no `,` or
/// `=`: QEMU ends a key at either).
impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={}", escape(v))?;
        }
        Ok(())
    }
}

/// Escapes a value for the option syntax: every `,` doubled.
pub fn escape(text: &str) -> String {
    text.replace(',', ",,")
}

fn parse_with(
    text: &str,
    implied_key: Option<&str>,
    bare_keys: BareKeys,
) -> Result<Options, KeyvalError> {
    let mut out = Options::new();
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() {
        // A key runs to the first '=' or ',' (QEMU: strcspn(params, "=,")).
        let name_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let has_value = rest.as_bytes().get(name_end) == Some(&b'=');
        let (key, value, after) = if has_value {
            let (v, after) = take_value(&rest[name_end + 1..]);
            (rest[..name_end].to_owned(), v, after)
        } else if let (true, Some(implied)) = (first, implied_key) {
            let (v, after) = take_value(rest);
            (implied.to_owned(), v, after)
        } else {
            let name = &rest[..name_end];
            let after = rest.get(name_end + 1..).unwrap_or("");
            match bare_keys {
                BareKeys::Reject => {
                    if name.is_empty() {
                        return Err(KeyvalError::EmptyKey);
                    }
                    return Err(KeyvalError::MissingValue(name.to_owned()));
                }
                BareKeys::OnOff => {
                    let (key, value) = match name.strip_prefix("no") {
                        Some(k) => (k, "off"),
                        None => (name, "on"),
                    };
                    if !key.is_empty() {
                        log::warn!(
                            "short-form boolean option '{name}' deprecated; \
                             please use {key}={value} instead"
                        );
                    }
                    (key.to_owned(), value.to_owned(), after)
                }
            }
        };
        if key.is_empty() {
            return Err(KeyvalError::EmptyKey);
        }
        first = false;
        out.push(key, value);
        rest = after;
    }
    Ok(out)
}

/// Reads a value up to an unescaped ',' (`,,` is a literal comma); returns it and what follows
/// the separating comma.
fn take_value(s: &str) -> (String, &str) {
    let mut out = String::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut start = 0;
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                out.push_str(&s[start..=i]);
                i += 2;
                start = i;
                continue;
            }
            out.push_str(&s[start..i]);
            return (out, &s[i + 1..]);
        }
        i += 1;
    }
    out.push_str(&s[start..]);
    (out, "")
}

/// QEMU's boolean spellings (`qapi_bool_parse`): `on`/`yes`/`true`/`y` and
/// `off`/`no`/`false`/`n`, case-sensitive.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// An integer in C's base-0 syntax as QEMU's string visitor reads it: optional sign, then
/// `0x` hex, `0` octal, or decimal. Returns `None` on junk, on an empty number, or on a
/// magnitude past `u64::MAX` (every property kind rejects those).
pub fn parse_int(text: &str) -> Option<i128> {
    let (neg, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) =
        if let Some(h) = rest.strip_prefix("0x").or_else(|| rest.strip_prefix("0X")) {
            (16, h)
        } else if rest.len() > 1 && rest.starts_with('0') {
            (8, &rest[1..])
        } else {
            (10, rest)
        };
    let magnitude = parse_digits(digits, radix)?;
    Some(if neg { -magnitude } else { magnitude })
}

fn parse_digits(digits: &str, radix: u32) -> Option<i128> {
    if digits.is_empty() {
        return None;
    }
    let mut acc: i128 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix)?;
        acc = acc.checked_mul(radix.into())?.checked_add(d.into())?;
        // Anything past u64::MAX is rejected by every kind; stop early on long inputs.
        if acc > i128::from(u64::MAX) {
            return None;
        }
    }
    Some(acc)
}

/// QEMU 7.2's size syntax (`qemu_strtosz`): bytes without a suffix. See [`parse_size_unit`].
pub fn parse_size(text: &str) -> Option<u64> {
    parse_size_unit(text, 1)
}

/// QEMU 7.2's `do_strtosz` with a default unit (`1` for `qemu_strtosz`, `1 << 20` for
/// `qemu_strtosz_MiB` as `-m` uses): leading whitespace and `+`, a decimal number with an
/// optional fraction (`1.5G`, `1.G`), or `0x` hex without fraction; then an optional suffix
/// `B K M G T P E` (any case, powers of 1024), else `default_unit`. A non-zero fraction needs
/// a unit above one byte (`1.5` and `1.5B` are refused, `1.0` is 1). The fraction is
/// computed in `f64` and truncated, as QEMU does. Negative numbers, exponents and results
/// past `u64::MAX` are refused.
pub fn parse_size_unit(text: &str, default_unit: u64) -> Option<u64> {
    let t = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let t = t.strip_prefix('+').unwrap_or(t);
    let (val, frac, after) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X"))
    {
        let end = h.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(h.len());
        let v = u64::try_from(parse_digits(&h[..end], 16)?).ok()?;
        let after = &h[end..];
        if after.starts_with('.') {
            return None;
        }
        (v, 0.0, after)
    } else {
        let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let v = u64::try_from(parse_digits(&t[..end], 10)?).ok()?;
        let mut after = &t[end..];
        let mut frac = 0.0f64;
        if let Some(f) = after.strip_prefix('.') {
            let fend = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
            if fend > 0 {
                frac = format!("0.{}", &f[..fend]).parse().ok()?;
            }
            after = &f[fend..];
        }
        (v, frac, after)
    };
    let mul = match after {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return None,
    };
    if mul == 0 || (mul == 1 && frac != 0.0) {
        return None;
    }
    // frac < 1, so the product is below mul <= 2^60: the cast cannot saturate.
    let frac_bytes = (frac * mul as f64) as u64;
    val.checked_mul(mul)?.checked_add(frac_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(o: &Options) -> Vec<(&str, &str)> {
        o.iter().collect()
    }

    #[test]
    fn qemu_opts_forms() {
        let o = Syntax::DEVICE
            .parse("foo,a=1,b,nob2,c=x=y,d=,e=,,f,")
            .unwrap();
        assert_eq!(
            pairs(&o),
            [
                ("driver", "foo"),
                ("a", "1"),
                ("b", "on"),
                ("b2", "off"),
                ("c", "x=y"),
                ("d", ""),
                ("e", ",f"),
            ]
        );
        // The implied key applies to the first element only, and only without '='.
        let o = Syntax::MACHINE.parse("type=q35,accel=kvm").unwrap();
        assert_eq!(pairs(&o), [("type", "q35"), ("accel", "kvm")]);
        let o = parse("a,b", None).unwrap();
        assert_eq!(pairs(&o), [("a", "on"), ("b", "on")]);
        assert_eq!(parse("", Some("x")).unwrap().len(), 0);
        assert_eq!(
            pairs(&Syntax::DEVICE.parse("we,,ird").unwrap()),
            [("driver", "we,ird")]
        );
    }

    #[test]
    fn errors() {
        for bad in ["foo,=1", "foo,a,,b", "=x", "foo,no"] {
            assert_eq!(
                Syntax::DEVICE.parse(bad),
                Err(KeyvalError::EmptyKey),
                "{bad}"
            );
        }
        assert_eq!(
            Syntax::OBJECT.parse("memory-backend-ram,id=m,share"),
            Err(KeyvalError::MissingValue("share".into()))
        );
        assert_eq!(
            Syntax::OBJECT
                .parse("memory-backend-ram,id=m,share")
                .unwrap_err()
                .to_string(),
            "Expected '=' after parameter 'share'"
        );
        assert_eq!(
            Syntax::BLOCKDEV.parse("x=1,,"),
            Ok(Options::from_iter([("x".to_owned(), "1,".to_owned())]))
        );
        assert_eq!(Syntax::BLOCKDEV.parse(","), Err(KeyvalError::EmptyKey));
    }

    #[test]
    fn repeated_keys_last_wins() {
        let mut o = Syntax::DEVICE.parse("foo,x=1,x=2").unwrap();
        assert_eq!(o.len(), 3);
        assert_eq!(o.get("x"), Some("2"));
        assert_eq!(o.take("x").as_deref(), Some("2"));
        assert_eq!(o.get("x"), None);
        assert_eq!(o.take("driver").as_deref(), Some("foo"));
        assert!(o.is_empty());
    }

    #[test]
    fn display_round_trips() {
        let o = Syntax::DEVICE.parse("a,,b,k=v,,w,x=").unwrap();
        assert_eq!(o.to_string(), "driver=a,,b,k=v,,w,x=");
        assert_eq!(Syntax::DEVICE.parse(&o.to_string()), Ok(o));
    }

    #[test]
    fn bools_as_qemu() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(t), Some(true));
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(f), Some(false));
        }
        for bad in ["", "ON", "1", "0", "enable"] {
            assert_eq!(parse_bool(bad), None, "{bad}");
        }
    }

    #[test]
    fn ints_base_zero() {
        assert_eq!(parse_int("0xf4"), Some(0xf4));
        assert_eq!(parse_int("0XF4"), Some(0xf4));
        assert_eq!(parse_int("010"), Some(8));
        assert_eq!(parse_int("0"), Some(0));
        assert_eq!(parse_int("-12"), Some(-12));
        assert_eq!(parse_int("+7"), Some(7));
        assert_eq!(parse_int("0x"), None);
        assert_eq!(parse_int("08"), None);
        assert_eq!(parse_int("12a"), None);
        assert_eq!(parse_int(""), None);
        assert_eq!(parse_int("-"), None);
        assert_eq!(parse_int(&"9".repeat(400)), None);
        assert_eq!(parse_int("18446744073709551615"), Some(u64::MAX.into()));
        assert_eq!(parse_int("18446744073709551616"), None);
    }

    #[test]
    fn sizes_as_qemu_7_2() {
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("512b"), Some(512));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("0.5E"), Some(1 << 59));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("0x10K"), Some(16 << 10));
        assert_eq!(parse_size(" +4k"), Some(4096));
        assert_eq!(parse_size("1.G"), Some(1 << 30));
        assert_eq!(parse_size("1.0"), Some(1));
        assert_eq!(parse_size("15E"), Some(15 << 60));
        // strtod rounds .99999999999999999999 to 1.0, so QEMU 7.2 gives a whole KiB.
        assert_eq!(parse_size("0.99999999999999999999K"), Some(1024));
        for bad in [
            "16E", "1.5", "1.5B", "1Q", "k", "", "1..5G", "-1", " -1", "0x1.5", "1e3", "1.5e3K",
            "0x", ".5K", "4 K", "4KB",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(parse_size_unit("256", 1 << 20), Some(256 << 20));
        assert_eq!(parse_size_unit("1.5", 1 << 20), Some(3 << 19));
        assert_eq!(parse_size_unit("2G", 1 << 20), Some(2 << 30));
    }
}
