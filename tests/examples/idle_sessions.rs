//! Benchmark: how much does an idle agent session cost rekeyd?
//!
//! Starts a real `rekeyd` process, enrolls N agent identities through the real
//! admin and enrollment APIs (in this process, one key pair each), opens N
//! long-lived mTLS sessions (hello + heartbeats off), then reads rekeyd's RSS
//! from /proc. Prints figures; asserts nothing about timing.
//!
//!     cargo run --release -p rekey-tests --example idle_sessions -- 2000

use rcgen::{CertificateParams, KeyPair};
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::admin_service_client::AdminServiceClient;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{AgentMessage, CreateTokenRequest, EnrollRequest, Hello, agent_message};
use rekey_tests::Coordinator;
use std::time::Instant;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn read(p: std::path::PathBuf) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let tmp = tempfile::tempdir()?;
    let c = Coordinator::start(
        &tmp.path().join("c"),
        "[sessions]\nheartbeat_interval = \"1h\"\nsilence_timeout = \"3h\"\n",
    );
    let pid = c.pid().expect("rekeyd running");
    let op = c.operator_dir();
    let ca = tls::certs_from_pem(&read(op.join("ca.pem")), "ca")?;
    let opcfg = tls::client_config(
        &ca,
        tls::certs_from_pem(&read(op.join("operator.pem")), "op")?,
        tls::key_from_pem(&read(op.join("operator.key")), "op")?,
    )?;
    let mut admin = AdminServiceClient::new(tls::connect(&c.addr(), opcfg).await?);
    let anon = tls::anonymous_client_config(&ca)?;
    let mut enroll = AgentServiceClient::new(tls::connect(&c.addr(), anon).await?);

    let t0 = Instant::now();
    let mut identities = Vec::with_capacity(n);
    for i in 0..n {
        let tok = admin
            .create_token(CreateTokenRequest { host: format!("bench-{i:05}"), ..Default::default() })
            .await?
            .into_inner();
        let key = KeyPair::generate()?;
        let csr = CertificateParams::default().serialize_request(&key)?;
        let r = enroll
            .enroll(EnrollRequest {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "bench".into(),
                token: tok.token,
                csr_der: csr.der().to_vec(),
            })
            .await?
            .into_inner();
        identities.push((r.certificate_pem, key.serialize_pem()));
    }
    let enroll_s = t0.elapsed().as_secs_f64();
    let base = rss_kib(pid);

    let t1 = Instant::now();
    let mut streams = Vec::with_capacity(n);
    for (cert, key) in &identities {
        let cfg = tls::client_config(&ca, tls::certs_from_pem(cert, "c")?, tls::key_from_pem(key, "k")?)?;
        let ch = tls::connect(&c.addr(), cfg).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello { protocol_version: PROTOCOL_VERSION, ..Default::default() })),
        })
        .await?;
        let mut inbound =
            AgentServiceClient::new(ch).session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        inbound.message().await?; // welcome
        streams.push((tx, inbound));
    }
    let connect_s = t1.elapsed().as_secs_f64();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let loaded = rss_kib(pid);
    let per = (loaded.saturating_sub(base)) as f64 / n as f64;
    println!("idle sessions        {n}");
    println!("enroll               {:.1} ms/agent (token + CSR signing + sled flush)", enroll_s * 1000.0 / n as f64);
    println!(
        "connect + hello      {:.2} ms/session (mTLS 1.3 handshake, client and server on the same 2 cores)",
        connect_s * 1000.0 / n as f64
    );
    println!("rekeyd RSS           {base} KiB before, {loaded} KiB with {n} sessions");
    println!("per idle session     {per:.1} KiB");
    let listed = admin.list_agents(rekey_proto::v1::ListAgentsRequest {}).await?.into_inner().agents;
    println!("connected (registry) {}", listed.iter().filter(|a| a.connected).count());
    drop(streams);
    Ok(())
}
