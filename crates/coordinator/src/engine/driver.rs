//! The engine's driver: one task that owns every active rotation, applies
//! events to the pure state machine one at a time, persists each transition
//! (with its audit records) and only then performs the side effects.
//!
//! Inputs arrive on one bounded channel ([`EngineHandle`]): operator commands,
//! agent events (hello, stage reports), and provider results from the short
//! tasks that call providers (so a slow provider never blocks other
//! rotations). A 1 s tick drives deadlines and the grace/monitoring timers.

use super::catalog::SecretSpec;
use super::link::{AgentLink, Delivery};
use super::machine::{self, Action, Event, ProviderOp, Rotation, RotationState, Stage, Usage, UseDetail};
use super::plan::{Target, plan_waves};
use super::reconcile::{OldVersion, reconcile, version_limit};
use super::state::{EngineState, StateError};
use crate::alerts::Alerts;
use crate::audit::AuditEntry;
use crate::config::Config;
use crate::store::Store;
use rand::Rng;
use rekey_common::error::Chain;
use rekey_common::secret::fingerprint_fields;
use rekey_common::time::now_unix_ms;
use rekey_proto::v1;
use rekey_providers::{
    CreateRequest, LastUsed, Provider, ProviderError, ProviderState, Sink, SinkWrite, VersionInfo, VersionStatus,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Retries of a retryable provider error before the rotation halts.
const PROVIDER_ATTEMPTS: u32 = 3;
/// The longest the engine sleeps between ticks; rotations with a sooner due
/// time ([`machine::next_due`]) are woken then.
const TICK: Duration = Duration::from_secs(1);
/// The shortest: a due time already past never turns into a busy loop.
const MIN_WAIT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown secret {0:?}: it is not in the coordinator's catalog (see `rekey secrets`)")]
    UnknownSecret(String),
    #[error(
        "no agent consumes secret {0:?}: no enrolled, unrevoked agent both declares it in its agent.toml and matches its selector"
    )]
    NoConsumers(String),
    #[error("secret {secret} is already being rotated by {rotation}; wait for it, or abort it")]
    AlreadyRotating { secret: String, rotation: String },
    #[error("no rotation {0:?} (see `rekey rotate list`)")]
    UnknownRotation(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot read the current version of {secret} from its provider")]
    Provider {
        secret: String,
        #[source]
        source: ProviderError,
    },
    #[error(transparent)]
    State(StateError),
    #[error("the rotation engine is not running")]
    Stopped,
}

impl From<StateError> for EngineError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::AlreadyRotating { secret, rotation } => EngineError::AlreadyRotating { secret, rotation },
            other => EngineError::State(other),
        }
    }
}

/// What agents tell the engine.
#[derive(Debug)]
pub enum AgentEvent {
    Connected { host: String, applied: Vec<v1::AppliedVersion> },
    Report { host: String, report: v1::StageReport },
}

type Reply = oneshot::Sender<Result<Rotation, EngineError>>;

/// How an operator asked for a start (a campaign asks with the default).
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The preflight was skipped, and why: audited as `rotation.preflight_skipped`.
    pub preflight_skipped: Option<String>,
}

/// How long a start waits for the provider's list of versions.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

enum Command {
    Start { secret: String, by: String, opts: StartOptions, listing: Option<Vec<VersionInfo>>, reply: Reply },
    Operator { id: String, event: Event, by: String, reply: Reply },
    Agent(AgentEvent),
    Provider { id: String, event: Event },
}

/// Cheap, cloneable access to the engine task.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    state: EngineState,
    providers: Arc<HashMap<String, Arc<dyn Provider>>>,
}

impl EngineHandle {
    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// Commands waiting in the engine's queue (a metric).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The provider of a catalog secret (for read-only queries).
    pub fn provider(&self, secret: &str) -> Option<Arc<dyn Provider>> {
        self.providers.get(secret).cloned()
    }

    pub async fn start(&self, secret: &str, by: &str) -> Result<Rotation, EngineError> {
        self.start_with(secret, by, StartOptions::default()).await
    }

    /// Starts a rotation. The provider's versions are listed here, in the
    /// caller's task (a slow provider never blocks the engine), so the engine
    /// reconciles its record with them before generating anything.
    pub async fn start_with(&self, secret: &str, by: &str, opts: StartOptions) -> Result<Rotation, EngineError> {
        let listing = match self.providers.get(secret) {
            Some(p) => match tokio::time::timeout(LIST_TIMEOUT, p.list()).await {
                Ok(Ok(v)) => Some(v),
                Ok(Err(e)) => {
                    tracing::info!(%secret, error = %Chain(&e), "provider versions not listed: nothing to reconcile with");
                    None
                }
                Err(_) => {
                    tracing::warn!(%secret, "provider versions not listed within 30s: nothing to reconcile with");
                    None
                }
            },
            None => None,
        };
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Start { secret: secret.to_string(), by: by.to_string(), opts, listing, reply };
        self.tx.send(cmd).await.map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Pause, resume, abort or exclude (as a machine event) on behalf of `by`.
    pub async fn control(&self, id: &str, event: Event, by: &str) -> Result<Rotation, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Operator { id: id.to_string(), event, by: by.to_string(), reply })
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Waits for room in the engine's queue: a busy engine slows the session
    /// that reports, it never drops a report.
    pub async fn agent_event(&self, ev: AgentEvent) {
        let _ = self.tx.send(Command::Agent(ev)).await;
    }
}

pub struct Engine {
    config: Arc<Config>,
    state: EngineState,
    store: Store,
    link: Arc<dyn AgentLink>,
    providers: Arc<HashMap<String, Arc<dyn Provider>>>,
    /// Per secret, where every new version is also written.
    sinks: Arc<HashMap<String, Vec<Arc<dyn Sink>>>>,
    active: HashMap<String, Rotation>,
    alerts: Alerts,
    tx: mpsc::Sender<Command>,
    rx: mpsc::Receiver<Command>,
}

/// An event handled and staged, its side effects not yet performed.
struct Stepped {
    id: String,
    state_before: RotationState,
    actions: Vec<Action>,
}

/// At most this many agent reports share one flush.
const MAX_BATCH: usize = 4096;
/// How long the first report of a batch waits for others to share its flush.
const GROUP_COMMIT: Duration = Duration::from_millis(3);

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill(&mut b[..]);
    hex::encode(b)
}

fn stage_of(s: i32) -> Option<Stage> {
    Some(match v1::Stage::try_from(s).ok()? {
        v1::Stage::Delivered => Stage::Delivered,
        v1::Stage::Applied => Stage::Applied,
        v1::Stage::Restarted => Stage::Restarted,
        v1::Stage::Healthy => Stage::Healthy,
        v1::Stage::Failed => Stage::Failed,
        v1::Stage::RolledBack => Stage::RolledBack,
        v1::Stage::Refused => Stage::Refused,
        v1::Stage::Unspecified => return None,
    })
}

/// Audit records for what changed between two states of a rotation.
/// The audit records of one transition: host changes (the hosts it
/// touched whose state moved), then new decisions and timeline entries.
fn audit_of(rot: &Rotation, decisions_before: usize, timeline_before: usize, actor: &str) -> Vec<AuditEntry> {
    let mut out = Vec::new();
    // Host changes first: they are the cause of the rotation's transitions.
    for (name, from) in &rot.touched.0 {
        let Some(h) = rot.hosts.get(name) else { continue };
        if *from != h.state {
            out.push(AuditEntry::new(
                actor,
                "host.state",
                serde_json::json!({
                    "rotation": rot.id, "secret": rot.secret, "host": name,
                    "from": from.as_str(), "to": h.state.as_str(),
                    "fingerprint": h.fingerprint, "error": h.error,
                    "excluded_by": h.exclusion.as_ref().map(|e| &e.by),
                    "reason": h.exclusion.as_ref().map(|e| &e.reason),
                }),
            ));
        }
    }
    for d in rot.decisions.iter().skip(decisions_before) {
        out.push(AuditEntry::new(
            actor,
            format!("rotation.decision.{}", d.kind.as_str()),
            serde_json::json!({
                "rotation": rot.id, "secret": rot.secret, "decision": d.kind.as_str(), "by": d.by,
                "reason": d.reason, "from": d.from.as_str(), "hosts_on_new": d.hosts_on_new,
            }),
        ));
    }
    for t in rot.timeline.iter().skip(timeline_before) {
        out.push(AuditEntry::new(
            actor,
            format!("rotation.{}", t.state.as_str()),
            serde_json::json!({ "rotation": rot.id, "secret": rot.secret, "state": t.state.as_str(), "note": t.note }),
        ));
    }
    out
}

/// A secret's provider and the sinks every new version is also written to.
pub struct SecretBackends {
    pub provider: Arc<dyn Provider>,
    pub sinks: Vec<Arc<dyn Sink>>,
}

/// Builds a secret's provider and sinks from its catalog entry, given the
/// durable state space the provider may keep (its create journal).
/// [`configured_backends`] in rekeyd; the deterministic simulation builds
/// simulated providers over the same state space.
pub type BuildBackends =
    dyn Fn(&SecretSpec, Arc<dyn ProviderState>) -> Result<SecretBackends, ProviderError> + Send + Sync;

/// The provider and sinks `spec` configures.
pub fn configured_backends(spec: &SecretSpec, state: Arc<dyn ProviderState>) -> Result<SecretBackends, ProviderError> {
    let provider = rekey_providers::build(&spec.provider, state)?;
    let sinks = spec.sinks.iter().map(|c| rekey_providers::build_sink(c, &spec.name)).collect::<Result<Vec<_>, _>>()?;
    Ok(SecretBackends { provider, sinks })
}

impl Engine {
    /// The engine with the providers and sinks `build` makes for each
    /// secret of the catalog (metered).
    pub fn new(
        config: Arc<Config>,
        store: Store,
        state: EngineState,
        link: Arc<dyn AgentLink>,
        alerts: Alerts,
        build: &BuildBackends,
    ) -> Result<(Engine, EngineHandle), ProviderError> {
        let mut backends = HashMap::new();
        for spec in &config.secrets {
            let SecretBackends { provider, sinks } = build(spec, state.provider_state(&spec.name))?;
            let provider = crate::metrics::events::metered(&spec.name, provider);
            backends.insert(spec.name.clone(), SecretBackends { provider, sinks });
        }
        Ok(Engine::with_backends(config, store, state, link, alerts, backends))
    }

    /// The engine with the given providers and sinks per secret name (tests
    /// and simulations put fakes here).
    pub fn with_backends(
        config: Arc<Config>,
        store: Store,
        state: EngineState,
        link: Arc<dyn AgentLink>,
        alerts: Alerts,
        backends: HashMap<String, SecretBackends>,
    ) -> (Engine, EngineHandle) {
        let mut providers = HashMap::new();
        let mut sinks = HashMap::new();
        for (name, b) in backends {
            providers.insert(name.clone(), b.provider);
            sinks.insert(name, b.sinks);
        }
        let providers = Arc::new(providers);
        let sinks = Arc::new(sinks);
        let (tx, rx) = mpsc::channel(1024);
        let handle = EngineHandle { tx: tx.clone(), state: state.clone(), providers: providers.clone() };
        (Engine { config, state, store, link, providers, sinks, alerts, active: HashMap::new(), tx, rx }, handle)
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), EngineError> {
        // Resume what a previous process left in flight.
        let now = now_unix_ms();
        for rot in self.state.list_rotations()? {
            if rot.state.is_terminal() {
                // A crash between completing and forgetting the revoked value: forget it now.
                if rot.state == RotationState::Completed
                    && let Some(old) = &rot.old_version
                    && (rot.old_revoked_ms.is_some() || rot.timeline.iter().any(|t| t.state == RotationState::Deleting))
                    && let Err(e) = self.state.remove_version(&rot.secret, old)
                {
                    tracing::error!(rotation = %rot.id, error = %Chain(&e), "cannot forget the old value");
                }
                continue;
            }
            // Once per rotation at start: a full comparison is affordable here.
            let before = rot.clone();
            let mut after = rot;
            let actions = machine::on_restart(&mut after, now);
            tracing::info!(rotation = %after.id, secret = %after.secret, state = after.state.as_str(), "resuming rotation");
            for (name, h) in &after.hosts {
                if before.hosts.get(name) != Some(h) {
                    after.touched.0.insert(name.clone(), before.hosts.get(name).map_or(h.state, |b| b.state));
                }
            }
            let id = after.id.clone();
            let counts = (before.decisions.len(), before.timeline.len());
            let head_before = if before.hosts_apart { before.clone().head_digest() } else { Vec::new() };
            self.active.insert(id.clone(), after);
            self.stage(&id, &head_before, counts, "rekeyd")?;
            self.state.flush_changes()?;
            self.run_actions(&id, actions, "rekeyd");
        }
        let mut wake = self.next_wake();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Agent(AgentEvent::Report { host, report })) => {
                        let (batch, next) = self.take_reports((host, report)).await;
                        self.on_reports(batch);
                        if let Some(cmd) = next {
                            self.on_command(cmd).await;
                        }
                        wake = wake.min(self.next_wake());
                    }
                    Some(cmd) => {
                        self.on_command(cmd).await;
                        wake = wake.min(self.next_wake());
                    }
                    None => return Ok(()),
                },
                _ = tokio::time::sleep_until(wake) => {
                    wake = tokio::time::Instant::now() + TICK;
                    let ids: Vec<String> = self.active.keys().cloned().collect();
                    for id in ids {
                        if let Err(e) = self.apply(&id, Event::Tick, "rekeyd") {
                            tracing::error!(rotation = %id, error = %Chain(&e), "tick failed");
                        }
                    }
                    wake = wake.min(self.next_wake());
                }
            }
        }
    }

    /// The soonest moment a rotation needs a tick (at most [`TICK`] away).
    fn next_wake(&self) -> tokio::time::Instant {
        let now_ms = now_unix_ms();
        let soonest = self.active.values().filter_map(machine::next_due).min();
        let wait = soonest
            .map_or(TICK, |t| Duration::from_millis(t.saturating_sub(now_ms).max(0) as u64).clamp(MIN_WAIT, TICK));
        tokio::time::Instant::now() + wait
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Start { secret, by, opts, listing, reply } => {
                let r = self.start(&secret, &by, opts, listing).await;
                let _ = reply.send(r);
            }
            Command::Operator { id, event, by, reply } => {
                let r = if self.active.contains_key(&id) {
                    self.apply_and_get(&id, event, &by)
                } else {
                    match self.state.get_rotation(&id) {
                        Ok(Some(rot)) => Err(EngineError::Refused(format!(
                            "rotation {id} is {}: nothing to change",
                            rot.state.as_str()
                        ))),
                        Ok(None) => Err(EngineError::UnknownRotation(id)),
                        Err(e) => Err(e.into()),
                    }
                };
                let _ = reply.send(r);
            }
            Command::Provider { id, event } => {
                if self.active.contains_key(&id)
                    && let Err(e) = self.apply(&id, event, "rekeyd")
                {
                    tracing::error!(rotation = %id, error = %Chain(&e), "provider result not applied");
                }
            }
            Command::Agent(AgentEvent::Connected { host, applied }) => {
                let ids: Vec<String> =
                    self.active.values().filter(|r| r.hosts.contains_key(&host)).map(|r| r.id.clone()).collect();
                for id in ids {
                    let secret = self.active[&id].secret.clone();
                    let a = applied
                        .iter()
                        .find(|a| a.secret == secret)
                        .map(|a| (a.version_id.clone(), a.fingerprint.clone()));
                    let actor = format!("agent/{host}");
                    if let Err(e) = self.apply(&id, Event::Connected { host: host.clone(), applied: a }, &actor) {
                        tracing::error!(rotation = %id, error = %Chain(&e), "agent hello not applied");
                    }
                }
            }
            Command::Agent(AgentEvent::Report { host, report }) => self.on_reports(vec![(host, report)]),
        }
    }

    /// Agent reports, applied as one batch (see [`Engine::apply_batch`]).
    fn on_reports(&mut self, reports: Vec<(String, v1::StageReport)>) {
        let mut events = Vec::with_capacity(reports.len());
        for (host, report) in reports {
            let Some(stage) = stage_of(report.stage) else {
                tracing::warn!(agent = %host, stage = report.stage, "report with an unknown stage ignored");
                continue;
            };
            let id = report.rotation_id.clone();
            match self.active.get(&id) {
                Some(r) if r.secret == report.secret => {
                    let ev = Event::Report {
                        host: host.clone(),
                        version: report.version_id,
                        stage,
                        fingerprint: report.fingerprint,
                        error: report.error,
                        at_ms: report.at_unix_ms,
                    };
                    events.push((id, ev, format!("agent/{host}")));
                }
                _ => tracing::debug!(agent = %host, rotation = %id, "report for an inactive rotation ignored"),
            }
        }
        self.apply_batch(events);
    }

    /// The reports arriving within [`GROUP_COMMIT`] of `first` (up to
    /// [`MAX_BATCH`]), and the first other command found, which must wait for
    /// the batch. A flush costs the same for one report as for thousands:
    /// this short wait is what lets a wave's reports share it.
    async fn take_reports(
        &mut self,
        first: (String, v1::StageReport),
    ) -> (Vec<(String, v1::StageReport)>, Option<Command>) {
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + GROUP_COMMIT;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(Some(Command::Agent(AgentEvent::Report { host, report }))) => batch.push((host, report)),
                Ok(Some(other)) => return (batch, Some(other)),
                Ok(None) | Err(_) => break,
            }
        }
        (batch, None)
    }

    async fn start(
        &mut self,
        secret: &str,
        by: &str,
        opts: StartOptions,
        listing: Option<Vec<VersionInfo>>,
    ) -> Result<Rotation, EngineError> {
        let spec = self.config.secret(secret).ok_or_else(|| EngineError::UnknownSecret(secret.to_string()))?.clone();
        let record = self.state.get_secret(secret)?;
        if let Some(active) = record.active_rotation {
            return Err(EngineError::AlreadyRotating { secret: secret.to_string(), rotation: active });
        }
        let consumers = consumer_targets(&self.store, &spec).map_err(|e| EngineError::State(StateError::Store(e)))?;
        let targets: Vec<String> = consumers.iter().map(|t| t.name.clone()).collect();
        if targets.is_empty() {
            return Err(EngineError::NoConsumers(secret.to_string()));
        }
        let provider =
            self.providers.get(secret).cloned().ok_or_else(|| EngineError::UnknownSecret(secret.to_string()))?;
        let (old, mut audit) = self.old_version(secret, record.current_version, listing, provider.as_ref()).await?;
        let now = now_unix_ms();
        let id = format!("rot-{:x}{}", now / 1000, random_hex(3));
        let plan = plan_waves(&consumers, spec.policy.canary, &spec.policy.selector_waves, &spec.policy.waves);
        let mut rot = Rotation::new(
            id.clone(),
            secret.to_string(),
            by.to_string(),
            spec.policy.clone(),
            old.clone(),
            plan.waves,
            String::new(),
            now,
        );
        rot.pause_after = plan.pause_after.clone();
        // Sealed apart, never in the rotation record (nor any view of it).
        let mut fingerprint_key = [0u8; 32];
        rand::rng().fill(&mut fingerprint_key[..]);
        self.state.put_fingerprint_key(&id, &fingerprint_key)?;
        audit.insert(
            0,
            AuditEntry::new(
                by,
                "rotation.start",
                serde_json::json!({ "rotation": id, "secret": secret, "old_version": old, "targets": targets, "waves": rot.waves,
                                "wave_kinds": plan.kinds, "pause_after": plan.pause_after, "empty_selector_waves": plan.empty }),
            ),
        );
        for a in &mut audit {
            a.details["rotation"] = serde_json::json!(id);
        }
        if let Some(reason) = opts.preflight_skipped {
            audit.push(AuditEntry::new(
                by,
                "rotation.preflight_skipped",
                serde_json::json!({ "rotation": id, "secret": secret, "by": by, "reason": reason }),
            ));
        }
        self.state.begin(&rot, audit)?;
        tracing::info!(rotation = %id, %secret, targets = targets.len(), operator = %by, "rotation started");
        self.active.insert(id.clone(), rot);
        self.apply_and_get(&id, Event::Begin, by)
    }

    /// The version a new rotation replaces: rekey's record reconciled with
    /// the provider's list when there is one (see `engine::reconcile`),
    /// else the record, else the provider's current version. Drift goes to
    /// the audit records returned (`rotation.drift`).
    async fn old_version(
        &self,
        secret: &str,
        recorded: Option<String>,
        listing: Option<Vec<VersionInfo>>,
        provider: &dyn Provider,
    ) -> Result<(Option<String>, Vec<AuditEntry>), EngineError> {
        let first = async || {
            provider
                .current()
                .await
                .map(|v| v.map(|v| v.id))
                .map_err(|source| EngineError::Provider { secret: secret.to_string(), source })
        };
        let Some(versions) = listing else {
            return Ok((if recorded.is_some() { recorded } else { first().await? }, Vec::new()));
        };
        let known = known_versions(&self.state, secret)?;
        let r = reconcile(recorded.as_deref(), &known, &versions, version_limit(provider.kind()));
        let old = match &r.old {
            OldVersion::Ambiguous(_) => {
                let why = r.problems().join("; ");
                return Err(EngineError::Refused(format!("{why}; no rotation was started and no key generated")));
            }
            OldVersion::FirstRotation => first().await?,
            _ => r.old_version().map(str::to_string),
        };
        let findings = r.findings();
        let mut audit = Vec::new();
        if r.recorded_missing || !r.unknown_active.is_empty() {
            tracing::warn!(%secret, recorded = ?r.recorded, old = ?old, drift = ?r.unknown_active, "provider differs from rekey's record");
            audit.push(AuditEntry::new(
                "rekeyd",
                "rotation.drift",
                serde_json::json!({
                    "secret": secret, "recorded_version": r.recorded, "recorded_missing": r.recorded_missing,
                    "old_version": old, "unknown_active": r.unknown_active, "findings": findings,
                }),
            ));
        }
        Ok((old, audit))
    }

    /// Persists what the last event changed in rotation `id` (see
    /// [`EngineState::commit_change`]): its record only if something besides
    /// its hosts changed, and the hosts it touched. Nothing if nothing changed.
    fn stage(&mut self, id: &str, head_before: &[u8], counts: (usize, usize), actor: &str) -> Result<(), EngineError> {
        let Some(rot) = self.active.get_mut(id) else { return Ok(()) };
        let mut head_changed = rot.head_digest() != head_before;
        let mut hosts: Vec<String> = rot.touched.0.keys().cloned().collect();
        if !rot.hosts_apart {
            // A record from before hosts were stored apart: move them all out now.
            rot.hosts_apart = true;
            head_changed = true;
            hosts = rot.hosts.keys().cloned().collect();
        }
        if !head_changed && hosts.is_empty() {
            return Ok(());
        }
        let head = head_changed.then(|| rot.head_record());
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let audit = audit_of(rot, counts.0, counts.1, actor);
        self.state.stage_change(rot, head.as_deref(), &hosts, audit)?;
        Ok(())
    }

    /// The rotation as persisted, after a change that was refused or not
    /// persisted: memory never runs ahead of the store.
    fn reload(&mut self, id: &str) {
        match self.state.get_rotation(id) {
            Ok(Some(r)) if !r.state.is_terminal() => {
                self.active.insert(id.to_string(), r);
            }
            Ok(_) => {
                self.active.remove(id);
            }
            Err(e) => tracing::error!(rotation = %id, error = %Chain(&e), "cannot reload the rotation"),
        }
    }

    /// Applies one event (and the follow-ups its side effects produce):
    /// handle → persist → act. The rotation changes in place: a host event
    /// costs the hosts it touched, not a copy of every host.
    fn apply(&mut self, id: &str, event: Event, actor: &str) -> Result<(), EngineError> {
        let mut queue = VecDeque::from([(event, actor.to_string())]);
        while let Some((event, actor)) = queue.pop_front() {
            let Some(stepped) = self.step(id, event, &actor)? else { break };
            if let Err(e) = self.state.flush_changes() {
                self.reload(id);
                return Err(e.into());
            }
            queue.extend(self.act(stepped).into_iter().map(|f| (f, "rekeyd".to_string())));
        }
        Ok(())
    }

    /// Agent reports in one batch: each is handled and staged in its own
    /// transaction, one flush makes them all durable, and only then are
    /// their side effects performed. Persist-before-act holds for every
    /// event; the batch shares the fsync (one per report was the bottleneck
    /// at thousands of hosts).
    fn apply_batch(&mut self, events: Vec<(String, Event, String)>) {
        let mut done = Vec::new();
        for (id, event, actor) in events {
            match self.step(&id, event, &actor) {
                Ok(Some(s)) => done.push(s),
                Ok(None) => {}
                Err(e) => tracing::error!(rotation = %id, error = %Chain(&e), "report not applied"),
            }
        }
        if let Err(e) = self.state.flush_changes() {
            tracing::error!(error = %Chain(&e), "reports not persisted; nothing done");
            let ids: std::collections::BTreeSet<String> = done.into_iter().map(|s| s.id).collect();
            ids.iter().for_each(|id| self.reload(id));
            return;
        }
        for s in done {
            let id = s.id.clone();
            for follow in self.act(s) {
                if let Err(e) = self.apply(&id, follow, "rekeyd") {
                    tracing::error!(rotation = %id, error = %Chain(&e), "follow-up not applied");
                }
            }
        }
    }

    /// Handles one event and stages its change (not yet flushed); `None`
    /// when the rotation is not active.
    fn step(&mut self, id: &str, event: Event, actor: &str) -> Result<Option<Stepped>, EngineError> {
        let Some(rot) = self.active.get_mut(id) else { return Ok(None) };
        let (state_before, counts) = (rot.state, (rot.decisions.len(), rot.timeline.len()));
        let head_before = rot.head_digest();
        let actions = match machine::handle(rot, event, now_unix_ms()) {
            Ok(a) => a,
            Err(r) => {
                self.reload(id);
                return Err(EngineError::Refused(r.0));
            }
        };
        if let Err(e) = self.stage(id, &head_before, counts, actor) {
            self.reload(id);
            return Err(e);
        }
        Ok(Some(Stepped { id: id.to_string(), state_before, actions }))
    }

    /// After the flush: logs the transition, forgets a revoked value once
    /// monitoring is over, performs the side effects; returns the events
    /// they produced (a delivery that could not be sent).
    fn act(&mut self, s: Stepped) -> Vec<Event> {
        let Some(rot) = self.active.get(&s.id) else { return Vec::new() };
        let id = &s.id;
        if rot.state != s.state_before {
            tracing::info!(rotation = %id, from = s.state_before.as_str(), to = rot.state.as_str(), "rotation state");
        }
        if rot.state == RotationState::Completed
            && s.state_before != RotationState::Completed
            && let Some(old) = &rot.old_version
            && (rot.old_revoked_ms.is_some() || rot.timeline.iter().any(|t| t.state == RotationState::Deleting))
        {
            // Monitoring is over: forget the revoked value.
            if let Err(e) = self.state.remove_version(&rot.secret, old) {
                tracing::error!(rotation = %id, error = %Chain(&e), "cannot forget the old value");
            }
        }
        let follow = self.run_actions_for(rot, s.actions);
        if rot.state.is_terminal() {
            self.active.remove(id);
        }
        follow
    }

    /// [`Engine::apply`], then the rotation as it stands (for an operator's answer).
    fn apply_and_get(&mut self, id: &str, event: Event, actor: &str) -> Result<Rotation, EngineError> {
        self.apply(id, event, actor)?;
        match self.active.get(id) {
            Some(r) => Ok(r.clone()),
            None => self.state.get_rotation(id)?.ok_or_else(|| EngineError::UnknownRotation(id.to_string())),
        }
    }

    fn run_actions(&mut self, id: &str, actions: Vec<Action>, actor: &str) {
        let Some(rot) = self.active.get(id).cloned() else { return };
        for ev in self.run_actions_for(&rot, actions) {
            if let Err(e) = self.apply(id, ev, actor) {
                tracing::error!(rotation = %id, error = %Chain(&e), "follow-up not applied");
            }
        }
    }

    /// Performs side effects; returns events that must be applied right away
    /// (a delivery that could not be sent).
    fn run_actions_for(&self, rot: &Rotation, actions: Vec<Action>) -> Vec<Event> {
        let mut follow = Vec::new();
        for action in actions {
            match action {
                Action::Create => self.spawn_provider(rot, ProviderOp::Create),
                Action::DeactivateOld => self.spawn_provider(rot, ProviderOp::DeactivateOld),
                Action::DeleteOld => self.spawn_provider(rot, ProviderOp::DeleteOld),
                Action::DeleteNew => self.spawn_provider(rot, ProviderOp::DeleteNew),
                Action::Deliver { host } => {
                    if let Err(error) = self.deliver(rot, &host) {
                        tracing::info!(rotation = %rot.id, %host, %error, "delivery not sent");
                        follow.push(Event::SendFailed { host, error });
                    }
                }
                Action::Rollback { host } => {
                    let version = rot.new_version.as_deref().unwrap_or_default();
                    if let Err(e) = self.link.rollback(&host, &rot.id, &rot.secret, version) {
                        tracing::info!(rotation = %rot.id, %host, error = %Chain(&e), "rollback not sent; retried when the agent reconnects");
                    }
                }
                Action::ReactivateOld => self.spawn_provider(rot, ProviderOp::ReactivateOld),
                Action::CheckUsage => self.spawn_usage_check(rot),
                Action::Alert { kind, severity, message } => {
                    let details = serde_json::json!({
                        "rotation": rot.id, "secret": rot.secret,
                        "old_version": rot.old_version, "new_version": rot.new_version,
                    });
                    let entry = AuditEntry::new(
                        "rekeyd",
                        format!("alert.{}", kind.as_str()),
                        serde_json::json!({ "rotation": rot.id, "secret": rot.secret, "severity": severity, "message": message }),
                    );
                    if let Err(e) = self.state.audit(now_unix_ms(), vec![entry]) {
                        tracing::error!(rotation = %rot.id, error = %Chain(&e), "cannot audit an alert");
                    }
                    if let Err(e) = self.alerts.raise(kind, severity, &rot.secret, Some(&rot.id), message, details) {
                        tracing::error!(rotation = %rot.id, error = %Chain(&e), "cannot record an alert");
                    }
                }
                Action::PurgeOld => {
                    if let Some(old) = &rot.old_version {
                        for host in rot.hosts.keys() {
                            if let Err(e) = self.link.purge(host, &rot.secret, old) {
                                tracing::info!(rotation = %rot.id, %host, error = %Chain(&e), "purge not sent");
                            }
                        }
                    }
                }
            }
        }
        follow
    }

    fn deliver(&self, rot: &Rotation, host: &str) -> Result<(), String> {
        let new = rot.new_version.as_deref().ok_or("no new version yet")?;
        if !self.link.is_connected(host) {
            return Err(format!("agent {host} is not connected"));
        }
        let fields = self
            .state
            .get_version(&rot.secret, new)
            .map_err(|e| format!("cannot read version {new}: {e}"))?
            .ok_or_else(|| format!("version {new} is missing from the store"))?;
        let previous_fields = match &rot.old_version {
            Some(old) => {
                self.state.get_version(&rot.secret, old).map_err(|e| format!("cannot read version {old}: {e}"))?
            }
            None => None,
        };
        let jitter = rekey_common::time::jitter(Duration::from_millis(rot.policy.jitter_ms)).as_millis() as u64;
        let delivery = Delivery {
            rotation_id: rot.id.clone(),
            secret: rot.secret.clone(),
            version_id: new.to_string(),
            fields,
            previous_version_id: rot.old_version.clone(),
            previous_fields,
            restart_jitter_ms: jitter,
            fingerprint_key: self
                .state
                .fingerprint_key(rot)
                .map_err(|e| format!("cannot read the fingerprint key: {e}"))?
                .expose()
                .to_vec(),
        };
        self.link.deliver(host, delivery).map_err(|e| e.to_string())?;
        tracing::info!(rotation = %rot.id, %host, version = %new, "delivered");
        Ok(())
    }

    /// Asks the provider when the old version was last used, in its own task.
    fn spawn_usage_check(&self, rot: &Rotation) {
        let (Some(provider), Some(old)) = (self.providers.get(&rot.secret).cloned(), rot.old_version.clone()) else {
            let _ = self.tx.try_send(Command::Provider {
                id: rot.id.clone(),
                event: Event::UsageChecked { usage: Some(Usage::Unknown), detail: UseDetail::default(), error: None },
            });
            return;
        };
        let tx = self.tx.clone();
        let id = rot.id.clone();
        let span = tracing::info_span!("usage", rotation = %rot.id, secret = %rot.secret, version = %old);
        tokio::spawn(
            async move {
                let (usage, detail, error) = match with_retries(|| provider.last_used(&old)).await {
                    Ok(LastUsed::Unknown) => (Some(Usage::Unknown), UseDetail::default(), None),
                    Ok(LastUsed::Never) => (Some(Usage::Never), UseDetail::default(), None),
                    Ok(LastUsed::At(u)) => {
                        (Some(Usage::At(u.at_ms)), UseDetail { resolution_ms: u.resolution_ms, source: u.source }, None)
                    }
                    // Deleted at the provider: nothing can use it any more.
                    Err(ProviderError::NotFound { .. }) => (Some(Usage::Gone), UseDetail::default(), None),
                    Err(e) => (None, UseDetail::default(), Some(e.to_string())),
                };
                let event = Event::UsageChecked { usage, detail, error };
                tracing::info!(?event, "usage checked");
                let _ = tx.send(Command::Provider { id, event }).await;
            }
            .instrument(span),
        );
    }

    /// Calls the provider in its own task; the result comes back as an event.
    fn spawn_provider(&self, rot: &Rotation, op: ProviderOp) {
        let Some(provider) = self.providers.get(&rot.secret).cloned() else {
            tracing::error!(secret = %rot.secret, "no provider for secret (removed from the catalog?)");
            let _ = self.tx.try_send(Command::Provider {
                id: rot.id.clone(),
                event: Event::ProviderFailed {
                    op,
                    error: format!("secret {} is no longer in the catalog", rot.secret),
                },
            });
            return;
        };
        let sinks = self.sinks.get(&rot.secret).cloned().unwrap_or_default();
        let state = self.state.clone();
        let tx = self.tx.clone();
        let rot = rot.clone();
        let span = tracing::info_span!("provider", rotation = %rot.id, secret = %rot.secret, op = ?op);
        tokio::spawn(
            async move {
                let event = match provider_call(&*provider, &sinks, &state, &rot, op).await {
                    Ok(ev) => ev,
                    Err(error) => {
                        tracing::warn!(%error, "provider call failed");
                        Event::ProviderFailed { op, error }
                    }
                };
                let _ = tx.send(Command::Provider { id: rot.id.clone(), event }).await;
            }
            .instrument(span),
        );
    }
}

async fn with_retries<T, F, Fut>(mut f: F) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProviderError>>,
{
    let mut attempt = 1;
    loop {
        // No provider call from a replica whose lease may have run out.
        if let Err(e) = crate::leading::ensure_leading() {
            return Err(ProviderError::Failed { provider: "rekeyd", message: e.to_string(), retryable: false });
        }
        match f().await {
            Err(e) if e.retryable() && attempt < PROVIDER_ATTEMPTS => {
                tracing::warn!(error = %Chain(&e), attempt, "retryable provider error");
                tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt))).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Creates the new version (idempotent per rotation id), seals it in the
/// store, audits the provider's notes, and writes it to every sink — all
/// before the rotation refers to it.
async fn create_version(
    p: &dyn Provider,
    sinks: &[Arc<dyn Sink>],
    state: &EngineState,
    rot: &Rotation,
) -> Result<Event, String> {
    let req = CreateRequest {
        secret: rot.secret.clone(),
        rotation_id: rot.id.clone(),
        previous_version: rot.old_version.clone(),
    };
    let v = with_retries(|| p.create(&req)).await.map_err(|e| e.to_string())?;
    // The value is durable (sealed) before the rotation refers to it.
    state.put_version(&rot.secret, &v.id, &v.fields).map_err(|e| e.to_string())?;
    let key = state.fingerprint_key(rot).map_err(|e| format!("cannot read the fingerprint key: {e}"))?;
    let fingerprint = fingerprint_fields(key.expose(), v.fields.iter().map(|(k, v)| (k.as_str(), v.expose())));
    tracing::info!(version = %v.id, %fingerprint, "new version created");
    if !v.notes.is_empty() {
        let entries = v
            .notes
            .iter()
            .map(|n| {
                AuditEntry::new(
                    "rekeyd",
                    "provider.note",
                    serde_json::json!({ "rotation": rot.id, "secret": rot.secret, "provider": p.kind(), "note": n }),
                )
            })
            .collect();
        state.audit(now_unix_ms(), entries).map_err(|e| e.to_string())?;
    }
    // Sinks hold the version before any host does; a failure halts the
    // rotation (nothing delivered) and a resume writes again (idempotent).
    for sink in sinks {
        let w = SinkWrite { secret: &rot.secret, rotation_id: &rot.id, version: &v.id, fields: &v.fields };
        let note = with_retries(|| sink.write(&w)).await.map_err(|e| format!("sink {}: {e}", sink.describe()))?;
        tracing::info!(version = %v.id, sink = %sink.describe(), "written to sink");
        let entry = AuditEntry::new(
            "rekeyd",
            "sink.write",
            serde_json::json!({
                "rotation": rot.id, "secret": rot.secret, "version": v.id,
                "sink": sink.describe(), "note": note,
            }),
        );
        state.audit(now_unix_ms(), vec![entry]).map_err(|e| e.to_string())?;
    }
    Ok(Event::Generated { version: v.id, fingerprint })
}

async fn provider_call(
    p: &dyn Provider,
    sinks: &[Arc<dyn Sink>],
    state: &EngineState,
    rot: &Rotation,
    op: ProviderOp,
) -> Result<Event, String> {
    match op {
        ProviderOp::Create => create_version(p, sinks, state, rot).await,
        ProviderOp::DeactivateOld => {
            let old = rot.old_version.as_deref().ok_or("no old version")?;
            audit_drift_before_revoking(p, state, rot, old).await;
            gone_or_done(op, with_retries(|| p.deactivate(old)).await)
        }
        ProviderOp::DeleteOld => {
            let old = rot.old_version.as_deref().ok_or("no old version")?;
            // The sealed old value is kept until monitoring ends, for leftover
            // scans (`rekey scope --version old`); see `Engine::apply`.
            gone_or_done(op, with_retries(|| p.delete(old)).await)
        }
        ProviderOp::ReactivateOld => {
            let old = rot.old_version.as_deref().ok_or("no old version")?;
            gone_or_done(op, with_retries(|| p.reactivate(old)).await)
        }
        ProviderOp::DeleteNew => {
            let new = rot.new_version.as_deref().ok_or("no new version")?;
            match with_retries(|| p.delete(new)).await {
                Ok(()) | Err(ProviderError::NotFound { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
            state.remove_version(&rot.secret, new).map_err(|e| e.to_string())?;
            Ok(Event::ProviderDone { op })
        }
    }
}

/// A call on the old version: done, or the version was already gone (counted as revoked).
fn gone_or_done(op: ProviderOp, r: Result<(), ProviderError>) -> Result<Event, String> {
    match r {
        Ok(()) => Ok(Event::ProviderDone { op }),
        Err(ProviderError::NotFound { .. }) => Ok(Event::OldGone { op }),
        Err(e) => Err(e.to_string()),
    }
}

/// Before revoking, looks at what the provider really holds: active versions
/// rekey did not make are audited as drift (left alone: rekey never revokes a
/// version it did not rotate out). An old version already gone is learned
/// from the provider's own answer to the deactivation (`NotFound`), never
/// from its absence in a list, which may be paginated.
async fn audit_drift_before_revoking(p: &dyn Provider, state: &EngineState, rot: &Rotation, old: &str) {
    let versions = match with_retries(|| p.list()).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "cannot list the provider's versions before revoking; going ahead");
            return;
        }
    };
    let drift: Vec<&str> = versions
        .iter()
        .filter(|v| v.status == VersionStatus::Active)
        .map(|v| v.id.as_str())
        .filter(|id| *id != old && Some(*id) != rot.new_version.as_deref())
        .collect();
    if !drift.is_empty() {
        tracing::warn!(?drift, "the provider holds active versions rekey did not make; left alone");
        let entry = AuditEntry::new(
            "rekeyd",
            "provider.drift",
            serde_json::json!({
                "rotation": rot.id, "secret": rot.secret, "active_unknown": drift,
                "note": "active versions rekey did not create: left alone; revoke them at the provider or rotate again",
            }),
        );
        if let Err(e) = state.audit(now_unix_ms(), vec![entry]) {
            tracing::error!(error = %Chain(&e), "cannot audit provider drift");
        }
    }
}

/// Agents that may receive `spec`: enrolled, not revoked, declaring it in
/// their own config, and selected by its labels.
pub fn consumers(store: &Store, spec: &super::catalog::SecretSpec) -> Result<Vec<String>, crate::store::StoreError> {
    Ok(consumer_targets(store, spec)?.into_iter().map(|t| t.name).collect())
}

/// [`consumers`] with their labels, for the wave planner.
pub fn consumer_targets(
    store: &Store,
    spec: &super::catalog::SecretSpec,
) -> Result<Vec<Target>, crate::store::StoreError> {
    Ok(store
        .list_agents()?
        .into_iter()
        .filter(|a| is_consumer(a, spec))
        .map(|a| Target { name: a.name, labels: a.labels })
        .collect())
}

/// Every version of `secret` rekey made, replaced or recorded: what the
/// reconciliation does not call drift.
pub fn known_versions(state: &EngineState, secret: &str) -> Result<std::collections::BTreeSet<String>, StateError> {
    let mut known: std::collections::BTreeSet<String> = state.get_secret(secret)?.current_version.into_iter().collect();
    for r in state.list_rotations()?.into_iter().filter(|r| r.secret == secret) {
        known.extend(r.old_version);
        known.extend(r.new_version);
    }
    Ok(known)
}

/// Whether `agent` may receive `spec` (see [`consumers`]).
pub fn is_consumer(agent: &crate::store::AgentRecord, spec: &super::catalog::SecretSpec) -> bool {
    agent.revoked_unix.is_none() && agent.secrets.contains(&spec.name) && spec.selects(&agent.name, &agent.labels)
}

/// For status displays: is the rotation waiting on something outside rekey?
pub fn waiting_on(rot: &Rotation) -> Option<String> {
    match rot.state {
        RotationState::RollingOut if rot.paused => Some(match rot.current_wave.checked_sub(1) {
            Some(w) if rot.pause_after.contains(&w) && !rot.wave_started(rot.current_wave) => {
                format!("paused after wave {w} (pause_after): check it, then `rekey rotate resume {}`", rot.id)
            }
            _ => "paused by an operator".into(),
        }),
        RotationState::Halted => rot.halt_reason.clone(),
        RotationState::RollingOut => {
            let unreachable: Vec<_> = rot
                .hosts
                .iter()
                .filter(|(_, h)| h.state == machine::HostState::Unreachable)
                .map(|(n, _)| n.as_str())
                .collect();
            (!unreachable.is_empty()).then(|| {
                format!(
                    "unreachable: {} — revocation waits until they return or are excluded",
                    rekey_common::error::named(&unreachable, ", ")
                )
            })
        }
        _ => None,
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
