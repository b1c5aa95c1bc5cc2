//! `http`: API keys of any REST API (a SaaS dashboard's keys) through
//! configured requests: create (method, URL, JSON body template, JSON
//! pointers from the response to the version's id and fields), revoke by id
//! (`{id}` in a URL template), optional deactivate/reactivate by id, an
//! optional list (which also gives `current` and `last_used`), an auth header
//! whose token comes from a file or an environment variable, and a timeout.
//!
//! Idempotency of `create` per rotation id: the ids the list shows are
//! recorded (intent) before the create request, the new key (id and fields,
//! sealed) right after. A replay returns the recorded key; if only the intent
//! is there (the answer was lost), every key the list shows that was not there
//! before is revoked, then a key is created again. Without a list request an
//! orphan cannot be seen: the replay says so in its notes (audited). A
//! response that created a key rekey cannot use (a field missing) has that key
//! deleted at once.
//!
//! Revoke order: many key APIs refuse to delete an active key. Every delete
//! (an orphan's, the old version's, an aborted new version's) deactivates an
//! active key first when a deactivate request is configured — by the list's
//! status when there is a list, else after a DELETE answered 409 Conflict.
//! 404/410 on any id request is [`ProviderError::NotFound`].
//!
//! The list is read with JSON pointers: status values may be strings,
//! booleans or numbers; times go through [`crate::timestamp`] (a value that
//! cannot be read is an error naming the key, the setting and what was
//! found); `last_used_source_pointer` gives the use's source.
//!
//! Errors name the request and the status, with a short excerpt of an error
//! body; a successful create's body is never echoed (it holds the secret), and
//! the auth token and every value the provider knows are redacted.

use crate::credential::Source;
use crate::journal::{Created, External, Journal, create_once};
use crate::timestamp::TimeFormat;
use crate::util::{excerpt, fill, redact};
use crate::{
    CreateRequest, FieldError, LastUsed, NewVersion, Provider, ProviderError, ProviderState, VersionInfo, VersionStatus,
};
use async_trait::async_trait;
use rekey_common::secret::SecretBytes;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const KIND: &str = "http";

fn default_timeout() -> String {
    "30s".into()
}
fn default_auth_header() -> String {
    "Authorization".into()
}
fn default_auth_scheme() -> String {
    "Bearer".into()
}
fn post() -> String {
    "POST".into()
}
fn get() -> String {
    "GET".into()
}
fn slash_id() -> String {
    "/id".into()
}
fn active() -> Vec<Value> {
    vec![Value::String("active".into())]
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Prepended to relative request URLs, e.g. `https://api.example.com`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The auth token: exactly one of these (or none for an open API).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
    /// Header carrying the token (default `Authorization`).
    #[serde(default = "default_auth_header")]
    pub auth_header: String,
    /// Written before the token (default `Bearer`; empty for the bare token).
    #[serde(default = "default_auth_scheme")]
    pub auth_scheme: String,
    /// Other (non-secret) headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Deadline of one request.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    pub create: CreateSpec,
    pub delete: RequestSpec,
    #[serde(default)]
    pub deactivate: Option<RequestSpec>,
    #[serde(default)]
    pub reactivate: Option<RequestSpec>,
    #[serde(default)]
    pub list: Option<ListSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateSpec {
    #[serde(default = "post")]
    pub method: String,
    /// `{secret}`, `{rotation_id}`, `{previous_version}` are replaced.
    pub url: String,
    /// JSON body; the same placeholders are replaced in its strings.
    #[serde(default)]
    pub body: Option<Value>,
    /// JSON pointer to the new key's id in the response (default `/id`).
    #[serde(default = "slash_id")]
    pub id_pointer: String,
    /// Field name → JSON pointer into the response, e.g. `{ value = "/secret" }`.
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// Default: DELETE for `delete`, POST otherwise.
    #[serde(default)]
    pub method: Option<String>,
    /// URL template; `{id}` is the version id (URL-encoded).
    pub url: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListSpec {
    #[serde(default = "get")]
    pub method: String,
    pub url: String,
    /// Pointer to the array of keys in the response (default: the whole body).
    #[serde(default)]
    pub items_pointer: String,
    /// Pointers inside one item.
    #[serde(default = "slash_id")]
    pub id_pointer: String,
    #[serde(default)]
    pub status_pointer: Option<String>,
    /// Status values meaning active (default `["active"]`): strings, booleans
    /// or numbers (`[true]`, `["enabled"]`, `[1]`); anything else is inactive.
    #[serde(default = "active")]
    pub active_values: Vec<Value>,
    /// When the key was created (see `created_format`).
    #[serde(default)]
    pub created_pointer: Option<String>,
    /// How `created_pointer`'s value is written (default `auto`).
    #[serde(default)]
    pub created_format: Option<String>,
    /// When the key was last used (see `last_used_format`); null or absent
    /// means never used.
    #[serde(default)]
    pub last_used_pointer: Option<String>,
    /// `auto` (default: RFC 3339 or unix seconds, with a fraction or not),
    /// `rfc3339`, `unix` or `unix_ms`.
    #[serde(default)]
    pub last_used_format: Option<String>,
    /// Where the last use came from (e.g. `/last_used_ip`), shown to the
    /// operator beside the time.
    #[serde(default)]
    pub last_used_source_pointer: Option<String>,
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

fn check_method(field: &str, m: &str) -> Result<(), FieldError> {
    if METHODS.contains(&m) {
        Ok(())
    } else {
        Err((field.into(), format!("{m:?} is not one of {}", METHODS.join(", "))))
    }
}

fn check_pointer(field: &str, p: &str) -> Result<(), FieldError> {
    crate::util::json_pointer(field, p, true)
}

impl ListSpec {
    /// The pointers and values the list reads: each one able to yield what it is for.
    fn validate(&self) -> Result<(), FieldError> {
        check_pointer("list.items_pointer", &self.items_pointer)?;
        check_pointer("list.id_pointer", &self.id_pointer)?;
        for (f, p) in [
            ("list.status_pointer", &self.status_pointer),
            ("list.created_pointer", &self.created_pointer),
            ("list.last_used_pointer", &self.last_used_pointer),
            ("list.last_used_source_pointer", &self.last_used_source_pointer),
        ] {
            if let Some(p) = p {
                // An item is an object: the whole item is never a time, a status or a source.
                crate::util::json_pointer(f, p, false)?;
            }
        }
        if self.active_values.is_empty() {
            return Err(("list.active_values".into(), "list at least one value meaning active".into()));
        }
        for (i, v) in self.active_values.iter().enumerate() {
            if !matches!(v, Value::String(_) | Value::Bool(_) | Value::Number(_)) {
                return Err((
                    format!("list.active_values[{i}]"),
                    format!("found {}, expected a string, a boolean or a number", crate::timestamp::describe(v)),
                ));
            }
        }
        let (created, used) = (self.created_pointer.is_some(), self.last_used_pointer.is_some());
        for (f, set, pointed, pointer) in [
            ("list.created_format", self.created_format.is_some(), created, "list.created_pointer"),
            ("list.last_used_format", self.last_used_format.is_some(), used, "list.last_used_pointer"),
            ("list.last_used_source_pointer", self.last_used_source_pointer.is_some(), used, "list.last_used_pointer"),
        ] {
            if set && !pointed {
                return Err((f.into(), format!("has no effect without {pointer}")));
            }
        }
        for (f, name) in
            [("list.created_format", &self.created_format), ("list.last_used_format", &self.last_used_format)]
        {
            if let Some(name) = name {
                TimeFormat::from_name(name).map_err(|m| (f.to_string(), m))?;
            }
        }
        Ok(())
    }

    /// A validated format setting (default `auto`).
    fn format(name: &Option<String>) -> TimeFormat {
        name.as_deref().and_then(|n| TimeFormat::from_name(n).ok()).unwrap_or_default()
    }

    /// Whether the status value `v` (at `status_pointer`) means active: equal
    /// as JSON, or as text (`"true"` matches `true`, `"1"` matches `1`).
    fn is_active(&self, v: &Value) -> bool {
        let text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        self.active_values.iter().any(|a| {
            a == v
                || matches!((a.as_f64(), v.as_f64()), (Some(x), Some(y)) if x == y)
                || (text(a).is_some() && text(a) == text(v))
        })
    }
}

impl HttpConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        crate::util::resolve_opt(base, &mut self.token_file);
    }

    fn token_source(&self) -> Result<Option<Source>, FieldError> {
        Source::pick("token", &self.token_file, &self.token_env, false)
    }

    pub fn can_deactivate(&self) -> bool {
        self.deactivate.is_some()
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        if let Some(b) = &self.base_url
            && !(b.starts_with("http://") || b.starts_with("https://"))
        {
            return Err(("base_url".into(), format!("{b:?} must start with http:// or https://")));
        }
        let url_ok = |field: &str, u: &str| -> Result<(), FieldError> {
            if u.starts_with("http://") || u.starts_with("https://") || (u.starts_with('/') && self.base_url.is_some())
            {
                Ok(())
            } else {
                Err((
                    field.into(),
                    format!("{u:?} must be an absolute http(s) URL, or a path starting with / and base_url set"),
                ))
            }
        };
        if let Some(t) = self.token_source()? {
            t.check("token")?;
        }
        if self.auth_header.is_empty() || !self.auth_header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(("auth_header".into(), format!("{:?} is not a header name", self.auth_header)));
        }
        for k in self.headers.keys() {
            if k.eq_ignore_ascii_case(&self.auth_header) {
                return Err((
                    format!("headers.{k}"),
                    "credentials never go in the config: use token_file or token_env".into(),
                ));
            }
        }
        crate::util::duration("timeout", &self.timeout, Duration::from_secs(1), Duration::from_secs(600))?;
        check_method("create.method", &self.create.method)?;
        url_ok("create.url", &self.create.url)?;
        check_pointer("create.id_pointer", &self.create.id_pointer)?;
        if self.create.fields.is_empty() {
            return Err((
                "create.fields".into(),
                "map at least one field to a pointer, e.g. { value = \"/secret\" }".into(),
            ));
        }
        for (name, p) in &self.create.fields {
            check_pointer(&format!("create.fields.{name}"), p)?;
        }
        for (name, spec) in [
            ("delete", Some(&self.delete)),
            ("deactivate", self.deactivate.as_ref()),
            ("reactivate", self.reactivate.as_ref()),
        ] {
            let Some(spec) = spec else { continue };
            if let Some(m) = &spec.method {
                check_method(&format!("{name}.method"), m)?;
            }
            url_ok(&format!("{name}.url"), &spec.url)?;
            if !spec.url.contains("{id}") {
                return Err((format!("{name}.url"), "must contain {id}".into()));
            }
        }
        if let Some(l) = &self.list {
            check_method("list.method", &l.method)?;
            url_ok("list.url", &l.url)?;
            l.validate()?;
        }
        Ok(())
    }
}

pub struct HttpProvider {
    config: HttpConfig,
    token: Option<Source>,
    client: reqwest::Client,
    state: Arc<dyn ProviderState>,
}

/// Percent-encodes a value for a URL path segment.
fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Replaces placeholders in every string of a JSON template.
fn fill_json(v: &Value, vars: &[(&str, &str)]) -> Value {
    match v {
        Value::String(s) => Value::String(fill(s, vars)),
        Value::Array(a) => Value::Array(a.iter().map(|x| fill_json(x, vars)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), fill_json(x, vars))).collect()),
        other => other.clone(),
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The top-level keys of a JSON object (safe to show: names, not values).
fn shape(v: &Value) -> String {
    match v {
        Value::Object(o) => format!("an object with keys {}", o.keys().cloned().collect::<Vec<_>>().join(", ")),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::String(_) => "a string".into(),
        Value::Number(_) => "a number".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Null => "null".into(),
    }
}

struct Reply {
    status: reqwest::StatusCode,
    body: Vec<u8>,
}

impl HttpProvider {
    pub fn new(config: HttpConfig, state: Arc<dyn ProviderState>) -> Result<Self, ProviderError> {
        rekey_common::tls::install_crypto_provider();
        let timeout = crate::util::duration_or(&config.timeout, Duration::from_secs(30));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| ProviderError::failed(KIND, format!("http client: {e}")))?;
        let token = config.token_source().map_err(|(f, m)| ProviderError::failed(KIND, format!("{f}: {m}")))?;
        Ok(HttpProvider { config, token, client, state })
    }

    fn url(&self, template: &str, vars: &[(&str, &str)]) -> String {
        let encoded: Vec<(&str, String)> = vars.iter().map(|(k, v)| (*k, encode_segment(v))).collect();
        let refs: Vec<(&str, &str)> = encoded.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let path = fill(template, &refs);
        match (&self.config.base_url, path.starts_with('/')) {
            (Some(b), true) => format!("{}{path}", b.trim_end_matches('/')),
            _ => path,
        }
    }

    fn token(&self) -> Result<Option<SecretBytes>, ProviderError> {
        self.token.as_ref().map(|s| s.read().map_err(|m| ProviderError::failed(KIND, m))).transpose()
    }

    /// Values to redact from anything shown: the token and what the journal holds.
    fn redact(&self, text: &str, token: Option<&SecretBytes>) -> String {
        let known = self.journal().known_values();
        let mut secrets: Vec<&[u8]> = known.iter().map(|s| s.as_bytes()).collect();
        if let Some(t) = token {
            secrets.push(t.expose());
        }
        redact(text, &secrets)
    }

    async fn send(&self, method: &str, url: &str, body: Option<&Value>) -> Result<Reply, ProviderError> {
        let token = self.token()?;
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| ProviderError::failed(KIND, format!("invalid method {method}")))?;
        let mut rq = self.client.request(m, url).header("accept", "application/json");
        for (k, v) in &self.config.headers {
            rq = rq.header(k, v);
        }
        if let Some(t) = &token {
            let t = std::str::from_utf8(t.expose())
                .map_err(|_| ProviderError::failed(KIND, "the API token is not text"))?;
            let value = if self.config.auth_scheme.is_empty() {
                t.to_string()
            } else {
                format!("{} {t}", self.config.auth_scheme)
            };
            let mut hv = reqwest::header::HeaderValue::from_str(&value)
                .map_err(|_| ProviderError::failed(KIND, "the API token is not a valid header value"))?;
            hv.set_sensitive(true);
            rq = rq.header(&self.config.auth_header, hv);
        }
        if let Some(b) = body {
            rq = rq.header("content-type", "application/json").body(serde_json::to_vec(b).expect("json"));
        }
        let what = format!("{method} {url}");
        let resp = rq.send().await.map_err(|e| {
            let reason = if e.is_timeout() {
                format!("timed out after {}", self.config.timeout)
            } else if e.is_connect() {
                format!("cannot connect: {}", source_chain(&e))
            } else {
                source_chain(&e)
            };
            ProviderError::transient(KIND, self.redact(&format!("{what}: {reason}"), token.as_ref()))
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            let reason =
                if e.is_timeout() { format!("timed out after {}", self.config.timeout) } else { source_chain(&e) };
            ProviderError::transient(KIND, format!("{what}: reading the response: {reason}"))
        })?;
        Ok(Reply { status, body: body.to_vec() })
    }

    /// An error for a non-2xx answer (body excerpt redacted).
    fn status_error(&self, what: &str, r: &Reply) -> ProviderError {
        let token = self.token().ok().flatten();
        let body = self.redact(&excerpt(&String::from_utf8_lossy(&r.body), 200), token.as_ref());
        let body = if body.is_empty() { String::new() } else { format!(": {body}") };
        let code = r.status.as_u16();
        let hint = match code {
            401 | 403 => match &self.token {
                Some(s) => format!(" (the API refused rekey's credentials from {})", s.describe()),
                None => " (the API wants credentials: set token_file or token_env)".into(),
            },
            _ => String::new(),
        };
        let message = format!("{what} answered {}{hint}{body}", r.status);
        if r.status.is_server_error() || code == 429 || code == 408 {
            ProviderError::transient(KIND, message)
        } else {
            ProviderError::failed(KIND, message)
        }
    }

    /// Runs an id request (delete, deactivate, reactivate); 404 is NotFound.
    async fn by_id(&self, spec: &RequestSpec, default_method: &str, id: &str) -> Result<(), ProviderError> {
        self.by_id_unless(spec, default_method, id, None).await.map(|_| ())
    }

    /// [`Self::by_id`], except that an answer with status `unless` is
    /// returned as `Ok(false)` instead of an error.
    async fn by_id_unless(
        &self,
        spec: &RequestSpec,
        default_method: &str,
        id: &str,
        unless: Option<reqwest::StatusCode>,
    ) -> Result<bool, ProviderError> {
        let method = spec.method.as_deref().unwrap_or(default_method);
        let url = self.url(&spec.url, &[("id", id)]);
        let r = self.send(method, &url, None).await?;
        if r.status.is_success() {
            Ok(true)
        } else if r.status == reqwest::StatusCode::NOT_FOUND || r.status == reqwest::StatusCode::GONE {
            Err(ProviderError::NotFound { provider: KIND, version: id.to_string() })
        } else if Some(r.status) == unless {
            Ok(false)
        } else {
            Err(self.status_error(&format!("{method} {url}"), &r))
        }
    }

    /// The list, with each item's raw JSON (for last-used lookups).
    async fn list_items(&self) -> Result<Option<Vec<(VersionInfo, Value)>>, ProviderError> {
        let Some(l) = &self.config.list else { return Ok(None) };
        let url = self.url(&l.url, &[]);
        let what = format!("{} {url}", l.method);
        let r = self.send(&l.method, &url, None).await?;
        if !r.status.is_success() {
            return Err(self.status_error(&what, &r));
        }
        let v: Value = serde_json::from_slice(&r.body).map_err(|_| {
            ProviderError::failed(KIND, format!("{what} answered {} with a body that is not JSON", r.status))
        })?;
        let items = v.pointer(&l.items_pointer).and_then(Value::as_array).ok_or_else(|| {
            ProviderError::failed(
                KIND,
                format!("{what}: no array at {:?} in the response ({})", l.items_pointer, shape(&v)),
            )
        })?;
        let mut out = Vec::new();
        for item in items {
            let id = item.pointer(&l.id_pointer).and_then(scalar_string).ok_or_else(|| {
                ProviderError::failed(KIND, format!("{what}: an item has no id at {} ({})", l.id_pointer, shape(item)))
            })?;
            let status = match &l.status_pointer {
                None => VersionStatus::Active,
                Some(p) => match item.pointer(p) {
                    Some(v) if l.is_active(v) => VersionStatus::Active,
                    Some(_) => VersionStatus::Inactive,
                    None => {
                        return Err(ProviderError::failed(
                            KIND,
                            format!(
                                "{what}: key {id} has no status at {p} ({}); check list.status_pointer",
                                shape(item)
                            ),
                        ));
                    }
                },
            };
            let created_unix = match l.created_pointer.as_deref().and_then(|p| item.pointer(p).map(|v| (p, v))) {
                None | Some((_, Value::Null)) => None,
                Some((p, v)) => {
                    let t =
                        self.time_at(&what, &id, "list.created_pointer", p, v, ListSpec::format(&l.created_format))?;
                    Some(t.at_ms.div_euclid(1000))
                }
            };
            out.push((VersionInfo { id, status, created_unix }, item.clone()));
        }
        Ok(Some(out))
    }

    /// Reads a timestamp of key `id` at pointer `p`; an unreadable value is
    /// an error naming the setting, the pointer and what was found.
    fn time_at(
        &self,
        what: &str,
        id: &str,
        setting: &str,
        p: &str,
        v: &Value,
        format: TimeFormat,
    ) -> Result<crate::timestamp::Stamp, ProviderError> {
        crate::timestamp::parse(v, format).map_err(|e| {
            let token = self.token().ok().flatten();
            let e = self.redact(&e, token.as_ref());
            ProviderError::failed(KIND, format!("{what}: key {id}: {setting} {p}: {e}"))
        })
    }

    /// Where the last use came from, from `last_used_source_pointer` (a
    /// scalar, redacted and cut short; anything else is not a source).
    fn source_of(&self, item: &Value) -> Option<String> {
        let p = self.config.list.as_ref()?.last_used_source_pointer.as_deref()?;
        let text = match item.pointer(p)? {
            Value::String(s) if !s.trim().is_empty() => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let token = self.token().ok().flatten();
        Some(self.redact(&excerpt(&text, 200), token.as_ref()))
    }

    /// Deletes key `id` in the API's revoke order: an active key is
    /// deactivated first when a deactivate request is configured (with a
    /// list, its status says whether; without one, or for a key the list
    /// does not show, a DELETE answered 409 Conflict is retried after
    /// deactivating). NotFound when the API says it is gone.
    async fn revoke(&self, id: &str, listed: Option<VersionStatus>) -> Result<(), ProviderError> {
        let status = match (listed, &self.config.deactivate) {
            (Some(s), _) => Some(s),
            // Absent from the list (which may be paginated): the DELETE decides.
            (None, Some(_)) if self.config.list.is_some() => {
                let items = self.list_items().await?.unwrap_or_default();
                items.into_iter().find(|(v, _)| v.id == id).map(|(v, _)| v.status)
            }
            _ => None,
        };
        if let (Some(VersionStatus::Active), Some(spec)) = (status, &self.config.deactivate) {
            self.by_id(spec, "POST", id).await?;
            tracing::info!(key = %id, "deactivated before deleting");
        }
        let fallback = match (status, &self.config.deactivate) {
            (None, Some(spec)) => Some(spec),
            _ => None,
        };
        let conflict = fallback.map(|_| reqwest::StatusCode::CONFLICT);
        if self.by_id_unless(&self.config.delete, "DELETE", id, conflict).await? {
            return Ok(());
        }
        // 409: the API wants the key deactivated first.
        self.by_id(fallback.expect("409 only tolerated with a deactivate request"), "POST", id).await?;
        self.by_id(&self.config.delete, "DELETE", id).await
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    excerpt(&rekey_common::error::chain(e), 300)
}

#[async_trait]
impl External for HttpProvider {
    const NOUN: &'static str = "key";

    fn journal(&self) -> Journal<'_> {
        Journal { provider: KIND, state: &*self.state }
    }

    async fn versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError> {
        Ok(self.list_items().await?.map(|items| items.into_iter().map(|(v, _)| v).collect()))
    }

    async fn delete_orphan(&self, orphan: &VersionInfo) -> Result<(), ProviderError> {
        match self.revoke(&orphan.id, Some(orphan.status)).await {
            Err(ProviderError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    fn unlisted_orphan_note(&self) -> Option<String> {
        Some(
            "an interrupted attempt of this rotation may have left a key at the API that rekey cannot see (no list request configured); check the API's keys"
                .into(),
        )
    }

    /// The create request; the response is read for the id and fields and
    /// never echoed (it holds the new secret).
    async fn create_new(&self, req: &CreateRequest, _replay: bool) -> Result<(Created, Vec<String>), ProviderError> {
        let prev = req.previous_version.clone().unwrap_or_default();
        let vars = [
            ("secret", req.secret.as_str()),
            ("rotation_id", req.rotation_id.as_str()),
            ("previous_version", prev.as_str()),
        ];
        let spec = &self.config.create;
        let url = self.url(&spec.url, &vars);
        let body = spec.body.as_ref().map(|b| fill_json(b, &vars));
        let what = format!("{} {url}", spec.method);
        let r = self.send(&spec.method, &url, body.as_ref()).await?;
        if !r.status.is_success() {
            return Err(self.status_error(&what, &r));
        }
        // Never echo this body: it holds the new secret.
        let v: Value = serde_json::from_slice(&r.body).map_err(|_| {
            ProviderError::failed(KIND, format!("{what} answered {} with a body that is not JSON", r.status))
        })?;
        let id = v.pointer(&spec.id_pointer).and_then(scalar_string).ok_or_else(|| {
            ProviderError::failed(
                KIND,
                format!(
                    "{what}: the response has no id at {} ({}); if a key was created, delete it at the API",
                    spec.id_pointer,
                    shape(&v)
                ),
            )
        })?;
        let mut fields = Vec::new();
        for (name, p) in &spec.fields {
            match v.pointer(p).and_then(scalar_string) {
                Some(s) => fields.push((name.clone(), s)),
                None => {
                    let cleanup = match self.revoke(&id, None).await {
                        Ok(()) | Err(ProviderError::NotFound { .. }) => format!("the key {id} it created was deleted"),
                        Err(e) => format!("deleting the key {id} it created failed too: {e}"),
                    };
                    return Err(ProviderError::failed(
                        KIND,
                        format!(
                            "{what}: the response has no string at {p} for field {name} ({}); {cleanup}",
                            shape(&v)
                        ),
                    ));
                }
            }
        }
        tracing::info!(key = %id, "key created");
        Ok((Created { id, fields, created_unix: None }, vec![]))
    }
}

#[async_trait]
impl Provider for HttpProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        let Some(items) = self.list_items().await? else { return Ok(None) };
        let active: Vec<VersionInfo> =
            items.into_iter().map(|(v, _)| v).filter(|v| v.status == VersionStatus::Active).collect();
        Ok(if active.len() == 1 { active.into_iter().next() } else { None })
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        create_once(self, req).await
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        match &self.config.deactivate {
            Some(spec) => self.by_id(spec, "POST", version).await,
            None => Err(ProviderError::failed(
                KIND,
                "no deactivate request is configured; configure provider.deactivate or set revocation.deactivate = false",
            )),
        }
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        match &self.config.reactivate {
            Some(spec) => self.by_id(spec, "POST", version).await,
            None => Err(ProviderError::failed(KIND, "no reactivate request is configured")),
        }
    }

    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        let result = self.revoke(version, None).await;
        if matches!(result, Ok(()) | Err(ProviderError::NotFound { .. })) {
            self.journal().forget_version(version)?;
        }
        result
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        match self.list_items().await? {
            Some(items) => Ok(items.into_iter().map(|(v, _)| v).collect()),
            None => Err(ProviderError::failed(KIND, "no list request is configured")),
        }
    }

    async fn last_used(&self, version: &str) -> Result<LastUsed, ProviderError> {
        let Some(l) = &self.config.list else { return Ok(LastUsed::Unknown) };
        let Some(p) = &l.last_used_pointer else { return Ok(LastUsed::Unknown) };
        let items = self.list_items().await?.unwrap_or_default();
        let (_, item) = items
            .into_iter()
            .find(|(v, _)| v.id == version)
            .ok_or_else(|| ProviderError::NotFound { provider: KIND, version: version.to_string() })?;
        Ok(match item.pointer(p) {
            None | Some(Value::Null) => LastUsed::Never,
            Some(v) => {
                let what = format!("{} {}", l.method, self.url(&l.url, &[]));
                let format = ListSpec::format(&l.last_used_format);
                let t = self.time_at(&what, version, "list.last_used_pointer", p, v, format)?;
                LastUsed::at(t.at_ms, t.resolution_ms, self.source_of(&item))
            }
        })
    }

    fn field_names(&self) -> Vec<String> {
        self.config.create.fields.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn demo_config(extra: &str) -> HttpConfig {
        toml::from_str(&format!(
            r#"
base_url = "http://127.0.0.1:9"
token_env = "PATH"
create = {{ url = "/v1/keys", body = {{ name = "rekey-{{secret}}-{{rotation_id}}" }}, fields = {{ value = "/secret" }} }}
delete = {{ url = "/v1/keys/{{id}}" }}
{extra}
"#
        ))
        .unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        demo_config("").validate().unwrap();
        let mut c = demo_config("");
        c.delete.url = "/v1/keys".into();
        assert_eq!(c.validate().unwrap_err().0, "delete.url");
        let mut c = demo_config("");
        c.create.fields.insert("value".into(), "secret".into());
        assert_eq!(c.validate().unwrap_err().0, "create.fields.value");
        let mut c = demo_config("");
        c.headers.insert("authorization".into(), "Bearer x".into());
        assert_eq!(c.validate().unwrap_err().0, "headers.authorization");
        let mut c = demo_config("");
        c.base_url = None;
        assert_eq!(c.validate().unwrap_err().0, "create.url");
        let mut c = demo_config("");
        c.token_env = Some("REKEY_TEST_UNSET_TOKEN".into());
        assert_eq!(c.validate().unwrap_err().0, "token_env");
    }

    #[test]
    fn usage_settings_that_can_never_yield_a_time_are_refused_naming_the_field() {
        let list = |extra: &str| demo_config(&format!("list = {{ url = \"/v1/keys\", {extra} }}"));
        list("last_used_pointer = \"/last_used_at\", last_used_format = \"unix_ms\"").validate().unwrap();
        let cases = [
            ("last_used_pointer = \"last_used_at\"", "list.last_used_pointer", "must start with /"),
            ("last_used_pointer = \"\"", "list.last_used_pointer", "not be empty"),
            ("last_used_pointer = \"/a~2b\"", "list.last_used_pointer", "~0"),
            ("created_pointer = \"created\"", "list.created_pointer", "must start with /"),
            ("last_used_format = \"unix\"", "list.last_used_format", "without list.last_used_pointer"),
            ("last_used_source_pointer = \"/ip\"", "list.last_used_source_pointer", "without list.last_used_pointer"),
            ("active_values = []", "list.active_values", "at least one"),
            ("active_values = [{ a = 1 }]", "list.active_values[0]", "expected a string, a boolean or a number"),
        ];
        for (extra, field, words) in cases {
            let (f, m) = list(extra).validate().unwrap_err();
            assert_eq!(f, field, "{extra}: {m}");
            assert!(m.contains(words), "{extra}: {m}");
        }
        // A format that does not exist, naming the choices.
        let (f, m) = list("last_used_pointer = \"/t\", last_used_format = \"epoch\"").validate().unwrap_err();
        assert_eq!(f, "list.last_used_format");
        assert!(m.contains("\"epoch\" is not a timestamp format") && m.contains("unix_ms"), "{m}");
        let (f, _) = list("created_pointer = \"/c\", created_format = \"secs\"").validate().unwrap_err();
        assert_eq!(f, "list.created_format");
    }

    #[test]
    fn status_values_match_strings_booleans_and_numbers() {
        let spec = |values: &str| {
            demo_config(&format!("list = {{ url = \"/k\", status_pointer = \"/s\", active_values = {values} }}"))
                .list
                .unwrap()
        };
        use serde_json::json;
        assert!(spec("[true]").is_active(&json!(true)) && !spec("[true]").is_active(&json!(false)));
        assert!(spec("[1]").is_active(&json!(1)) && spec("[1]").is_active(&json!(1.0)));
        assert!(!spec("[1]").is_active(&json!(0)));
        assert!(spec("[\"enabled\"]").is_active(&json!("enabled")));
        assert!(spec("[\"true\"]").is_active(&json!(true)), "text equality of scalars");
        assert!(!spec("[\"active\"]").is_active(&json!(null)));
        assert!(spec("[\"active\", \"ACTIVE\"]").is_active(&json!("ACTIVE")));
    }

    /// A real HTTP server on loopback answering from `route` (method, path)
    /// → (status line, JSON body); records every request line.
    fn serve(
        route: impl Fn(&str, &str) -> (&'static str, String) + Send + Sync + 'static,
    ) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (seen2, route) = (seen.clone(), Arc::new(route));
        std::thread::spawn(move || {
            for conn in l.incoming().take(100).flatten() {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let _ = r.read_exact(&mut vec![0; len]);
                let mut parts = line.split_whitespace();
                let (m, p) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let (status, body) = route(&m, &p);
                seen2.lock().unwrap().push(format!("{m} {p} {}", &status[..3]));
                let mut conn = conn;
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, seen)
    }

    fn provider(url: &str, extra: &str) -> HttpProvider {
        let mut c = demo_config(extra);
        c.base_url = Some(url.to_string());
        c.validate().unwrap();
        HttpProvider::new(c, Arc::new(crate::testing::Mem::default())).unwrap()
    }

    #[tokio::test]
    async fn booleans_numbers_epochs_and_fractions_are_read_from_a_real_server() {
        let body = serde_json::json!({ "data": [
            { "id": "k1", "enabled": true, "created": 1714564800, "used": 1714564900.25, "ip": "10.0.0.7" },
            { "id": "k2", "enabled": false, "created": "2024-05-01T12:00:00Z", "used": null },
            { "id": "k3", "enabled": 1, "created": 1714564800.5, "used": "yesterday" },
            { "id": "k4", "enabled": true, "created": 1714564800, "used": 1714564900250i64 },
        ]})
        .to_string();
        let (url, _) = serve(move |_, _| ("200 OK", body.clone()));
        let p = provider(
            &url,
            "list = { url = \"/v1/keys\", items_pointer = \"/data\", status_pointer = \"/enabled\", active_values = [true, 1], created_pointer = \"/created\", last_used_pointer = \"/used\", last_used_source_pointer = \"/ip\" }",
        );
        let list = p.list().await.unwrap();
        let got: Vec<(&str, VersionStatus, Option<i64>)> =
            list.iter().map(|v| (v.id.as_str(), v.status, v.created_unix)).collect();
        use VersionStatus::{Active, Inactive};
        assert_eq!(
            got,
            [
                ("k1", Active, Some(1714564800)),
                ("k2", Inactive, Some(1714564800)),
                ("k3", Active, Some(1714564800)),
                ("k4", Active, Some(1714564800))
            ]
        );
        assert_eq!(p.last_used("k1").await.unwrap(), LastUsed::at(1_714_564_900_250, 10, Some("10.0.0.7".into())));
        assert_eq!(p.last_used("k2").await.unwrap(), LastUsed::Never);
        // Present but unreadable: an error naming the key, the pointer and what was found.
        let e = p.last_used("k3").await.unwrap_err().to_string();
        assert!(e.contains("key k3: list.last_used_pointer /used: found the string \"yesterday\""), "{e}");
        let e = p.last_used("k4").await.unwrap_err().to_string();
        assert!(e.contains("unix_ms"), "milliseconds are not guessed: {e}");
        assert!(matches!(p.last_used("k9").await, Err(ProviderError::NotFound { .. })));
        assert_eq!(p.field_names(), ["value"]);
    }

    #[tokio::test]
    async fn milliseconds_read_with_their_format_and_a_missing_status_is_an_error() {
        let body = r#"[{"id":"k1","state":"on","used":1714564900250}]"#;
        let (url, _) = serve(move |_, _| ("200 OK", body.to_string()));
        let p =
            provider(&url, "list = { url = \"/k\", last_used_pointer = \"/used\", last_used_format = \"unix_ms\" }");
        assert_eq!(p.last_used("k1").await.unwrap(), LastUsed::at(1_714_564_900_250, 1, None));
        let p = provider(&url, "list = { url = \"/k\", status_pointer = \"/status\" }");
        let e = p.list().await.unwrap_err().to_string();
        assert!(e.contains("key k1 has no status at /status"), "{e}");
    }

    #[tokio::test]
    async fn delete_follows_the_revoke_order_with_and_without_a_list() {
        // An API that refuses to delete an active key, like the demo API.
        let state = Arc::new(std::sync::Mutex::new(BTreeMap::from([
            ("a".to_string(), true),
            ("b".to_string(), true),
            ("c".to_string(), false),
        ])));
        let st = state.clone();
        let (url, seen) = serve(move |m, p| {
            let mut keys = st.lock().unwrap();
            let id = p.trim_start_matches("/v1/keys/").trim_end_matches("/deactivate").to_string();
            match (m, p.ends_with("/deactivate")) {
                ("GET", _) => {
                    let items: Vec<Value> = keys
                        .iter()
                        .map(|(k, a)| serde_json::json!({ "id": k, "status": if *a { "active" } else { "inactive" } }))
                        .collect();
                    ("200 OK", Value::Array(items).to_string())
                }
                (_, true) => match keys.get_mut(&id) {
                    Some(a) => {
                        *a = false;
                        ("200 OK", "{}".into())
                    }
                    None => ("404 Not Found", "{}".into()),
                },
                _ => match keys.get(&id) {
                    Some(true) => ("409 Conflict", r#"{"error":"key is active; deactivate first"}"#.into()),
                    Some(false) => {
                        keys.remove(&id);
                        ("204 No Content", String::new())
                    }
                    None => ("404 Not Found", "{}".into()),
                },
            }
        });
        let deactivate = "deactivate = { url = \"/v1/keys/{id}/deactivate\" }";
        let with_list =
            provider(&url, &format!("{deactivate}\nlist = {{ url = \"/v1/keys\", status_pointer = \"/status\" }}"));
        with_list.delete("a").await.unwrap();
        with_list.delete("c").await.unwrap();
        assert!(matches!(with_list.delete("a").await, Err(ProviderError::NotFound { .. })));
        let requests = std::mem::take(&mut *seen.lock().unwrap());
        assert!(!requests.iter().any(|r| r.ends_with(" 409")), "a refused DELETE with a list: {requests:?}");
        assert!(requests.contains(&"POST /v1/keys/a/deactivate 200".to_string()), "{requests:?}");
        assert!(
            !requests.iter().any(|r| r.starts_with("POST /v1/keys/c/")),
            "an inactive key is not deactivated again"
        );
        // Without a list, the API's 409 tells rekey to deactivate first.
        let no_list = provider(&url, deactivate);
        no_list.delete("b").await.unwrap();
        assert!(matches!(no_list.delete("b").await, Err(ProviderError::NotFound { .. })));
        assert!(state.lock().unwrap().is_empty());
        // Without a deactivate request, the refusal is the error.
        state.lock().unwrap().insert("d".into(), true);
        let e = provider(&url, "").delete("d").await.unwrap_err().to_string();
        assert!(e.contains("409 Conflict") && e.contains("deactivate first"), "{e}");
        assert!(matches!(provider(&url, "").deactivate("d").await, Err(ProviderError::Failed { .. })));
        assert!(matches!(no_list.deactivate("zz").await, Err(ProviderError::NotFound { .. })));
    }

    #[test]
    fn templates_fill_and_encode() {
        let p = HttpProvider::new(demo_config(""), Arc::new(crate::testing::Mem::default())).unwrap();
        assert_eq!(p.url("/v1/keys/{id}", &[("id", "a b/c")]), "http://127.0.0.1:9/v1/keys/a%20b%2Fc");
        let body = fill_json(p.config.create.body.as_ref().unwrap(), &[("secret", "s"), ("rotation_id", "rot-1")]);
        assert_eq!(body, serde_json::json!({ "name": "rekey-s-rot-1" }));
    }
}
