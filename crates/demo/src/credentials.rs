//! The demo service's credentials file: env-file lines (`KEY=value`,
//! optional `export `, optional single or double quotes, `#` comments).

use rekey_common::secret::SecretBytes;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {path} has no {key}=... line")]
    Missing { path: PathBuf, key: String },
    #[error("credentials file {path}: {key} is not a demo api key (expected dk_ followed by letters and digits)")]
    Malformed { path: PathBuf, key: String },
}

/// A demo key: `dk_` and at least 16 of `[A-Za-z0-9_-]`.
pub fn is_demo_key(v: &[u8]) -> bool {
    v.strip_prefix(b"dk_").is_some_and(|rest| {
        rest.len() >= 16 && rest.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    })
}

/// The value of `key` in env-file `text` (the last assignment wins).
pub fn parse_env_value(text: &[u8], key: &str) -> Option<SecretBytes> {
    let mut found = None;
    for line in text.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut l = line.trim_ascii_start();
        if let Some(rest) = l.strip_prefix(b"export ") {
            l = rest.trim_ascii_start();
        }
        let Some(rest) = l.strip_prefix(key.as_bytes()) else { continue };
        let rest = rest.trim_ascii_start();
        let Some(value) = rest.strip_prefix(b"=") else { continue };
        let value = value.trim_ascii();
        let value = match value.first() {
            Some(q @ (b'"' | b'\'')) => {
                let inner = &value[1..];
                let end = inner.iter().position(|b| b == q).unwrap_or(inner.len());
                &inner[..end]
            }
            _ => {
                let end =
                    value.windows(2).position(|w| w[0].is_ascii_whitespace() && w[1] == b'#').unwrap_or(value.len());
                value[..end].trim_ascii_end()
            }
        };
        found = Some(SecretBytes::new(value.to_vec()));
    }
    found
}

/// Reads and checks the service's key.
pub fn read_key(path: &Path, key: &str) -> Result<SecretBytes, CredentialsError> {
    let text = std::fs::read(path).map_err(|source| CredentialsError::Read { path: path.to_path_buf(), source })?;
    let v = parse_env_value(&text, key)
        .ok_or_else(|| CredentialsError::Missing { path: path.to_path_buf(), key: key.to_string() })?;
    if !is_demo_key(v.expose()) {
        return Err(CredentialsError::Malformed { path: path.to_path_buf(), key: key.to_string() });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_lines() {
        let text = b"# c\nOTHER=1\r\nexport DEMO_API_KEY = \"dk_0123456789abcdef\" \nDEMO_API_KEYS=x\n";
        assert_eq!(parse_env_value(text, "DEMO_API_KEY").unwrap().expose(), b"dk_0123456789abcdef");
        assert_eq!(parse_env_value(b"K=v # note\n", "K").unwrap().expose(), b"v");
        assert_eq!(parse_env_value(b"K='a b'\n", "K").unwrap().expose(), b"a b");
        assert!(parse_env_value(b"KX=v\n", "K").is_none());
    }

    #[test]
    fn checks_the_key_and_never_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds.env");
        assert!(matches!(read_key(&p, "K"), Err(CredentialsError::Read { .. })));
        std::fs::write(&p, "K=not-a-demo-key-at-all\n").unwrap();
        let e = read_key(&p, "K").unwrap_err().to_string();
        assert!(e.contains("not a demo api key") && !e.contains("not-a-demo"), "{e}");
        std::fs::write(&p, "J=1\n").unwrap();
        assert!(read_key(&p, "K").unwrap_err().to_string().contains("has no K=... line"));
        std::fs::write(&p, "K=dk_abcdefghijklmnop\n").unwrap();
        assert_eq!(read_key(&p, "K").unwrap().expose(), b"dk_abcdefghijklmnop");
    }
}
