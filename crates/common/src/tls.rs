//! mTLS plumbing shared by every rekey binary.
//!
//! - Every connection is TLS 1.3 only, with the `ring` provider (one crypto
//!   provider for the whole workspace; see STACK.md).
//! - Identities live in a URI subject-alternative name: `rekey://agent/NAME`,
//!   `rekey://operator/NAME`. The coordinator's certificate carries the DNS
//!   name [`COORDINATOR_NAME`], which clients verify instead of the address they
//!   dialled (the CA is private and pinned, so a host name adds nothing).
//! - At enrollment the agent has no certificate yet and knows the coordinator
//!   only by its CA fingerprint: [`pinned_client_config`] accepts a server chain
//!   only if it contains a CA with exactly that fingerprint and the leaf
//!   verifies against it. Nothing is sent before that check passes.

use crate::error::Chain;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// DNS name in every coordinator server certificate; clients verify this name.
pub const COORDINATOR_NAME: &str = "rekeyd";
const URI_PREFIX: &str = "rekey://";

/// Installs ring as the process-wide rustls provider. Call first in every
/// binary and test; repeated calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM in {what}")]
    Pem {
        what: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    #[error("tls configuration")]
    Rustls(#[from] rustls::Error),
    #[error("tls verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
}

/// Who is on the other side of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
    /// Certificate serial number, lowercase hex: the unit of revocation.
    pub serial: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }

    /// The URI SAN that names `name` in this role.
    pub fn uri(self, name: &str) -> String {
        format!("{URI_PREFIX}{}/{name}", self.as_str())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role.as_str(), self.name)
    }
}

/// `sha256:HEX` of a DER certificate: how operators pin the CA.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(ring::digest::digest(&ring::digest::SHA256, der)))
}

/// Normalizes a user-supplied fingerprint (`sha256:AB..`, `AB:CD:..`) for comparison.
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let hexpart: String = s.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
    let hexpart = hexpart.to_ascii_lowercase();
    (hexpart.len() == 64 && hexpart.chars().all(|c| c.is_ascii_hexdigit())).then(|| format!("sha256:{hexpart}"))
}

/// Reads the rekey identity from a DER certificate.
pub fn identity_of(der: &[u8]) -> Result<Identity, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let serial = hex::encode(cert.raw_serial());
    let not_after_unix = cert.validity().not_after.timestamp();
    let not_before_unix = cert.validity().not_before.timestamp();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?
        .ok_or_else(|| TlsError::Parse("certificate has no subject alternative name".into()))?;
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else { continue };
        let Some(rest) = uri.strip_prefix(URI_PREFIX) else { continue };
        let (role, name) = rest.split_once('/').unwrap_or((rest, ""));
        let role = match role {
            "agent" => Role::Agent,
            "operator" => Role::Operator,
            _ => continue,
        };
        if !name.is_empty() {
            return Ok(Identity { role, name: name.to_string(), serial, not_before_unix, not_after_unix });
        }
    }
    Err(TlsError::Parse("certificate names no rekey identity (rekey://agent/.. or rekey://operator/..)".into()))
}

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what: what.to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem { what: what.to_string(), source })
}

fn roots_from(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    Ok(Arc::new(roots))
}

/// The coordinator's TLS 1.3 server configuration. `chain` is the server
/// certificate followed by the CA (the CA is sent so enrolling agents can pin it).
///
/// A client certificate must chain to `ca`; a client without one may connect
/// (enrollment is the only call that allows it). Revocation is checked on the
/// first message of every call, not here: a handshake refusal reaches the
/// client as a vague "connection closed", a refused call as a clear reason.
pub fn server_config(
    ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots_from(ca)?, provider()).allow_unauthenticated().build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client configuration with a client certificate (agents after enrollment, operators).
pub fn client_config(
    ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_from(ca)?)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client configuration without a client certificate, trusting `ca` (used by
/// tests and diagnostics to show that certificate-less calls are refused).
pub fn anonymous_client_config(ca: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots_from(ca)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// What the pinned verifier saw, so a mismatch can be reported precisely.
#[derive(Debug, Default, Clone)]
pub struct PinObservation(Arc<Mutex<Option<String>>>);

impl PinObservation {
    /// The fingerprints the server presented, when they did not match the pin.
    pub fn mismatch(&self) -> Option<String> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    observed: PinObservation,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.pin) else {
            let seen: Vec<String> = intermediates.iter().map(|c| fingerprint(c)).collect();
            let seen = if seen.is_empty() { "no CA certificate".to_string() } else { seen.join(", ") };
            if let Ok(mut g) = self.observed.0.lock() {
                *g = Some(seen);
            }
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Client configuration for enrollment: no client certificate; the server
/// must present a CA whose fingerprint is `pin` and a leaf signed by it.
pub fn pinned_client_config(pin: &str) -> Result<(Arc<ClientConfig>, PinObservation), TlsError> {
    let observed = PinObservation::default();
    let verifier = Arc::new(PinnedCaVerifier { pin: pin.to_string(), observed: observed.clone() });
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(cfg), observed))
}

/// HTTP/2 keepalive so a dead peer (cut cable, frozen host) is noticed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected byte stream, as a [`Dialer`] returns it.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// What dialling `host:port` yields.
pub type Dialing = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Conn>>> + Send>>;

/// Opens the TCP connection under every client's TLS: a simulation's network
/// instead of the kernel's (see [`install_dialer`]).
pub type Dialer = fn(String) -> Dialing;

static DIALER: OnceLock<Dialer> = OnceLock::new();

/// Makes every client connection of this process ([`connect`]) dial through
/// `dialer`, for the deterministic simulation (its dialer uses the simulated
/// network inside a simulated host and the kernel's elsewhere). Never called
/// by rekeyd, the agent or the CLI. Once per process; false if one was
/// installed already.
pub fn install_dialer(dialer: Dialer) -> bool {
    DIALER.set(dialer).is_ok()
}

async fn dial(authority: String) -> std::io::Result<Box<dyn Conn>> {
    if let Some(dialer) = DIALER.get() {
        return dialer(authority).await;
    }
    let tcp = TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    Ok(Box::new(tcp))
}

/// Opens a gRPC channel to `addr` (`host:port`) over our own rustls config.
pub async fn connect(addr: &str, tls: Arc<ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    // Plain `http://` in the URI: TLS is done by the connector below, with our
    // verifier and TLS 1.3 only, rather than by tonic's built-in config.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let authority = uri.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
            let tcp = dial(authority).await?;
            let name = ServerName::try_from(COORDINATOR_NAME).expect("static name is valid");
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint.connect_with_connector(connector).await
}

/// Bounds on what a client can hold before it has proven anything. Only
/// `Enroll` accepts a client without a certificate, and it is one short call:
/// such connections are few and brief, or they are an attack on descriptors.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// TLS handshakes in progress at once; beyond, new connections wait in
    /// the listen backlog until one ends.
    pub max_handshakes: usize,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
    /// Open connections without a client certificate; beyond, closed at once.
    pub max_unauthenticated: usize,
    /// A connection without a client certificate is closed after this long,
    /// whatever it is doing (an enrollment takes well under a second).
    pub unauthenticated_lifetime: Duration,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        AcceptLimits {
            max_handshakes: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_unauthenticated: 256,
            unauthenticated_lifetime: Duration::from_secs(30),
        }
    }
}

/// Where the server's connections come from: a kernel listener, or a
/// simulation's. Its streams tell tonic their addresses as a TCP stream does,
/// so requests find the peer's certificate the same way.
pub trait Listener: Send + 'static {
    type Io: AsyncRead
        + AsyncWrite
        + tonic::transport::server::Connected<ConnectInfo = tonic::transport::server::TcpConnectInfo>
        + Unpin
        + Send
        + 'static;

    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, SocketAddr)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;

    fn accept(&self) -> impl Future<Output = std::io::Result<(TcpStream, SocketAddr)>> + Send {
        let accepted = TcpListener::accept(self);
        async move {
            let (tcp, peer) = accepted.await?;
            let _ = tcp.set_nodelay(true);
            Ok((tcp, peer))
        }
    }
}

/// An accepted TLS connection. A connection without a client certificate
/// holds one of the limited unauthenticated slots and ends at its deadline.
pub struct ServerStream<Io = TcpStream> {
    inner: TlsStream<Io>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<Io> ServerStream<Io> {
    /// Whether the deadline passed: then every read and write fails.
    fn expired(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        self.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }
}

fn lifetime_over() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "unauthenticated connection lifetime over")
}

impl<Io: AsyncRead + AsyncWrite + Unpin> tokio::io::AsyncRead for ServerStream<Io> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(lifetime_over()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<Io: AsyncRead + AsyncWrite + Unpin> tokio::io::AsyncWrite for ServerStream<Io> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return std::task::Poll::Ready(Err(lifetime_over()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<Io> tonic::transport::server::Connected for ServerStream<Io>
where
    Io: tonic::transport::server::Connected + AsyncRead + AsyncWrite + Unpin,
{
    // The TLS stream's own: tonic finds the peer certificates in it.
    type ConnectInfo = <TlsStream<Io> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow
/// or hostile client cannot stall the accept loop), yielding established TLS
/// streams for `tonic::transport::Server::serve_with_incoming`, within
/// `limits`. The returned receiver is bounded: under a reconnect storm
/// handshakes wait, memory doesn't grow.
pub fn tls_incoming<L: Listener>(
    listener: L,
    config: Arc<ServerConfig>,
    limits: AcceptLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<ServerStream<L::Io>, std::io::Error>> {
    let (tx, rx) = mpsc::channel::<Result<ServerStream<L::Io>, std::io::Error>>(256);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    let unauthenticated = Arc::new(tokio::sync::Semaphore::new(limits.max_unauthenticated));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %Chain(&e), "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // At the limit, wait for a slot rather than close: the kernel's
            // backlog holds the rest. Closing turned a fleet reconnecting at
            // once (10,000 after a restart) into failures that the agents'
            // backoff then spread over 36 s.
            let handshake = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = handshakes.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (acceptor, tx, unauthenticated) = (acceptor.clone(), tx.clone(), unauthenticated.clone());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::info!(%peer, error = %Chain(&e), "tls handshake refused"),
                    Err(_) => return tracing::info!(%peer, "tls handshake timed out"),
                };
                drop(handshake);
                let (deadline, slot) = if stream.get_ref().1.peer_certificates().is_some() {
                    (None, None)
                } else {
                    let Ok(slot) = unauthenticated.try_acquire_owned() else {
                        return tracing::warn!(
                            %peer,
                            max = limits.max_unauthenticated,
                            "too many connections without a client certificate: connection closed"
                        );
                    };
                    (Some(Box::pin(tokio::time::sleep(limits.unauthenticated_lifetime))), Some(slot))
                };
                let _ = tx.send(Ok(ServerStream { inner: stream, deadline, _slot: slot })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The peer identity of a tonic request, from its verified client certificate.
pub fn request_identity<T>(req: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("this call requires a client certificate issued by rekeyd"))?;
    let leaf = certs.first().ok_or_else(|| tonic::Status::unauthenticated("no client certificate presented"))?;
    identity_of(leaf).map_err(|e| tonic::Status::unauthenticated(format!("unusable client certificate: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA and a server certificate for `rekeyd` signed by it.
    fn server() -> (Arc<ServerConfig>, Vec<CertificateDer<'static>>) {
        install_crypto_provider();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![COORDINATOR_NAME.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let ca_der = ca_cert.der().clone();
        let cfg = server_config(
            std::slice::from_ref(&ca_der),
            vec![cert.der().clone(), ca_der.clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        (cfg, vec![ca_der])
    }

    /// A TLS client without a certificate that completes the handshake and
    /// then sends nothing (no HTTP/2 preface).
    async fn idle_client(
        addr: std::net::SocketAddr,
        ca: &[CertificateDer<'static>],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots_from(ca).unwrap())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from(COORDINATOR_NAME).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.unwrap()
    }

    /// True once the server side closed (EOF or error) within `within`.
    async fn closed_within(c: &mut tokio_rustls::client::TlsStream<TcpStream>, within: Duration) -> bool {
        let mut b = [0u8; 16];
        matches!(tokio::time::timeout(within, c.read(&mut b)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn connections_without_a_certificate_are_few_and_short_lived() {
        let (cfg, ca) = server();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = AcceptLimits {
            max_unauthenticated: 2,
            // Long enough that the "still open" checks below run well inside
            // it even on a loaded machine; the closing checks wait for it.
            unauthenticated_lifetime: Duration::from_secs(10),
            ..AcceptLimits::default()
        };
        let stop = CancellationToken::new();
        let mut incoming = tls_incoming(listener, cfg, limits, stop.clone());
        // The server side: hold every accepted stream and read from it, as
        // hyper does while it waits for the preface.
        let server = tokio::spawn(async move {
            use tokio_stream::StreamExt;
            let mut readers = Vec::new();
            while let Some(Ok(mut s)) = incoming.next().await {
                readers.push(tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    let r = s.read(&mut b).await;
                    let _ = s.shutdown().await;
                    r.is_err()
                }));
            }
            readers
        });
        let mut a = idle_client(addr, &ca).await;
        let mut b = idle_client(addr, &ca).await;
        // A third, over the limit, is closed at once.
        let mut c = idle_client(addr, &ca).await;
        assert!(
            closed_within(&mut c, crate::testing::budget()).await,
            "the third unauthenticated connection stayed open"
        );
        // The first two are still open before their lifetime…
        assert!(!closed_within(&mut a, Duration::from_millis(200)).await);
        // …and closed after it, although they never sent anything.
        let patience = Duration::from_secs(10) + crate::testing::budget();
        assert!(closed_within(&mut a, patience).await, "an idle unauthenticated connection outlived its lifetime");
        assert!(closed_within(&mut b, patience).await);
        // Their slots are free again.
        let mut d = idle_client(addr, &ca).await;
        assert!(!closed_within(&mut d, Duration::from_millis(200)).await, "a slot was not released");
        stop.cancel();
        drop(server);
    }
}
