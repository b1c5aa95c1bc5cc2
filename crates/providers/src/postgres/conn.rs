//! Connecting as rekey's admin role: the URL (never holding a password),
//! the password from its file or variable read at each connection, TLS
//! through rustls (ring) when the URL's `sslmode` asks for it.
//!
//! `sslmode`: absent or `disable` → no TLS; `require`, `verify-ca` and
//! `verify-full` → TLS with the server's certificate and host name verified
//! against `ca_file` or the system roots. rekey is stricter than libpq's
//! `require` on purpose: it never sends its admin credential to a server it
//! has not verified. `prefer` and `allow` (which fall back to plain text
//! silently) are refused.

use super::KIND;
use crate::ProviderError;
use crate::credential::Source;
use rekey_common::secret::SecretBytes;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::Client;
use tokio_postgres::config::SslMode;

/// The admin connection's settings, parsed once at load.
#[derive(Clone, Debug)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: bool,
    ca_file: Option<PathBuf>,
    password: Option<Source>,
    timeout: Duration,
}

/// Splits `sslmode` out of a URL or key=value string (tokio-postgres knows
/// fewer modes than libpq); returns the rest and the mode.
fn split_sslmode(url: &str) -> (String, Option<String>) {
    if let Some((base, query)) = url.split_once('?') {
        let mut mode = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| match kv.split_once('=') {
                Some(("sslmode", v)) => {
                    mode = Some(v.to_string());
                    false
                }
                _ => true,
            })
            .collect();
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        return (rest, mode);
    }
    if url.contains("://") {
        return (url.to_string(), None);
    }
    let mut mode = None;
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|kv| match kv.split_once('=') {
            Some(("sslmode", v)) => {
                mode = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    (kept.join(" "), mode)
}

impl Target {
    /// Parses the URL; (field, message) when it cannot work.
    pub fn parse(
        url: &str,
        ca_file: Option<&Path>,
        password: Option<Source>,
        timeout: Duration,
    ) -> Result<Target, (String, String)> {
        let field = |m: String| ("url".to_string(), m);
        let (rest, mode) = split_sslmode(url);
        let tls = match mode.as_deref() {
            None | Some("disable") => false,
            Some("require" | "verify-ca" | "verify-full") => true,
            Some(m @ ("prefer" | "allow")) => {
                return Err(field(format!(
                    "sslmode={m} may fall back to an unencrypted connection: use sslmode=verify-full (or require; rekey verifies the certificate either way) or sslmode=disable"
                )));
            }
            Some(m) => {
                return Err(field(format!("sslmode={m:?} is not one of disable, require, verify-ca, verify-full")));
            }
        };
        let mut config = tokio_postgres::Config::from_str(&rest)
            .map_err(|e| field(format!("not a PostgreSQL connection URL: {e}")))?;
        if config.get_password().is_some() {
            return Err(field(
                "holds a password: take it out of the URL and put it in password_file (mode 0600) or password_env"
                    .into(),
            ));
        }
        if config.get_user().is_none() {
            return Err(field("names no user: postgres://USER@HOST:PORT/DB".into()));
        }
        if config.get_hosts().is_empty() {
            return Err(field("names no host: postgres://USER@HOST:PORT/DB".into()));
        }
        if ca_file.is_some() && !tls {
            return Err((
                "ca_file".into(),
                "is set but the url does not ask for TLS (add ?sslmode=verify-full)".into(),
            ));
        }
        config.ssl_mode(if tls { SslMode::Require } else { SslMode::Disable });
        config.connect_timeout(timeout);
        config.application_name("rekey");
        Ok(Target { config, tls, ca_file: ca_file.map(Path::to_path_buf), password, timeout })
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or_default()
    }

    fn tls_config(&self) -> Result<rustls::ClientConfig, ProviderError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                use rustls_pki_types::CertificateDer;
                use rustls_pki_types::pem::PemObject;
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<_, _>>())
                    .map_err(|e| ProviderError::failed(KIND, format!("ca_file {}: {e}", path.display())))?;
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| ProviderError::failed(KIND, format!("ca_file {}: {e}", path.display())))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ProviderError::failed(KIND, format!("tls: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// A fresh admin connection (its driver runs in a task of its own until
    /// the client is dropped).
    pub async fn connect(&self) -> Result<Client, ProviderError> {
        let mut config = self.config.clone();
        if let Some(src) = &self.password {
            let pw: SecretBytes = src.read().map_err(|m| ProviderError::failed(KIND, m))?;
            config.password(pw.expose());
        }
        let what = || format!("connect as {}", self.user());
        let fut = async {
            if self.tls {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config()?);
                let (client, conn) = config.connect(tls).await.map_err(|e| pg_error(&what(), &e))?;
                tokio::spawn(async move { drop(conn.await) });
                Ok(client)
            } else {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| pg_error(&what(), &e))?;
                tokio::spawn(async move { drop(conn.await) });
                Ok(client)
            }
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ProviderError::transient(KIND, format!("{}: no answer within {:?}", what(), self.timeout)))?
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A PostgreSQL error in words: the server's code and message when it sent
/// one (never a statement: they carry verifiers), else the client's error.
pub fn pg_error(op: &str, e: &tokio_postgres::Error) -> ProviderError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // Class 08 (connection), 53 (resources), 57P (shutdown), 40 (rollback): worth a retry.
        let retryable = ["08", "53", "57P", "40"].iter().any(|c| code.starts_with(c));
        let hint = match code {
            "28P01" | "28000" => "; rekey's admin credential was refused",
            "42501" => "; rekey's admin role lacks the privilege (it needs CREATEROLE, and ADMIN on the base role)",
            _ => "",
        };
        let message = format!("{op}: {} ({code}){hint}", db.message());
        return ProviderError::Failed { provider: KIND, message, retryable };
    }
    let closed = e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let mut message = format!("{op}: {e}");
    if let Some(s) = std::error::Error::source(e) {
        message.push_str(&format!(": {s}"));
    }
    ProviderError::Failed { provider: KIND, message, retryable: closed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<Target, (String, String)> {
        Target::parse(url, None, None, Duration::from_secs(5))
    }

    #[test]
    fn sslmode_is_read_by_rekey_and_weak_modes_are_refused() {
        assert!(!parse("postgres://admin@db:5432/app").unwrap().tls);
        assert!(parse("postgres://admin@db:5432/app?sslmode=verify-full&connect_timeout=3").unwrap().tls);
        assert!(parse("host=db user=admin sslmode=require").unwrap().tls);
        let e = parse("postgres://admin@db/app?sslmode=prefer").unwrap_err();
        assert_eq!(e.0, "url");
        assert!(e.1.contains("fall back"), "{}", e.1);
        assert!(parse("postgres://admin@db/app?sslmode=bogus").unwrap_err().1.contains("not one of"));
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_echoing_it() {
        let e = parse("postgres://admin:hunter22@db/app").unwrap_err();
        assert!(e.1.contains("password_file") && !e.1.contains("hunter22"), "{}", e.1);
        assert!(parse("postgres://db/app").unwrap_err().1.contains("no user"));
        let ca = Target::parse("postgres://a@db/app", Some(Path::new("/ca.pem")), None, Duration::from_secs(1));
        assert_eq!(ca.unwrap_err().0, "ca_file");
    }
}
