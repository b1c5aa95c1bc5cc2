//! `rekey-agent enroll`: key pair made here, CSR sent with the join token to
//! a coordinator pinned by its CA fingerprint, certificate stored.

use crate::identity::{Enrollment, Identity, IdentityError};
use rcgen::{CertificateParams, KeyPair};
use rekey_common::error::chain;
use rekey_common::ha;
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::EnrollRequest;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The environment variable that may carry the join token.
pub const TOKEN_ENV: &str = "REKEY_JOIN_TOKEN";
/// A join token is short; anything longer is not one.
const MAX_TOKEN_LEN: u64 = 4096;

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
    #[error("invalid --coordinator: {0}")]
    BadCoordinator(String),
    #[error("no coordinator accepted the enrollment (no leader reachable): tried {0}")]
    NoLeader(String),
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
    #[error(
        "a join token is required: --token-file FILE (mode 0600), the {TOKEN_ENV} environment variable, \
         or --token - to read it from stdin"
    )]
    NoToken,
    #[error("give the join token one way only, got {0}")]
    TokenTwice(String),
    #[error("cannot read the join token from {from}")]
    TokenRead {
        from: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {} is accessible by group or others (mode {mode:04o}); run chmod 600 on it", .path.display())]
    TokenFileMode { path: PathBuf, mode: u32 },
    #[error("the join token from {0} is empty")]
    EmptyToken(String),
}

/// Where the join token comes from. `--token T` puts it in the process's
/// arguments, which every local user can read in `/proc/PID/cmdline`: it is
/// kept for compatibility, and the others are preferred.
pub enum TokenSource<'a> {
    /// `--token-file FILE`: readable by its owner only.
    File(&'a Path),
    /// `REKEY_JOIN_TOKEN` (a process's environment is private to its user).
    Env(String),
    /// `--token -`.
    Stdin,
    /// `--token T` (discouraged).
    Arg(&'a str),
}

impl<'a> TokenSource<'a> {
    /// Exactly one of `--token`, `--token-file` and the environment variable.
    pub fn pick(arg: Option<&'a str>, file: Option<&'a Path>, env: Option<String>) -> Result<Self, EnrollError> {
        let given: Vec<&str> =
            [(arg.is_some(), "--token"), (file.is_some(), "--token-file"), (env.is_some(), TOKEN_ENV)]
                .into_iter()
                .filter_map(|(set, name)| set.then_some(name))
                .collect();
        if given.len() > 1 {
            return Err(EnrollError::TokenTwice(given.join(" and ")));
        }
        Ok(match (arg, file, env) {
            (Some("-"), _, _) => TokenSource::Stdin,
            (Some(t), _, _) => TokenSource::Arg(t),
            (_, Some(f), _) => TokenSource::File(f),
            (_, _, Some(e)) => TokenSource::Env(e),
            (None, None, None) => return Err(EnrollError::NoToken),
        })
    }

    fn describe(&self) -> String {
        match self {
            TokenSource::File(p) => format!("token file {}", p.display()),
            TokenSource::Env(_) => TOKEN_ENV.to_string(),
            TokenSource::Stdin => "stdin".into(),
            TokenSource::Arg(_) => "--token".into(),
        }
    }

    /// The token, trimmed. A token file must not be accessible by group or
    /// others (checked on the opened file).
    pub fn read(&self, stdin: impl Read) -> Result<String, EnrollError> {
        let from = self.describe();
        let read_err = |source| EnrollError::TokenRead { from: from.clone(), source };
        let text = match self {
            TokenSource::Arg(t) => t.to_string(),
            TokenSource::Env(t) => t.clone(),
            TokenSource::Stdin => read_bounded(stdin).map_err(read_err)?,
            TokenSource::File(path) => {
                let f = std::fs::File::open(path).map_err(read_err)?;
                let mode = f.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    return Err(EnrollError::TokenFileMode { path: path.to_path_buf(), mode });
                }
                read_bounded(f).map_err(read_err)?
            }
        };
        let token = text.trim();
        if token.is_empty() {
            return Err(EnrollError::EmptyToken(from));
        }
        Ok(token.to_string())
    }
}

fn read_bounded(r: impl Read) -> std::io::Result<String> {
    let mut s = String::new();
    r.take(MAX_TOKEN_LEN).read_to_string(&mut s)?;
    Ok(s)
}

pub struct EnrollOptions<'a> {
    /// Coordinator replicas, tried in order (a follower's leader hint is followed).
    pub coordinators: &'a [String],
    pub token: &'a str,
    pub ca_fingerprint: &'a str,
    pub state_dir: &'a Path,
    pub force: bool,
}

/// How one address answered an enrollment that did not succeed.
enum Attempt {
    /// Unreachable, or a follower that knows no leader: try the next address.
    Next(String),
    /// A follower named the leader: go there at once.
    Leader(String),
    /// Refused for good (pin mismatch, bad token): stop.
    Fatal(EnrollError),
}

pub async fn enroll(opts: EnrollOptions<'_>) -> Result<Enrollment, EnrollError> {
    let pin = tls::normalize_fingerprint(opts.ca_fingerprint)
        .ok_or_else(|| EnrollError::BadFingerprint(opts.ca_fingerprint.to_string()))?;
    let addrs = ha::parse_addresses(opts.coordinators).map_err(EnrollError::BadCoordinator)?;
    if !opts.force
        && let Ok(existing) = Identity::load(opts.state_dir)
    {
        return Err(EnrollError::AlreadyEnrolled(opts.state_dir.display().to_string(), existing.enrollment.host));
    }
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let request = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: rekey_common::VERSION.to_string(),
        token: opts.token.trim().to_string(),
        csr_der: csr.der().to_vec(),
    };
    // One pass: the join token is single-use, so a rerun is the operator's call.
    let mut coordinators = ha::Coordinators::new(addrs.clone());
    let mut tried = Vec::new();
    while let Some(addr) = coordinators.next_address() {
        let resp = match enroll_at(&addr, &pin, request.clone()).await {
            Ok(resp) => resp,
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Leader(leader)) => {
                tried.push((addr, format!("a follower; the leader is at {leader}")));
                coordinators.follow(&leader);
                continue;
            }
            Err(Attempt::Next(why)) => {
                tried.push((addr, why));
                continue;
            }
        };
        let enrollment = Enrollment {
            host: resp.host,
            labels: resp.labels.into_iter().collect(),
            coordinator: addr,
            coordinators: addrs,
            ca_fingerprint: pin,
        };
        Identity::save_enrollment(
            opts.state_dir,
            &enrollment,
            &resp.ca_pem,
            &resp.certificate_pem,
            &key.serialize_pem(),
        )?;
        return Ok(enrollment);
    }
    Err(match tried.as_slice() {
        [(addr, message)] => EnrollError::Connect { addr: addr.clone(), message: message.clone() },
        _ => EnrollError::NoLeader(tried.iter().map(|(a, why)| format!("{a} ({why})")).collect::<Vec<_>>().join(", ")),
    })
}

/// One enrollment attempt at `addr`, the CA pinned to `pin`.
async fn enroll_at(addr: &str, pin: &str, request: EnrollRequest) -> Result<rekey_proto::v1::EnrollResponse, Attempt> {
    let (config, observed) = tls::pinned_client_config(pin).map_err(|e| Attempt::Fatal(e.into()))?;
    let mismatch = |observed: &tls::PinObservation| {
        observed.mismatch().map(|seen| {
            Attempt::Fatal(EnrollError::FingerprintMismatch { addr: addr.to_string(), pinned: pin.to_string(), seen })
        })
    };
    let channel = match tls::connect(addr, config).await {
        Ok(c) => c,
        Err(e) => return Err(mismatch(&observed).unwrap_or(Attempt::Next(chain(&e)))),
    };
    let resp = match AgentServiceClient::new(channel).enroll(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(m) = mismatch(&observed) {
                return Err(m);
            }
            return Err(match (ha::refusal(&status), status.code()) {
                (Some(ha::Refusal::Leader(leader)), _) => Attempt::Leader(leader),
                (Some(ha::Refusal::NoLeader), _) => Attempt::Next(status.message().to_string()),
                (None, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled) => {
                    Attempt::Next(status.message().to_string())
                }
                _ => Attempt::Fatal(EnrollError::Refused(status.message().to_string())),
            });
        }
    };
    // The returned CA must be the one we pinned.
    let ca = tls::certs_from_pem(&resp.ca_pem, "enrollment response").map_err(|e| Attempt::Fatal(e.into()))?;
    if tls::fingerprint(&ca[0]) != pin {
        let seen = tls::fingerprint(&ca[0]);
        return Err(Attempt::Fatal(EnrollError::FingerprintMismatch {
            addr: addr.to_string(),
            pinned: pin.to_string(),
            seen,
        }));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl Sized, EnrollError>) -> String {
        r.err().expect("an error").to_string()
    }

    #[test]
    fn one_token_source_exactly() {
        let f = Path::new("/t");
        assert!(matches!(TokenSource::pick(None, Some(f), None), Ok(TokenSource::File(_))));
        assert!(matches!(TokenSource::pick(None, None, Some("x".into())), Ok(TokenSource::Env(_))));
        assert!(matches!(TokenSource::pick(Some("-"), None, None), Ok(TokenSource::Stdin)));
        assert!(matches!(TokenSource::pick(Some("t"), None, None), Ok(TokenSource::Arg("t"))));
        let e = err(TokenSource::pick(None, None, None));
        assert!(e.starts_with("a join token is required: --token-file FILE"), "{e}");
        let e = err(TokenSource::pick(Some("t"), Some(f), Some("x".into())));
        assert_eq!(e, "give the join token one way only, got --token and --token-file and REKEY_JOIN_TOKEN");
    }

    #[test]
    fn token_files_must_be_private_and_tokens_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("join.token");
        std::fs::write(&p, "abc.def\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = err(TokenSource::File(&p).read(std::io::empty()));
        assert_eq!(
            e,
            format!("token file {} is accessible by group or others (mode 0644); run chmod 600 on it", p.display())
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(TokenSource::File(&p).read(std::io::empty()).unwrap(), "abc.def");
        assert_eq!(TokenSource::Stdin.read(&b"  tok.en \n"[..]).unwrap(), "tok.en");
        assert_eq!(err(TokenSource::Stdin.read(&b"\n"[..])), "the join token from stdin is empty");
        let e = err(TokenSource::File(&dir.path().join("missing")).read(std::io::empty()));
        assert!(e.starts_with("cannot read the join token from token file "), "{e}");
    }
}
