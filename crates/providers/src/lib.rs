//! Secret providers: where new versions of a secret come from and where old
//! ones are revoked. Every provider sits behind [`Provider`], so the rotation
//! engine never knows which one it drives.
//!
//! - [`random`]: locally generated tokens (the embedded default).
//! - [`aws_iam`]: the access keys of an IAM user.
//! - [`vault`]: versions of a Vault/OpenBao KV v2 secret; also a [`Sink`].
//! - [`http`]: any REST API that issues keys (SaaS dashboards).
//! - [`command`]: operator-supplied executables with a JSON contract.
//! - [`postgres`]: PostgreSQL login passwords (alternating roles or in place).
//!
//! Contract the engine relies on:
//! - [`Provider::create`] is **idempotent per rotation id**: the engine records
//!   its intent (the rotation's `generating` state) before calling, and after a
//!   crash calls again with the same [`CreateRequest`]. A provider returns the
//!   version it already made for that rotation, or cleans up what it cannot
//!   return and makes one — never two live new versions. The external
//!   providers keep a [`journal`] in their [`ProviderState`] for this.
//! - `deactivate`, `reactivate` and `delete` of a version that exists are
//!   idempotent; of a version that no longer exists they return
//!   [`ProviderError::NotFound`] in every provider (the engine records "already
//!   gone" and treats it as revoked).
//! - `delete` follows the provider's own revoke order: where the API refuses
//!   to delete an active key, it deactivates first.
//! - `list` returns every version with its status (where the provider can
//!   list: [`ProviderConfig::can_list`]).
//! - `last_used` reports a [`Use`] with its resolution and, where the
//!   provider says, its source; a timestamp that is present but cannot be
//!   read is an error, never "no usage".
//! - Errors carry the provider's precise reason and never a secret value.
//! - Credentials a provider needs come from a file (mode 0600 checked) or an
//!   environment variable ([`credential`]), never from the config text.
//!
//! A [`Sink`] receives every new version of a secret after the engine stored
//! it (e.g. to mirror it into Vault); it is idempotent per version.
//!
//! Owns no tasks.

pub mod aws_iam;
pub mod command;
pub mod credential;
pub mod http;
pub mod journal;
pub mod postgres;
pub mod random;
pub mod timestamp;
mod util;
pub mod vault;

use async_trait::async_trait;
use rekey_common::secret::SecretBytes;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The named fields of one secret version (e.g. `value`, or `access_key_id`
/// and `secret_access_key`). Template variables on the agents use these names.
pub type Fields = BTreeMap<String, SecretBytes>;

#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub secret: String,
    pub rotation_id: String,
    /// The version being replaced, if known.
    pub previous_version: Option<String>,
}

#[derive(Debug)]
pub struct NewVersion {
    pub id: String,
    pub fields: Fields,
    /// What the provider did on the way that an auditor must see (e.g. "deleted
    /// stale inactive key AKIA…"); recorded in the audit log. Never a value.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionStatus {
    Active,
    Inactive,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionInfo {
    pub id: String,
    pub status: VersionStatus,
    pub created_unix: Option<i64>,
}

/// What a provider knows about the last use of a version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LastUsed {
    /// The provider does not report usage.
    Unknown,
    Never,
    At(Use),
}

/// One reported use of a version: when, how precisely, and from where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Use {
    /// Unix milliseconds, as the provider reported it (truncated to its resolution).
    pub at_ms: i64,
    /// How coarse the provider's timestamp is: 1000 for whole seconds, 1 for
    /// milliseconds. The use happened somewhere in `[at_ms, at_ms + resolution_ms)`.
    pub resolution_ms: i64,
    /// Where the use came from, in words (e.g. `iam in us-east-1`, a source
    /// address), when the provider says. Never a secret value.
    pub source: Option<String>,
}

impl Use {
    /// The latest instant the use may have happened (for comparisons that
    /// must be conservative: a use in the same second as an event counts as
    /// after it).
    pub fn latest_ms(&self) -> i64 {
        self.at_ms.saturating_add(self.resolution_ms.max(1) - 1)
    }

    /// Whether the use may have happened at or after `t_ms`.
    pub fn may_be_at_or_after(&self, t_ms: i64) -> bool {
        self.latest_ms() >= t_ms
    }
}

impl LastUsed {
    pub fn at(at_ms: i64, resolution_ms: i64, source: Option<String>) -> LastUsed {
        LastUsed::At(Use { at_ms, resolution_ms, source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused or failed; `retryable` for timeouts, throttling, 5xx.
    #[error("{provider}: {message}")]
    Failed { provider: &'static str, message: String, retryable: bool },
    /// The version does not exist at the provider.
    #[error("{provider}: version {version} not found")]
    NotFound { provider: &'static str, version: String },
    /// The provider's own state could not be read or written.
    #[error("{provider}: state: {message}")]
    State { provider: &'static str, message: String },
}

impl ProviderError {
    pub fn retryable(&self) -> bool {
        matches!(self, ProviderError::Failed { retryable: true, .. })
    }

    pub(crate) fn failed(provider: &'static str, message: impl Into<String>) -> Self {
        ProviderError::Failed { provider, message: message.into(), retryable: false }
    }

    pub(crate) fn transient(provider: &'static str, message: impl Into<String>) -> Self {
        ProviderError::Failed { provider, message: message.into(), retryable: true }
    }
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name of the provider kind, e.g. `random`, `aws-iam`.
    fn kind(&self) -> &'static str;

    /// The version in use at the provider when rekey has none recorded yet
    /// (the first rotation of an existing key), if the provider can tell.
    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        Ok(None)
    }

    /// The names of the fields a new version will have (e.g. `value`, or
    /// `access_key_id` and `secret_access_key`), for dry runs; empty when the
    /// provider cannot tell before creating one.
    fn field_names(&self) -> Vec<String> {
        Vec::new()
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError>;
    /// [`ProviderError::NotFound`] when the version no longer exists.
    async fn deactivate(&self, version: &str) -> Result<(), ProviderError>;
    /// [`ProviderError::NotFound`] when the version no longer exists.
    async fn reactivate(&self, version: &str) -> Result<(), ProviderError>;
    /// Removes the version for good, in the provider's revoke order
    /// (deactivating an active one first where the provider requires it);
    /// [`ProviderError::NotFound`] when it no longer exists.
    async fn delete(&self, version: &str) -> Result<(), ProviderError>;
    /// Every version with its status (an error where the provider is not
    /// configured to list: see [`ProviderConfig::can_list`]).
    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError>;

    /// When the version was last used, as precisely as the provider says
    /// and from where; [`ProviderError::NotFound`] when it no longer exists.
    async fn last_used(&self, _version: &str) -> Result<LastUsed, ProviderError> {
        Ok(LastUsed::Unknown)
    }
}

/// Durable, encrypted key-value space a provider may keep state in (given by
/// the coordinator: one namespace per secret, values sealed at rest).
pub trait ProviderState: Send + Sync + 'static {
    fn get(&self, key: &str) -> Result<Option<SecretBytes>, String>;
    fn put(&self, key: &str, value: &[u8]) -> Result<(), String>;
    fn remove(&self, key: &str) -> Result<(), String>;
    fn keys(&self) -> Result<Vec<String>, String>;
}

/// A config problem: (field path relative to the provider or sink, message).
pub type FieldError = (String, String);

/// A provider's settings in a `[[secret]]` block: `provider = { kind = "random", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[allow(clippy::large_enum_variant, reason = "parsed once per secret at start; boxing buys nothing")]
pub enum ProviderConfig {
    Random(random::RandomConfig),
    AwsIam(aws_iam::AwsIamConfig),
    Vault(vault::VaultConfig),
    Http(http::HttpConfig),
    Command(command::CommandConfig),
    Postgres(postgres::PostgresConfig),
}

impl ProviderConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Random(_) => "random",
            ProviderConfig::AwsIam(_) => aws_iam::KIND,
            ProviderConfig::Vault(_) => vault::KIND,
            ProviderConfig::Http(_) => http::KIND,
            ProviderConfig::Command(_) => command::KIND,
            ProviderConfig::Postgres(_) => postgres::KIND,
        }
    }

    /// Makes relative paths (credential files, commands) relative to `base`,
    /// the directory of the config file, as operators expect.
    pub fn resolve_paths(&mut self, base: &Path) {
        match self {
            ProviderConfig::Random(_) => {}
            ProviderConfig::AwsIam(c) => c.resolve_paths(base),
            ProviderConfig::Vault(c) => c.resolve_paths(base),
            ProviderConfig::Http(c) => c.resolve_paths(base),
            ProviderConfig::Command(c) => c.resolve_paths(base),
            ProviderConfig::Postgres(c) => c.resolve_paths(base),
        }
    }

    /// Whether versions can be deactivated (rather than only deleted).
    pub fn can_deactivate(&self) -> bool {
        match self {
            ProviderConfig::Http(c) => c.can_deactivate(),
            ProviderConfig::Command(c) => c.can_deactivate(),
            _ => true,
        }
    }

    /// Whether a deactivated version can be made active again (the engine
    /// refuses `on_use_during_grace = "reactivate"` without it).
    pub fn can_reactivate(&self) -> bool {
        match self {
            ProviderConfig::Http(c) => c.reactivate.is_some(),
            ProviderConfig::Command(c) => c.reactivate.is_some(),
            _ => true,
        }
    }

    /// Whether the provider can list its versions (the engine reconciles
    /// with the list before generating and before revoking).
    pub fn can_list(&self) -> bool {
        match self {
            ProviderConfig::Http(c) => c.list.is_some(),
            ProviderConfig::Command(c) => c.list.is_some(),
            _ => true,
        }
    }

    /// Whether the provider reports when a version was last used.
    pub fn reports_usage(&self) -> bool {
        match self {
            ProviderConfig::AwsIam(_) => true,
            // Sessions in pg_stat_activity; in place (single) the old password is gone at create.
            ProviderConfig::Postgres(c) => c.strategy == postgres::Strategy::Alternating,
            ProviderConfig::Http(c) => c.list.as_ref().is_some_and(|l| l.last_used_pointer.is_some()),
            ProviderConfig::Command(c) => c.last_used.is_some(),
            ProviderConfig::Random(_) | ProviderConfig::Vault(_) => false,
        }
    }

    /// Checks settings beyond their syntax, including that credential files
    /// exist with mode 0600 and credential variables are set; returns
    /// (field, message) on error.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            ProviderConfig::Random(c) => c.validate(),
            ProviderConfig::AwsIam(c) => c.validate(),
            ProviderConfig::Vault(c) => c.validate(),
            ProviderConfig::Http(c) => c.validate(),
            ProviderConfig::Command(c) => c.validate(),
            ProviderConfig::Postgres(c) => c.validate(),
        }
    }

    /// What a plan tells before a rotation without stopping it (e.g. that
    /// a strategy is not zero-downtime).
    pub fn plan_warnings(&self) -> Vec<String> {
        match self {
            ProviderConfig::Postgres(c) => c.plan_warnings(),
            _ => vec![],
        }
    }
}

/// Builds the provider for one secret.
pub fn build(config: &ProviderConfig, state: Arc<dyn ProviderState>) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match config {
        ProviderConfig::Random(c) => Arc::new(random::Random::new(c.clone(), state)),
        ProviderConfig::AwsIam(c) => Arc::new(aws_iam::AwsIam::new(c.clone(), state)?),
        ProviderConfig::Vault(c) => Arc::new(vault::VaultProvider::new(c.clone(), state)?),
        ProviderConfig::Http(c) => Arc::new(http::HttpProvider::new(c.clone(), state)?),
        ProviderConfig::Command(c) => Arc::new(command::CommandProvider::new(c.clone(), state)?),
        ProviderConfig::Postgres(c) => Arc::new(postgres::PostgresProvider::new(c.clone(), state)?),
    })
}

/// One new version, as handed to a [`Sink`].
#[derive(Debug)]
pub struct SinkWrite<'a> {
    pub secret: &'a str,
    pub rotation_id: &'a str,
    pub version: &'a str,
    pub fields: &'a Fields,
}

/// Somewhere every new version of a secret is also written (after the engine
/// stored it, before any host gets it). Idempotent per version: writing the
/// same version again changes nothing.
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Where it writes, for messages and the audit log (e.g. `vault secret/apps/api-key`).
    fn describe(&self) -> String;

    /// Writes the version; returns what was done, for the audit log (never a value).
    async fn write(&self, w: &SinkWrite<'_>) -> Result<String, ProviderError>;
}

/// A sink's settings: `sinks = [{ kind = "vault", ... }]` in a `[[secret]]` block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SinkConfig {
    Vault(vault::VaultSinkConfig),
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Vault(_) => vault::KIND,
        }
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        match self {
            SinkConfig::Vault(c) => c.resolve_paths(base),
        }
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            SinkConfig::Vault(c) => c.validate(),
        }
    }
}

/// Builds a sink for `secret`.
pub fn build_sink(config: &SinkConfig, secret: &str) -> Result<Arc<dyn Sink>, ProviderError> {
    Ok(match config {
        SinkConfig::Vault(c) => Arc::new(vault::VaultSink::new(c.clone(), secret)?),
    })
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory [`ProviderState`] for unit tests.
    #[derive(Default)]
    pub struct Mem(pub Mutex<BTreeMap<String, Vec<u8>>>);
    impl ProviderState for Mem {
        fn get(&self, k: &str) -> Result<Option<SecretBytes>, String> {
            Ok(self.0.lock().unwrap().get(k).map(|v| SecretBytes::new(v.clone())))
        }
        fn put(&self, k: &str, v: &[u8]) -> Result<(), String> {
            self.0.lock().unwrap().insert(k.into(), v.to_vec());
            Ok(())
        }
        fn remove(&self, k: &str) -> Result<(), String> {
            self.0.lock().unwrap().remove(k);
            Ok(())
        }
        fn keys(&self) -> Result<Vec<String>, String> {
            Ok(self.0.lock().unwrap().keys().cloned().collect())
        }
    }

    #[test]
    fn a_use_in_the_same_second_counts_as_at_or_after_it() {
        let whole = Use { at_ms: 10_000, resolution_ms: 1000, source: None };
        assert_eq!(whole.latest_ms(), 10_999);
        assert!(whole.may_be_at_or_after(10_500), "a whole-second use may be after a switch in its second");
        assert!(!whole.may_be_at_or_after(11_000));
        let exact = Use { at_ms: 10_000, resolution_ms: 1, source: None };
        assert!(exact.may_be_at_or_after(10_000) && !exact.may_be_at_or_after(10_001));
    }

    #[test]
    fn capabilities_follow_the_configured_operations() {
        #[derive(Deserialize)]
        struct W {
            provider: ProviderConfig,
        }
        let http = |extra: &str| {
            toml::from_str::<W>(&format!(
                "provider = {{ kind = \"http\", create = {{ url = \"http://h/k\", fields = {{ value = \"/s\" }} }}, delete = {{ url = \"http://h/k/{{id}}\" }} {extra} }}"
            ))
            .unwrap()
            .provider
        };
        let bare = http("");
        assert!(!bare.can_reactivate() && !bare.can_list() && !bare.reports_usage() && !bare.can_deactivate());
        let full = http(
            ", reactivate = { url = \"http://h/k/{id}/on\" }, list = { url = \"http://h/k\", last_used_pointer = \"/t\" }",
        );
        assert!(full.can_reactivate() && full.can_list() && full.reports_usage());
        let random = toml::from_str::<W>("provider = { kind = \"random\" }").unwrap().provider;
        assert!(random.can_reactivate() && random.can_list() && !random.reports_usage());
    }

    #[test]
    fn configs_parse_with_kind_and_refuse_unknown_fields() {
        #[derive(Deserialize)]
        struct W {
            provider: ProviderConfig,
        }
        let w: W = toml::from_str(r#"provider = { kind = "random", length = 24 }"#).unwrap();
        assert_eq!(w.provider.kind(), "random");
        let e = toml::from_str::<W>(r#"provider = { kind = "aws-iam", user_name = "u", secret_access_key = "x" }"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("secret_access_key"), "{e}");
    }
}
