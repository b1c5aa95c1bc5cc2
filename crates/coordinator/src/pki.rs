//! The coordinator's certificate authority.
//!
//! The CA key is generated here, sealed with the master key before it touches
//! the store, and lives unsealed only in memory. The coordinator's own TLS
//! server key is generated fresh at every start and never written anywhere.
//! Agent certificates are short-lived and signed from a CSR: only the CSR's
//! public key is used; name, usages and lifetime are decided here.

use crate::crypto::{CryptoError, Key};
use crate::store::{Store, StoreError};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rekey_common::tls::{self, COORDINATOR_NAME, Role};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::time::Duration;
use time::OffsetDateTime;

const CA_CERT: &str = "ca_cert_pem";
const CA_KEY: &str = "ca_key_sealed";
const CA_KEY_LABEL: &str = "rekey/ca-key";
const DEK: &str = "dek_sealed";
const DEK_LABEL: &str = "rekey/dek";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Accept some clock skew between coordinator and hosts: certificates start
/// this long before now (at most a quarter of their lifetime).
const BACKDATE: Duration = Duration::from_secs(300);

fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 4)
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("certificate generation failed")]
    Rcgen(#[from] rcgen::Error),
    #[error("the certificate signing request is invalid or its signature does not verify")]
    BadCsr(#[source] rcgen::Error),
    #[error("the store holds a CA certificate but no sealed CA key (data dir damaged)")]
    Inconsistent,
}

/// The CA plus the store's data-encryption key, both unsealed in memory.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    dek: std::sync::Arc<Key>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

/// A certificate just issued.
pub struct Issued {
    pub cert_pem: String,
    pub serial: String,
    pub not_after_unix: i64,
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).map_err(|_| CryptoError::Random)?;
    b[0] &= 0x7f; // positive INTEGER
    b[0] |= 0x01; // no leading zero byte to strip: serial hex is stable
    Ok(SerialNumber::from_slice(&b))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "rekey");
    d.push(DnType::CommonName, cn);
    d
}

impl Ca {
    /// Loads the CA from the store, or creates it (and the DEK) on first start.
    /// Returns the CA and whether it was just created.
    pub fn load_or_create(store: &Store, master: &Key) -> Result<(Ca, bool), PkiError> {
        if let Some(cert) = store.meta_get(CA_CERT)? {
            let sealed = store.meta_get(CA_KEY)?.ok_or(PkiError::Inconsistent)?;
            let key_pem = master.open(CA_KEY_LABEL, &sealed)?;
            let key = KeyPair::from_pem(std::str::from_utf8(key_pem.expose()).map_err(|_| PkiError::Inconsistent)?)?;
            let dek = master.unwrap_key(DEK_LABEL, &store.meta_get(DEK)?.ok_or(PkiError::Inconsistent)?)?;
            let cert_pem = String::from_utf8(cert).map_err(|_| PkiError::Inconsistent)?;
            let cert_der =
                tls::certs_from_pem(&cert_pem, "stored CA certificate").map_err(|_| PkiError::Inconsistent)?.remove(0);
            return Ok((Ca { cert_pem, cert_der, key, dek: std::sync::Arc::new(dek) }, false));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("rekey coordinator CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let dek = Key::generate()?;
        // Sealed material first, the certificate last: a crash in between
        // leaves no CA certificate, so the next start simply creates a new CA.
        store.meta_put(DEK, &master.wrap(DEK_LABEL, &dek)?)?;
        store.meta_put(CA_KEY, &master.seal(CA_KEY_LABEL, key.serialize_pem().as_bytes())?)?;
        store.meta_put(CA_CERT, cert.pem().as_bytes())?;
        Ok((Ca { cert_pem: cert.pem(), cert_der: cert.der().clone(), key, dek: std::sync::Arc::new(dek) }, true))
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> String {
        tls::fingerprint(&self.cert_der)
    }

    /// The store's data-encryption key (seals secret values at rest).
    pub fn dek(&self) -> std::sync::Arc<Key> {
        self.dek.clone()
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// A fresh server certificate and key for this process's listener. The
    /// chain includes the CA so enrolling agents can match their pin.
    pub fn issue_server(
        &self,
        extra_names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let key = KeyPair::generate()?;
        let mut names = vec![COORDINATOR_NAME.to_string()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = dn(COORDINATOR_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    fn client_params(
        &self,
        role: Role,
        name: &str,
        lifetime: Duration,
    ) -> Result<(CertificateParams, SerialNumber), PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.subject_alt_names = vec![SanType::URI(role.uri(name).try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - backdate(lifetime);
        params.not_after = now + lifetime;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        Ok((params, serial))
    }

    /// Checks that a CSR parses and its signature verifies, without signing.
    pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map(|_| ())
            .map_err(PkiError::BadCsr)
    }

    /// Signs an agent certificate for `name` from the agent's CSR.
    pub fn sign_agent_csr(&self, csr_der: &[u8], name: &str, lifetime: Duration) -> Result<Issued, PkiError> {
        self.sign_csr(Role::Agent, csr_der, name, lifetime)
    }

    /// Signs an operator certificate for `name` from a CSR made where the
    /// operator keeps the key (`rekey operator create`).
    pub fn sign_operator_csr(&self, csr_der: &[u8], name: &str, lifetime: Duration) -> Result<Issued, PkiError> {
        self.sign_csr(Role::Operator, csr_der, name, lifetime)
    }

    /// Only the CSR's public key is used: name, role, usages and lifetime are ours.
    fn sign_csr(&self, role: Role, csr_der: &[u8], name: &str, lifetime: Duration) -> Result<Issued, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(PkiError::BadCsr)?;
        let (params, serial) = self.client_params(role, name, lifetime)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: hex::encode(serial.to_bytes()),
            not_after_unix: params.not_after.unix_timestamp(),
        })
    }

    /// A new operator credential: certificate and its private key (PEM).
    pub fn issue_operator(&self, name: &str, lifetime: Duration) -> Result<(Issued, String), PkiError> {
        let key = KeyPair::generate()?;
        let (params, serial) = self.client_params(Role::Operator, name, lifetime)?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            Issued {
                cert_pem: cert.pem(),
                serial: hex::encode(serial.to_bytes()),
                not_after_unix: params.not_after.unix_timestamp(),
            },
            key.serialize_pem(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_sealed_and_signs_only_the_csr_key() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let fp = {
            let store = Store::open(dir.path()).unwrap();
            let (ca, created) = Ca::load_or_create(&store, &master).unwrap();
            assert!(created);
            // The sealed key in the store is not the PEM.
            let sealed = store.meta_get(CA_KEY).unwrap().unwrap();
            assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"));
            let fp = ca.fingerprint();
            drop(ca);
            store.close().unwrap();
            fp
        };
        let store = Store::open(dir.path()).unwrap();
        let (ca, created) = Ca::load_or_create(&store, &master).unwrap();
        assert!(!created);
        assert_eq!(ca.fingerprint(), fp);
        // The wrong master key cannot open it.
        assert!(matches!(
            Ca::load_or_create(&store, &Key::generate().unwrap()),
            Err(PkiError::Crypto(CryptoError::Open { .. }))
        ));

        // A CSR asking to be an operator still yields an agent certificate named by us.
        let agent_key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil".to_string()]).unwrap();
        req.subject_alt_names = vec![SanType::URI(Role::Operator.uri("root").try_into().unwrap())];
        let csr = req.serialize_request(&agent_key).unwrap();
        let issued = ca.sign_agent_csr(csr.der(), "web-1", Duration::from_secs(3600)).unwrap();
        let der = tls::certs_from_pem(&issued.cert_pem, "issued").unwrap().remove(0);
        let id = tls::identity_of(&der).unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Agent, "web-1"));
        assert_eq!(id.serial, issued.serial);
        assert!(matches!(ca.sign_agent_csr(b"garbage", "x", Duration::from_secs(1)), Err(PkiError::BadCsr(_))));
    }
}
