//! Timestamps as providers report them (RFC 3339 strings, unix seconds with
//! or without a fraction, unix milliseconds), read honestly: each one with
//! the resolution it was given in, and a value that is present but cannot be
//! read is an error that says what was found — never "no usage".
//!
//! The rule of [`TimeFormat::Auto`] (the default): a string is RFC 3339
//! (`2024-05-01T12:00:00.250Z`; an offset such as `+02:00` is applied; no zone
//! means UTC) or a decimal number of unix seconds; a JSON number is unix
//! seconds, with its fraction if it has one. Milliseconds are never guessed:
//! a number of seconds past the year 5000 is refused with a hint to set the
//! format to `unix_ms`.
//!
//! Resolution: whole seconds → 1000 ms; a fraction of n digits → 10^(3-n) ms
//! (1 ms from three digits on); unix milliseconds → 1 ms. A fraction whose
//! trailing zeros a serializer dropped reads coarser than it was, never finer.

use serde_json::Value;

/// How a timestamp field is written. Configs name it as a string
/// ([`TimeFormat::from_name`]) so that a wrong name is refused by `validate`
/// with the exact field, not by serde somewhere inside the provider table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeFormat {
    /// RFC 3339 strings or unix seconds (see the module docs).
    #[default]
    Auto,
    Rfc3339,
    /// Unix seconds, integer or with a fraction (a JSON number or a numeric string).
    Unix,
    /// Unix milliseconds (a JSON number or a numeric string).
    UnixMs,
}

impl TimeFormat {
    pub const NAMES: &'static str = "auto, rfc3339, unix or unix_ms";

    /// The format called `name` in a config.
    pub fn from_name(name: &str) -> Result<TimeFormat, String> {
        Ok(match name {
            "auto" => TimeFormat::Auto,
            "rfc3339" => TimeFormat::Rfc3339,
            "unix" => TimeFormat::Unix,
            "unix_ms" => TimeFormat::UnixMs,
            other => return Err(format!("{other:?} is not a timestamp format: expected {}", Self::NAMES)),
        })
    }

    /// What a value in this format looks like, for error messages.
    pub fn expected(self) -> &'static str {
        match self {
            TimeFormat::Auto => {
                "an RFC 3339 string (e.g. 2024-05-01T12:00:00Z) or unix seconds (e.g. 1714564800 or 1714564800.25)"
            }
            TimeFormat::Rfc3339 => "an RFC 3339 string (e.g. 2024-05-01T12:00:00Z)",
            TimeFormat::Unix => "unix seconds (e.g. 1714564800 or 1714564800.25)",
            TimeFormat::UnixMs => "unix milliseconds (e.g. 1714564800250)",
        }
    }
}

/// A point in time and how coarse it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub at_ms: i64,
    pub resolution_ms: i64,
}

/// Unix seconds beyond this (the year 5138) are milliseconds written by mistake.
const MAX_UNIX_SECONDS: i64 = 100_000_000_000;

/// Reads `v` as a timestamp in `format`; the error says what was found and
/// what was expected (without the field's name: the caller adds it).
pub fn parse(v: &Value, format: TimeFormat) -> Result<Stamp, String> {
    let bad = || format!("found {}, expected {}", describe(v), format.expected());
    let stamp = match (v, format) {
        (Value::String(s), TimeFormat::Auto) => rfc3339(s).or_else(|| decimal(s.trim(), 1000)),
        (Value::String(s), TimeFormat::Rfc3339) => rfc3339(s),
        (Value::String(s), TimeFormat::Unix) => decimal(s.trim(), 1000),
        (Value::String(s), TimeFormat::UnixMs) => decimal(s.trim(), 1),
        (Value::Number(n), TimeFormat::Auto | TimeFormat::Unix) => decimal(&n.to_string(), 1000),
        (Value::Number(n), TimeFormat::UnixMs) => decimal(&n.to_string(), 1),
        _ => None,
    }
    .ok_or_else(bad)?;
    if format != TimeFormat::UnixMs && stamp.at_ms / 1000 >= MAX_UNIX_SECONDS {
        return Err(format!(
            "found {}, which as unix seconds is after the year 5000: if it is unix milliseconds, set the format to \"unix_ms\"",
            describe(v)
        ));
    }
    if stamp.at_ms < 0 {
        return Err(format!("found {}, a time before 1970", describe(v)));
    }
    Ok(stamp)
}

/// What a JSON value is, in words, with a short excerpt of a scalar.
pub fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string {:?}", crate::util::excerpt(s, 40)),
        Value::Number(n) => format!("the number {n}"),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Null => "null".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// Resolution in ms of a fraction of `digits` digits of a unit of `unit_ms`.
fn resolution(unit_ms: i64, digits: usize) -> i64 {
    let mut r = unit_ms;
    for _ in 0..digits {
        if r == 1 {
            break;
        }
        r /= 10;
    }
    r.max(1)
}

/// A decimal number of units of `unit_ms` (1000: seconds; 1: milliseconds),
/// read from its text so that no float rounding moves it; exponent forms go
/// through f64.
fn decimal(s: &str, unit_ms: i64) -> Option<Stamp> {
    if s.is_empty() {
        return None;
    }
    if s.contains(['e', 'E']) {
        let f: f64 = s.parse().ok()?;
        if !f.is_finite() {
            return None;
        }
        let ms = f * unit_ms as f64;
        return (ms.abs() < 9.0e15).then(|| Stamp { at_ms: ms.floor() as i64, resolution_ms: 1 });
    }
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.contains('.') && frac.is_empty() {
        return None;
    }
    let whole: i64 = int.parse().ok()?;
    let mut at_ms = whole.checked_mul(unit_ms)?;
    // The fraction's share of a unit, in ms (truncated: never later than written).
    let mut part = 0i64;
    let mut scale = unit_ms;
    for b in frac.bytes().take(3) {
        scale /= 10;
        if scale == 0 {
            break;
        }
        part += i64::from(b - b'0') * scale;
    }
    at_ms += part;
    if neg {
        at_ms = -at_ms;
    }
    Some(Stamp { at_ms, resolution_ms: if frac.is_empty() { unit_ms } else { resolution(unit_ms, frac.len()) } })
}

/// An RFC 3339 date-time (a space for the `T` and a missing zone, read as
/// UTC, are accepted); fractions to the millisecond.
fn rfc3339(s: &str) -> Option<Stamp> {
    let s = s.trim();
    let (body, offset_s) = if let Some(b) = s.strip_suffix(['Z', 'z']) {
        (b, 0i64)
    } else if s.len() > 6 && s.is_char_boundary(s.len() - 6) && matches!(&s[s.len() - 6..s.len() - 5], "+" | "-") {
        let (b, off) = s.split_at(s.len() - 6);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':')?;
        let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
        if h > 23 || m > 59 {
            return None;
        }
        (b, sign * (h * 3600 + m * 60))
    } else {
        (s, 0)
    };
    let (base, frac) = body.split_once('.').unwrap_or((body, ""));
    if base.len() != 19 || !frac.bytes().all(|b| b.is_ascii_digit()) || (body.contains('.') && frac.is_empty()) {
        return None;
    }
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let secs = i64::try_from(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs()).ok()? - offset_s;
    let mut ms = 0i64;
    let mut scale = 100;
    for b in frac.bytes().take(3) {
        ms += i64::from(b - b'0') * scale;
        scale /= 10;
    }
    let resolution_ms = if frac.is_empty() { 1000 } else { resolution(1000, frac.len()) };
    Some(Stamp { at_ms: secs.checked_mul(1000)? + ms, resolution_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(v: Value, f: TimeFormat) -> (i64, i64) {
        let s = parse(&v, f).unwrap_or_else(|e| panic!("{v}: {e}"));
        (s.at_ms, s.resolution_ms)
    }

    #[test]
    fn auto_reads_every_common_shape_with_its_resolution() {
        use TimeFormat::Auto;
        assert_eq!(ok(json!(1714564800), Auto), (1_714_564_800_000, 1000));
        assert_eq!(ok(json!(1714564800.25), Auto), (1_714_564_800_250, 10));
        assert_eq!(ok(json!(1714564800.123456), Auto), (1_714_564_800_123, 1));
        assert_eq!(ok(json!("1714564800.5"), Auto), (1_714_564_800_500, 100));
        assert_eq!(ok(json!("2024-05-01T12:00:00Z"), Auto), (1_714_564_800_000, 1000));
        assert_eq!(ok(json!("2024-05-01T12:00:00.250Z"), Auto), (1_714_564_800_250, 1));
        assert_eq!(ok(json!("2024-05-01T14:00:00.5+02:00"), Auto), (1_714_564_800_500, 100));
        assert_eq!(ok(json!("2024-05-01 07:30:00-04:30"), Auto), (1_714_564_800_000, 1000));
        assert_eq!(ok(json!("2024-05-01T12:00:00"), Auto), (1_714_564_800_000, 1000));
        // A float is read from its shortest text: one fraction digit here.
        assert_eq!(ok(json!(1.7145648e9), Auto), (1_714_564_800_000, 100));
        assert_eq!(ok(json!("1.7145648e9"), Auto), (1_714_564_800_000, 1));
    }

    #[test]
    fn explicit_formats_read_only_their_own_shape() {
        assert_eq!(ok(json!(1714564800250i64), TimeFormat::UnixMs), (1_714_564_800_250, 1));
        assert_eq!(ok(json!("1714564800250"), TimeFormat::UnixMs), (1_714_564_800_250, 1));
        assert_eq!(ok(json!(1714564800), TimeFormat::Unix), (1_714_564_800_000, 1000));
        assert!(parse(&json!(1714564800), TimeFormat::Rfc3339).is_err());
        assert!(parse(&json!("2024-05-01T12:00:00Z"), TimeFormat::Unix).is_err());
    }

    #[test]
    fn unreadable_values_say_what_was_found_and_what_was_expected() {
        let e = parse(&json!(true), TimeFormat::Auto).unwrap_err();
        assert!(e.contains("the boolean true") && e.contains("expected an RFC 3339 string"), "{e}");
        let e = parse(&json!("yesterday"), TimeFormat::Auto).unwrap_err();
        assert!(e.contains("the string \"yesterday\""), "{e}");
        let e = parse(&json!({"t": 1}), TimeFormat::Unix).unwrap_err();
        assert!(e.contains("an object") && e.contains("expected unix seconds"), "{e}");
        // Milliseconds are not guessed: a hint instead.
        let e = parse(&json!(1714564800250i64), TimeFormat::Auto).unwrap_err();
        assert!(e.contains("after the year 5000") && e.contains("unix_ms"), "{e}");
        assert!(parse(&json!(-5), TimeFormat::Auto).unwrap_err().contains("before 1970"));
        for bad in ["", "12.", "2024-05-01T12:00:00.Z", "2024-05-01T12:00:00+25:00", "2024-13-01T00:00:00Z"] {
            assert!(parse(&json!(bad), TimeFormat::Auto).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn formats_are_named_in_configs() {
        assert_eq!(TimeFormat::from_name("unix_ms").unwrap(), TimeFormat::UnixMs);
        assert_eq!(TimeFormat::from_name("rfc3339").unwrap(), TimeFormat::Rfc3339);
        assert_eq!(TimeFormat::from_name("auto").unwrap(), TimeFormat::Auto);
        let e = TimeFormat::from_name("epoch").unwrap_err();
        assert_eq!(e, "\"epoch\" is not a timestamp format: expected auto, rfc3339, unix or unix_ms");
    }
}
