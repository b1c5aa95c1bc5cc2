//! `aws-iam`: the access keys of one IAM user. A version is an access key
//! (its id, `AKIA…`, is the version id); its fields are `access_key_id` and
//! `secret_access_key`.
//!
//! Owns: calls to IAM (`ListAccessKeys`, `CreateAccessKey`,
//! `UpdateAccessKey`, `DeleteAccessKey`, `GetAccessKeyLastUsed`) through
//! aws-sdk-iam on a ring-only rustls client (no aws-lc), and the create
//! [`journal`](crate::journal) in its provider state.
//!
//! IAM allows two access keys per user. Before creating, if the user is at the
//! limit: a stale *inactive* key (not the version being replaced) is deleted
//! and reported in the version's notes (the engine audits them); two *active*
//! keys are refused with an error naming both, changing nothing.
//!
//! Idempotency of `create` per rotation id: the key ids that exist are
//! recorded (intent) before `CreateAccessKey`, and the new key (id and secret,
//! sealed by the state store) right after. A replay returns the recorded key;
//! if only the intent is there, the interrupted call may have created a key
//! whose secret is lost, so every key not in the recorded set is deleted
//! before creating again — never a third key, never a leaked one.
//!
//! Credentials for rekey itself: the AWS default chain (environment, shared
//! profile, web identity, ECS, IMDS), or an explicit shared-credentials file
//! (mode 0600 checked, read at each use), or named environment variables.
//! `endpoint_url` points it at another endpoint (moto in tests).

use crate::credential::{Source, check_file};
use crate::journal::{Created, External, Journal, create_once};
use crate::{
    CreateRequest, FieldError, LastUsed, NewVersion, Provider, ProviderError, ProviderState, VersionInfo, VersionStatus,
};
use async_trait::async_trait;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::future;
use aws_sdk_iam::Client;
use aws_sdk_iam::config::{Credentials, ProvideCredentials, Region};
use aws_sdk_iam::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_iam::types::StatusType;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

pub const KIND: &str = "aws-iam";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsIamConfig {
    /// The IAM user whose access keys this secret is.
    pub user_name: String,
    /// Region for signing (IAM is global); default: the environment's or profile's, else us-east-1.
    #[serde(default)]
    pub region: Option<String>,
    /// Another endpoint, e.g. `http://127.0.0.1:5000` for moto.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Profile to use from the shared config/credentials files (or from `credentials_file`).
    #[serde(default)]
    pub profile: Option<String>,
    /// A shared-credentials file (`[profile]` with `aws_access_key_id`,
    /// `aws_secret_access_key`, optional `aws_session_token`), mode 0600.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Names of environment variables holding rekey's own credentials.
    #[serde(default)]
    pub access_key_id_env: Option<String>,
    #[serde(default)]
    pub secret_access_key_env: Option<String>,
    #[serde(default)]
    pub session_token_env: Option<String>,
    /// Deadline of one IAM call.
    #[serde(default = "default_timeout")]
    pub timeout: String,
}

fn default_timeout() -> String {
    "30s".into()
}

impl AwsIamConfig {
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        crate::util::resolve_opt(base, &mut self.credentials_file);
    }

    pub(crate) fn validate(&self) -> Result<(), FieldError> {
        let u = &self.user_name;
        if u.is_empty() || u.len() > 64 || !u.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)) {
            return Err(("user_name".into(), format!("{u:?} is not a valid IAM user name")));
        }
        if let Some(e) = &self.endpoint_url
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(("endpoint_url".into(), format!("{e:?} must start with http:// or https://")));
        }
        crate::util::duration("timeout", &self.timeout, Duration::from_secs(1), Duration::from_secs(600))?;
        let env_set = self.access_key_id_env.is_some() || self.secret_access_key_env.is_some();
        if env_set && self.credentials_file.is_some() {
            return Err((
                "credentials_file".into(),
                "set either credentials_file or access_key_id_env/secret_access_key_env, not both".into(),
            ));
        }
        if self.session_token_env.is_some() && !env_set {
            return Err((
                "session_token_env".into(),
                "needs access_key_id_env and secret_access_key_env as well".into(),
            ));
        }
        if env_set {
            let (Some(id), Some(secret)) = (&self.access_key_id_env, &self.secret_access_key_env) else {
                let missing =
                    if self.access_key_id_env.is_none() { "access_key_id_env" } else { "secret_access_key_env" };
                return Err((missing.into(), "access_key_id_env and secret_access_key_env go together".into()));
            };
            Source::Env(id.clone()).check("access_key_id").map_err(|(_, m)| ("access_key_id_env".into(), m))?;
            Source::Env(secret.clone())
                .check("secret_access_key")
                .map_err(|(_, m)| ("secret_access_key_env".into(), m))?;
            if let Some(t) = &self.session_token_env {
                Source::Env(t.clone()).check("session_token").map_err(|(_, m)| ("session_token_env".into(), m))?;
            }
        }
        if let Some(f) = &self.credentials_file {
            check_file(f).map_err(|m| ("credentials_file".to_string(), m))?;
        }
        Ok(())
    }
}

/// rekey's own credentials from named environment variables, read at each use.
#[derive(Debug)]
struct EnvCredentials {
    id: String,
    secret: String,
    token: Option<String>,
}

impl EnvCredentials {
    fn load(&self) -> Result<Credentials, CredentialsError> {
        let var = |name: &str| {
            std::env::var(name)
                .map_err(|_| CredentialsError::not_loaded(format!("environment variable {name} is not set")))
        };
        let token = self.token.as_deref().map(var).transpose()?;
        Ok(Credentials::new(var(&self.id)?, var(&self.secret)?, token, None, "rekey-environment"))
    }
}

impl ProvideCredentials for EnvCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(self.load())
    }
}

/// rekey's own credentials from a shared-credentials file, read at each use.
#[derive(Debug)]
struct FileCredentials {
    path: PathBuf,
    profile: String,
}

impl FileCredentials {
    fn load(&self) -> Result<Credentials, CredentialsError> {
        let text = Source::File(self.path.clone()).read().map_err(CredentialsError::not_loaded)?;
        let text = std::str::from_utf8(text.expose())
            .map_err(|_| CredentialsError::invalid_configuration(format!("{} is not UTF-8", self.path.display())))?;
        let values = parse_profile(text, &self.profile).ok_or_else(|| {
            CredentialsError::invalid_configuration(format!(
                "credentials file {} has no [{}] section",
                self.path.display(),
                self.profile
            ))
        })?;
        let get = |k: &str| values.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let missing = |k: &str| {
            CredentialsError::invalid_configuration(format!(
                "credentials file {} has no {k} in [{}]",
                self.path.display(),
                self.profile
            ))
        };
        let id = get("aws_access_key_id").ok_or_else(|| missing("aws_access_key_id"))?;
        let secret = get("aws_secret_access_key").ok_or_else(|| missing("aws_secret_access_key"))?;
        Ok(Credentials::new(id, secret, get("aws_session_token"), None, "rekey-credentials-file"))
    }
}

impl ProvideCredentials for FileCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(self.load())
    }
}

/// The `key = value` pairs of section `[profile]` (or `[profile NAME]`) of an INI file.
fn parse_profile(text: &str, profile: &str) -> Option<Vec<(String, String)>> {
    let mut current: Option<bool> = None;
    let mut found = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            let name = name.strip_prefix("profile ").map(str::trim).unwrap_or(name);
            let this = name == profile;
            found |= this;
            current = Some(this);
            continue;
        }
        if current == Some(true)
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    found.then_some(out)
}

pub struct AwsIam {
    config: AwsIamConfig,
    state: Arc<dyn ProviderState>,
    client: OnceCell<Client>,
}

/// The text of `<tag>` in an XML error body (some IAM-compatible servers wrap
/// errors in a way the SDK does not parse; the code is still there).
fn xml_tag(body: &[u8], tag: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + text[start..].find(&format!("</{tag}>"))?;
    Some(text[start..end].trim().to_string())
}

/// The error code and message of a service error, from the SDK or the raw body.
fn code_and_message<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<(String, String, u16)>
where
    R: RawResponse,
{
    let SdkError::ServiceError(se) = e else { return None };
    let body = se.raw().body_bytes();
    let code =
        se.err().code().map(str::to_string).or_else(|| xml_tag(body, "Code")).unwrap_or_else(|| "Unknown".into());
    let message = se.err().message().map(str::to_string).or_else(|| xml_tag(body, "Message")).unwrap_or_default();
    Some((code, message, se.raw().status_code()))
}

/// What a service error's raw response tells (implemented for the SDK's HTTP response).
pub(crate) trait RawResponse {
    fn body_bytes(&self) -> &[u8];
    fn status_code(&self) -> u16;
}

impl RawResponse for aws_sdk_iam::config::http::HttpResponse {
    fn body_bytes(&self) -> &[u8] {
        self.body().bytes().unwrap_or_default()
    }
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// What the provider makes of an IAM error.
fn aws_error<E, R>(op: &str, e: SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: RawResponse + std::fmt::Debug,
{
    if let Some((code, message, status)) = code_and_message(&e) {
        let retryable = status >= 500
            || matches!(code.as_str(), "Throttling" | "ServiceFailure" | "ServiceUnavailable" | "RequestLimitExceeded");
        let hint = match code.as_str() {
            "InvalidClientTokenId" | "SignatureDoesNotMatch" | "UnrecognizedClientException" => {
                "; rekey's own AWS credentials were refused"
            }
            "AccessDenied" | "AccessDeniedException" => "; rekey's own AWS identity lacks the permission",
            _ => "",
        };
        let message = if message.is_empty() { String::new() } else { format!(": {message}") };
        return ProviderError::Failed { provider: KIND, message: format!("{op}: {code}{message}{hint}"), retryable };
    }
    match &e {
        SdkError::TimeoutError(_) => ProviderError::transient(KIND, format!("{op}: timed out")),
        SdkError::DispatchFailure(_) => {
            ProviderError::transient(KIND, format!("{op}: cannot reach IAM: {}", DisplayErrorContext(&e)))
        }
        SdkError::ResponseError(_) => {
            ProviderError::transient(KIND, format!("{op}: malformed response: {}", DisplayErrorContext(&e)))
        }
        _ => ProviderError::failed(KIND, format!("{op}: {}", DisplayErrorContext(&e))),
    }
}

/// IAM does not document the granularity of `LastUsedDate`: the resolution
/// is the precision of the timestamp it answered (whole seconds, or
/// milliseconds when it carries a fraction).
fn resolution_ms(d: &aws_sdk_iam::primitives::DateTime) -> i64 {
    if d.subsec_nanos() == 0 { 1000 } else { 1 }
}

/// `GetAccessKeyLastUsed`'s service and region in words (`N/A` is left out).
fn use_source(service: &str, region: &str) -> Option<String> {
    let known = |s: &str| !s.is_empty() && s != "N/A";
    match (known(service), known(region)) {
        (true, true) => Some(format!("{service} in {region}")),
        (true, false) => Some(service.to_string()),
        (false, true) => Some(format!("region {region}")),
        (false, false) => None,
    }
}

fn is_no_such_entity<E: ProvideErrorMetadata, R: RawResponse>(e: &SdkError<E, R>) -> bool {
    code_and_message(e).is_some_and(|(code, _, _)| code == "NoSuchEntity")
}

impl AwsIam {
    pub fn new(config: AwsIamConfig, state: Arc<dyn ProviderState>) -> Result<Self, ProviderError> {
        Ok(AwsIam { config, state, client: OnceCell::new() })
    }

    /// The IAM client, built on first use (loading the default chain is async).
    async fn client(&self) -> Result<&Client, ProviderError> {
        self.client
            .get_or_try_init(|| async {
                use aws_smithy_http_client::tls::{Provider as Tls, rustls_provider::CryptoMode};
                let c = &self.config;
                let timeout = crate::util::duration_or(&c.timeout, Duration::from_secs(30));
                let http =
                    aws_smithy_http_client::Builder::new().tls_provider(Tls::Rustls(CryptoMode::Ring)).build_https();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .http_client(http)
                    .timeout_config(
                        aws_config::timeout::TimeoutConfig::builder()
                            .operation_timeout(timeout)
                            .connect_timeout(timeout.min(Duration::from_secs(10)))
                            .build(),
                    )
                    // The engine retries retryable errors itself; one SDK retry smooths blips.
                    .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2));
                if let Some(r) = &c.region {
                    loader = loader.region(Region::new(r.clone()));
                }
                if let Some(e) = &c.endpoint_url {
                    loader = loader.endpoint_url(e);
                }
                if let Some(p) = &c.profile {
                    loader = loader.profile_name(p);
                }
                if let (Some(id), Some(secret)) = (&c.access_key_id_env, &c.secret_access_key_env) {
                    loader = loader.credentials_provider(EnvCredentials {
                        id: id.clone(),
                        secret: secret.clone(),
                        token: c.session_token_env.clone(),
                    });
                } else if let Some(path) = &c.credentials_file {
                    loader = loader.credentials_provider(FileCredentials {
                        path: path.clone(),
                        profile: c.profile.clone().unwrap_or_else(|| "default".into()),
                    });
                }
                let sdk = loader.load().await;
                let mut b = aws_sdk_iam::config::Builder::from(&sdk);
                if sdk.region().is_none() {
                    b = b.region(Region::new("us-east-1"));
                }
                Ok::<_, ProviderError>(Client::from_conf(b.build()))
            })
            .await
    }

    async fn keys(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        let out = self
            .client()
            .await?
            .list_access_keys()
            .user_name(&self.config.user_name)
            .send()
            .await
            .map_err(|e| aws_error(&format!("ListAccessKeys for user {}", self.config.user_name), e))?;
        Ok(out
            .access_key_metadata()
            .iter()
            .filter_map(|k| {
                Some(VersionInfo {
                    id: k.access_key_id()?.to_string(),
                    status: match k.status() {
                        Some(StatusType::Active) => VersionStatus::Active,
                        _ => VersionStatus::Inactive,
                    },
                    created_unix: k.create_date().map(|d| d.secs()),
                })
            })
            .collect())
    }

    /// `DeleteAccessKey` (IAM deletes an active key as well); NotFound when it is gone.
    async fn delete_key(&self, id: &str) -> Result<(), ProviderError> {
        match self.client().await?.delete_access_key().user_name(&self.config.user_name).access_key_id(id).send().await
        {
            Ok(_) => Ok(()),
            Err(e) if is_no_such_entity(&e) => Err(ProviderError::NotFound { provider: KIND, version: id.to_string() }),
            Err(e) => Err(aws_error(&format!("DeleteAccessKey {id}"), e)),
        }
    }

    async fn set_status(&self, id: &str, status: StatusType) -> Result<(), ProviderError> {
        match self
            .client()
            .await?
            .update_access_key()
            .user_name(&self.config.user_name)
            .access_key_id(id)
            .status(status.clone())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_no_such_entity(&e) => Err(ProviderError::NotFound { provider: KIND, version: id.to_string() }),
            Err(e) => Err(aws_error(&format!("UpdateAccessKey {id} to {}", status.as_str()), e)),
        }
    }

    /// Makes room under the two-keys limit; returns the notes of what it deleted.
    async fn make_room(&self, keys: &[VersionInfo], previous: Option<&str>) -> Result<Vec<String>, ProviderError> {
        let user = &self.config.user_name;
        if keys.len() < 2 {
            return Ok(vec![]);
        }
        let describe = |k: &VersionInfo| {
            let mut s = format!("{} ({}", k.id, if k.status == VersionStatus::Active { "active" } else { "inactive" });
            if Some(k.id.as_str()) == previous {
                s.push_str(", current");
            }
            s.push(')');
            s
        };
        let all = keys.iter().map(describe).collect::<Vec<_>>().join(" and ");
        let active = keys.iter().filter(|k| k.status == VersionStatus::Active).count();
        if active >= 2 {
            return Err(ProviderError::failed(
                KIND,
                format!(
                    "user {user} already has two active access keys, {all}: IAM allows two keys per user and rekey deletes only an inactive one; deactivate and delete the key that is not in use, then resume"
                ),
            ));
        }
        let stale: Vec<&VersionInfo> =
            keys.iter().filter(|k| k.status == VersionStatus::Inactive && Some(k.id.as_str()) != previous).collect();
        if stale.is_empty() {
            return Err(ProviderError::failed(
                KIND,
                format!(
                    "user {user} has two access keys, {all}, and none is a stale inactive key rekey may delete; delete the key that is not in use, then resume"
                ),
            ));
        }
        let mut notes = Vec::new();
        // One is enough to make room; delete the oldest stale key.
        let victim = stale.iter().min_by_key(|k| k.created_unix.unwrap_or(i64::MAX)).expect("non-empty");
        match self.delete_key(&victim.id).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        tracing::info!(user = %user, key = %victim.id, "deleted stale inactive access key to make room");
        notes.push(format!(
            "deleted stale inactive access key {} of user {user} to make room for the new key (IAM allows two per user)",
            victim.id
        ));
        Ok(notes)
    }
}

/// IAM lists every key, so nothing an interrupted `CreateAccessKey` made can
/// hide; before creating, room is made under the two-keys limit.
#[async_trait]
impl External for AwsIam {
    const NOUN: &'static str = "access key";

    fn journal(&self) -> Journal<'_> {
        Journal { provider: KIND, state: &*self.state }
    }

    async fn versions(&self) -> Result<Option<Vec<VersionInfo>>, ProviderError> {
        self.keys().await.map(Some)
    }

    async fn delete_orphan(&self, orphan: &VersionInfo) -> Result<(), ProviderError> {
        match self.delete_key(&orphan.id).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn orphan_name(&self, id: &str) -> String {
        format!("access key {id} of user {}", self.config.user_name)
    }

    async fn before_create(
        &self,
        req: &CreateRequest,
        current: Option<Vec<VersionInfo>>,
    ) -> Result<(Vec<String>, Vec<String>), ProviderError> {
        let mut keys = current.unwrap_or_default();
        let room = self.make_room(&keys, req.previous_version.as_deref()).await?;
        if !room.is_empty() {
            keys = self.keys().await?;
        }
        Ok((keys.into_iter().map(|k| k.id).collect(), room))
    }

    async fn create_new(&self, _req: &CreateRequest, _replay: bool) -> Result<(Created, Vec<String>), ProviderError> {
        let user = &self.config.user_name;
        let out = self
            .client()
            .await?
            .create_access_key()
            .user_name(user)
            .send()
            .await
            .map_err(|e| aws_error(&format!("CreateAccessKey for user {user}"), e))?;
        let key = out.access_key().ok_or_else(|| {
            ProviderError::failed(KIND, format!("CreateAccessKey for user {user}: the response has no access key"))
        })?;
        let created = Created {
            id: key.access_key_id().to_string(),
            fields: vec![
                ("access_key_id".into(), key.access_key_id().to_string()),
                ("secret_access_key".into(), key.secret_access_key().to_string()),
            ],
            created_unix: key.create_date().map(|d| d.secs()),
        };
        tracing::info!(%user, key = %created.id, "access key created");
        Ok((created, vec![]))
    }
}

#[async_trait]
impl Provider for AwsIam {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn current(&self) -> Result<Option<VersionInfo>, ProviderError> {
        let active: Vec<VersionInfo> =
            self.keys().await?.into_iter().filter(|k| k.status == VersionStatus::Active).collect();
        Ok(if active.len() == 1 { active.into_iter().next() } else { None })
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        create_once(self, req).await
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.set_status(version, StatusType::Inactive).await
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.set_status(version, StatusType::Active).await
    }

    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        let result = self.delete_key(version).await;
        if matches!(result, Ok(()) | Err(ProviderError::NotFound { .. })) {
            self.journal().forget_version(version)?;
        }
        result
    }

    fn field_names(&self) -> Vec<String> {
        vec!["access_key_id".into(), "secret_access_key".into()]
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        self.keys().await
    }

    async fn last_used(&self, version: &str) -> Result<LastUsed, ProviderError> {
        match self.client().await?.get_access_key_last_used().access_key_id(version).send().await {
            Ok(out) => Ok(match out.access_key_last_used() {
                Some(l) => match l.last_used_date() {
                    Some(d) => {
                        let at_ms = d.secs().saturating_mul(1000) + i64::from(d.subsec_nanos() / 1_000_000);
                        LastUsed::at(at_ms, resolution_ms(d), use_source(l.service_name(), l.region()))
                    }
                    None => LastUsed::Never,
                },
                None => LastUsed::Never,
            }),
            Err(e) if is_no_such_entity(&e) => Err(ProviderError::NotFound { provider: KIND, version: version.into() }),
            Err(e) => Err(aws_error(&format!("GetAccessKeyLastUsed {version}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AwsIamConfig {
        toml::from_str::<AwsIamConfig>("user_name = \"app-deployer\"").unwrap()
    }

    #[test]
    fn config_validation_names_the_field() {
        cfg().validate().unwrap();
        let bad = AwsIamConfig { user_name: "no spaces".into(), ..cfg() };
        assert_eq!(bad.validate().unwrap_err().0, "user_name");
        let bad = AwsIamConfig { access_key_id_env: Some("REKEY_TEST_UNSET_ID".into()), ..cfg() };
        assert_eq!(bad.validate().unwrap_err().0, "secret_access_key_env");
        let bad = AwsIamConfig {
            access_key_id_env: Some("REKEY_TEST_UNSET_ID".into()),
            secret_access_key_env: Some("REKEY_TEST_UNSET_SECRET".into()),
            ..cfg()
        };
        let (f, m) = bad.validate().unwrap_err();
        assert_eq!(f, "access_key_id_env");
        assert!(m.contains("REKEY_TEST_UNSET_ID is not set"), "{m}");
        let bad = AwsIamConfig { endpoint_url: Some("127.0.0.1:5000".into()), ..cfg() };
        assert_eq!(bad.validate().unwrap_err().0, "endpoint_url");
        let bad = AwsIamConfig { credentials_file: Some("/nonexistent/rekey/aws".into()), ..cfg() };
        let (f, m) = bad.validate().unwrap_err();
        assert_eq!(f, "credentials_file");
        assert!(m.contains("/nonexistent/rekey/aws"), "{m}");
    }

    #[test]
    fn error_codes_are_found_in_wrapped_xml() {
        let body = b"<ErrorResponse><Errors><Error><Code>InvalidClientTokenId</Code><Message>bad</Message></Error></Errors></ErrorResponse>";
        assert_eq!(xml_tag(body, "Code").as_deref(), Some("InvalidClientTokenId"));
        assert_eq!(xml_tag(body, "Message").as_deref(), Some("bad"));
        assert_eq!(xml_tag(body, "Type"), None);
    }

    #[test]
    fn the_source_of_a_use_names_service_and_region() {
        assert_eq!(use_source("s3", "eu-west-1").as_deref(), Some("s3 in eu-west-1"));
        assert_eq!(use_source("iam", "N/A").as_deref(), Some("iam"));
        assert_eq!(use_source("N/A", "N/A"), None);
        let whole = aws_sdk_iam::primitives::DateTime::from_secs(1_714_564_800);
        assert_eq!(resolution_ms(&whole), 1000);
        assert_eq!(resolution_ms(&aws_sdk_iam::primitives::DateTime::from_millis(1_714_564_800_250)), 1);
    }

    #[test]
    fn shared_credentials_profiles_parse() {
        let text =
            "# c\n[default]\naws_access_key_id = A\naws_secret_access_key=B\n[profile rekey]\naws_access_key_id=C\n";
        assert_eq!(
            parse_profile(text, "default").unwrap(),
            vec![("aws_access_key_id".into(), "A".into()), ("aws_secret_access_key".into(), "B".into())]
        );
        assert_eq!(parse_profile(text, "rekey").unwrap(), vec![("aws_access_key_id".into(), "C".into())]);
        assert!(parse_profile(text, "other").is_none());
    }
}
