//! TOML configuration loading with errors an operator can act on: every error
//! names the file and, where it can, the field (`secret[2].rollout.canary`).

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A configuration file that could not be used. Changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },
}

impl ConfigError {
    /// An error about one field found while validating an already parsed file.
    pub fn field(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Field { path: path.to_path_buf(), field: field.into(), message: message.into() }
    }
}

/// Reads and parses `path` as TOML into `T` (which should use
/// `#[serde(deny_unknown_fields)]`).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    parse_toml(path, &text)
}

/// Parses `text` (read from `path`) as TOML into `T`.
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError::Syntax { path: path.to_path_buf(), message: one_line(&e.to_string()) })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let message = one_line(&e.into_inner().to_string());
        if field == "." || field.is_empty() {
            ConfigError::Syntax { path: path.to_path_buf(), message }
        } else {
            ConfigError::Field { path: path.to_path_buf(), field, message }
        }
    })
}

/// toml's messages carry a multi-line source excerpt; keep the first meaningful line.
/// What a secret name may be, on both sides (catalog and agent config): one or
/// more `/`-separated segments of ASCII letters, digits, `-`, `_` and `.`,
/// none empty, `.` or `..`, at most 200 bytes. Names end up in paths (agent
/// state, Vault mounts) and URLs, so nothing may climb out of them.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let expected =
        "expected segments of letters, digits, '-', '_', '.' separated by '/' (no empty, '.' or '..' segment)";
    let segment_ok = |seg: &str| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if name.is_empty() || name.len() > 200 || !name.split('/').all(segment_ok) {
        return Err(format!("invalid secret name {name:?}: {expected}"));
    }
    Ok(())
}

fn one_line(msg: &str) -> String {
    let mut parts =
        msg.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with("-->"));
    let first = parts.next().unwrap_or(msg).trim_start_matches("TOML parse error at ").to_string();
    match parts.next_back() {
        Some(last) if last != first => format!("{first}: {last}"),
        _ => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: std::net::SocketAddr,
        #[serde(default)]
        inner: Vec<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        name: String,
    }

    #[test]
    fn errors_name_file_and_field() {
        let p = Path::new("/etc/rekey/x.toml");
        let e = parse_toml::<Sample>(p, "listen = \"nope\"").unwrap_err().to_string();
        assert!(e.starts_with("/etc/rekey/x.toml: field `listen`"), "{e}");

        let e = parse_toml::<Sample>(p, "listen = \"127.0.0.1:1\"\n[[inner]]\nnam = 'a'").unwrap_err().to_string();
        assert!(e.contains("inner[0]") && e.contains("unknown field `nam`"), "{e}");

        let e = parse_toml::<Sample>(p, "listen = [").unwrap_err().to_string();
        assert!(e.starts_with("/etc/rekey/x.toml:"), "{e}");
    }

    #[test]
    fn secret_names_cannot_climb_out_of_a_path() {
        for ok in ["api-key", "vendor/api_key.v2", "a", "x.y"] {
            assert!(check_secret_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../../x", "a/../b", "/abs", "a//b", "a/", ".", "a b", "x\u{e9}", &"x".repeat(201)] {
            assert!(check_secret_name(bad).is_err(), "{bad}");
        }
    }
}
