//! Regression tests for what an attacker or an accident could use (issue
//! "trust hardening"), each against real processes over real mTLS.

use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{AgentMessage, Hello, agent_message};
use rekey_tests::{Agent, Coordinator, budget, wait_for};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rekey-security-").tempdir().unwrap()
}

/// Opens an agent session with the agent's real identity and sends nothing:
/// the hello is held back until the caller sends it on the returned sender.
/// The call itself completes only when the coordinator answers the session.
async fn session_holding_hello(
    addr: &str,
    state_dir: &Path,
) -> (mpsc::Sender<AgentMessage>, tokio::task::JoinHandle<Result<(), tonic::Status>>) {
    tls::install_crypto_provider();
    let pem = std::fs::read_to_string(state_dir.join("identity.pem")).unwrap();
    let ca = tls::certs_from_pem(&std::fs::read_to_string(state_dir.join("ca.pem")).unwrap(), "ca").unwrap();
    let cfg = tls::client_config(&ca, tls::certs_from_pem(&pem, "id").unwrap(), tls::key_from_pem(&pem, "id").unwrap())
        .unwrap();
    let channel = tls::connect(addr, cfg).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    let call = tokio::spawn(async move {
        let mut inbound = AgentServiceClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        // Accepted: read until the coordinator ends the stream.
        while inbound.message().await?.is_some() {}
        Ok(())
    });
    (tx, call)
}

fn hello() -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "held".into(),
            secrets: vec![],
            applied: vec![],
        })),
    }
}

/// Issue item 1: a session waiting for its hello when the agent is revoked
/// is closed at once, and the revocation stays — the old code wrote the
/// record it had read before the hello back over the revocation.
#[test]
fn a_revoke_closes_a_session_still_waiting_for_hello_and_stays_revoked() {
    let dir = tmp();
    let c = Coordinator::start(&dir.path().join("c"), "");
    let a = Agent::new(dir.path(), "held-1", &[]);
    a.enroll_ok(&c, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, call) = rt.block_on(session_holding_hello(&c.addr(), &a.state_dir()));
    // Let the coordinator read the record and start waiting for the hello.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!call.is_finished(), "the session must be waiting for the hello");
    let revoked_at = Instant::now();
    c.cli_ok(&["agent", "revoke", "held-1"]);
    // Refused because of the revocation, long before the 10 s hello timeout.
    let status = rt.block_on(async {
        tokio::time::timeout(budget(), call).await.expect("the session ends").unwrap().unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    assert!(revoked_at.elapsed() < Duration::from_secs(8), "closed by the hello timeout, not the revocation");
    // The hello arriving late changes nothing.
    let _ = rt.block_on(tx.send(hello()));
    let agent = c.agent("held-1").unwrap();
    assert_eq!((agent["revoked"].as_bool(), agent["connected"].as_bool()), (Some(true), Some(false)), "{agent}");

    // A fresh session with the revoked certificate is refused too, hello or not.
    let (tx, call) = rt.block_on(session_holding_hello(&c.addr(), &a.state_dir()));
    let _ = rt.block_on(tx.send(hello()));
    let status = rt.block_on(async { tokio::time::timeout(budget(), call).await.unwrap().unwrap().unwrap_err() });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    wait_for("the registry to show held-1 revoked and offline", || {
        c.agent("held-1").is_some_and(|a| a["revoked"] == true && a["connected"] == false)
    });
}
