//! The agent's live session: one bidirectional stream to rekeyd, kept open
//! with jittered exponential backoff, heartbeats, and certificate renewal at
//! about two thirds of the certificate's lifetime.
//!
//! [`run`] first opens the apply pipeline and recovers what a crash
//! interrupted, then starts the [`Dispatcher`] (one worker task per declared
//! secret) which outlives every session: deliveries, rollbacks and purges
//! are queued to it and never block the stream, and an apply keeps running
//! while the agent reconnects. Stage reports wait in the [`Outbox`] and go
//! out after each `Welcome`; heartbeat acks tell which ones the coordinator
//! has read. `Hello.applied` tells a (re)started coordinator what is applied.
//! A scope scan ([`crate::scan`]) runs in a task of its own and answers on
//! the session's outbound channel; it ends with the session.
//!
//! Fatal conditions stop the agent with an actionable message instead of
//! retrying forever: an expired certificate, a revoked agent, a protocol
//! version mismatch, a coordinator that no longer knows this agent.

use crate::config::AgentConfig;
use crate::dispatch::{Command, Dispatcher};
use crate::identity::{Identity, IdentityError};
use crate::outbox::Outbox;
use crate::pipeline::{Pipeline, PipelineError};
use crate::scan::Scans;
use rand::Rng;
use rcgen::{CertificateParams, KeyPair};
use rekey_common::error::{Chain, chain};
use rekey_common::time::{format_unix, now_unix};
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{AgentMessage, Heartbeat, Hello, RenewRequest, agent_message, coordinator_message};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Until the coordinator's welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// A renewal with no answer is retried after this long.
const RENEW_RETRY: Duration = Duration::from_secs(30);
/// At shutdown, how long an apply in progress may take to finish.
const APPLY_DRAIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the certificate of agent {host} expired at {expired} while it could not renew it; \
         it must be enrolled again: on the coordinator run `rekey token create --host {host}`, \
         then here `rekey-agent enroll --force --coordinator {coordinator} --token TOKEN --ca-fingerprint {fingerprint} --state-dir {state_dir}`"
    )]
    CertificateExpired { host: String, expired: String, coordinator: String, fingerprint: String, state_dir: String },
    #[error(
        "agent {host} was revoked by the coordinator ({reason}); enroll it again with a new join token to bring it back"
    )]
    Revoked { host: String, reason: String },
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
    #[error("no coordinator address: set `coordinator` in {0}")]
    NoCoordinator(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Full-jitter exponential backoff.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: uniform in [cap/2, cap] where cap doubles each attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.initial.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + rand::rng().random_range(Duration::ZERO..=cap - half)
    }
}

enum End {
    Shutdown,
    /// Session lost; `established` if it had been welcomed (reset the backoff).
    Lost {
        established: bool,
        why: String,
    },
}

/// Runs the agent until `shutdown` or a fatal error.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    // An agent that is not enrolled stops here, before touching its state dir.
    Identity::load(&config.state_dir)?;
    let outbox = Outbox::new();
    let pipeline = Pipeline::open(&config, outbox.clone())?;
    // Undo what a crash interrupted before telling anyone what is applied.
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        reports = pipeline.recover() => if !reports.is_empty() {
            tracing::info!(reports = reports.len(), "recovered interrupted operations; reporting once connected");
        }
    }
    let dispatcher = Dispatcher::start(pipeline.clone());
    let scans = Scans::new(&config);
    let result = sessions(&config, &pipeline, &dispatcher, &scans, &shutdown).await;
    dispatcher.shutdown(APPLY_DRAIN).await;
    result
}

async fn sessions(
    config: &AgentConfig,
    pipeline: &Pipeline,
    dispatcher: &Dispatcher,
    scans: &Scans,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
    loop {
        // Reload each time: a renewal replaced the certificate on disk.
        let identity = Identity::load(&config.state_dir)?;
        let now = now_unix();
        if identity.cert.not_after_unix <= now {
            return Err(expired(config, &identity));
        }
        match session(config, &identity, shutdown, pipeline, dispatcher, scans).await? {
            End::Shutdown => return Ok(()),
            End::Lost { established, why } => {
                if established {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "session lost, reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn expired(config: &AgentConfig, identity: &Identity) -> AgentError {
    AgentError::CertificateExpired {
        host: identity.enrollment.host.clone(),
        expired: format_unix(identity.cert.not_after_unix),
        coordinator: identity.enrollment.coordinator.clone(),
        fingerprint: identity.enrollment.ca_fingerprint.clone(),
        state_dir: config.state_dir.display().to_string(),
    }
}

/// When to renew: two thirds into the certificate's lifetime.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

fn is_fatal_status(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::FailedPrecondition
    )
}

async fn session(
    config: &AgentConfig,
    identity: &Identity,
    shutdown: &CancellationToken,
    pipeline: &Pipeline,
    dispatcher: &Dispatcher,
    scans: &Scans,
) -> Result<End, AgentError> {
    let outbox = pipeline.outbox();
    let host = identity.enrollment.host.clone();
    let addr = config.coordinator.clone().unwrap_or_else(|| identity.enrollment.coordinator.clone());
    if addr.is_empty() {
        return Err(AgentError::NoCoordinator(config.path.display().to_string()));
    }
    let channel = match tls::connect(&addr, identity.client_config()?).await {
        Ok(c) => c,
        Err(e) => return Ok(End::Lost { established: false, why: format!("cannot connect to {addr}: {}", chain(&e)) }),
    };
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(32);
    // Ends this session's side tasks (a running scan) when the session ends.
    let session_done = shutdown.child_token();
    let _end_side_tasks = session_done.clone().drop_guard();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: rekey_common::VERSION.to_string(),
        secrets: config.secret_names(),
        applied: pipeline.applied(),
    };
    out_tx.try_send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).expect("fresh channel");
    let mut inbound = match AgentServiceClient::new(channel).session(ReceiverStream::new(out_rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            let text = chain(&status);
            if is_fatal_status(&status) {
                return Err(AgentError::Refused(status.message().to_string()));
            }
            if text.contains("Revoked") || text.contains("revoked") {
                return Err(AgentError::Revoked {
                    host,
                    reason: "certificate refused as revoked at the handshake".into(),
                });
            }
            return Ok(End::Lost { established: false, why: format!("session refused: {text}") });
        }
    };

    let mut heartbeat = tokio::time::interval(DEFAULT_HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut established = false;
    let mut pending_key: Option<KeyPair> = None;
    let mut renew_due = renew_at(identity.cert.not_before_unix, identity.cert.not_after_unix);
    let mut renew_check = tokio::time::interval(Duration::from_secs(1));

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(End::Shutdown),
            _ = heartbeat.tick() => {
                seq += 1;
                if out_tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat { seq })) }).await.is_err() {
                    return Ok(End::Lost { established, why: "outbound stream closed".into() });
                }
            }
            _ = outbox.changed(), if established => {
                for report in outbox.take_unsent(seq) {
                    if out_tx.send(AgentMessage { msg: Some(agent_message::Msg::Report(report)) }).await.is_err() {
                        return Ok(End::Lost { established, why: "outbound stream closed".into() });
                    }
                }
            }
            _ = renew_check.tick(), if established && now_unix() >= renew_due => {
                let key = match KeyPair::generate() { Ok(k) => k, Err(e) => { tracing::error!(error = %Chain(&e), "cannot generate key"); continue } };
                let csr = match CertificateParams::default().serialize_request(&key) {
                    Ok(c) => c,
                    Err(e) => { tracing::error!(error = %Chain(&e), "cannot build csr"); continue }
                };
                tracing::info!(expires = %format_unix(identity.cert.not_after_unix), "renewing certificate");
                pending_key = Some(key);
                renew_due = now_unix() + RENEW_RETRY.as_secs() as i64;
                let _ = out_tx.send(AgentMessage { msg: Some(agent_message::Msg::Renew(RenewRequest { csr_der: csr.der().to_vec() })) }).await;
            }
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(End::Lost { established, why: "coordinator closed the session".into() }),
                    Err(status) => {
                        if is_fatal_status(&status) {
                            return Err(AgentError::Refused(status.message().to_string()));
                        }
                        return Ok(End::Lost { established, why: chain(&status) });
                    }
                };
                match msg.msg {
                    Some(coordinator_message::Msg::Welcome(w)) => {
                        established = true;
                        let every = Duration::from_millis(w.heartbeat_interval_ms.max(100));
                        heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        tracing::info!(coordinator = %addr, host = %w.host, "session established");
                        // Everything not yet acknowledged goes (again) now.
                        outbox.session_started();
                        for report in outbox.take_unsent(seq) {
                            if out_tx.send(AgentMessage { msg: Some(agent_message::Msg::Report(report)) }).await.is_err() {
                                return Ok(End::Lost { established, why: "outbound stream closed".into() });
                            }
                        }
                    }
                    Some(coordinator_message::Msg::HeartbeatAck(ack)) => outbox.acknowledged(ack.seq),
                    Some(coordinator_message::Msg::Renewed(r)) => {
                        let Some(key) = pending_key.take() else {
                            tracing::warn!("unsolicited certificate ignored");
                            continue;
                        };
                        crate::identity::Identity::save_certificate(&config.state_dir, &r.certificate_pem, &key.serialize_pem())?;
                        let now = now_unix();
                        renew_due = renew_at(now, r.not_after_unix);
                        tracing::info!(expires = %format_unix(r.not_after_unix), "certificate renewed");
                    }
                    Some(coordinator_message::Msg::Revoked(r)) => {
                        return Err(AgentError::Revoked { host, reason: r.reason });
                    }
                    Some(coordinator_message::Msg::Delivery(d)) => {
                        let names: Vec<&str> = d.fields.iter().map(|f| f.name.as_str()).collect();
                        tracing::info!(secret = %d.secret, rotation = %d.rotation_id, version = %d.version_id, fields = ?names, "delivery received");
                        dispatcher.submit(Command::Deliver(d));
                    }
                    Some(coordinator_message::Msg::Rollback(r)) => {
                        tracing::info!(secret = %r.secret, rotation = %r.rotation_id, version = %r.version_id, "rollback requested");
                        dispatcher.submit(Command::Rollback(r));
                    }
                    Some(coordinator_message::Msg::Purge(p)) => {
                        tracing::info!(secret = %p.secret, version = %p.version_id, "purge requested");
                        dispatcher.submit(Command::Purge(p));
                    }
                    Some(coordinator_message::Msg::Scan(req)) => {
                        tracing::info!(scan = %req.scan_id, targets = req.targets.len(), "scope scan requested");
                        scans.spawn(req, out_tx.clone(), session_done.clone());
                    }
                    None => tracing::warn!("empty message from coordinator ignored"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100), "{d:?}");
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800), "{d:?}");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(2)), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn renewal_at_two_thirds() {
        assert_eq!(renew_at(0, 86_400), 57_600);
    }
}
