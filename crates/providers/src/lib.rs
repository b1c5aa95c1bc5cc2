//! Secret providers: where new versions of a secret come from and where old
//! ones are revoked. Every provider sits behind [`Provider`], so the rotation
//! engine never knows which one it drives.
//!
//! Contract the engine relies on:
//! - [`Provider::create`] is **idempotent per rotation id**: the engine records
//!   its intent (the rotation's `generating` state) before calling, and after a
//!   crash calls again with the same [`CreateRequest`]. A provider returns the
//!   version it already made for that rotation, or cleans up what it cannot
//!   return and makes one — never two live new versions.
//! - `deactivate`, `reactivate` and `delete` are idempotent (deleting a
//!   version that is already gone succeeds).
//! - Errors carry the provider's precise reason and never a secret value.
//!
//! Owns no tasks.

pub mod random;

use async_trait::async_trait;
use rekey_common::secret::SecretBytes;
use serde::Deserialize;
use std::collections::BTreeMap;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "at", rename_all = "lowercase")]
pub enum LastUsed {
    /// The provider does not report usage.
    Unknown,
    Never,
    At(i64),
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

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError>;
    async fn deactivate(&self, version: &str) -> Result<(), ProviderError>;
    async fn reactivate(&self, version: &str) -> Result<(), ProviderError>;
    async fn delete(&self, version: &str) -> Result<(), ProviderError>;
    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError>;

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

/// A provider's settings in a `[[secret]]` block: `provider = { kind = "random", ... }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ProviderConfig {
    Random(random::RandomConfig),
}

impl ProviderConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderConfig::Random(_) => "random",
        }
    }

    /// Checks settings beyond their syntax; returns (field, message) on error.
    pub fn validate(&self) -> Result<(), (String, String)> {
        match self {
            ProviderConfig::Random(c) => c.validate(),
        }
    }
}

/// Builds the provider for one secret.
pub fn build(config: &ProviderConfig, state: Arc<dyn ProviderState>) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match config {
        ProviderConfig::Random(c) => Arc::new(random::Random::new(c.clone(), state)),
    })
}
