//! Direct gRPC clients with chosen credentials, to try what the CLI and the
//! agent would never do (no certificate, a foreign CA, the wrong role).

use rekey_common::tls;
use rekey_proto::v1::admin_service_client::AdminServiceClient;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rustls::ClientConfig;
use std::path::Path;
use std::sync::Arc;

pub fn rt() -> tokio::runtime::Runtime {
    tls::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub fn ca_of(operator_dir: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    tls::certs_from_pem(&std::fs::read_to_string(operator_dir.join("ca.pem")).unwrap(), "ca").unwrap()
}

/// TLS config presenting the agent identity stored in `state_dir`.
pub fn agent_config(state_dir: &Path, ca_dir: &Path) -> Arc<ClientConfig> {
    let pem = std::fs::read_to_string(state_dir.join("identity.pem")).unwrap();
    tls::client_config(&ca_of(ca_dir), tls::certs_from_pem(&pem, "id").unwrap(), tls::key_from_pem(&pem, "id").unwrap())
        .unwrap()
}

pub async fn admin(
    addr: &str,
    cfg: Arc<ClientConfig>,
) -> Result<AdminServiceClient<tonic::transport::Channel>, String> {
    tls::connect(addr, cfg).await.map(AdminServiceClient::new).map_err(|e| e.to_string())
}

pub async fn agent(
    addr: &str,
    cfg: Arc<ClientConfig>,
) -> Result<AgentServiceClient<tonic::transport::Channel>, String> {
    tls::connect(addr, cfg).await.map(AgentServiceClient::new).map_err(|e| e.to_string())
}
