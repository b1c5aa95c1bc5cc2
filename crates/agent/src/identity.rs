//! The agent's identity on disk, in its state dir:
//!
//! - `identity.pem` (0600): the agent's certificate followed by its private
//!   key, replaced atomically as one file, so a crash during renewal can never
//!   leave a certificate beside the wrong key;
//! - `ca.pem`: the coordinator's CA (pinned by fingerprint at enrollment);
//! - `enrollment.json`: host name, labels, coordinator address, CA fingerprint.
//!
//! The state dir is created 0700 (parents too) and every file in it is 0600:
//! nothing there is for other users.

use rekey_common::tls::{self, Identity as CertIdentity};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this agent is not enrolled: {path} is missing (run `rekey-agent enroll` first)")]
    NotEnrolled { path: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub host: String,
    pub labels: BTreeMap<String, String>,
    /// The address that enrolled this agent (the leader at the time).
    pub coordinator: String,
    /// Every address given at enrollment, in order: where the agent looks
    /// for the leader when `agent.toml` names none (absent before HA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<String>,
    pub ca_fingerprint: String,
}

impl Enrollment {
    /// The addresses given at enrollment (the one that enrolled, for an
    /// enrollment made before several were possible).
    pub fn addresses(&self) -> Vec<String> {
        if self.coordinators.is_empty() { vec![self.coordinator.clone()] } else { self.coordinators.clone() }
    }
}

/// A loaded identity, ready to build a TLS client config.
pub struct Identity {
    pub enrollment: Enrollment,
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert: CertIdentity,
}

pub fn identity_path(dir: &Path) -> PathBuf {
    dir.join("identity.pem")
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IdentityError::NotEnrolled { path: path.to_path_buf() }
        } else {
            IdentityError::Read { path: path.to_path_buf(), source }
        }
    })
}

/// Atomic replace ([`rekey_common::fs::write_atomic`]), creating the state
/// dir (and any missing parent) 0700 on first use.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write { path: path.to_path_buf(), source };
    crate::pipeline::files::private_dir(path.parent().unwrap_or(Path::new("."))).map_err(err)?;
    rekey_common::fs::write_atomic(path, bytes, mode).map_err(err)
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let enr_path = dir.join("enrollment.json");
        let enrollment: Enrollment = serde_json::from_str(&read(&enr_path)?)
            .map_err(|e| IdentityError::Damaged { path: enr_path.clone(), message: e.to_string() })?;
        let ca_path = dir.join("ca.pem");
        let ca = tls::certs_from_pem(&read(&ca_path)?, "ca.pem")
            .map_err(|e| IdentityError::Damaged { path: ca_path.clone(), message: e.to_string() })?;
        let id_path = identity_path(dir);
        let pem = read(&id_path)?;
        let damaged = |message: String| IdentityError::Damaged { path: id_path.clone(), message };
        let chain = tls::certs_from_pem(&pem, "identity.pem").map_err(|e| damaged(e.to_string()))?;
        let key = tls::key_from_pem(&pem, "identity.pem").map_err(|e| damaged(e.to_string()))?;
        let cert = tls::identity_of(&chain[0]).map_err(|e| damaged(e.to_string()))?;
        Ok(Identity { enrollment, ca, chain, key, cert })
    }

    /// Writes a whole new identity (enrollment).
    pub fn save_enrollment(
        dir: &Path,
        enrollment: &Enrollment,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<(), IdentityError> {
        Self::save_certificate(dir, cert_pem, key_pem)?;
        // Nothing in the state dir is for other users.
        write_atomic(&dir.join("ca.pem"), ca_pem.as_bytes(), 0o600)?;
        let json = serde_json::to_vec_pretty(enrollment).expect("serializable");
        write_atomic(&dir.join("enrollment.json"), &json, 0o600)
    }

    /// Replaces certificate and key together (renewal).
    pub fn save_certificate(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<(), IdentityError> {
        let mut both = String::with_capacity(cert_pem.len() + key_pem.len() + 1);
        both.push_str(cert_pem.trim_end());
        both.push('\n');
        both.push_str(key_pem);
        write_atomic(&identity_path(dir), both.as_bytes(), 0o600)
    }

    pub fn client_config(&self) -> Result<std::sync::Arc<rustls::ClientConfig>, tls::TlsError> {
        tls::client_config(&self.ca, self.chain.clone(), self.key.clone_key())
    }
}
