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
//! before is deleted, then a key is created again. Without a list request an
//! orphan cannot be seen: the replay says so in its notes (audited). A
//! response that created a key rekey cannot use (a field missing) has that key
//! deleted at once.
//!
//! Errors name the request and the status, with a short excerpt of an error
//! body; a successful create's body is never echoed (it holds the secret), and
//! the auth token and every value the provider knows are redacted.

use crate::credential::Source;
use crate::journal::{Created, External, Journal, create_once};
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
fn active() -> Vec<String> {
    vec!["active".into()]
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
    /// Status values meaning active (default `["active"]`); anything else is inactive.
    #[serde(default = "active")]
    pub active_values: Vec<String>,
    /// Unix seconds or an RFC 3339 string.
    #[serde(default)]
    pub created_pointer: Option<String>,
    /// Unix seconds or an RFC 3339 string; null means never used.
    #[serde(default)]
    pub last_used_pointer: Option<String>,
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
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err((field.into(), format!("{p:?} is not a JSON pointer (e.g. /data/id)")))
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
            check_pointer("list.items_pointer", &l.items_pointer)?;
            check_pointer("list.id_pointer", &l.id_pointer)?;
            for (f, p) in [
                ("list.status_pointer", &l.status_pointer),
                ("list.created_pointer", &l.created_pointer),
                ("list.last_used_pointer", &l.last_used_pointer),
            ] {
                if let Some(p) = p {
                    check_pointer(f, p)?;
                }
            }
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

fn time_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => humantime::parse_rfc3339_weak(s.trim_end_matches('Z').split('.').next()?)
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs() as i64),
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
        let method = spec.method.as_deref().unwrap_or(default_method);
        let url = self.url(&spec.url, &[("id", id)]);
        let r = self.send(method, &url, None).await?;
        if r.status.is_success() {
            Ok(())
        } else if r.status == reqwest::StatusCode::NOT_FOUND || r.status == reqwest::StatusCode::GONE {
            Err(ProviderError::NotFound { provider: KIND, version: id.to_string() })
        } else {
            Err(self.status_error(&format!("{method} {url}"), &r))
        }
    }

    async fn delete_id(&self, id: &str) -> Result<(), ProviderError> {
        match self.by_id(&self.config.delete, "DELETE", id).await {
            Err(ProviderError::NotFound { .. }) => Ok(()),
            other => other,
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
                Some(p) => match item.pointer(p).and_then(scalar_string) {
                    Some(s) if l.active_values.contains(&s) => VersionStatus::Active,
                    _ => VersionStatus::Inactive,
                },
            };
            let created_unix = l.created_pointer.as_deref().and_then(|p| item.pointer(p)).and_then(time_of);
            out.push((VersionInfo { id, status, created_unix }, item.clone()));
        }
        Ok(Some(out))
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

    async fn delete_orphan(&self, id: &str) -> Result<(), ProviderError> {
        self.delete_id(id).await
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
                    let cleanup = match self.delete_id(&id).await {
                        Ok(()) => format!("the key {id} it created was deleted"),
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
        self.delete_id(version).await?;
        self.journal().forget_version(version)
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        match self.list_items().await? {
            Some(items) => Ok(items.into_iter().map(|(v, _)| v).collect()),
            None => Err(ProviderError::failed(KIND, "no list request is configured")),
        }
    }

    async fn last_used(&self, version: &str) -> Result<LastUsed, ProviderError> {
        let Some(p) = self.config.list.as_ref().and_then(|l| l.last_used_pointer.clone()) else {
            return Ok(LastUsed::Unknown);
        };
        let items = self.list_items().await?.unwrap_or_default();
        let (_, item) = items
            .into_iter()
            .find(|(v, _)| v.id == version)
            .ok_or_else(|| ProviderError::NotFound { provider: KIND, version: version.to_string() })?;
        Ok(match item.pointer(&p) {
            None | Some(Value::Null) => LastUsed::Never,
            Some(v) => time_of(v).map(LastUsed::At).unwrap_or(LastUsed::Unknown),
        })
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
    fn templates_fill_and_encode() {
        let p = HttpProvider::new(demo_config(""), Arc::new(crate::testing::Mem::default())).unwrap();
        assert_eq!(p.url("/v1/keys/{id}", &[("id", "a b/c")]), "http://127.0.0.1:9/v1/keys/a%20b%2Fc");
        let body = fill_json(p.config.create.body.as_ref().unwrap(), &[("secret", "s"), ("rotation_id", "rot-1")]);
        assert_eq!(body, serde_json::json!({ "name": "rekey-s-rot-1" }));
        assert_eq!(time_of(&serde_json::json!("1970-01-01T00:00:10Z")), Some(10));
        assert_eq!(time_of(&serde_json::json!(12)), Some(12));
    }
}
