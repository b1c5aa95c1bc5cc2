//! `agent.toml`: what this host consumes and how to reach the coordinator.
//! Unknown fields are refused; errors name the file and the field.

use rekey_common::config::{ConfigError, load_toml, parse_toml};
use rekey_common::time::serde_duration;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// `host:port` of rekeyd; defaults to the address used at enrollment.
    coordinator: Option<String>,
    state_dir: PathBuf,
    #[serde(default)]
    reconnect: RawReconnect,
    #[serde(default, rename = "secret")]
    secrets: Vec<RawSecret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawReconnect {
    #[serde(with = "serde_duration")]
    initial_backoff: Duration,
    #[serde(with = "serde_duration")]
    max_backoff: Duration,
}

impl Default for RawReconnect {
    fn default() -> Self {
        RawReconnect { initial_backoff: Duration::from_millis(500), max_backoff: Duration::from_secs(30) }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    name: String,
}

/// A secret this host consumes.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretConfig {
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub path: PathBuf,
    pub coordinator: Option<String>,
    pub state_dir: PathBuf,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub secrets: Vec<SecretConfig>,
}

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        Self::validate(path, load_toml(path)?)
    }

    pub fn from_str(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        Self::validate(path, parse_toml(path, text)?)
    }

    fn validate(path: &Path, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(c) = &raw.coordinator
            && c.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none()
        {
            return Err(ConfigError::field(path, "coordinator", format!("expected HOST:PORT, got {c:?}")));
        }
        if raw.reconnect.initial_backoff.is_zero() || raw.reconnect.initial_backoff > raw.reconnect.max_backoff {
            return Err(ConfigError::field(
                path,
                "reconnect.initial_backoff",
                "must be greater than zero and at most reconnect.max_backoff",
            ));
        }
        let mut seen = BTreeSet::new();
        let mut secrets = Vec::new();
        for (i, s) in raw.secrets.into_iter().enumerate() {
            if s.name.is_empty()
                || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            {
                return Err(ConfigError::field(
                    path,
                    format!("secret[{i}].name"),
                    format!("invalid secret name {:?}: expected letters, digits, '-', '_', '.', '/'", s.name),
                ));
            }
            if !seen.insert(s.name.clone()) {
                return Err(ConfigError::field(
                    path,
                    format!("secret[{i}].name"),
                    format!("secret {:?} is declared twice", s.name),
                ));
            }
            secrets.push(SecretConfig { name: s.name });
        }
        Ok(AgentConfig {
            path: path.to_path_buf(),
            coordinator: raw.coordinator,
            state_dir: base.join(raw.state_dir),
            initial_backoff: raw.reconnect.initial_backoff,
            max_backoff: raw.reconnect.max_backoff,
            secrets,
        })
    }

    pub fn secret_names(&self) -> Vec<String> {
        self.secrets.iter().map(|s| s.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let p = Path::new("/etc/rekey/agent.toml");
        let c = AgentConfig::from_str(p, "state_dir = 'state'\n[[secret]]\nname = 'api-key'\n").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/etc/rekey/state"));
        assert_eq!(c.secret_names(), vec!["api-key"]);

        let e =
            AgentConfig::from_str(p, "state_dir = 's'\n[[secret]]\nname = 'a'\n[[secret]]\nname = 'a'\n").unwrap_err();
        assert!(e.to_string().contains("secret[1].name"), "{e}");
        let e = AgentConfig::from_str(p, "state_dir = 's'\ncoordinator = 'nohost'").unwrap_err();
        assert!(e.to_string().contains("field `coordinator`"), "{e}");
        let e = AgentConfig::from_str(p, "state_dir = 's'\n[[secret]]\nname = 'a'\npath = '/x'\n").unwrap_err();
        assert!(e.to_string().contains("secret[0]") && e.to_string().contains("unknown field `path`"), "{e}");
        let e = AgentConfig::from_str(p, "[reconnect]\nmax_backoff='1s'").unwrap_err();
        assert!(e.to_string().contains("missing field `state_dir`"), "{e}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// deploy/agent.toml is documentation people copy: it must parse.
    #[test]
    fn the_deploy_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/agent.toml");
        let c = AgentConfig::from_file(&path).unwrap();
        assert!(!c.secrets.is_empty());
    }
}
