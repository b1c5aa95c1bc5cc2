//! The agent's live session: one bidirectional stream to rekeyd, kept open
//! with jittered exponential backoff, heartbeats, and certificate renewal at
//! about two thirds of the certificate's lifetime.
//!
//! [`run`] first opens the apply pipeline and recovers what a crash
//! interrupted, then starts the [`Dispatcher`] (one worker task per restart
//! group) which outlives every session: deliveries, rollbacks and purges
//! are queued to it and never block the stream, and an apply keeps running
//! while the agent reconnects. Stage reports wait in the [`Outbox`] and go
//! out after each `Welcome`; heartbeat acks tell which ones the coordinator
//! has read. `Hello.applied` tells a (re)started coordinator what is applied.
//! A scope scan ([`crate::scan`]) and a preflight dry run
//! ([`crate::preflight`], `rekey rotate plan`) each run in a task of their
//! own and answer on the session's outbound channel; they end with the
//! session.
//!
//! With several coordinator replicas ([`rekey_common::ha::Coordinators`]),
//! each attempt goes to the next address of a pass (the last leader first):
//! a follower's leader hint is followed at once, an unreachable replica or
//! an election moves on, and only a full pass without a session waits the
//! backoff. A hint outside the configured list is followed too: the hinted
//! server must prove the pinned CA and name like any other (docs/ha.md).
//!
//! Fatal conditions stop the agent with an actionable message instead of
//! retrying forever: an expired certificate, a revoked agent, a protocol
//! version mismatch, a coordinator that no longer knows this agent.

use crate::config::AgentConfig;
use crate::dispatch::{Command, Dispatcher};
use crate::identity::{Identity, IdentityError};
use crate::outbox::Outbox;
use crate::pipeline::{Pipeline, PipelineError};
use crate::preflight::Preflights;
use crate::scan::Scans;
use rcgen::{CertificateParams, KeyPair};
use rekey_common::error::{Chain, chain};
use rekey_common::ha::{self, Coordinators};
use rekey_common::time::{format_unix, now_unix};
use rekey_common::tls;
use rekey_proto::PROTOCOL_VERSION;
use rekey_proto::v1::agent_service_client::AgentServiceClient;
use rekey_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Hello, RenewRequest, RenewResponse, agent_message, coordinator_message,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// Until the coordinator's welcome says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// A renewal with no answer is retried after this long.
const RENEW_RETRY: Duration = Duration::from_secs(30);
/// An established session sleeps until its renewal is due, but never longer
/// than this in one go: the due time is on the wall clock, which may jump.
/// (An idle agent wakes only for heartbeats and this — no polling.)
const RENEW_CHECK_MAX: Duration = Duration::from_secs(60);
/// At shutdown, how long an apply in progress may take to finish.
const APPLY_DRAIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the certificate of agent {host} expired at {expired} while it could not renew it; \
         it must be enrolled again: on the coordinator run `rekey token create --host {host}`, \
         then here `rekey-agent enroll --force --coordinator {coordinator} --token-file FILE --ca-fingerprint {fingerprint} --state-dir {state_dir}`"
    )]
    CertificateExpired { host: String, expired: String, coordinator: String, fingerprint: String, state_dir: String },
    #[error(
        "agent {host} was revoked by the coordinator ({reason}); enroll it again with a new join token to bring it back"
    )]
    Revoked { host: String, reason: String },
    #[error("the coordinator refused this agent: {0}")]
    Refused(String),
    #[error("no coordinator address: set `coordinator` or `coordinators` in {0}")]
    NoCoordinator(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// Exponential backoff with jitter: each delay is drawn uniformly from the
/// upper half of a cap that doubles per attempt up to `max` ("equal
/// jitter": never a burst of immediate retries, still spread out).
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

    /// The cap of the current attempt: `initial × 2^attempt`, at most `max`.
    pub fn cap(&self) -> Duration {
        self.initial.saturating_mul(1u32 << self.attempt.min(16)).min(self.max)
    }

    /// The next delay: uniform in [cap/2, cap]; the cap doubles each attempt.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + rekey_common::time::jitter(cap - half)
    }
}

/// When to renew: two thirds into the certificate's lifetime.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

/// The heartbeat interval a welcome asks for (at least 100 ms).
pub fn heartbeat_every(welcome_interval_ms: u64) -> Duration {
    Duration::from_millis(welcome_interval_ms.max(100))
}

/// When the certificate is renewed, and the key of a request in flight.
/// Times are unix seconds (the certificate's clock, not the session's).
struct Renewal {
    due: i64,
    pending: Option<KeyPair>,
}

impl Renewal {
    fn new(not_before: i64, not_after: i64) -> Renewal {
        Renewal { due: renew_at(not_before, not_after), pending: None }
    }

    fn is_due(&self, now: i64) -> bool {
        now >= self.due
    }

    /// How long to sleep before looking again (at most [`RENEW_CHECK_MAX`]).
    fn wait(&self, now: i64) -> Duration {
        Duration::from_secs((self.due - now).clamp(0, RENEW_CHECK_MAX.as_secs() as i64) as u64)
    }

    /// A request went out at `now` with `key`; unanswered, it is retried
    /// [`RENEW_RETRY`] later.
    fn requested(&mut self, now: i64, key: KeyPair) {
        self.pending = Some(key);
        self.due = now + RENEW_RETRY.as_secs() as i64;
    }

    /// The key of the request in flight, if any (an answer to none is ignored).
    fn take_pending(&mut self) -> Option<KeyPair> {
        self.pending.take()
    }

    /// A new certificate valid until `not_after` was stored at `now`.
    fn renewed(&mut self, now: i64, not_after: i64) {
        self.due = renew_at(now, not_after);
    }
}

/// The heartbeat timer: every [`DEFAULT_HEARTBEAT`] (the first at once)
/// until the welcome names the coordinator's interval, then one interval
/// after the welcome and every interval from there. A late tick is not
/// made up with a burst.
struct Heartbeats {
    interval: tokio::time::Interval,
    seq: u64,
}

impl Heartbeats {
    fn new() -> Heartbeats {
        let mut interval = tokio::time::interval(DEFAULT_HEARTBEAT);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Heartbeats { interval, seq: 0 }
    }

    fn welcome(&mut self, interval_ms: u64) {
        let every = heartbeat_every(interval_ms);
        self.interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        self.interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }

    /// Waits for the next beat; its sequence number (cancel-safe).
    async fn tick(&mut self) -> u64 {
        self.interval.tick().await;
        self.seq += 1;
        self.seq
    }
}

enum End {
    Shutdown,
    /// Session lost; `established` if it had been welcomed (reset the backoff).
    Lost {
        established: bool,
        why: String,
    },
    /// A follower refused the session; `leader` is the address it named.
    Redirected {
        leader: Option<String>,
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
    let side = Side { scans: Scans::new(&config), preflights: Preflights::new(&config) };
    let result = sessions(&config, &pipeline, &dispatcher, &side, &shutdown).await;
    dispatcher.shutdown(APPLY_DRAIN).await;
    result
}

/// What a session hands to tasks of their own: scans and dry runs.
struct Side {
    scans: Scans,
    preflights: Preflights,
}

async fn sessions(
    config: &AgentConfig,
    pipeline: &Pipeline,
    dispatcher: &Dispatcher,
    side: &Side,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
    let mut coordinators = Coordinators::new(addresses(config, &Identity::load(&config.state_dir)?)?);
    let mut last_failure = String::new();
    loop {
        // Reload each time: a renewal replaced the certificate on disk.
        let identity = Identity::load(&config.state_dir)?;
        let now = now_unix();
        if identity.cert.not_after_unix <= now {
            return Err(expired(config, &identity));
        }
        let Some(addr) = coordinators.next_address() else {
            // Every address tried once: the backoff, then a new pass.
            if !wait_to_reconnect(&mut backoff, false, &last_failure, shutdown).await {
                return Ok(());
            }
            coordinators.new_pass();
            continue;
        };
        match session(config, &identity, shutdown, pipeline, dispatcher, side, &addr).await? {
            End::Shutdown => return Ok(()),
            End::Lost { established: true, why } => {
                // It was the leader: the next pass starts there.
                coordinators.found(&addr);
                if !wait_to_reconnect(&mut backoff, true, &why, shutdown).await {
                    return Ok(());
                }
                coordinators.new_pass();
            }
            End::Lost { established: false, why } => {
                tracing::info!(coordinator = %addr, reason = %why, "coordinator not reachable, trying the next");
                last_failure = why;
            }
            End::Redirected { leader: Some(leader), why } => {
                tracing::info!(coordinator = %addr, %leader, "a follower named the leader, moving there");
                coordinators.follow(&leader);
                last_failure = why;
            }
            End::Redirected { leader: None, why } => {
                tracing::info!(coordinator = %addr, "a follower knows no leader (election), trying the next");
                last_failure = why;
            }
        }
    }
}

/// Where to look for the leader: `agent.toml`'s addresses, else those given
/// at enrollment.
fn addresses(config: &AgentConfig, identity: &Identity) -> Result<Vec<String>, AgentError> {
    let addrs =
        if config.coordinators.is_empty() { identity.enrollment.addresses() } else { config.coordinators.clone() };
    let addrs: Vec<String> = addrs.into_iter().filter(|a| !a.is_empty()).collect();
    if addrs.is_empty() {
        return Err(AgentError::NoCoordinator(config.path.display().to_string()));
    }
    Ok(addrs)
}

/// After a lost session: waits the backoff's next delay (from the first
/// step again if the session had been welcomed). False if `shutdown` came first.
async fn wait_to_reconnect(backoff: &mut Backoff, established: bool, why: &str, shutdown: &CancellationToken) -> bool {
    if established {
        backoff.reset();
    }
    let delay = backoff.next_delay();
    tracing::warn!(reason = %why, retry_in_ms = delay.as_millis() as u64, "session lost, reconnecting");
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
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

/// A follower's refusal, as the end of this attempt.
fn redirected(status: &tonic::Status) -> Option<End> {
    let leader = match ha::refusal(status)? {
        ha::Refusal::Leader(addr) => Some(addr),
        ha::Refusal::NoLeader => None,
    };
    Some(End::Redirected { leader, why: status.message().to_string() })
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
    side: &Side,
    addr: &str,
) -> Result<End, AgentError> {
    let (out_tx, inbound) = match open(config, identity, pipeline, addr).await? {
        Opened::Stream(out_tx, inbound) => (out_tx, inbound),
        Opened::Failed(end) => return Ok(end),
    };
    // Ends this session's side tasks (a running scan) when the session ends.
    let session_done = shutdown.child_token();
    let _end_side_tasks = session_done.clone().drop_guard();
    let live = Live {
        config,
        dispatcher,
        scans: &side.scans,
        preflights: &side.preflights,
        outbox: pipeline.outbox().clone(),
        out_tx,
        session_done,
        host: identity.enrollment.host.clone(),
        addr: addr.to_string(),
        cert_not_after: identity.cert.not_after_unix,
        heartbeats: Heartbeats::new(),
        renewal: Renewal::new(identity.cert.not_before_unix, identity.cert.not_after_unix),
        established: false,
        clock: &now_unix,
    };
    live.run(inbound, shutdown).await
}

enum Opened {
    Stream(mpsc::Sender<AgentMessage>, Box<tonic::Streaming<CoordinatorMessage>>),
    /// This attempt failed; try again later.
    Failed(End),
}

/// Connects, queues the hello, opens the stream.
async fn open(
    config: &AgentConfig,
    identity: &Identity,
    pipeline: &Pipeline,
    addr: &str,
) -> Result<Opened, AgentError> {
    let lost = |why| Ok(Opened::Failed(End::Lost { established: false, why }));
    let channel = match tls::connect(addr, identity.client_config()?).await {
        Ok(c) => c,
        Err(e) => return lost(format!("cannot connect to {addr}: {}", chain(&e))),
    };
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(32);
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: rekey_common::VERSION.to_string(),
        secrets: config.secret_names(),
        applied: pipeline.applied(),
    };
    out_tx.try_send(AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).expect("fresh channel");
    match AgentServiceClient::new(channel).session(ReceiverStream::new(out_rx)).await {
        Ok(r) => Ok(Opened::Stream(out_tx, Box::new(r.into_inner()))),
        Err(status) => {
            let text = chain(&status);
            if let Some(end) = redirected(&status) {
                return Ok(Opened::Failed(end));
            }
            if is_fatal_status(&status) {
                return Err(AgentError::Refused(status.message().to_string()));
            }
            if text.contains("Revoked") || text.contains("revoked") {
                return Err(AgentError::Revoked {
                    host: identity.enrollment.host.clone(),
                    reason: "certificate refused as revoked at the handshake".into(),
                });
            }
            lost(format!("session refused: {text}"))
        }
    }
}

/// A session once its stream is open: the loop of [`Live::run`] and what it
/// keeps between messages.
struct Live<'a> {
    config: &'a AgentConfig,
    dispatcher: &'a Dispatcher,
    scans: &'a Scans,
    preflights: &'a Preflights,
    outbox: Outbox,
    out_tx: mpsc::Sender<AgentMessage>,
    /// Cancelled when the session ends: its side tasks (a scan) stop.
    session_done: CancellationToken,
    host: String,
    addr: String,
    /// Expiry of the certificate the session was opened with (for the log).
    cert_not_after: i64,
    heartbeats: Heartbeats,
    renewal: Renewal,
    /// Welcomed by the coordinator.
    established: bool,
    /// Unix seconds; tests drive it from tokio's paused clock.
    clock: &'a (dyn Fn() -> i64 + Sync),
}

impl Live<'_> {
    /// Heartbeats, reports, renewals and the coordinator's messages until
    /// the session ends (shutdown, a lost stream) or a fatal condition.
    async fn run(
        mut self,
        mut inbound: impl Stream<Item = Result<CoordinatorMessage, tonic::Status>> + Unpin,
        shutdown: &CancellationToken,
    ) -> Result<End, AgentError> {
        loop {
            let renew_wait = self.renewal.wait((self.clock)());
            let end = tokio::select! {
                _ = shutdown.cancelled() => Some(End::Shutdown),
                seq = self.heartbeats.tick() => self.send(agent_message::Msg::Heartbeat(Heartbeat { seq })).await,
                _ = self.outbox.changed(), if self.established => self.send_reports().await,
                _ = tokio::time::sleep(renew_wait), if self.established => {
                    if self.renewal.is_due((self.clock)()) {
                        self.request_renewal().await;
                    }
                    None
                }
                msg = inbound.next() => match msg {
                    Some(Ok(m)) => self.on_message(m).await?,
                    None => Some(self.lost("coordinator closed the session".into())),
                    Some(Err(status)) if !self.established && ha::refusal(&status).is_some() => redirected(&status),
                    Some(Err(status)) if is_fatal_status(&status) => {
                        return Err(AgentError::Refused(status.message().to_string()));
                    }
                    Some(Err(status)) => Some(self.lost(chain(&status))),
                },
            };
            if let Some(end) = end {
                return Ok(end);
            }
        }
    }

    fn lost(&self, why: String) -> End {
        End::Lost { established: self.established, why }
    }

    /// Sends one message; the end of the session if the stream is gone.
    async fn send(&self, msg: agent_message::Msg) -> Option<End> {
        let sent = self.out_tx.send(AgentMessage { msg: Some(msg) }).await;
        sent.is_err().then(|| self.lost("outbound stream closed".into()))
    }

    /// Sends every report not yet sent in this session.
    async fn send_reports(&self) -> Option<End> {
        for report in self.outbox.take_unsent(self.heartbeats.seq) {
            if let Some(end) = self.send(agent_message::Msg::Report(report)).await {
                return Some(end);
            }
        }
        None
    }

    /// A fresh key and a CSR for it, sent on the stream.
    async fn request_renewal(&mut self) {
        let key = match KeyPair::generate() {
            Ok(k) => k,
            Err(e) => return tracing::error!(error = %Chain(&e), "cannot generate key"),
        };
        let csr = match CertificateParams::default().serialize_request(&key) {
            Ok(c) => c,
            Err(e) => return tracing::error!(error = %Chain(&e), "cannot build csr"),
        };
        tracing::info!(expires = %format_unix(self.cert_not_after), "renewing certificate");
        self.renewal.requested((self.clock)(), key);
        let _ = self.send(agent_message::Msg::Renew(RenewRequest { csr_der: csr.der().to_vec() })).await;
    }

    async fn on_message(&mut self, msg: CoordinatorMessage) -> Result<Option<End>, AgentError> {
        use coordinator_message::Msg;
        match msg.msg {
            Some(Msg::Welcome(w)) => {
                self.established = true;
                self.heartbeats.welcome(w.heartbeat_interval_ms);
                tracing::info!(coordinator = %self.addr, host = %w.host, "session established");
                // Everything not yet acknowledged goes (again) now.
                self.outbox.session_started();
                return Ok(self.send_reports().await);
            }
            Some(Msg::HeartbeatAck(ack)) => self.outbox.acknowledged(ack.seq),
            Some(Msg::Renewed(r)) => self.renewed(&r)?,
            Some(Msg::Revoked(r)) => return Err(AgentError::Revoked { host: self.host.clone(), reason: r.reason }),
            Some(Msg::Delivery(d)) => {
                let names: Vec<&str> = d.fields.iter().map(|f| f.name.as_str()).collect();
                tracing::info!(secret = %d.secret, rotation = %d.rotation_id, version = %d.version_id, fields = ?names, "delivery received");
                self.dispatcher.submit(Command::Deliver(d));
            }
            Some(Msg::Rollback(r)) => {
                tracing::info!(secret = %r.secret, rotation = %r.rotation_id, version = %r.version_id, "rollback requested");
                self.dispatcher.submit(Command::Rollback(r));
            }
            Some(Msg::Purge(p)) => {
                tracing::info!(secret = %p.secret, version = %p.version_id, "purge requested");
                self.dispatcher.submit(Command::Purge(p));
            }
            Some(Msg::Scan(req)) => {
                tracing::info!(scan = %req.scan_id, targets = req.targets.len(), "scope scan requested");
                self.scans.spawn(req, self.out_tx.clone(), self.session_done.clone());
            }
            Some(Msg::Preflight(p)) => {
                tracing::info!(secret = %p.secret, request = %p.request_id, "preflight requested");
                self.preflights.spawn(p, self.out_tx.clone(), self.session_done.clone());
            }
            None => tracing::warn!("empty message from coordinator ignored"),
        }
        Ok(None)
    }

    /// Stores the certificate answering our request with the key it was for.
    fn renewed(&mut self, r: &RenewResponse) -> Result<(), AgentError> {
        let Some(key) = self.renewal.take_pending() else {
            tracing::warn!("unsolicited certificate ignored");
            return Ok(());
        };
        Identity::save_certificate(&self.config.state_dir, &r.certificate_pem, &key.serialize_pem())?;
        self.renewal.renewed((self.clock)(), r.not_after_unix);
        tracing::info!(expires = %format_unix(r.not_after_unix), "certificate renewed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rekey_proto::v1::{HeartbeatAck, Revoked, Welcome};
    use tokio::time::Instant;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn backoff_caps_double_up_to_the_max_and_reset() {
        let mut b = Backoff::new(100 * MS, 2 * SEC);
        let caps: Vec<Duration> = (0..7)
            .map(|_| {
                let cap = b.cap();
                b.next_delay();
                cap
            })
            .collect();
        assert_eq!(caps, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS, 2 * SEC, 2 * SEC]);
        b.reset();
        assert_eq!(b.cap(), 100 * MS);
        // Far past the shift bound the cap stays at the max.
        let mut b = Backoff::new(SEC, Duration::from_secs(30));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.cap(), Duration::from_secs(30));
    }

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
        assert_eq!(renew_at(1_000, 1_090), 1_060);
    }

    #[test]
    fn an_unanswered_renewal_is_retried_and_a_new_certificate_moves_the_next() {
        let mut r = Renewal::new(1_000, 1_090);
        assert!(!r.is_due(1_059) && r.is_due(1_060));
        assert!(r.take_pending().is_none(), "nothing asked yet");
        r.requested(1_060, KeyPair::generate().unwrap());
        assert!(!r.is_due(1_089) && r.is_due(1_090), "retried 30 s later");
        assert!(r.take_pending().is_some());
        r.renewed(1_095, 1_185);
        assert!(!r.is_due(1_154) && r.is_due(1_155));
    }

    #[test]
    fn an_idle_session_sleeps_until_its_renewal_is_due_instead_of_polling() {
        let r = Renewal::new(1_000, 1_090); // due at 1_060
        assert_eq!(r.wait(1_030), 30 * SEC);
        assert_eq!(r.wait(1_060), Duration::ZERO);
        assert_eq!(r.wait(1_100), Duration::ZERO, "overdue: at once");
        let year = Renewal::new(0, 365 * 86_400);
        assert_eq!(year.wait(0), RENEW_CHECK_MAX, "a far renewal still looks again after a wall-clock jump");
    }

    #[test]
    fn a_welcome_cannot_ask_for_a_storm_of_heartbeats() {
        assert_eq!(heartbeat_every(5_000), 5 * SEC);
        assert_eq!(heartbeat_every(0), 100 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_wait_the_backoff_and_a_welcomed_session_starts_it_over() {
        let mut b = Backoff::new(100 * MS, SEC);
        let shutdown = CancellationToken::new();
        for cap in [100 * MS, 200 * MS, 400 * MS, 800 * MS, SEC, SEC] {
            let t = Instant::now();
            assert!(wait_to_reconnect(&mut b, false, "lost", &shutdown).await);
            let waited = t.elapsed();
            assert!(waited >= cap / 2 && waited <= cap, "waited {waited:?} for cap {cap:?}");
        }
        let t = Instant::now();
        assert!(wait_to_reconnect(&mut b, true, "lost", &shutdown).await);
        assert!(t.elapsed() <= 100 * MS, "a welcomed session resets the backoff: {:?}", t.elapsed());
        shutdown.cancel();
        let t = Instant::now();
        assert!(!wait_to_reconnect(&mut b, false, "lost", &shutdown).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    /// An agent with no secrets, and one session's stream halves.
    struct Harness {
        _dir: tempfile::TempDir,
        config: AgentConfig,
        outbox: Outbox,
        dispatcher: Dispatcher,
        scans: Scans,
        preflights: Preflights,
        shutdown: CancellationToken,
        /// Unix seconds: this base plus the (paused) time since the start.
        clock: Box<dyn Fn() -> i64 + Sync>,
    }

    const NOT_BEFORE: i64 = 1_700_000_000;

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig::from_str(&dir.path().join("agent.toml"), "state_dir = 'state'\n").unwrap();
        let outbox = Outbox::new();
        let pipeline = Pipeline::open(&config, outbox.clone()).unwrap();
        let start = Instant::now();
        Harness {
            scans: Scans::new(&config),
            preflights: Preflights::new(&config),
            dispatcher: Dispatcher::start(pipeline),
            _dir: dir,
            config,
            outbox,
            shutdown: CancellationToken::new(),
            clock: Box::new(move || NOT_BEFORE + start.elapsed().as_secs() as i64),
        }
    }

    type Inbound = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

    impl Harness {
        /// A session on a certificate valid for `lifetime` seconds from the start.
        fn live(
            &self,
            lifetime: i64,
        ) -> (Live<'_>, Inbound, ReceiverStream<Result<CoordinatorMessage, tonic::Status>>, mpsc::Receiver<AgentMessage>)
        {
            let (in_tx, in_rx) = mpsc::channel(8);
            let (out_tx, out_rx) = mpsc::channel(32);
            let live = Live {
                config: &self.config,
                dispatcher: &self.dispatcher,
                scans: &self.scans,
                preflights: &self.preflights,
                outbox: self.outbox.clone(),
                out_tx,
                session_done: self.shutdown.child_token(),
                host: "host-1".into(),
                addr: "127.0.0.1:1".into(),
                cert_not_after: NOT_BEFORE + lifetime,
                heartbeats: Heartbeats::new(),
                renewal: Renewal::new(NOT_BEFORE, NOT_BEFORE + lifetime),
                established: false,
                clock: &*self.clock,
            };
            (live, in_tx, ReceiverStream::new(in_rx), out_rx)
        }
    }

    fn from_coordinator(m: coordinator_message::Msg) -> Result<CoordinatorMessage, tonic::Status> {
        Ok(CoordinatorMessage { msg: Some(m) })
    }

    fn welcome(heartbeat_ms: u64) -> Result<CoordinatorMessage, tonic::Status> {
        from_coordinator(coordinator_message::Msg::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            host: "host-1".into(),
            heartbeat_interval_ms: heartbeat_ms,
        }))
    }

    /// The next message `want` picks, and when (since `start`) it went out.
    async fn next<T>(
        out: &mut mpsc::Receiver<AgentMessage>,
        start: Instant,
        want: impl Fn(agent_message::Msg) -> Option<T>,
    ) -> (T, Duration) {
        loop {
            let m = out.recv().await.expect("the session is running").msg.expect("a message");
            if let Some(t) = want(m) {
                return (t, start.elapsed());
            }
        }
    }

    fn heartbeat(m: agent_message::Msg) -> Option<u64> {
        match m {
            agent_message::Msg::Heartbeat(h) => Some(h.seq),
            _ => None,
        }
    }

    fn renew(m: agent_message::Msg) -> Option<()> {
        matches!(m, agent_message::Msg::Renew(_)).then_some(())
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_every_10s_until_the_welcome_names_the_interval() {
        let h = harness();
        let (live, in_tx, inbound, mut out) = h.live(86_400);
        let start = Instant::now();
        let driver = async {
            let mut beats = Vec::new();
            for _ in 0..2 {
                beats.push(next(&mut out, start, heartbeat).await);
            }
            in_tx.send(welcome(3_000)).await.unwrap();
            for _ in 0..2 {
                beats.push(next(&mut out, start, heartbeat).await);
            }
            // Acks are taken; nothing else changes the rhythm.
            in_tx
                .send(from_coordinator(coordinator_message::Msg::HeartbeatAck(HeartbeatAck { seq: 4 })))
                .await
                .unwrap();
            beats.push(next(&mut out, start, heartbeat).await);
            h.shutdown.cancel();
            beats
        };
        let (end, beats) = tokio::join!(live.run(inbound, &h.shutdown), driver);
        assert!(matches!(end, Ok(End::Shutdown)));
        let secs = |s| Duration::from_secs(s);
        assert_eq!(beats, [(1, secs(0)), (2, secs(10)), (3, secs(13)), (4, secs(16)), (5, secs(19))]);
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_asks_at_two_thirds_retries_unanswered_and_follows_the_new_certificate() {
        let h = harness();
        let (live, in_tx, inbound, mut out) = h.live(90);
        let start = Instant::now();
        let driver = async {
            // An hour between heartbeats: only the renewal speaks.
            in_tx.send(welcome(3_600_000)).await.unwrap();
            let (_, first) = next(&mut out, start, renew).await;
            let (_, retry) = next(&mut out, start, renew).await;
            let not_after = (h.clock)() + 90;
            let answer = RenewResponse { certificate_pem: "CERT".into(), not_after_unix: not_after };
            in_tx.send(from_coordinator(coordinator_message::Msg::Renewed(answer))).await.unwrap();
            let (_, next_one) = next(&mut out, start, renew).await;
            h.shutdown.cancel();
            [first, retry, next_one]
        };
        let (end, times) = tokio::join!(live.run(inbound, &h.shutdown), driver);
        assert!(matches!(end, Ok(End::Shutdown)));
        // 2/3 of 90 s; then RENEW_RETRY later; then 2/3 into the new certificate's 90 s.
        assert_eq!(times, [60, 90, 150].map(Duration::from_secs));
        let stored = std::fs::read_to_string(h.config.state_dir.join("identity.pem")).unwrap();
        assert!(stored.starts_with("CERT\n") && stored.contains("PRIVATE KEY"), "{stored}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_ends_lost_when_the_stream_ends_and_fatally_when_refused_or_revoked() {
        let h = harness();
        let (live, in_tx, inbound, _out) = h.live(86_400);
        in_tx.send(welcome(1_000)).await.unwrap();
        drop(in_tx);
        match live.run(inbound, &h.shutdown).await {
            Ok(End::Lost { established, why }) => {
                assert!(established);
                assert_eq!(why, "coordinator closed the session");
            }
            _ => panic!("expected a lost session"),
        }

        let (live, in_tx, inbound, _out) = h.live(86_400);
        in_tx.send(Err(tonic::Status::unavailable("gone"))).await.unwrap();
        assert!(matches!(live.run(inbound, &h.shutdown).await, Ok(End::Lost { established: false, .. })));

        let (live, in_tx, inbound, _out) = h.live(86_400);
        in_tx.send(Err(tonic::Status::permission_denied("unknown agent"))).await.unwrap();
        let e = live.run(inbound, &h.shutdown).await.err().expect("fatal");
        assert_eq!(e.to_string(), "the coordinator refused this agent: unknown agent");

        let (live, in_tx, inbound, _out) = h.live(86_400);
        let revoked = Revoked { reason: "decommissioned".into() };
        in_tx.send(from_coordinator(coordinator_message::Msg::Revoked(revoked))).await.unwrap();
        let e = live.run(inbound, &h.shutdown).await.err().expect("fatal");
        assert!(
            matches!(e, AgentError::Revoked { ref host, ref reason } if host == "host-1" && reason == "decommissioned")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_refusal_before_the_welcome_names_where_to_go() {
        let h = harness();
        let (live, in_tx, inbound, _out) = h.live(86_400);
        in_tx.send(Err(ha::follower_status("rekeyd-2", Some("10.0.0.1:7400")))).await.unwrap();
        match live.run(inbound, &h.shutdown).await {
            Ok(End::Redirected { leader, why }) => {
                assert_eq!(leader.as_deref(), Some("10.0.0.1:7400"));
                assert!(why.contains("rekeyd-2") && why.contains("is a follower"), "{why}");
            }
            _ => panic!("expected a redirect"),
        }
        let (live, in_tx, inbound, _out) = h.live(86_400);
        in_tx.send(Err(ha::follower_status("rekeyd-2", None))).await.unwrap();
        assert!(matches!(live.run(inbound, &h.shutdown).await, Ok(End::Redirected { leader: None, .. })));
        // At the call itself (the usual place), the same reading.
        assert!(matches!(
            redirected(&ha::follower_status("x", Some("a:1"))),
            Some(End::Redirected { leader: Some(l), .. }) if l == "a:1"
        ));
        assert!(redirected(&tonic::Status::unavailable("connection reset")).is_none(), "a transport failure");
    }

    /// A preflight is answered once, with the request's id, on the stream.
    #[tokio::test(start_paused = true)]
    async fn a_preflight_is_answered_with_its_request_id() {
        let h = harness();
        let (live, in_tx, inbound, mut out) = h.live(86_400);
        let start = Instant::now();
        let driver = async {
            in_tx.send(welcome(1_000)).await.unwrap();
            let req = rekey_proto::v1::Preflight {
                request_id: "plan-7".into(),
                secret: "api".into(),
                placeholder_fields: vec![rekey_proto::v1::SecretField { name: "value".into(), value: b"x".to_vec() }],
                ..Default::default()
            };
            in_tx.send(from_coordinator(coordinator_message::Msg::Preflight(req))).await.unwrap();
            let (result, _) = next(&mut out, start, |m| match m {
                agent_message::Msg::PreflightResult(r) => Some(r),
                _ => None,
            })
            .await;
            h.shutdown.cancel();
            result
        };
        let (end, result) = tokio::join!(live.run(inbound, &h.shutdown), driver);
        assert!(matches!(end, Ok(End::Shutdown)));
        assert_eq!((result.request_id.as_str(), result.secret.as_str()), ("plan-7", "api"));
        assert_eq!(result.checks.len(), 1);
        assert!(!result.checks[0].ok && result.checks[0].detail.starts_with("secret api is not declared in "));
    }
}
