//! Small helpers the providers share: redaction, excerpts, durations, templates.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Replaces every occurrence of each secret (at least 4 bytes long, so a
/// short value cannot turn ordinary text into `<redacted>` soup) by `<redacted>`.
pub(crate) fn redact(text: &str, secrets: &[&[u8]]) -> String {
    let mut out = text.to_string();
    let mut secrets: Vec<&str> =
        secrets.iter().filter(|s| s.len() >= 4).filter_map(|s| std::str::from_utf8(s).ok()).collect();
    // Longest first: a value containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets {
        if out.contains(s) {
            out = out.replace(s, "<redacted>");
        }
    }
    out
}

/// At most `max` characters of `text` on one line (for error messages).
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// Parses a duration setting such as `30s`; (field, message) on error.
pub(crate) fn duration(field: &str, s: &str, min: Duration, max: Duration) -> Result<Duration, (String, String)> {
    let d = rekey_common::time::parse_duration(s).map_err(|m| (field.to_string(), m))?;
    if d < min || d > max {
        return Err((field.to_string(), format!("must be between {} and {}", humanize(min), humanize(max))));
    }
    Ok(d)
}

fn humanize(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

/// The duration of an already validated setting.
pub(crate) fn duration_or(s: &str, default: Duration) -> Duration {
    rekey_common::time::parse_duration(s).unwrap_or(default)
}

pub(crate) fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

pub(crate) fn resolve_opt(base: &Path, p: &mut Option<PathBuf>) {
    if let Some(p) = p {
        resolve(base, p);
    }
}

/// Checks that `p` is a JSON pointer (RFC 6901): empty (the whole document,
/// only where `allow_empty`) or `/`-separated tokens where `~` is only ever
/// `~0` or `~1`.
pub(crate) fn json_pointer(field: &str, p: &str, allow_empty: bool) -> Result<(), (String, String)> {
    let example = "e.g. /data/last_used_at";
    if p.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err((field.into(), format!("must point inside each item ({example}), not be empty")))
        };
    }
    if !p.starts_with('/') {
        return Err((field.into(), format!("{p:?} is not a JSON pointer: it must start with / ({example})")));
    }
    let bytes = p.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'~' && !matches!(bytes.get(i + 1), Some(b'0' | b'1')) {
            return Err((field.into(), format!("{p:?} is not a JSON pointer: ~ must be written ~0 (and / as ~1)")));
        }
    }
    Ok(())
}

/// Replaces `{name}` placeholders in `template` with `vars` (unknown names stay as they are).
pub(crate) fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_replaces_every_known_value_longest_first() {
        let t = "token sk_live_abcdef and sk_live_abcdef12 and abc";
        let r = redact(t, &[b"sk_live_abcdef", b"sk_live_abcdef12", b"abc"]);
        assert_eq!(r, "token <redacted> and <redacted> and abc");
    }

    #[test]
    fn excerpts_are_one_line_and_bounded() {
        assert_eq!(excerpt("a\n  b\tc", 10), "a b c");
        assert_eq!(excerpt("abcdefghijkl", 5), "abcde…");
    }

    #[test]
    fn json_pointers_are_checked() {
        assert!(json_pointer("f", "/a/b~0c~1d", false).is_ok());
        assert!(json_pointer("f", "", true).is_ok());
        assert_eq!(json_pointer("f", "", false).unwrap_err().0, "f");
        assert!(json_pointer("f", "a/b", true).unwrap_err().1.contains("must start with /"));
        assert!(json_pointer("f", "/a~2", true).unwrap_err().1.contains("~0"));
        assert!(json_pointer("f", "/a~", true).is_err());
    }

    #[test]
    fn templates_fill_known_names() {
        assert_eq!(fill("/v1/keys/{id}/x/{other}", &[("id", "k1")]), "/v1/keys/k1/x/{other}");
    }
}
