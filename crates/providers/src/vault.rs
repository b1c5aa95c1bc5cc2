//! `vault`: a secret kept in Vault/OpenBao KV v2, as a provider and as a sink.
//!
//! **Provider.** The secret lives at one KV path; a version is a KV version
//! (`kv-3`). `create` generates a value locally (the `random` generator:
//! length, alphabet, format, prefix) and writes it as a new KV version;
//! `deactivate` soft-deletes that KV version (`reactivate` undeletes it),
//! `delete` destroys it. The path's custom metadata records which rotation
//! wrote the latest version, with the rekey version id and the time.
//!
//! Idempotency of `create` per rotation id: the value is chosen and recorded
//! (sealed, in the provider state) together with the KV version it replaces,
//! before writing with check-and-set on that version. A replay finds the
//! recorded KV version, or looks for the recorded value among the versions
//! written since (a write whose answer was lost), or writes it again: one
//! rotation never leaves two KV versions.
//!
//! **Sink.** `sinks = [{ kind = "vault", path = "rekey/{secret}", ... }]`
//! writes every new version of a secret (from any provider) to a KV path,
//! with the same custom metadata. Idempotent per version: when the latest KV
//! version already holds these fields, nothing is written again.
//!
//! Auth: a token (from a file or an environment variable) or AppRole (role id
//! and secret id from files or environment variables; the login token is
//! cached and renewed by logging in again when refused).

use crate::credential::Source;
use crate::journal::{Attempt, Created, Journal, to_fields};
use crate::random::RandomConfig;
use crate::util::{excerpt, fill};
use crate::{
    CreateRequest, FieldError, NewVersion, Provider, ProviderError, ProviderState, Sink, SinkWrite, VersionInfo,
    VersionStatus,
};
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vaultrs::api::kv2::requests::{SetSecretMetadataRequest, SetSecretRequestOptions};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use vaultrs::kv2;

pub const KIND: &str = "vault";
const SINK: &str = "vault sink";

fn default_mount() -> String {
    "secret".into()
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_timeout() -> String {
    "30s".into()
}

/// `provider = { kind = "vault", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// e.g. `https://vault.internal:8200`.
    pub address: String,
    /// KV v2 mount (default `secret`).
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Path of the secret inside the mount.
    pub path: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// PEM bundle to trust for an `https` address (default: the system's roots).
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub role_id_file: Option<PathBuf>,
    #[serde(default)]
    pub role_id_env: Option<String>,
    #[serde(default)]
    pub secret_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_id_env: Option<String>,
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
    /// How new values are generated (as the `random` provider: format, length, alphabet, prefix).
    #[serde(default)]
    pub generate: RandomConfig,
}

/// `sinks = [{ kind = "vault", ... }]`: where every new version is also written.
///
/// The connection fields repeat [`VaultConfig`]'s on purpose: serde cannot
/// combine `#[serde(flatten)]` with `deny_unknown_fields`, and refusing unknown
/// fields (a typo in a credential setting) matters more than sharing a struct.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VaultSinkConfig {
    pub address: String,
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Path inside the mount; `{secret}` is replaced by the secret's name.
    pub path: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout: String,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub role_id_file: Option<PathBuf>,
    #[serde(default)]
    pub role_id_env: Option<String>,
    #[serde(default)]
    pub secret_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_id_env: Option<String>,
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
}

/// The connection settings both configs share, by reference.
struct ConnSpec<'a> {
    address: &'a str,
    mount: &'a str,
    path: &'a str,
    namespace: &'a Option<String>,
    ca_cert: &'a Option<PathBuf>,
    timeout: &'a str,
    token_file: &'a Option<PathBuf>,
    token_env: &'a Option<String>,
    role_id_file: &'a Option<PathBuf>,
    role_id_env: &'a Option<String>,
    secret_id_file: &'a Option<PathBuf>,
    secret_id_env: &'a Option<String>,
    approle_mount: &'a str,
}

macro_rules! conn_spec {
    ($c:expr) => {
        ConnSpec {
            address: &$c.address,
            mount: &$c.mount,
            path: &$c.path,
            namespace: &$c.namespace,
            ca_cert: &$c.ca_cert,
            timeout: &$c.timeout,
            token_file: &$c.token_file,
            token_env: &$c.token_env,
            role_id_file: &$c.role_id_file,
            role_id_env: &$c.role_id_env,
            secret_id_file: &$c.secret_id_file,
            secret_id_env: &$c.secret_id_env,
            approle_mount: &$c.approle_mount,
        }
    };
}

macro_rules! resolve_conn_paths {
    ($c:expr, $base:expr) => {
        crate::util::resolve_opt($base, &mut $c.ca_cert);
        crate::util::resolve_opt($base, &mut $c.token_file);
        crate::util::resolve_opt($base, &mut $c.role_id_file);
        crate::util::resolve_opt($base, &mut $c.secret_id_file);
    };
}

#[derive(Debug, Clone)]
enum Auth {
    Token(Source),
    AppRole { role_id: Source, secret_id: Source, mount: String },
}

#[derive(Debug, Clone)]
struct Conn {
    address: String,
    mount: String,
    namespace: Option<String>,
    ca_cert: Option<PathBuf>,
    timeout: Duration,
    auth: Auth,
}

fn valid_segment_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.ends_with('/')
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
        && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_./{}@".contains(c))
}

impl ConnSpec<'_> {
    fn auth(&self) -> Result<Auth, FieldError> {
        let token = Source::pick("token", self.token_file, self.token_env, false)?;
        let role_id = Source::pick("role_id", self.role_id_file, self.role_id_env, false)?;
        let secret_id = Source::pick("secret_id", self.secret_id_file, self.secret_id_env, false)?;
        match (token, role_id, secret_id) {
            (Some(t), None, None) => Ok(Auth::Token(t)),
            (None, Some(r), Some(s)) => {
                Ok(Auth::AppRole { role_id: r, secret_id: s, mount: self.approle_mount.to_string() })
            }
            (Some(_), _, _) => Err((
                "token_file".into(),
                "set either a token (token_file/token_env) or AppRole (role_id_*/secret_id_*), not both".into(),
            )),
            (None, Some(_), None) => {
                Err(("secret_id_file".into(), "AppRole needs secret_id_file or secret_id_env".into()))
            }
            (None, None, Some(_)) => Err(("role_id_file".into(), "AppRole needs role_id_file or role_id_env".into())),
            (None, None, None) => Err((
                "token_file".into(),
                "missing credentials: set token_file or token_env, or role_id_*/secret_id_* for AppRole".into(),
            )),
        }
    }

    fn validate(&self) -> Result<(), FieldError> {
        if !(self.address.starts_with("http://") || self.address.starts_with("https://")) {
            return Err(("address".into(), format!("{:?} must start with http:// or https://", self.address)));
        }
        if !valid_segment_path(self.mount) || self.mount.contains('{') {
            return Err(("mount".into(), format!("{:?} is not a valid mount path", self.mount)));
        }
        if !valid_segment_path(self.path) {
            return Err((
                "path".into(),
                format!("{:?} is not a valid KV path (e.g. apps/api-key, without leading or trailing /)", self.path),
            ));
        }
        crate::util::duration("timeout", self.timeout, Duration::from_secs(1), Duration::from_secs(600))?;
        if let Some(ca) = self.ca_cert
            && !ca.is_file()
        {
            return Err(("ca_cert".into(), format!("{} is not a readable file", ca.display())));
        }
        match self.auth()? {
            Auth::Token(t) => t.check("token"),
            Auth::AppRole { role_id, secret_id, .. } => {
                role_id.check("role_id")?;
                secret_id.check("secret_id")
            }
        }
    }

    fn conn(&self) -> Result<Conn, FieldError> {
        Ok(Conn {
            address: self.address.trim_end_matches('/').to_string(),
            mount: self.mount.to_string(),
            namespace: self.namespace.clone(),
            ca_cert: self.ca_cert.clone(),
            timeout: crate::util::duration_or(self.timeout, Duration::from_secs(30)),
            auth: self.auth()?,
        })
    }
}

impl VaultConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        resolve_conn_paths!(self, base);
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        let spec = conn_spec!(self);
        spec.validate()?;
        if self.path.contains('{') {
            return Err(("path".into(), "placeholders are for sinks; a provider's path is one secret".into()));
        }
        self.generate.validate().map_err(|(f, m)| (format!("generate.{f}"), m))
    }
}

impl VaultSinkConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        resolve_conn_paths!(self, base);
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        conn_spec!(self).validate()?;
        let rest = self.path.replace("{secret}", "x");
        if rest.contains('{') || rest.contains('}') {
            return Err(("path".into(), "the only placeholder is {secret}".into()));
        }
        Ok(())
    }
}

/// A Vault client that logs in (AppRole) when it needs to.
struct Session {
    conn: Conn,
    who: &'static str,
    approle_token: tokio::sync::Mutex<Option<String>>,
}

/// Vault's answer, classified.
fn vault_error(who: &'static str, op: &str, e: ClientError) -> ProviderError {
    match e {
        ClientError::APIError { code, errors } => {
            let detail = excerpt(&errors.join("; "), 300);
            let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
            let hint = match code {
                403 => "; rekey's Vault token or AppRole lacks the permission, or has expired",
                _ => "",
            };
            let message = format!("{op}: vault answered {code}{detail}{hint}");
            if code >= 500 || code == 429 {
                ProviderError::transient(who, message)
            } else {
                ProviderError::failed(who, message)
            }
        }
        ClientError::RestClientError { source } => {
            // The source chain names the cause (connection refused, timeout) and never a value.
            let msg = rekey_common::error::chain(&source);
            ProviderError::transient(who, format!("{op}: cannot reach vault: {}", excerpt(&msg, 400)))
        }
        other => ProviderError::failed(who, format!("{op}: {other}")),
    }
}

fn is_status(e: &ClientError, code: u16) -> bool {
    matches!(e, ClientError::APIError { code: c, .. } if *c == code)
}

impl Session {
    fn new(conn: Conn, who: &'static str) -> Self {
        Session { conn, who, approle_token: tokio::sync::Mutex::new(None) }
    }

    fn client_with(&self, token: &str) -> Result<VaultClient, ProviderError> {
        rekey_common::tls::install_crypto_provider();
        let mut b = VaultClientSettingsBuilder::default();
        b.address(&self.conn.address)
            .token(token)
            .timeout(Some(self.conn.timeout))
            .verify(true)
            .ca_certs(self.conn.ca_cert.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
        if let Some(ns) = &self.conn.namespace {
            b.namespace(Some(ns.clone()));
        }
        let settings = b.build().map_err(|e| ProviderError::failed(self.who, format!("vault client settings: {e}")))?;
        VaultClient::new(settings).map_err(|e| ProviderError::failed(self.who, format!("vault client: {e}")))
    }

    async fn client(&self) -> Result<VaultClient, ProviderError> {
        match &self.conn.auth {
            Auth::Token(src) => {
                let token = src.read().map_err(|m| ProviderError::failed(self.who, m))?;
                let token = std::str::from_utf8(token.expose()).map_err(|_| {
                    ProviderError::failed(self.who, format!("the token in {} is not text", src.describe()))
                })?;
                self.client_with(token)
            }
            Auth::AppRole { role_id, secret_id, mount } => {
                let mut cached = self.approle_token.lock().await;
                if let Some(t) = cached.as_deref() {
                    return self.client_with(t);
                }
                let role = role_id.read().map_err(|m| ProviderError::failed(self.who, m))?;
                let secret = secret_id.read().map_err(|m| ProviderError::failed(self.who, m))?;
                let text = |v: &rekey_common::secret::SecretBytes, what: &str| {
                    std::str::from_utf8(v.expose())
                        .map(str::to_string)
                        .map_err(|_| ProviderError::failed(self.who, format!("the AppRole {what} is not text")))
                };
                let anon = self.client_with("")?;
                let auth =
                    vaultrs::auth::approle::login(&anon, mount, &text(&role, "role id")?, &text(&secret, "secret id")?)
                        .await
                        .map_err(|e| vault_error(self.who, &format!("AppRole login at auth/{mount}"), e))?;
                *cached = Some(auth.client_token.clone());
                self.client_with(&auth.client_token)
            }
        }
    }

    /// Runs `f` with a client; with AppRole, a refused (expired) token is
    /// replaced by logging in again, once.
    async fn call<T, F, Fut>(&self, op: &str, f: F) -> Result<T, ProviderError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let client = Arc::new(self.client().await?);
        match f(client).await {
            Err(e) if is_status(&e, 403) && matches!(self.conn.auth, Auth::AppRole { .. }) => {
                *self.approle_token.lock().await = None;
                let client = Arc::new(self.client().await?);
                f(client).await.map_err(|e| vault_error(self.who, op, e))
            }
            other => other.map_err(|e| vault_error(self.who, op, e)),
        }
    }

    /// The path's metadata; `None` when nothing was ever written there.
    async fn metadata(&self, path: &str) -> Result<Option<kv2_meta::Metadata>, ProviderError> {
        let mount = self.conn.mount.clone();
        let p = path.to_string();
        let r = self
            .call(&format!("read metadata of {}/{path}", self.conn.mount), move |c| {
                let (mount, p) = (mount.clone(), p.clone());
                async move {
                    match kv2::read_metadata(&*c, &mount, &p).await {
                        Ok(m) => Ok(Some(m)),
                        Err(e) if is_status(&e, 404) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        Ok(r.map(kv2_meta::Metadata::from))
    }

    async fn read_version(&self, path: &str, version: u64) -> Result<Option<BTreeMap<String, String>>, ProviderError> {
        let mount = self.conn.mount.clone();
        let p = path.to_string();
        self.call(&format!("read {}/{path} version {version}", self.conn.mount), move |c| {
            let (mount, p) = (mount.clone(), p.clone());
            async move {
                match kv2::read_version::<BTreeMap<String, serde_json::Value>>(&*c, &mount, &p, version).await {
                    Ok(m) => Ok(Some(
                        m.into_iter().map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_default())).collect(),
                    )),
                    Err(e) if is_status(&e, 404) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    /// Writes `data` as a new version (check-and-set on `cas` when given); returns its number.
    async fn write(&self, path: &str, data: &[(String, String)], cas: Option<u64>) -> Result<u64, ProviderError> {
        let mount = self.conn.mount.clone();
        let p = path.to_string();
        let map: HashMap<String, String> = data.iter().cloned().collect();
        let map = Arc::new(map);
        self.call(&format!("write {}/{path}", self.conn.mount), move |c| {
            let (mount, p, map) = (mount.clone(), p.clone(), map.clone());
            async move {
                let meta = match cas {
                    Some(v) => {
                        let opts = SetSecretRequestOptions { cas: v as u32 };
                        kv2::set_with_options(&*c, &mount, &p, &*map, opts).await?
                    }
                    None => kv2::set(&*c, &mount, &p, &*map).await?,
                };
                Ok(meta.version)
            }
        })
        .await
    }

    /// Records which rotation wrote the latest version (merged into the path's custom metadata).
    async fn stamp(&self, path: &str, secret: &str, rotation: &str, version: &str) -> Result<(), ProviderError> {
        let mut custom = self.metadata(path).await?.map(|m| m.custom).unwrap_or_default();
        custom.insert("rekey_secret".into(), secret.to_string());
        custom.insert("rekey_rotation_id".into(), rotation.to_string());
        custom.insert("rekey_version".into(), version.to_string());
        custom.insert("rekey_written_at".into(), rekey_common::time::format_unix(rekey_common::time::now_unix()));
        let custom: HashMap<String, String> = custom.into_iter().collect();
        let mount = self.conn.mount.clone();
        let p = path.to_string();
        self.call(&format!("write metadata of {}/{path}", self.conn.mount), move |c| {
            let (mount, p, custom) = (mount.clone(), p.clone(), custom.clone());
            async move {
                let mut b = SetSecretMetadataRequest::builder();
                b.custom_metadata(custom);
                kv2::set_metadata(&*c, &mount, &p, Some(&mut b)).await
            }
        })
        .await
    }

    async fn versions_op(&self, path: &str, op: VersionsOp, n: u64) -> Result<(), ProviderError> {
        let mount = self.conn.mount.clone();
        let p = path.to_string();
        let what = match op {
            VersionsOp::Delete => "soft-delete",
            VersionsOp::Undelete => "undelete",
            VersionsOp::Destroy => "destroy",
        };
        self.call(&format!("{what} {}/{path} version {n}", self.conn.mount), move |c| {
            let (mount, p) = (mount.clone(), p.clone());
            async move {
                match op {
                    VersionsOp::Delete => kv2::delete_versions(&*c, &mount, &p, vec![n]).await,
                    VersionsOp::Undelete => kv2::undelete_versions(&*c, &mount, &p, vec![n]).await,
                    VersionsOp::Destroy => kv2::destroy_versions(&*c, &mount, &p, vec![n]).await,
                }
            }
        })
        .await
    }
}

#[derive(Clone, Copy)]
enum VersionsOp {
    Delete,
    Undelete,
    Destroy,
}

/// The parts of KV v2 metadata rekey uses.
mod kv2_meta {
    use std::collections::BTreeMap;
    use vaultrs::api::kv2::responses::ReadSecretMetadataResponse;

    pub struct VersionMeta {
        pub created_unix: Option<i64>,
        pub deleted: bool,
        pub destroyed: bool,
    }

    pub struct Metadata {
        pub current: u64,
        pub versions: BTreeMap<u64, VersionMeta>,
        pub custom: BTreeMap<String, String>,
    }

    pub fn parse_time(s: &str) -> Option<i64> {
        let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z').split('.').next()?).ok()?;
        t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs() as i64)
    }

    impl From<ReadSecretMetadataResponse> for Metadata {
        fn from(m: ReadSecretMetadataResponse) -> Self {
            Metadata {
                current: m.current_version,
                versions: m
                    .versions
                    .into_iter()
                    .filter_map(|(k, v)| {
                        Some((
                            k.parse().ok()?,
                            VersionMeta {
                                created_unix: parse_time(&v.created_time),
                                deleted: !v.deletion_time.is_empty(),
                                destroyed: v.destroyed,
                            },
                        ))
                    })
                    .collect(),
                custom: m.custom_metadata.unwrap_or_default().into_iter().collect(),
            }
        }
    }
}

fn version_id(n: u64) -> String {
    format!("kv-{n}")
}

fn parse_version(v: &str) -> Result<u64, ProviderError> {
    v.strip_prefix("kv-")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ProviderError::NotFound { provider: KIND, version: v.to_string() })
}

fn same(a: &BTreeMap<String, String>, b: &[(String, String)]) -> bool {
    a.len() == b.len() && b.iter().all(|(k, v)| a.get(k) == Some(v))
}

pub struct VaultProvider {
    config: VaultConfig,
    session: Session,
    state: Arc<dyn ProviderState>,
}

impl VaultProvider {
    pub fn new(config: VaultConfig, state: Arc<dyn ProviderState>) -> Result<Self, ProviderError> {
        let conn = conn_spec!(config).conn().map_err(|(f, m)| ProviderError::failed(KIND, format!("{f}: {m}")))?;
        Ok(VaultProvider { config, session: Session::new(conn, KIND), state })
    }

    fn journal(&self) -> Journal<'_> {
        Journal { provider: KIND, state: &*self.state }
    }

    fn path(&self) -> &str {
        &self.config.path
    }

    async fn finish(&self, mut a: Attempt, n: u64, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        let planned = a.planned.clone().unwrap_or_default();
        let id = version_id(n);
        a.created = Some(Created { id: id.clone(), fields: planned.clone(), created_unix: None });
        self.journal().save(&a)?;
        self.session.stamp(self.path(), &req.secret, &req.rotation_id, &id).await?;
        Ok(NewVersion { id, fields: to_fields(&planned), notes: a.notes })
    }
}

#[async_trait]
impl Provider for VaultProvider {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        let Some(m) = self.session.metadata(self.path()).await? else { return Ok(None) };
        Ok(m.versions.get(&m.current).filter(|v| !v.deleted && !v.destroyed).map(|v| VersionInfo {
            id: version_id(m.current),
            status: VersionStatus::Active,
            created_unix: v.created_unix,
        }))
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        let journal = self.journal();
        journal.forget_others(&req.rotation_id)?;
        let meta = self.session.metadata(self.path()).await?;
        let current = meta.as_ref().map(|m| m.current).unwrap_or(0);
        if let Some(a) = journal.load(&req.rotation_id)? {
            if let Some(c) = &a.created {
                let n = parse_version(&c.id)?;
                let live = meta.as_ref().and_then(|m| m.versions.get(&n)).is_some_and(|v| !v.destroyed);
                if live {
                    self.session.stamp(self.path(), &req.secret, &req.rotation_id, &c.id).await?;
                    return Ok(NewVersion { id: c.id.clone(), fields: c.fields(), notes: a.notes.clone() });
                }
            } else if let Some(planned) = &a.planned {
                // Was the value written before the answer was lost?
                let base: u64 = a.existing.first().and_then(|v| parse_version(v).ok()).unwrap_or(0);
                for n in (base + 1)..=current {
                    if let Some(data) = self.session.read_version(self.path(), n).await?
                        && same(&data, planned)
                    {
                        return self.finish(a, n, req).await;
                    }
                }
                // Not written: write the recorded value on top of what is there now.
                let n = self.session.write(self.path(), planned, Some(current)).await?;
                return self.finish(a, n, req).await;
            }
        }
        let planned =
            self.config.generate.generate().map_err(|m| ProviderError::State { provider: KIND, message: m })?;
        let a = Attempt {
            rotation_id: req.rotation_id.clone(),
            existing: vec![version_id(current)],
            planned: Some(planned.clone()),
            notes: vec![],
            created: None,
        };
        journal.save(&a)?;
        let n = self.session.write(self.path(), &planned, Some(current)).await?;
        self.finish(a, n, req).await
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        let n = parse_version(version)?;
        let m = self.session.metadata(self.path()).await?;
        match m.as_ref().and_then(|m| m.versions.get(&n)) {
            Some(v) if !v.destroyed => self.session.versions_op(self.path(), VersionsOp::Delete, n).await,
            _ => Err(ProviderError::NotFound { provider: KIND, version: version.to_string() }),
        }
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        let n = parse_version(version)?;
        let m = self.session.metadata(self.path()).await?;
        match m.as_ref().and_then(|m| m.versions.get(&n)) {
            Some(v) if !v.destroyed => self.session.versions_op(self.path(), VersionsOp::Undelete, n).await,
            _ => Err(ProviderError::NotFound { provider: KIND, version: version.to_string() }),
        }
    }

    /// Destroys the KV version; NotFound when it never existed or is destroyed already.
    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        let n = parse_version(version)?;
        let m = self.session.metadata(self.path()).await?;
        let live = m.as_ref().and_then(|m| m.versions.get(&n)).is_some_and(|v| !v.destroyed);
        if live {
            self.session.versions_op(self.path(), VersionsOp::Destroy, n).await?;
        }
        self.journal().forget_version(version)?;
        if live { Ok(()) } else { Err(ProviderError::NotFound { provider: KIND, version: version.to_string() }) }
    }

    fn field_names(&self) -> Vec<String> {
        self.config.generate.field_names()
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        let Some(m) = self.session.metadata(self.path()).await? else { return Ok(vec![]) };
        Ok(m.versions
            .iter()
            .filter(|(_, v)| !v.destroyed)
            .map(|(n, v)| VersionInfo {
                id: version_id(*n),
                status: if v.deleted { VersionStatus::Inactive } else { VersionStatus::Active },
                created_unix: v.created_unix,
            })
            .collect())
    }
}

pub struct VaultSink {
    session: Session,
    path: String,
}

impl VaultSink {
    pub fn new(config: VaultSinkConfig, secret: &str) -> Result<Self, ProviderError> {
        let conn = conn_spec!(config).conn().map_err(|(f, m)| ProviderError::failed(SINK, format!("{f}: {m}")))?;
        Ok(VaultSink { session: Session::new(conn, SINK), path: fill(&config.path, &[("secret", secret)]) })
    }
}

#[async_trait]
impl Sink for VaultSink {
    fn describe(&self) -> String {
        format!("vault {}/{}", self.session.conn.mount, self.path)
    }

    async fn write(&self, w: &SinkWrite<'_>) -> Result<String, ProviderError> {
        let data = crate::journal::from_fields(SINK, w.fields)?;
        let meta = self.session.metadata(&self.path).await?;
        let latest = match &meta {
            Some(m) if m.versions.get(&m.current).is_some_and(|v| !v.deleted && !v.destroyed) => {
                self.session.read_version(&self.path, m.current).await?.map(|d| (m.current, d))
            }
            _ => None,
        };
        let (n, note) = match latest {
            Some((n, d)) if same(&d, &data) => (n, "already held"),
            _ => (self.session.write(&self.path, &data, None).await?, "wrote"),
        };
        self.session.stamp(&self.path, w.secret, w.rotation_id, w.version).await?;
        Ok(format!("{note} version {} of {} at {} as kv version {n}", w.version, w.secret, self.describe()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> VaultConfig {
        toml::from_str(&format!("address = \"http://127.0.0.1:8200\"\npath = \"apps/api\"\n{extra}")).unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(cfg("").validate().unwrap_err().0, "token_file");
        assert_eq!(cfg("token_env = \"REKEY_TEST_UNSET_TOKEN\"").validate().unwrap_err().0, "token_env");
        let bad = VaultConfig { path: "/x".into(), ..cfg("token_env = \"PATH\"") };
        assert_eq!(bad.validate().unwrap_err().0, "path");
        cfg("token_env = \"PATH\"").validate().unwrap();
        assert_eq!(cfg("role_id_env = \"PATH\"").validate().unwrap_err().0, "secret_id_file");
        assert_eq!(cfg("token_env = \"PATH\"\ngenerate = { length = 2 }").validate().unwrap_err().0, "generate.length");
        let sink: VaultSinkConfig =
            toml::from_str("address = \"http://h:1\"\npath = \"rekey/{secret}\"\ntoken_env = \"PATH\"").unwrap();
        sink.validate().unwrap();
        let bad: VaultSinkConfig =
            toml::from_str("address = \"http://h:1\"\npath = \"rekey/{name}\"\ntoken_env = \"PATH\"").unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "path");
    }

    #[test]
    fn vault_times_parse() {
        assert_eq!(kv2_meta::parse_time("1970-01-01T00:01:40.123456789Z"), Some(100));
        assert_eq!(parse_version("kv-12").unwrap(), 12);
        assert!(parse_version("v-1").is_err());
    }
}
