//! A file's new content from its current content and the secret's fields:
//! minijinja templates (strict undefined), in-place replacement of the old
//! value, env-file key updates. Pure: no I/O, no clock.
//!
//! Every buffer that holds a value is a [`SecretBytes`]; error messages name
//! fields, keys and versions, never values.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use rekey_common::secret::{SecretBytes, fingerprint_fields};
use rekey_proto::v1::SecretField;
use std::collections::{BTreeMap, BTreeSet};

/// How a file's new content is produced.
#[derive(Debug, Clone)]
pub enum FileContent {
    /// The whole file rendered from a minijinja template with the secret's
    /// fields as variables (strict: an undefined variable is an error).
    Template { source: String },
    /// Every occurrence of the previous value of `field` replaced by the new
    /// value, inside an existing file. `None`: the secret's only field.
    Replace { field: Option<String> },
    /// `KEY=value` lines of an existing env file updated (env key → field);
    /// every other byte kept.
    EnvFile { keys: BTreeMap<String, String> },
}

impl FileContent {
    pub fn kind(&self) -> &'static str {
        match self {
            FileContent::Template { .. } => "template",
            FileContent::Replace { .. } => "replace",
            FileContent::EnvFile { .. } => "env-file",
        }
    }
}

/// The named fields of one secret version (`value`, or `access_key_id` and
/// `secret_access_key`, ...).
#[derive(Default)]
pub struct Fields {
    map: BTreeMap<String, SecretBytes>,
}

impl Fields {
    /// Takes the values out of the protocol message (no copy is left behind
    /// in it). Refuses empty or duplicate names.
    pub fn from_proto(fields: Vec<SecretField>) -> Result<Fields, String> {
        let mut map = BTreeMap::new();
        for f in fields {
            if f.name.is_empty() {
                return Err("a field has no name".into());
            }
            let name = f.name;
            if map.insert(name.clone(), SecretBytes::new(f.value)).is_some() {
                return Err(format!("field {name} appears twice"));
            }
        }
        Ok(Fields { map })
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Fields {
        Fields { map: pairs.into_iter().map(|(k, v)| (k.to_string(), SecretBytes::new(v.to_vec()))).collect() }
    }

    pub fn get(&self, name: &str) -> Option<&SecretBytes> {
        self.map.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The field names, for messages: `value` or `access_key_id, secret_access_key`.
    pub fn names(&self) -> String {
        if self.map.is_empty() {
            return "no fields".into();
        }
        self.map.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Keyed fingerprint of the whole version (never the value).
    pub fn fingerprint(&self, key: &[u8]) -> String {
        fingerprint_fields(key, self.map.iter().map(|(k, v)| (k.as_str(), v.expose())))
    }

    /// `field`, or the only field when `None`.
    fn resolve<'a>(&'a self, field: Option<&'a str>, which: &str) -> Result<(&'a str, &'a SecretBytes), RenderError> {
        match field {
            Some(f) => self.map.get(f).map(|v| (f, v)).ok_or_else(|| RenderError::NoField {
                field: f.to_string(),
                which: which.into(),
                have: self.names(),
            }),
            None if self.map.len() == 1 => {
                let (k, v) = self.map.iter().next().expect("one field");
                Ok((k.as_str(), v))
            }
            None => Err(RenderError::Ambiguous { which: which.into(), have: self.names() }),
        }
    }

    fn values(&self) -> impl Iterator<Item = &SecretBytes> {
        self.map.values()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the template uses {missing}, which the {which} version does not carry (it has {have})")]
    Undefined { missing: String, which: String, have: String },
    #[error("the template failed: {0}")]
    Template(String),
    #[error("field {field} is not valid UTF-8, so it cannot be used in a template")]
    NotUtf8 { field: String },
    #[error("the {which} version has no field {field} (it has {have})")]
    NoField { field: String, which: String, have: String },
    #[error("name the field to use: the {which} version has several ({have})")]
    Ambiguous { which: String, have: String },
    #[error("replacing needs the previous value, which the delivery does not carry")]
    NoPrevious,
    #[error("the file does not contain the previous value of field {field} (version {previous})")]
    OldValueAbsent { field: String, previous: String },
    #[error("field {field} cannot be written to env key {key}: {why}")]
    EnvValue { field: String, key: String, why: &'static str },
    #[error("the file does not exist (kind = \"{kind}\" updates an existing file)")]
    Missing { kind: &'static str },
    #[error("the expectation names the version id, which is not known here")]
    NoVersionId,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Config files are not HTML: never escape, whatever the file name.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    let mut syntax = minijinja::syntax::SyntaxConfig::builder();
    syntax.keep_trailing_newline(true);
    env.set_syntax(syntax.build().expect("default delimiters are valid"));
    env
}

/// Compiles a template (at config load): syntax errors only.
pub fn check_template(source: &str) -> Result<(), String> {
    let env = environment();
    env.template_from_str(source).map(|_| ()).map_err(|e| e.to_string())
}

/// Renders the whole file from `source` with the fields as variables.
pub fn render_template(source: &str, fields: &Fields, scrub: &Scrubber) -> Result<SecretBytes, RenderError> {
    let env = environment();
    let tmpl = env.template_from_str(source).map_err(|e| RenderError::Template(scrub.scrub(&e.to_string())))?;
    // Name what is missing (minijinja's strict error does not).
    let globals: BTreeSet<String> = env.globals().map(|(k, _)| k.to_string()).collect();
    let missing: BTreeSet<String> = tmpl
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| fields.get(v).is_none() && !globals.contains(v))
        .collect();
    if !missing.is_empty() {
        return Err(RenderError::Undefined {
            missing: missing.iter().map(|m| format!("undefined variable `{m}`")).collect::<Vec<_>>().join(", "),
            which: "new".into(),
            have: fields.names(),
        });
    }
    let mut ctx = BTreeMap::new();
    for (k, v) in &fields.map {
        let s = std::str::from_utf8(v.expose()).map_err(|_| RenderError::NotUtf8 { field: k.clone() })?;
        ctx.insert(k.clone(), Value::from(s));
    }
    let out = tmpl.render(Value::from(ctx)).map_err(|e| RenderError::Template(scrub.scrub(&e.to_string())))?;
    Ok(SecretBytes::new(out.into_bytes()))
}

/// The variable of an expectation that stands for the version's id.
pub const VERSION_ID: &str = "version_id";

/// A health check's expected text (`body_contains`, `output_contains`). It may
/// name the version's id (`{{ version_id }}`) and the fields the secret
/// declares public (`{{ access_key_id }}`), so a check can require that the
/// service reports the *new* version; a secret field is refused at load.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    source: String,
    /// The variables it uses.
    names: BTreeSet<String>,
}

impl Expect {
    /// Compiles `source`; every variable must be `version_id` or in `public`.
    pub fn parse(source: &str, public: &BTreeSet<String>) -> Result<Expect, String> {
        let env = environment();
        let tmpl = env.template_from_str(source).map_err(|e| format!("invalid template: {e}"))?;
        let names: BTreeSet<String> = tmpl.undeclared_variables(false).into_iter().collect();
        for n in &names {
            if n != VERSION_ID && !public.contains(n) {
                let declared = if public.is_empty() {
                    "none is declared".to_string()
                } else {
                    public.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
                };
                return Err(format!(
                    "uses `{n}`, which is not a public field: expected `{VERSION_ID}` or a field listed in \
                     this secret's public_fields ({declared}); a secret field can never appear in a health check"
                ));
            }
        }
        Ok(Expect { source: source.to_string(), names })
    }

    /// Uses nothing of the version: the same text whatever is applied.
    pub fn is_fixed(&self) -> bool {
        self.names.is_empty()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The expected text for the version `version_id` with `fields`.
    pub fn render(&self, version_id: &str, fields: &Fields) -> Result<String, RenderError> {
        let mut ctx = BTreeMap::new();
        for n in &self.names {
            let v = if n == VERSION_ID {
                if version_id.is_empty() {
                    return Err(RenderError::NoVersionId);
                }
                version_id.to_string()
            } else {
                let (_, v) = fields.resolve(Some(n), "checked")?;
                std::str::from_utf8(v.expose()).map_err(|_| RenderError::NotUtf8 { field: n.clone() })?.to_string()
            };
            ctx.insert(n.clone(), Value::from(v));
        }
        let env = environment();
        let tmpl = env.template_from_str(&self.source).map_err(|e| RenderError::Template(e.to_string()))?;
        tmpl.render(Value::from(ctx)).map_err(|e| RenderError::Template(e.to_string()))
    }
}

/// Replaces every occurrence of the previous value of `field` (default: the
/// only field) by the new value. Returns the new content and the count.
pub fn replace(
    current: &[u8],
    field: Option<&str>,
    new: &Fields,
    old: &Fields,
    previous_version: &str,
) -> Result<(SecretBytes, usize), RenderError> {
    let (name, new_value) = new.resolve(field, "new")?;
    if old.is_empty() {
        return Err(RenderError::NoPrevious);
    }
    let (_, old_value) = old.resolve(Some(name), "previous")?;
    let (old_b, new_b) = (old_value.expose(), new_value.expose());
    if old_b.is_empty() {
        return Err(RenderError::NoPrevious);
    }
    let mut out = Vec::with_capacity(current.len() + new_b.len());
    let mut count = 0;
    let mut i = 0;
    while i < current.len() {
        if current[i..].starts_with(old_b) {
            out.extend_from_slice(new_b);
            i += old_b.len();
            count += 1;
        } else {
            out.push(current[i]);
            i += 1;
        }
    }
    if count == 0 {
        return Err(RenderError::OldValueAbsent {
            field: name.to_string(),
            previous: if previous_version.is_empty() { "unknown".into() } else { previous_version.into() },
        });
    }
    Ok((SecretBytes::new(out), count))
}

#[derive(Clone, Copy, PartialEq)]
enum Quote {
    None,
    Double,
    Single,
}

/// Splits an assignment line into (bytes before the value, key, value
/// region, bytes after the value). `None` for comments, blanks, anything else.
fn parse_assignment(body: &[u8]) -> Option<(usize, &str, usize, usize, Quote)> {
    let mut i = body.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    if body[i..].starts_with(b"export ") {
        i += 7;
        i += body[i..].iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    }
    let key_start = i;
    while i < body.len() && (body[i].is_ascii_alphanumeric() || body[i] == b'_') {
        i += 1;
    }
    if i == key_start || body[key_start].is_ascii_digit() {
        return None;
    }
    let key = std::str::from_utf8(&body[key_start..i]).ok()?;
    i += body[i..].iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    if body.get(i) != Some(&b'=') {
        return None;
    }
    i += 1;
    i += body[i..].iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    let start = i;
    let (quote, end) = match body.get(i) {
        Some(b'"') => {
            let mut j = i + 1;
            while j < body.len() && body[j] != b'"' {
                j += if body[j] == b'\\' { 2 } else { 1 };
            }
            (Quote::Double, (j + 1).min(body.len()))
        }
        Some(b'\'') => {
            let j = body[i + 1..].iter().position(|b| *b == b'\'').map(|p| i + 1 + p + 1).unwrap_or(body.len());
            (Quote::Single, j)
        }
        _ => {
            // An unquoted value ends at a ` #` comment, if any.
            let mut end = body.len();
            for j in i..body.len() {
                if body[j] == b'#' && j > i && matches!(body[j - 1], b' ' | b'\t') {
                    end = j;
                    while end > i && matches!(body[end - 1], b' ' | b'\t') {
                        end -= 1;
                    }
                    break;
                }
            }
            (Quote::None, end)
        }
    };
    Some((key_start, key, start, end, quote))
}

fn encode_env_value(v: &[u8], quote: Quote, field: &str, key: &str) -> Result<Vec<u8>, RenderError> {
    let err = |why| RenderError::EnvValue { field: field.into(), key: key.into(), why };
    if v.iter().any(|b| matches!(b, b'\n' | b'\r' | 0)) {
        return Err(err("the value contains a line break or a NUL byte"));
    }
    Ok(match quote {
        Quote::None => {
            if v.iter().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"\"'\\$#`".contains(b)) {
                return Err(err(
                    "the value contains a space, quote, backslash, `$`, `#` or control character; quote the value in the file",
                ));
            }
            v.to_vec()
        }
        Quote::Double => {
            let mut out = vec![b'"'];
            for b in v {
                if matches!(b, b'"' | b'\\' | b'$' | b'`') {
                    out.push(b'\\');
                }
                out.push(*b);
            }
            out.push(b'"');
            out
        }
        Quote::Single => {
            if v.contains(&b'\'') {
                return Err(err("the value contains a single quote; use double quotes in the file"));
            }
            let mut out = vec![b'\''];
            out.extend_from_slice(v);
            out.push(b'\'');
            out
        }
    })
}

/// Updates `KEY=value` lines (every occurrence of each key; `export KEY=`
/// too) keeping their quoting, and appends keys the file lacks. Every other
/// byte of the file is kept as it was, line endings included.
pub fn update_env_file(
    current: &[u8],
    keys: &BTreeMap<String, String>,
    fields: &Fields,
) -> Result<SecretBytes, RenderError> {
    let mut values = BTreeMap::new();
    for (key, field) in keys {
        let (_, v) = fields.resolve(Some(field), "new")?;
        values.insert(key.as_str(), (field.as_str(), v));
    }
    let mut out = Vec::with_capacity(current.len() + 64);
    let mut found = BTreeSet::new();
    for line in current.split_inclusive(|b| *b == b'\n') {
        let body_len = line.len() - line.strip_suffix(b"\n").map_or(0, |_| 1);
        let body_len = if line[..body_len].ends_with(b"\r") { body_len - 1 } else { body_len };
        let body = &line[..body_len];
        match parse_assignment(body).and_then(|a| values.get(a.1).map(|v| (a, v))) {
            Some(((_, key, start, end, quote), (field, v))) => {
                out.extend_from_slice(&body[..start]);
                out.extend_from_slice(&encode_env_value(v.expose(), quote, field, key)?);
                out.extend_from_slice(&body[end..]);
                out.extend_from_slice(&line[body_len..]);
                found.insert(key.to_string());
            }
            None => out.extend_from_slice(line),
        }
    }
    for (key, (field, v)) in &values {
        if found.contains(*key) {
            continue;
        }
        if !out.is_empty() && !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        let quote =
            if encode_env_value(v.expose(), Quote::None, field, key).is_ok() { Quote::None } else { Quote::Double };
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(&encode_env_value(v.expose(), quote, field, key)?);
        out.push(b'\n');
    }
    Ok(SecretBytes::new(out))
}

/// The new content of a declared file. `current` is `None` for a missing file.
pub fn render(
    content: &FileContent,
    current: Option<&SecretBytes>,
    new: &Fields,
    old: &Fields,
    previous_version: &str,
    scrub: &Scrubber,
) -> Result<SecretBytes, RenderError> {
    match content {
        FileContent::Template { source } => render_template(source, new, scrub),
        FileContent::Replace { field } => {
            let current = current.ok_or(RenderError::Missing { kind: "replace" })?;
            replace(current.expose(), field.as_deref(), new, old, previous_version).map(|(c, _)| c)
        }
        FileContent::EnvFile { keys } => {
            let current = current.ok_or(RenderError::Missing { kind: "env-file" })?;
            update_env_file(current.expose(), keys, new)
        }
    }
}

/// Removes any value of the given versions from text that came from outside
/// (a template engine's message, a command's stderr, an HTTP body), so it can
/// go into a log or a report.
#[derive(Default)]
pub struct Scrubber {
    values: Vec<SecretBytes>,
}

/// Shorter values would redact ordinary words; real secrets are longer.
const MIN_SCRUB_LEN: usize = 4;

impl Scrubber {
    pub fn new(sets: &[&Fields]) -> Scrubber {
        let mut values: Vec<SecretBytes> =
            sets.iter().flat_map(|f| f.values()).filter(|v| v.len() >= MIN_SCRUB_LEN).cloned().collect();
        // Longest first, so a value containing another is redacted whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        Scrubber { values }
    }

    pub fn scrub(&self, text: &str) -> String {
        let mut s = text.to_string();
        for v in &self.values {
            if let Ok(v) = std::str::from_utf8(v.expose())
                && s.contains(v)
            {
                s = s.replace(v, "<redacted>");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Fields {
        Fields::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_bytes())))
    }

    fn s(b: &SecretBytes) -> String {
        String::from_utf8(b.expose().to_vec()).unwrap()
    }

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn template_renders_fields_by_name_and_keeps_the_trailing_newline() {
        let fields = f(&[("access_key_id", "AKIA1"), ("secret_access_key", "s3cr<et>&")]);
        let out = render_template(
            "[default]\nid = {{ access_key_id }}\nkey = {{ secret_access_key }}\n",
            &fields,
            &Scrubber::default(),
        )
        .unwrap();
        // No HTML escaping, even of < > &.
        assert_eq!(s(&out), "[default]\nid = AKIA1\nkey = s3cr<et>&\n");
    }

    #[test]
    fn template_undefined_variable_is_an_error_naming_it() {
        let fields = f(&[("value", "topsecret-1")]);
        let e = render_template("k={{ value }} {{ nope }}", &fields, &Scrubber::default()).unwrap_err().to_string();
        assert!(e.contains("undefined variable `nope`") && e.contains("it has value"), "{e}");
        assert!(!e.contains("topsecret"), "{e}");
        // Strict: attribute access and filters on undefined values fail too,
        // not only printing.
        assert!(render_template("{% if nope %}x{% endif %}", &fields, &Scrubber::default()).is_err());
        // Globals such as range() are not "missing".
        assert!(
            render_template("{% for i in range(2) %}{{ value }}{% endfor %}", &fields, &Scrubber::default()).is_ok()
        );
    }

    #[test]
    fn template_errors_are_scrubbed() {
        let fields = f(&[("value", "topsecret-1")]);
        let scrub = Scrubber::new(&[&fields]);
        assert_eq!(scrub.scrub("bad topsecret-1 here"), "bad <redacted> here");
        let e = render_template("{{ value | int }}", &fields, &scrub);
        if let Err(e) = e {
            assert!(!e.to_string().contains("topsecret"), "{e}");
        }
        assert!(check_template("{{ value").is_err());
        assert!(check_template("{{ value }}").is_ok());
    }

    #[test]
    fn replace_every_occurrence_byte_for_byte() {
        let new = f(&[("value", "NEW-KEY-2")]);
        let old = f(&[("value", "OLD-KEY-1")]);
        let (out, n) = replace(b"a=OLD-KEY-1\r\nb = \"OLD-KEY-1\"\nOLD-KEY-1", None, &new, &old, "v1").unwrap();
        assert_eq!(n, 3);
        assert_eq!(s(&out), "a=NEW-KEY-2\r\nb = \"NEW-KEY-2\"\nNEW-KEY-2");

        let e = replace(b"nothing here", None, &new, &old, "v1").unwrap_err().to_string();
        assert_eq!(e, "the file does not contain the previous value of field value (version v1)");
        let e = replace(b"x", None, &new, &Fields::default(), "").unwrap_err();
        assert!(matches!(e, RenderError::NoPrevious), "{e}");

        let two = f(&[("id", "A"), ("key", "B")]);
        let e = replace(b"x", None, &two, &two, "v1").unwrap_err().to_string();
        assert!(e.contains("name the field") && e.contains("id, key"), "{e}");
        let (out, _) = replace(b"k=B;", Some("key"), &f(&[("id", "C"), ("key", "D")]), &two, "v1").unwrap();
        assert_eq!(s(&out), "k=D;");
        let e = replace(b"x", Some("nope"), &two, &two, "v1").unwrap_err().to_string();
        assert!(e.contains("no field nope"), "{e}");
    }

    #[test]
    fn env_file_updates_keys_and_keeps_every_other_byte() {
        let before = "# comment = here\r\nOTHER=1\n\nAPI_KEY=old # rotated by rekey\nexport API_KEY = \"old\"\nQUOTED='old'\nAPI_KEYS=untouched\n  TRAIL=x";
        let fields = f(&[("value", "new-Key_2"), ("id", "id-9")]);
        let out = update_env_file(
            before.as_bytes(),
            &keys(&[("API_KEY", "value"), ("QUOTED", "value"), ("NEW_ONE", "id")]),
            &fields,
        )
        .unwrap();
        assert_eq!(
            s(&out),
            "# comment = here\r\nOTHER=1\n\nAPI_KEY=new-Key_2 # rotated by rekey\nexport API_KEY = \"new-Key_2\"\nQUOTED='new-Key_2'\nAPI_KEYS=untouched\n  TRAIL=x\nNEW_ONE=id-9\n"
        );
        // Untouched when no key matches.
        let out = update_env_file(b"A=1\r\nB=2", &keys(&[("B", "value")]), &fields).unwrap();
        assert_eq!(s(&out), "A=1\r\nB=new-Key_2");
    }

    #[test]
    fn env_file_quotes_or_refuses_values_it_cannot_write() {
        let spaced = f(&[("value", "a b$c\"d")]);
        let e = update_env_file(b"K=x\n", &keys(&[("K", "value")]), &spaced).unwrap_err().to_string();
        assert!(e.contains("field value cannot be written to env key K") && !e.contains("a b"), "{e}");
        let out = update_env_file(b"K=\"x\"\n", &keys(&[("K", "value")]), &spaced).unwrap();
        assert_eq!(s(&out), "K=\"a b\\$c\\\"d\"\n");
        // Appended keys get double quotes when they need them.
        let out = update_env_file(b"", &keys(&[("K", "value")]), &spaced).unwrap();
        assert_eq!(s(&out), "K=\"a b\\$c\\\"d\"\n");
        let nl = f(&[("value", "a\nb")]);
        assert!(update_env_file(b"K=\"x\"\n", &keys(&[("K", "value")]), &nl).is_err());
        let e = update_env_file(b"K=x\n", &keys(&[("K", "missing")]), &spaced).unwrap_err().to_string();
        assert!(e.contains("no field missing"), "{e}");
    }

    #[test]
    fn fields_refuse_duplicates_and_fingerprint_independently_of_order() {
        let e = Fields::from_proto(vec![
            SecretField { name: "a".into(), value: b"1".to_vec() },
            SecretField { name: "a".into(), value: b"2".to_vec() },
        ])
        .err()
        .unwrap();
        assert_eq!(e, "field a appears twice");
        let a = f(&[("x", "1"), ("y", "2")]);
        let b = f(&[("y", "2"), ("x", "1")]);
        assert_eq!(a.fingerprint(b"k"), b.fingerprint(b"k"));
        assert_eq!(a.fingerprint(b"k"), fingerprint_fields(b"k", [("x", &b"1"[..]), ("y", &b"2"[..])]));
    }
}
