//! Credentials a provider presents to the outside (an API token, a Vault
//! token, an AppRole secret id): always from a file or an environment
//! variable, never from `coordinator.toml` itself.
//!
//! A config names them with a pair of fields, `<name>_file` and `<name>_env`.
//! At config load a file must exist and be readable by its owner only (mode
//! 0600 or 0400: no group or other bits), and a variable must be set; the
//! value itself is read at each use, so replacing the file (or restarting
//! with a new variable) rotates rekey's own credential without a config change.

use crate::FieldError;
use rekey_common::secret::SecretBytes;
use std::path::{Path, PathBuf};

/// Where one credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Env(String),
}

impl Source {
    /// Picks the source from the `<name>_file` / `<name>_env` pair; exactly
    /// one may be set (`required`: one must be set).
    pub fn pick(
        name: &str,
        file: &Option<PathBuf>,
        env: &Option<String>,
        required: bool,
    ) -> Result<Option<Source>, FieldError> {
        match (file, env) {
            (Some(_), Some(_)) => {
                Err((format!("{name}_file"), format!("set either {name}_file or {name}_env, not both")))
            }
            (Some(f), None) => Ok(Some(Source::File(f.clone()))),
            (None, Some(e)) => Ok(Some(Source::Env(e.clone()))),
            (None, None) if required => Err((
                format!("{name}_file"),
                format!(
                    "missing: set {name}_file (a file readable only by rekeyd, mode 0600) or {name}_env (the name of an environment variable)"
                ),
            )),
            (None, None) => Ok(None),
        }
    }

    /// The config field this source came from (for error messages).
    pub fn field(&self, name: &str) -> String {
        match self {
            Source::File(_) => format!("{name}_file"),
            Source::Env(_) => format!("{name}_env"),
        }
    }

    /// Checks at config load that the credential can be read, without reading it.
    pub fn check(&self, name: &str) -> Result<(), FieldError> {
        let field = self.field(name);
        match self {
            Source::File(path) => check_file(path).map_err(|m| (field, m)),
            Source::Env(var) => {
                if var.is_empty() || var.contains('=') {
                    return Err((field, format!("{var:?} is not a valid environment variable name")));
                }
                match std::env::var_os(var) {
                    Some(v) if !v.is_empty() => Ok(()),
                    Some(_) => Err((field, format!("environment variable {var} is empty"))),
                    None => Err((field, format!("environment variable {var} is not set"))),
                }
            }
        }
    }

    /// Reads the credential (surrounding whitespace, e.g. a trailing newline, trimmed).
    pub fn read(&self) -> Result<SecretBytes, String> {
        let raw = match self {
            Source::File(path) => {
                check_file(path)?;
                std::fs::read(path).map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?
            }
            Source::Env(var) => std::env::var_os(var)
                .ok_or_else(|| format!("environment variable {var} is not set"))?
                .into_encoded_bytes(),
        };
        let v = SecretBytes::new(raw.trim_ascii().to_vec());
        if v.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(v)
    }

    /// `file /etc/rekey/token` or `environment variable VAULT_TOKEN`.
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("credentials file {}", p.display()),
            Source::Env(v) => format!("environment variable {v}"),
        }
    }
}

/// A credentials file must be a regular file only its owner can read.
pub fn check_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read credentials file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("credentials file {} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "credentials file {} is accessible by group or others (mode {mode:04o}); run chmod 600 on it",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_must_be_owner_only_and_values_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cr3t-token\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let src = Source::pick("token", &Some(f.clone()), &None, true).unwrap().unwrap();
        let (field, msg) = src.check("token").unwrap_err();
        assert_eq!(field, "token_file");
        assert!(msg.contains("mode 0644") && msg.contains("chmod 600"), "{msg}");
        assert!(src.read().is_err());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        src.check("token").unwrap();
        assert_eq!(src.read().unwrap().expose(), b"s3cr3t-token");
        let missing = Source::File(dir.path().join("nope"));
        assert!(missing.check("token").unwrap_err().1.contains("cannot read credentials file"));
    }

    #[test]
    fn exactly_one_source() {
        let both = Source::pick("token", &Some("/x".into()), &Some("V".into()), true).unwrap_err();
        assert!(both.1.contains("not both"));
        let none = Source::pick("token", &None, &None, true).unwrap_err();
        assert_eq!(none.0, "token_file");
        assert_eq!(Source::pick("token", &None, &None, false).unwrap(), None);
        let unset = Source::Env("REKEY_TEST_SURELY_UNSET_VARIABLE".into()).check("token").unwrap_err();
        assert_eq!(
            unset,
            ("token_env".into(), "environment variable REKEY_TEST_SURELY_UNSET_VARIABLE is not set".into())
        );
    }
}
