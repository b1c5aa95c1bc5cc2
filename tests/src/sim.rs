//! Simulated agents for load: thousands of them on one tokio runtime in this
//! process, each with its own identity enrolled through the real enrollment
//! RPC, its own mTLS session and the real protocol (hello, heartbeats at the
//! welcome's interval, stage reports, dry runs, rollbacks), and the real
//! agent's reconnect backoff ([`rekey_agent::session::Backoff`]). Only the
//! apply step is simulated: it takes [`SimOptions::apply`] and fails for a
//! deterministic [`SimOptions::fail_rate`] share of hosts. Unlike
//! [`crate::scripted`] (a thread and a `rekey-agent enroll` process per
//! agent), nothing here costs more than a task and a connection per host.

use anyhow::{Context, Result};
use rcgen::{CertificateParams, KeyPair};
use rekey_agent::session::Backoff;
use rekey_common::secret::fingerprint_fields;
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::admin_service_client::AdminServiceClient;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{
    AgentMessage, CreateTokenRequest, Delivery, EnrollRequest, Heartbeat, Hello, PreflightCheck, PreflightResult,
    ScanResult, Stage, StageReport, agent_message, coordinator_message,
};
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// One enrolled identity (what `rekey-agent enroll` would leave in its state dir).
pub struct Identity {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// An operator's admin client for the coordinator whose operator
/// credential is in `operator_dir`, reading answers of any size.
pub async fn admin(addr: &str, operator_dir: &std::path::Path) -> Result<AdminServiceClient<Channel>> {
    let read = |f: &str| std::fs::read_to_string(operator_dir.join(f)).with_context(|| format!("read {f}"));
    let ca = tls::certs_from_pem(&read("ca.pem")?, "ca")?;
    let cfg = tls::client_config(
        &ca,
        tls::certs_from_pem(&read("operator.pem")?, "operator")?,
        tls::key_from_pem(&read("operator.key")?, "operator")?,
    )?;
    Ok(AdminServiceClient::new(tls::connect(addr, cfg).await?).max_decoding_message_size(usize::MAX))
}

/// Enrolls `names` (labels `labels` each) through the admin and enrollment
/// APIs, `concurrency` at a time, as the agents would: a join token, a fresh
/// key pair, and a CSR signed by rekeyd over a connection of its own (rekeyd
/// cuts unauthenticated connections short, so they are never shared).
pub async fn enroll(
    addr: &str,
    operator_dir: &std::path::Path,
    names: &[String],
    labels: &HashMap<String, String>,
    concurrency: usize,
) -> Result<Vec<Identity>> {
    let admin = admin(addr, operator_dir).await?;
    let ca = tls::certs_from_pem(&std::fs::read_to_string(operator_dir.join("ca.pem"))?, "ca")?;
    let anonymous = tls::anonymous_client_config(&ca)?;
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let (admin, anonymous, gate, addr) = (admin.clone(), anonymous.clone(), gate.clone(), addr.to_string());
        let (name, labels) = (name.clone(), labels.clone());
        tasks.spawn(async move {
            let _slot = gate.acquire_owned().await?;
            let mut last = None;
            // A connection cut mid-call leaves the token's fate unknown: a new one.
            for _ in 0..3 {
                match enroll_one(&addr, admin.clone(), anonymous.clone(), &name, &labels).await {
                    Ok(id) => return anyhow::Ok((i, id)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("tried"))
        });
    }
    let mut out: Vec<Option<Identity>> = (0..names.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (i, id) = done??;
        out[i] = Some(id);
    }
    Ok(out.into_iter().flatten().collect())
}

async fn enroll_one(
    addr: &str,
    mut admin: AdminServiceClient<Channel>,
    anonymous: Arc<rustls::ClientConfig>,
    name: &str,
    labels: &HashMap<String, String>,
) -> Result<Identity> {
    let tok =
        admin.create_token(CreateTokenRequest { host: name.into(), labels: labels.clone(), ttl_seconds: 0 }).await?;
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    let mut enroller = AgentServiceClient::new(tls::connect(addr, anonymous).await?);
    let r = enroller
        .enroll(EnrollRequest {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "sim".into(),
            token: tok.into_inner().token,
            csr_der: csr.der().to_vec(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("enroll {name}: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(Identity { name: name.into(), cert_pem: r.certificate_pem, key_pem: key.serialize_pem() })
}

/// How the simulated hosts behave.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The secrets every host consumes (sent in its hello).
    pub secrets: Vec<String>,
    /// How long an apply (write, restart, health check) takes.
    pub apply: Duration,
    /// Share of hosts whose apply fails (then rolls back), 0.0..=1.0,
    /// chosen by a hash of host and version so a run is repeatable.
    pub fail_rate: f64,
    /// The agent's reconnect backoff (`[reconnect]`; the agent's defaults
    /// are 500 ms and 30 s).
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            secrets: Vec::new(),
            apply: Duration::ZERO,
            fail_rate: 0.0,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What the fleet has seen, counted across every host.
#[derive(Default, Debug)]
pub struct Stats {
    /// Sessions welcomed and still open.
    pub connected: AtomicUsize,
    /// Sessions welcomed, ever.
    pub sessions: AtomicU64,
    /// Connection attempts that failed before a welcome (each followed by a backoff).
    pub connect_errors: AtomicU64,
    /// Those failures by what they said (the error chain, cut at 100 characters).
    pub error_kinds: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Established sessions that ended (rekeyd went away, a stream broke).
    pub lost: AtomicU64,
    pub deliveries: AtomicU64,
    pub reports: AtomicU64,
}

/// N simulated hosts, each reconnecting forever until [`Fleet::stop`].
pub struct Fleet {
    pub stats: Arc<Stats>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Fleet {
    /// Starts one session task per identity (all at once, as after a
    /// coordinator restart: the backoff spreads the retries).
    pub fn start(addr: &str, ca_pem: &str, ids: Vec<Identity>, opts: SimOptions) -> Result<Fleet> {
        let ca: Arc<Vec<CertificateDer<'static>>> = Arc::new(tls::certs_from_pem(ca_pem, "ca")?);
        let (stats, stop) = (Arc::new(Stats::default()), CancellationToken::new());
        let opts = Arc::new(opts);
        let mut tasks = tokio::task::JoinSet::new();
        for id in ids {
            let host = Host { addr: addr.to_string(), ca: ca.clone(), id: Arc::new(id), opts: opts.clone() };
            tasks.spawn(host.run(stats.clone(), stop.clone()));
        }
        Ok(Fleet { stats, stop, tasks })
    }

    pub fn connected(&self) -> usize {
        self.stats.connected.load(Ordering::Relaxed)
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Host {
    addr: String,
    ca: Arc<Vec<CertificateDer<'static>>>,
    id: Arc<Identity>,
    opts: Arc<SimOptions>,
}

/// Whether this host's apply of `version` fails, at `rate` over all hosts.
fn fails(host: &str, version: &str, rate: f64) -> bool {
    // FNV-1a: stable across runs and platforms, no dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain([0]).chain(version.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h % 10_000) < (rate.clamp(0.0, 1.0) * 10_000.0) as u64
}

fn report(d: &Delivery, stage: Stage, fingerprint: &str, error: &str) -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Report(StageReport {
            rotation_id: d.rotation_id.clone(),
            secret: d.secret.clone(),
            version_id: d.version_id.clone(),
            stage: stage as i32,
            fingerprint: fingerprint.to_string(),
            error: error.to_string(),
            at_unix_ms: rekey_common::time::now_unix_ms(),
        })),
    }
}

impl Host {
    async fn run(self, stats: Arc<Stats>, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.opts.initial_backoff, self.opts.max_backoff);
        while !stop.is_cancelled() {
            match self.session(&stats, &stop).await {
                // Welcomed, then lost: start the backoff over, as the agent does.
                Ok(true) => {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                }
                Ok(false) => return,
                Err(e) => {
                    stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    let kind: String = format!("{e:#}").chars().take(100).collect();
                    *stats.error_kinds.lock().expect("error kinds lock").entry(kind).or_default() += 1;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One session: `Ok(true)` if it was welcomed and then lost, `Ok(false)`
    /// when stopped, an error if it never got a welcome.
    async fn session(&self, stats: &Stats, stop: &CancellationToken) -> Result<bool> {
        let cfg = tls::client_config(
            &self.ca,
            tls::certs_from_pem(&self.id.cert_pem, "identity")?,
            tls::key_from_pem(&self.id.key_pem, "identity")?,
        )?;
        let channel = tls::connect(&self.addr, cfg).await?;
        let (tx, rx) = mpsc::channel(64);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "sim".into(),
            secrets: self.opts.secrets.clone(),
            applied: Vec::new(),
        };
        tx.send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await?;
        let mut inbound = AgentServiceClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let every = match inbound.message().await?.and_then(|m| m.msg) {
            Some(coordinator_message::Msg::Welcome(w)) => Duration::from_millis(w.heartbeat_interval_ms.max(100)),
            other => anyhow::bail!("expected a welcome, got {other:?}"),
        };
        stats.connected.fetch_add(1, Ordering::Relaxed);
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        let end = self.serve(&mut inbound, &tx, every, stats, stop).await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        Ok(end)
    }

    /// The welcomed session until it ends: `true` if lost, `false` if stopped.
    async fn serve(
        &self,
        inbound: &mut tonic::Streaming<rekey_proto::v1::CoordinatorMessage>,
        tx: &mpsc::Sender<AgentMessage>,
        every: Duration,
        stats: &Stats,
        stop: &CancellationToken,
    ) -> bool {
        let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut seq = 0;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return false,
                _ = hb.tick() => {
                    seq += 1;
                    let beat = AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat { seq })) };
                    if tx.send(beat).await.is_err() { return true }
                    continue;
                }
                m = inbound.message() => match m { Ok(Some(m)) => m, _ => return true },
            };
            if !self.answer(msg.msg, tx, stats) {
                return true;
            }
        }
    }

    /// Answers one coordinator message (false: the stream is gone); an
    /// apply runs in its own task so heartbeats go on meanwhile, as in the agent.
    fn answer(&self, msg: Option<coordinator_message::Msg>, tx: &mpsc::Sender<AgentMessage>, stats: &Stats) -> bool {
        match msg {
            Some(coordinator_message::Msg::Delivery(d)) => {
                stats.deliveries.fetch_add(1, Ordering::Relaxed);
                stats.reports.fetch_add(4, Ordering::Relaxed);
                let (tx, host, opts) = (tx.clone(), self.id.name.clone(), self.opts.clone());
                tokio::spawn(async move {
                    let fields: Vec<(&str, &[u8])> =
                        d.fields.iter().map(|f| (f.name.as_str(), f.value.as_slice())).collect();
                    let fp = fingerprint_fields(&d.fingerprint_key, fields);
                    let _ = tx.send(report(&d, Stage::Delivered, "", "")).await;
                    tokio::time::sleep(opts.apply).await;
                    let _ = tx.send(report(&d, Stage::Applied, "", "")).await;
                    if fails(&host, &d.version_id, opts.fail_rate) {
                        let _ = tx.send(report(&d, Stage::Failed, "", "simulated health check failure")).await;
                        let _ = tx.send(report(&d, Stage::RolledBack, "", "simulated")).await;
                    } else {
                        let _ = tx.send(report(&d, Stage::Restarted, "", "")).await;
                        let _ = tx.send(report(&d, Stage::Healthy, &fp, "")).await;
                    }
                });
                true
            }
            Some(coordinator_message::Msg::Rollback(r)) => {
                let d = Delivery {
                    rotation_id: r.rotation_id,
                    secret: r.secret,
                    version_id: r.version_id,
                    ..Default::default()
                };
                tx.try_send(report(&d, Stage::RolledBack, "", "")).is_ok()
            }
            Some(coordinator_message::Msg::Preflight(p)) => {
                let checks =
                    vec![PreflightCheck { subject: "simulated dry run".into(), ok: true, detail: "ok".into() }];
                let r = PreflightResult { request_id: p.request_id, secret: p.secret, checks };
                tx.try_send(AgentMessage { msg: Some(agent_message::Msg::PreflightResult(r)) }).is_ok()
            }
            Some(coordinator_message::Msg::Scan(req)) => {
                let r = ScanResult { scan_id: req.scan_id, ..Default::default() };
                tx.try_send(AgentMessage { msg: Some(agent_message::Msg::ScanResult(r)) }).is_ok()
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fails;

    #[test]
    fn the_failure_share_is_close_to_the_rate_and_repeatable() {
        let n = (0..10_000).filter(|i| fails(&format!("h{i}"), "v2", 0.05)).count();
        assert!((400..600).contains(&n), "{n} of 10000 at 5 %");
        assert!(!(0..1000).any(|i| fails(&format!("h{i}"), "v2", 0.0)));
        assert!((0..1000).all(|i| fails(&format!("h{i}"), "v2", 1.0)));
        assert_eq!(fails("h1", "v2", 0.5), fails("h1", "v2", 0.5));
    }
}
