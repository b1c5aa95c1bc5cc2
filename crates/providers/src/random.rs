//! `random`: the embedded provider. Generates tokens or id/secret pairs of a
//! configured length and alphabet; versions (sealed by the coordinator's
//! store) and their status are kept in the provider state.

use crate::{CreateRequest, Fields, NewVersion, Provider, ProviderError, ProviderState, VersionInfo, VersionStatus};
use async_trait::async_trait;
use rekey_common::secret::SecretBytes;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const KIND: &str = "random";

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One field, `value`.
    #[default]
    Token,
    /// Two fields, `id` (public) and `secret`.
    IdSecret,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RandomConfig {
    #[serde(default)]
    pub format: Format,
    /// Length of the random part, in characters.
    #[serde(default = "default_length")]
    pub length: usize,
    /// `alphanumeric` (default), `hex`, `base64url`, or the literal characters to use.
    #[serde(default = "default_alphabet")]
    pub alphabet: String,
    /// Prepended to the value (e.g. `sk_live_`).
    #[serde(default)]
    pub prefix: String,
}

impl Default for RandomConfig {
    fn default() -> Self {
        RandomConfig {
            format: Format::Token,
            length: default_length(),
            alphabet: default_alphabet(),
            prefix: String::new(),
        }
    }
}

/// The least entropy (length × log2 of the alphabet's size) a generated
/// value may have: guessing must stay out of reach whatever leaks about it.
pub const MIN_ENTROPY_BITS: f64 = 128.0;

fn default_length() -> usize {
    32
}
fn default_alphabet() -> String {
    "alphanumeric".into()
}

impl RandomConfig {
    fn chars(&self) -> Vec<u8> {
        match self.alphabet.as_str() {
            "alphanumeric" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".to_vec(),
            "hex" => b"0123456789abcdef".to_vec(),
            "base64url" => b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".to_vec(),
            custom => {
                let mut v: Vec<u8> = custom.bytes().collect();
                v.sort_unstable();
                v.dedup();
                v
            }
        }
    }

    /// The names of the fields [`Self::generate`] makes.
    pub fn field_names(&self) -> Vec<String> {
        match self.format {
            Format::Token => vec!["value".into()],
            Format::IdSecret => vec!["id".into(), "secret".into()],
        }
    }

    /// A new value: `[("value", ..)]`, or `[("id", ..), ("secret", ..)]` for `id-secret`.
    pub fn generate(&self) -> Result<Vec<(String, String)>, String> {
        let value = format!("{}{}", self.prefix, random_string(&self.chars(), self.length)?);
        Ok(match self.format {
            Format::Token => vec![("value".to_string(), value)],
            Format::IdSecret => {
                let idpart = random_string(b"0123456789abcdefghijklmnopqrstuvwxyz", 16)?;
                vec![("id".to_string(), format!("{}id_{idpart}", self.prefix)), ("secret".to_string(), value)]
            }
        })
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(8..=4096).contains(&self.length) {
            return Err(("length".into(), format!("must be between 8 and 4096, got {}", self.length)));
        }
        if !self.alphabet.is_ascii() || self.chars().len() < 2 {
            return Err((
                "alphabet".into(),
                "expected alphanumeric, hex, base64url, or at least 2 distinct ASCII characters".into(),
            ));
        }
        let per_char = (self.chars().len() as f64).log2();
        let bits = self.length as f64 * per_char;
        if bits < MIN_ENTROPY_BITS {
            let needed = (MIN_ENTROPY_BITS / per_char).ceil();
            return Err((
                "length".into(),
                format!(
                    "{} characters over an alphabet of {} give {} bits of entropy, under the minimum of {MIN_ENTROPY_BITS}: use a length of at least {needed} (or a larger alphabet)",
                    self.length,
                    self.chars().len(),
                    bits.floor()
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    id: String,
    rotation_id: String,
    status: VersionStatus,
    created_unix: i64,
    /// Field name → value (this whole record is sealed by the state store).
    fields: Vec<(String, String)>,
}

pub struct Random {
    config: RandomConfig,
    state: Arc<dyn ProviderState>,
}

fn state_err(message: String) -> ProviderError {
    ProviderError::State { provider: KIND, message }
}

/// Uniform random string over `alphabet` (rejection sampling: no modulo bias).
fn random_string(alphabet: &[u8], len: usize) -> Result<String, String> {
    let rng = SystemRandom::new();
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf).map_err(|_| "system random number generator failed".to_string())?;
        for b in buf {
            if (b as usize) < limit && out.len() < len {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

impl Random {
    pub fn new(config: RandomConfig, state: Arc<dyn ProviderState>) -> Self {
        Random { config, state }
    }

    fn load(&self, id: &str) -> Result<Option<Stored>, ProviderError> {
        let Some(raw) = self.state.get(&format!("v/{id}")).map_err(state_err)? else { return Ok(None) };
        serde_json::from_slice(raw.expose()).map(Some).map_err(|e| state_err(format!("corrupt version {id}: {e}")))
    }

    fn save(&self, v: &Stored) -> Result<(), ProviderError> {
        let json = SecretBytes::new(serde_json::to_vec(v).expect("serializable"));
        self.state.put(&format!("v/{}", v.id), json.expose()).map_err(state_err)
    }

    fn fields(v: &Stored) -> Fields {
        v.fields.iter().map(|(k, val)| (k.clone(), SecretBytes::new(val.as_bytes().to_vec()))).collect()
    }

    fn set_status(&self, id: &str, status: VersionStatus) -> Result<(), ProviderError> {
        let mut v =
            self.load(id)?.ok_or_else(|| ProviderError::NotFound { provider: KIND, version: id.to_string() })?;
        v.status = status;
        self.save(&v)
    }
}

#[async_trait]
impl Provider for Random {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn create(&self, req: &CreateRequest) -> Result<NewVersion, ProviderError> {
        // Idempotent per rotation: the version id is derived from the rotation id.
        let id = format!("v-{}", req.rotation_id.trim_start_matches("rot-"));
        if let Some(v) = self.load(&id)? {
            return Ok(NewVersion { id, fields: Self::fields(&v), notes: vec![] });
        }
        let fields = self.config.generate().map_err(state_err)?;
        let stored = Stored {
            id: id.clone(),
            rotation_id: req.rotation_id.clone(),
            status: VersionStatus::Active,
            created_unix: rekey_common::time::now_unix(),
            fields,
        };
        self.save(&stored)?;
        Ok(NewVersion { id, fields: Self::fields(&stored), notes: vec![] })
    }

    async fn deactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.set_status(version, VersionStatus::Inactive)
    }

    async fn reactivate(&self, version: &str) -> Result<(), ProviderError> {
        self.set_status(version, VersionStatus::Active)
    }

    async fn delete(&self, version: &str) -> Result<(), ProviderError> {
        if self.load(version)?.is_none() {
            return Err(ProviderError::NotFound { provider: KIND, version: version.to_string() });
        }
        self.state.remove(&format!("v/{version}")).map_err(state_err)
    }

    fn field_names(&self) -> Vec<String> {
        self.config.field_names()
    }

    async fn list(&self) -> Result<Vec<VersionInfo>, ProviderError> {
        let mut out = Vec::new();
        for k in self.state.keys().map_err(state_err)? {
            if let Some(id) = k.strip_prefix("v/")
                && let Some(v) = self.load(id)?
            {
                out.push(VersionInfo { id: v.id, status: v.status, created_unix: Some(v.created_unix) });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Mem;

    fn cfg(toml_like: RandomConfig) -> Random {
        Random::new(toml_like, Arc::new(Mem::default()))
    }

    #[tokio::test]
    async fn create_is_idempotent_per_rotation_and_lifecycle_works() {
        let p = cfg(RandomConfig { format: Format::Token, length: 32, alphabet: "hex".into(), prefix: "tk_".into() });
        let req = CreateRequest { secret: "s".into(), rotation_id: "rot-1".into(), previous_version: None };
        let a = p.create(&req).await.unwrap();
        let b = p.create(&req).await.unwrap();
        assert_eq!(a.id, b.id);
        assert_eq!(a.fields["value"], b.fields["value"]);
        let v = std::str::from_utf8(a.fields["value"].expose()).unwrap().to_string();
        assert!(v.starts_with("tk_") && v.len() == 35 && v[3..].chars().all(|c| c.is_ascii_hexdigit()), "{v}");
        let c = p.create(&CreateRequest { rotation_id: "rot-2".into(), ..req.clone() }).await.unwrap();
        assert_ne!(c.fields["value"], a.fields["value"]);
        assert_eq!(p.list().await.unwrap().len(), 2);
        p.deactivate(&a.id).await.unwrap();
        let l = p.list().await.unwrap();
        assert_eq!(l.iter().find(|x| x.id == a.id).unwrap().status, VersionStatus::Inactive);
        p.reactivate(&a.id).await.unwrap();
        p.delete(&a.id).await.unwrap();
        assert_eq!(p.list().await.unwrap().len(), 1);
        // Gone: every operation on it says so.
        assert!(matches!(p.delete(&a.id).await, Err(ProviderError::NotFound { .. })));
        assert!(matches!(p.deactivate(&a.id).await, Err(ProviderError::NotFound { .. })));
        assert!(matches!(p.reactivate(&a.id).await, Err(ProviderError::NotFound { .. })));
        assert_eq!(p.field_names(), ["value"]);
    }

    #[tokio::test]
    async fn id_secret_pairs_and_validation() {
        let p = cfg(RandomConfig {
            format: Format::IdSecret,
            length: 40,
            alphabet: "alphanumeric".into(),
            prefix: String::new(),
        });
        let v = p
            .create(&CreateRequest { secret: "s".into(), rotation_id: "rot-9".into(), previous_version: None })
            .await
            .unwrap();
        assert_eq!(v.fields.keys().collect::<Vec<_>>(), vec!["id", "secret"]);
        assert_eq!(v.fields["secret"].len(), 40);
        let bad = RandomConfig { format: Format::Token, length: 4, alphabet: "hex".into(), prefix: String::new() };
        assert_eq!(bad.validate().unwrap_err().0, "length");
        let bad = RandomConfig { format: Format::Token, length: 16, alphabet: "a".into(), prefix: String::new() };
        assert_eq!(bad.validate().unwrap_err().0, "alphabet");
    }

    #[test]
    fn configurations_under_128_bits_are_refused_with_the_length_needed() {
        let c = |length: usize, alphabet: &str| RandomConfig {
            format: Format::Token,
            length,
            alphabet: alphabet.into(),
            prefix: String::new(),
        };
        let (field, msg) = c(8, "ab").validate().unwrap_err();
        assert_eq!(field, "length");
        assert!(msg.contains("8 bits of entropy") && msg.contains("at least 128"), "{msg}");
        let (_, msg) = c(24, "hex").validate().unwrap_err();
        assert!(msg.contains("96 bits") && msg.contains("length of at least 32"), "{msg}");
        assert!(c(32, "hex").validate().is_ok());
        assert!(c(22, "base64url").validate().is_ok());
        assert!(c(21, "alphanumeric").validate().is_err());
        assert!(RandomConfig::default().validate().is_ok(), "the defaults are accepted");
    }
}
