//! `rekey-agent enroll`: key pair made here, CSR sent with the join token to
//! a coordinator pinned by its CA fingerprint, certificate stored.

use crate::identity::{Enrollment, Identity, IdentityError};
use rcgen::{CertificateParams, KeyPair};
use rekey_common::error::chain;
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::EnrollRequest;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid --ca-fingerprint {0:?}: expected sha256: followed by 64 hexadecimal characters")]
    BadFingerprint(String),
    #[error(
        "the coordinator at {addr} presented CA {seen}, which does not match --ca-fingerprint {pinned}; \
         the join token was not sent"
    )]
    FingerprintMismatch { addr: String, pinned: String, seen: String },
    #[error("cannot reach the coordinator at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the coordinator refused the enrollment: {0}")]
    Refused(String),
    #[error("cannot generate the key pair or CSR")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0} already holds an enrollment for {1}; pass --force to replace it")]
    AlreadyEnrolled(String, String),
}

pub struct EnrollOptions<'a> {
    pub coordinator: &'a str,
    pub token: &'a str,
    pub ca_fingerprint: &'a str,
    pub state_dir: &'a Path,
    pub force: bool,
}

pub async fn enroll(opts: EnrollOptions<'_>) -> Result<Enrollment, EnrollError> {
    let pin = tls::normalize_fingerprint(opts.ca_fingerprint)
        .ok_or_else(|| EnrollError::BadFingerprint(opts.ca_fingerprint.to_string()))?;
    if !opts.force
        && let Ok(existing) = Identity::load(opts.state_dir)
    {
        return Err(EnrollError::AlreadyEnrolled(opts.state_dir.display().to_string(), existing.enrollment.host));
    }
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;

    let (config, observed) = tls::pinned_client_config(&pin)?;
    let addr = opts.coordinator.to_string();
    let mismatch = |observed: &tls::PinObservation| {
        observed.mismatch().map(|seen| EnrollError::FingerprintMismatch {
            addr: addr.clone(),
            pinned: pin.clone(),
            seen,
        })
    };
    let channel = match tls::connect(&addr, config).await {
        Ok(c) => c,
        Err(e) => {
            return Err(mismatch(&observed).unwrap_or(EnrollError::Connect { addr: addr.clone(), message: chain(&e) }));
        }
    };
    let resp = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: rekey_common::VERSION.to_string(),
            token: opts.token.trim().to_string(),
            csr_der: csr.der().to_vec(),
        })
        .await;
    let resp = match resp {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(m) = mismatch(&observed) {
                return Err(m);
            }
            return Err(match status.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                    EnrollError::Connect { addr, message: status.message().to_string() }
                }
                _ => EnrollError::Refused(status.message().to_string()),
            });
        }
    };
    // The returned CA must be the one we pinned.
    let ca = tls::certs_from_pem(&resp.ca_pem, "enrollment response")?;
    if tls::fingerprint(&ca[0]) != pin {
        return Err(EnrollError::FingerprintMismatch { addr, pinned: pin, seen: tls::fingerprint(&ca[0]) });
    }
    let enrollment = Enrollment {
        host: resp.host,
        labels: resp.labels.into_iter().collect(),
        coordinator: opts.coordinator.to_string(),
        ca_fingerprint: pin,
    };
    Identity::save_enrollment(opts.state_dir, &enrollment, &resp.ca_pem, &resp.certificate_pem, &key.serialize_pem())?;
    Ok(enrollment)
}
