//! The rotation state machine: pure (no I/O, `now` passed in), separate from
//! its driver. [`handle`] applies one event to a [`Rotation`] and returns the
//! side effects the driver must perform *after* persisting the new state.
//! [`on_restart`] returns what a restarted coordinator must redo.
//!
//! ```text
//! planned → generating → rolling_out (canary, waves) → verified → deactivating
//!         → grace → deleting → monitoring → completed
//! rollout failure over budget → halted (old untouched) → resume | abort
//! abort → hosts roll back → new version deleted → aborted
//! ```

use super::plan::Amount;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RotationState {
    Planned,
    Generating,
    RollingOut,
    Halted,
    Verified,
    Deactivating,
    Grace,
    Deleting,
    Monitoring,
    Completed,
    Aborting,
    Aborted,
}

impl RotationState {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationState::Planned => "planned",
            RotationState::Generating => "generating",
            RotationState::RollingOut => "rolling_out",
            RotationState::Halted => "halted",
            RotationState::Verified => "verified",
            RotationState::Deactivating => "deactivating",
            RotationState::Grace => "grace",
            RotationState::Deleting => "deleting",
            RotationState::Monitoring => "monitoring",
            RotationState::Completed => "completed",
            RotationState::Aborting => "aborting",
            RotationState::Aborted => "aborted",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, RotationState::Completed | RotationState::Aborted)
    }

    /// States at or past verification: the old version may be touched, abort no longer makes sense.
    pub fn is_past_verification(self) -> bool {
        matches!(
            self,
            RotationState::Verified
                | RotationState::Deactivating
                | RotationState::Grace
                | RotationState::Deleting
                | RotationState::Monitoring
                | RotationState::Completed
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Pending,
    Delivered,
    Applied,
    Restarted,
    Healthy,
    Failed,
    RolledBack,
    Unreachable,
    Excluded,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Pending => "pending",
            HostState::Delivered => "delivered",
            HostState::Applied => "applied",
            HostState::Restarted => "restarted",
            HostState::Healthy => "healthy",
            HostState::Failed => "failed",
            HostState::RolledBack => "rolled_back",
            HostState::Unreachable => "unreachable",
            HostState::Excluded => "excluded",
        }
    }

    /// Progress within one apply attempt.
    fn rank(self) -> u8 {
        match self {
            HostState::Delivered => 1,
            HostState::Applied => 2,
            HostState::Restarted => 3,
            HostState::Healthy => 4,
            _ => 0,
        }
    }

    fn in_flight(self) -> bool {
        matches!(self, HostState::Delivered | HostState::Applied | HostState::Restarted)
    }

    /// Settled for the purpose of finishing a wave.
    fn settled(self) -> bool {
        matches!(
            self,
            HostState::Healthy
                | HostState::Failed
                | HostState::RolledBack
                | HostState::Unreachable
                | HostState::Excluded
        )
    }
}

/// What an agent reported for a delivery (mirrors the protocol's `Stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    Delivered,
    Applied,
    Restarted,
    Healthy,
    Failed,
    RolledBack,
    Refused,
}

/// Rollout and revocation policy, snapshotted into the rotation at start so
/// a config change never alters a rotation in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub canary: usize,
    pub waves: Vec<Amount>,
    pub failure_budget: Amount,
    pub host_deadline_ms: i64,
    pub jitter_ms: u64,
    pub deactivate: bool,
    pub grace_ms: i64,
    pub delete: bool,
    pub monitor_ms: i64,
    /// Before deactivating, ask the provider when the old version was last
    /// used and hold revocation if it was used after every host switched.
    #[serde(default = "yes")]
    pub require_evidence: bool,
    /// The provider's usage-reporting granularity: use within this long after
    /// the last host switched is not held against the rotation.
    #[serde(default)]
    pub usage_granularity_ms: i64,
    /// What to do when the deactivated old version is used during the grace period.
    #[serde(default)]
    pub grace_use: GraceUse,
    /// How often usage is checked during grace and monitoring.
    #[serde(default = "one_minute")]
    pub check_every_ms: i64,
}

fn yes() -> bool {
    true
}

fn one_minute() -> i64 {
    60_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GraceUse {
    /// Alert, reactivate the old version and halt the rotation.
    #[default]
    Reactivate,
    /// Alert and carry on.
    Proceed,
}

/// What the provider says about the old version's last use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "at_ms")]
pub enum Usage {
    /// The provider keeps no usage data for this kind of secret.
    Unknown,
    Never,
    At(i64),
}

/// One usage check, as shown in status and reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceEntry {
    pub at_ms: i64,
    pub phase: RotationState,
    pub usage: Option<Usage>,
    pub error: Option<String>,
    /// What rekey concluded.
    pub verdict: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            canary: 1,
            waves: vec![Amount::Percent(100)],
            failure_budget: Amount::Count(0),
            host_deadline_ms: 5 * 60_000,
            jitter_ms: 0,
            deactivate: true,
            grace_ms: 10 * 60_000,
            delete: true,
            monitor_ms: 0,
            require_evidence: true,
            usage_granularity_ms: 0,
            grace_use: GraceUse::Reactivate,
            check_every_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exclusion {
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub state: HostState,
    pub wave: usize,
    pub delivered_ms: Option<i64>,
    pub updated_ms: i64,
    /// Fingerprint of the version the host reports loaded (never the value).
    pub fingerprint: Option<String>,
    pub error: Option<String>,
    pub exclusion: Option<Exclusion>,
    /// Abort: this host may hold the new version and must confirm its rollback.
    pub rollback_pending: bool,
    /// A reconnected host that may have missed its delivery gets it again at
    /// this time, unless it reports first (an agent that was mid-apply
    /// reports the truth about that attempt right after its hello).
    #[serde(default)]
    pub redeliver_at_ms: Option<i64>,
    /// (state, time) of each change, oldest first.
    pub history: Vec<(HostState, i64)>,
}

impl HostStatus {
    fn new(wave: usize, now: i64) -> Self {
        HostStatus {
            state: HostState::Pending,
            wave,
            delivered_ms: None,
            updated_ms: now,
            fingerprint: None,
            error: None,
            exclusion: None,
            rollback_pending: false,
            redeliver_at_ms: None,
            history: vec![(HostState::Pending, now)],
        }
    }

    fn set(&mut self, state: HostState, now: i64) {
        if self.state != state {
            self.state = state;
            self.history.push((state, now));
            if self.history.len() > 64 {
                self.history.remove(1);
            }
        }
        self.updated_ms = now;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at_ms: i64,
    pub state: RotationState,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rotation {
    pub id: String,
    pub secret: String,
    pub state: RotationState,
    pub paused: bool,
    pub started_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub policy: Policy,
    pub old_version: Option<String>,
    pub new_version: Option<String>,
    pub expected_fingerprint: Option<String>,
    /// Key of the keyed fingerprints for this rotation (not a secret: it only
    /// makes fingerprints incomparable across rotations).
    pub fingerprint_key: String,
    pub waves: Vec<Vec<String>>,
    pub current_wave: usize,
    pub hosts: BTreeMap<String, HostStatus>,
    /// Why the rotation is halted (and what to do about it).
    pub halt_reason: Option<String>,
    /// The state a halt interrupted, so resume knows what to redo.
    pub halted_from: Option<RotationState>,
    /// End of the grace or monitoring period.
    pub phase_until_ms: Option<i64>,
    /// Abort: the provider was asked to delete the new version.
    pub delete_new_issued: bool,
    pub timeline: Vec<TimelineEntry>,
    /// Usage checks of the old version (revocation evidence, grace tripwire, monitoring).
    #[serde(default)]
    pub evidence: Vec<EvidenceEntry>,
    /// The pre-revocation evidence was gathered and allows deactivation.
    #[serde(default)]
    pub evidence_ok: bool,
    #[serde(default)]
    pub usage_check_pending: bool,
    #[serde(default)]
    pub next_check_ms: Option<i64>,
    #[serde(default)]
    pub deactivated_ms: Option<i64>,
    /// The old version is being reactivated after use during grace.
    #[serde(default)]
    pub reactivating: bool,
    /// The last use already alerted on (the same use is reported by every check).
    #[serde(default)]
    pub alerted_use_ms: Option<i64>,
}

/// How long after a reconnect a host that was mid-delivery is sent the
/// version again if it has not reported on its own.
pub const REDELIVER_AFTER_MS: i64 = 1500;

/// A side effect for the driver, performed after the state is persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the provider for the new version (idempotent per rotation id).
    Create,
    /// Send the new version to this host.
    Deliver {
        host: String,
    },
    /// Tell this host to restore the old version.
    Rollback {
        host: String,
    },
    DeactivateOld,
    DeleteOld,
    DeleteNew,
    /// Tell agents the old version is revoked: purge backups holding it.
    PurgeOld,
    /// Ask the provider when the old version was last used.
    CheckUsage,
    /// Undo the deactivation (the old version was used during grace).
    ReactivateOld,
    /// Tell an operator now (log, store, webhook).
    Alert {
        kind: AlertKind,
        severity: Severity,
        message: String,
    },
}

/// What an alert is about. Serialized in `snake_case` (`old_version_used`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The old version was used after every target host had switched:
    /// revocation is held.
    OldVersionUsed,
    /// The deactivated old version was used during the grace window.
    OldVersionUsedDuringGrace,
    /// The deleted old version was used while monitoring.
    OldVersionUsedAfterRevocation,
    /// A copy of a revoked value is still on a host (tripwire scan).
    LeftoverFound,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::OldVersionUsed => "old_version_used",
            AlertKind::OldVersionUsedDuringGrace => "old_version_used_during_grace",
            AlertKind::OldVersionUsedAfterRevocation => "old_version_used_after_revocation",
            AlertKind::LeftoverFound => "leftover_found",
        }
    }
}

/// How urgent an alert is. Serialized in `snake_case`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProviderOp {
    Create,
    DeactivateOld,
    DeleteOld,
    DeleteNew,
    ReactivateOld,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Planned → generating.
    Begin,
    Generated {
        version: String,
        fingerprint: String,
    },
    ProviderDone {
        op: ProviderOp,
    },
    ProviderFailed {
        op: ProviderOp,
        error: String,
    },
    Report {
        host: String,
        version: String,
        stage: Stage,
        fingerprint: String,
        error: String,
    },
    /// An agent (re)connected; `applied` is the version of this secret it reports loaded.
    Connected {
        host: String,
        applied: Option<(String, String)>,
    },
    /// A delivery or rollback could not be sent (agent not connected).
    SendFailed {
        host: String,
        error: String,
    },
    Tick,
    /// The answer to [`Action::CheckUsage`] (or why there is none).
    UsageChecked {
        usage: Option<Usage>,
        error: Option<String>,
    },
    Pause {
        by: String,
    },
    Resume {
        by: String,
    },
    Abort {
        by: String,
    },
    Exclude {
        host: String,
        by: String,
        reason: String,
    },
}

/// An operator command that does not apply in the rotation's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Rotation {
    /// A new rotation over `waves` (from the planner).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        secret: String,
        started_by: String,
        policy: Policy,
        old_version: Option<String>,
        waves: Vec<Vec<String>>,
        fingerprint_key: String,
        now: i64,
    ) -> Rotation {
        let mut hosts = BTreeMap::new();
        for (i, w) in waves.iter().enumerate() {
            for h in w {
                hosts.insert(h.clone(), HostStatus::new(i, now));
            }
        }
        Rotation {
            id,
            secret,
            state: RotationState::Planned,
            paused: false,
            started_by,
            created_ms: now,
            updated_ms: now,
            policy,
            old_version,
            new_version: None,
            expected_fingerprint: None,
            fingerprint_key,
            waves,
            current_wave: 0,
            hosts,
            halt_reason: None,
            halted_from: None,
            phase_until_ms: None,
            delete_new_issued: false,
            evidence: Vec::new(),
            evidence_ok: false,
            usage_check_pending: false,
            next_check_ms: None,
            deactivated_ms: None,
            reactivating: false,
            alerted_use_ms: None,
            timeline: vec![TimelineEntry { at_ms: now, state: RotationState::Planned, note: "planned".into() }],
        }
    }

    fn goto(&mut self, state: RotationState, note: impl Into<String>, now: i64) {
        self.state = state;
        self.updated_ms = now;
        self.timeline.push(TimelineEntry { at_ms: now, state, note: note.into() });
    }

    fn halt(&mut self, reason: String, now: i64) {
        self.halted_from = Some(self.state);
        self.halt_reason = Some(reason.clone());
        self.goto(RotationState::Halted, reason, now);
    }

    /// Whether the verification decision was made (also while halted after it).
    pub fn verified(&self) -> bool {
        self.state.is_past_verification()
            || (self.state == RotationState::Halted
                && self.halted_from.is_some_and(RotationState::is_past_verification))
    }

    /// Every target healthy on the expected version, or excluded by an operator.
    pub fn gate_open(&self) -> bool {
        let Some(expected) = &self.expected_fingerprint else { return false };
        self.hosts.values().all(|h| {
            h.state == HostState::Excluded
                || (h.state == HostState::Healthy && h.fingerprint.as_deref() == Some(expected.as_str()))
        })
    }

    /// Hosts that keep the gate closed, with why.
    pub fn blocking_hosts(&self) -> Vec<(String, HostState)> {
        self.hosts
            .iter()
            .filter(|(_, h)| !matches!(h.state, HostState::Healthy | HostState::Excluded))
            .map(|(n, h)| (n.clone(), h.state))
            .collect()
    }

    fn failed_hosts(&self) -> Vec<(&String, &HostStatus)> {
        self.hosts.iter().filter(|(_, h)| matches!(h.state, HostState::Failed | HostState::RolledBack)).collect()
    }

    pub fn failure_budget(&self) -> usize {
        self.policy.failure_budget.resolve_down(self.hosts.len())
    }
}

fn fmt_ms(ms: i64) -> String {
    if ms % 1000 == 0 { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

/// Applies `event`; returns the side effects to perform once the new state is durable.
pub fn handle(rot: &mut Rotation, event: Event, now: i64) -> Result<Vec<Action>, Refusal> {
    let mut actions = Vec::new();
    match event {
        Event::Begin => {
            if rot.state == RotationState::Planned {
                rot.goto(RotationState::Generating, "generating the new version", now);
                actions.push(Action::Create);
            }
        }
        Event::Generated { version, fingerprint } => {
            // Only the first answer counts: a replayed create returns the same version.
            if rot.new_version.is_none() && matches!(rot.state, RotationState::Generating | RotationState::Halted) {
                rot.new_version = Some(version.clone());
                rot.expected_fingerprint = Some(fingerprint);
                if rot.state == RotationState::Halted {
                    // Halted while the create was in flight: keep the version, stay halted.
                    rot.halted_from = Some(RotationState::RollingOut);
                } else if rot.hosts.is_empty() {
                    rot.goto(RotationState::RollingOut, format!("version {version} created; no target hosts"), now);
                } else {
                    rot.goto(RotationState::RollingOut, format!("version {version} created; rolling out"), now);
                }
            }
        }
        Event::ProviderDone { op } => match (op, rot.state) {
            (ProviderOp::ReactivateOld, RotationState::Grace) if rot.reactivating => {
                rot.reactivating = false;
                rot.deactivated_ms = None;
                rot.evidence_ok = false;
                rot.halted_from = Some(RotationState::Verified);
                let reason = "the old version was used during the grace period and has been reactivated; \
                              find the consumer (`rekey scope`), then resume to check again and revoke"
                    .to_string();
                rot.halt_reason = Some(reason.clone());
                rot.goto(RotationState::Halted, reason, now);
            }
            (ProviderOp::DeactivateOld, RotationState::Deactivating) => {
                rot.deactivated_ms = Some(now);
                rot.next_check_ms = Some(now + rot.policy.check_every_ms);
                rot.phase_until_ms = Some(now + rot.policy.grace_ms);
                let note = format!("old version deactivated; grace period of {}", fmt_ms(rot.policy.grace_ms));
                rot.goto(RotationState::Grace, note, now);
            }
            (ProviderOp::DeleteOld, RotationState::Deleting) => {
                actions.push(Action::PurgeOld);
                enter_monitoring(rot, "old version deleted", now);
            }
            (ProviderOp::DeleteNew, RotationState::Aborting) => {
                rot.goto(RotationState::Aborted, "new version deleted; every host back on the old version", now);
            }
            _ => {} // late or duplicate: ignore
        },
        Event::ProviderFailed { op, error } => {
            let expected = match op {
                ProviderOp::Create => RotationState::Generating,
                ProviderOp::DeactivateOld => RotationState::Deactivating,
                ProviderOp::DeleteOld => RotationState::Deleting,
                ProviderOp::DeleteNew => RotationState::Aborting,
                ProviderOp::ReactivateOld => RotationState::Grace,
            };
            if rot.state == expected {
                let what = match op {
                    ProviderOp::Create => "creating the new version",
                    ProviderOp::DeactivateOld => "deactivating the old version",
                    ProviderOp::DeleteOld => "deleting the old version",
                    ProviderOp::DeleteNew => "deleting the new version",
                    ProviderOp::ReactivateOld => "reactivating the old version after its use during grace",
                };
                if op == ProviderOp::ReactivateOld {
                    rot.reactivating = false;
                    rot.halted_from = Some(RotationState::Verified);
                }
                if op == ProviderOp::DeleteNew {
                    rot.delete_new_issued = false;
                }
                rot.halt(format!("provider failed {what}: {error}; fix the cause, then resume (or abort)"), now);
            }
        }
        Event::Report { host, version, stage, fingerprint, error } => {
            report(rot, &host, &version, stage, fingerprint, error, now, &mut actions);
        }
        Event::Connected { host, applied } => {
            connected(rot, &host, applied, now, &mut actions);
        }
        Event::SendFailed { host, error } => {
            if let Some(h) = rot.hosts.get_mut(&host)
                && (h.state.in_flight() || h.state == HostState::Pending)
            {
                h.error = Some(error);
                h.set(HostState::Unreachable, now);
            }
        }
        Event::Tick => {
            let deadline = rot.policy.host_deadline_ms;
            if matches!(rot.state, RotationState::RollingOut | RotationState::Halted) {
                for (name, h) in rot.hosts.iter_mut() {
                    if h.redeliver_at_ms.is_some_and(|t| now >= t) {
                        h.redeliver_at_ms = None;
                        if h.state.in_flight() || h.state == HostState::Unreachable {
                            h.delivered_ms = Some(now);
                            h.set(HostState::Delivered, now);
                            actions.push(Action::Deliver { host: name.clone() });
                            continue;
                        }
                    }
                    if h.state.in_flight() && h.delivered_ms.is_some_and(|d| now - d > deadline) {
                        h.error = Some(format!(
                            "no healthy report within {} of delivery (last stage: {})",
                            fmt_ms(deadline),
                            h.state.as_str()
                        ));
                        h.set(HostState::Unreachable, now);
                    }
                }
            }
        }
        Event::UsageChecked { usage, error } => usage_checked(rot, usage, error, now, &mut actions),
        Event::Pause { by } => {
            if rot.state != RotationState::RollingOut || rot.paused {
                return Err(Refusal(format!(
                    "rotation {} is {}{}: only a rolling-out rotation can be paused",
                    rot.id,
                    rot.state.as_str(),
                    if rot.paused { " (already paused)" } else { "" }
                )));
            }
            rot.paused = true;
            rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note: format!("paused by {by}") });
        }
        Event::Resume { by } => resume(rot, &by, now, &mut actions)?,
        Event::Abort { by } => abort(rot, &by, now, &mut actions)?,
        Event::Exclude { host, by, reason } => {
            if rot.state.is_terminal() || rot.verified() {
                return Err(Refusal(format!(
                    "rotation {} is {}: exclusions only matter before verification",
                    rot.id,
                    rot.state.as_str()
                )));
            }
            let h = rot
                .hosts
                .get_mut(&host)
                .ok_or_else(|| Refusal(format!("host {host:?} is not a target of rotation {}", rot.id)))?;
            if h.state == HostState::Excluded {
                return Err(Refusal(format!("host {host} is already excluded")));
            }
            h.exclusion = Some(Exclusion { by: by.clone(), reason: reason.clone(), at_ms: now });
            h.rollback_pending = false;
            h.set(HostState::Excluded, now);
            rot.timeline.push(TimelineEntry {
                at_ms: now,
                state: rot.state,
                note: format!("host {host} excluded by {by}: {reason}"),
            });
        }
    }
    advance(rot, now, &mut actions);
    rot.updated_ms = now;
    Ok(actions)
}

#[allow(clippy::too_many_arguments)]
fn report(
    rot: &mut Rotation,
    host: &str,
    version: &str,
    stage: Stage,
    fingerprint: String,
    error: String,
    now: i64,
    actions: &mut Vec<Action>,
) {
    if rot.new_version.as_deref() != Some(version) || rot.state.is_terminal() || rot.verified() || rot.delete_new_issued
    {
        return; // stale, about another version, or after the decision was made
    }
    let expected = rot.expected_fingerprint.clone();
    let aborting = rot.state == RotationState::Aborting;
    let Some(h) = rot.hosts.get_mut(host) else { return };
    if h.state == HostState::Excluded {
        return;
    }
    h.redeliver_at_ms = None;
    if aborting && matches!(stage, Stage::Delivered | Stage::Applied | Stage::Restarted | Stage::Healthy) {
        // Anything that may hold the new version must confirm a rollback
        // before the new version is deleted.
        h.rollback_pending = true;
    }
    match stage {
        Stage::Delivered | Stage::Applied | Stage::Restarted => {
            let next = match stage {
                Stage::Delivered => HostState::Delivered,
                Stage::Applied => HostState::Applied,
                _ => HostState::Restarted,
            };
            // Forward only: a late "applied" never undoes "healthy".
            if (h.state.in_flight() || h.state == HostState::Unreachable) && next.rank() > h.state.rank() {
                h.set(next, now);
            }
        }
        Stage::Healthy => {
            if expected.as_deref() == Some(fingerprint.as_str()) {
                h.fingerprint = Some(fingerprint);
                h.error = None;
                h.set(HostState::Healthy, now);
                if aborting {
                    actions.push(Action::Rollback { host: host.to_string() });
                }
            } else {
                h.fingerprint = Some(fingerprint.clone());
                h.error = Some(format!(
                    "host reports a loaded version with fingerprint {fingerprint}, expected {}",
                    expected.unwrap_or_default()
                ));
                h.set(HostState::Failed, now);
            }
        }
        Stage::Failed | Stage::Refused => {
            let prefix = if stage == Stage::Refused { "agent refused the delivery: " } else { "" };
            h.error = Some(format!("{prefix}{}", if error.is_empty() { "failed (no reason given)" } else { &error }));
            if h.state != HostState::RolledBack || stage == Stage::Refused {
                h.set(HostState::Failed, now);
            }
            if stage == Stage::Refused {
                h.rollback_pending = false; // nothing was applied
            }
        }
        Stage::RolledBack => {
            h.rollback_pending = false;
            h.fingerprint = None;
            h.set(HostState::RolledBack, now);
        }
    }
}

fn connected(rot: &mut Rotation, host: &str, applied: Option<(String, String)>, now: i64, actions: &mut Vec<Action>) {
    let Some(new) = rot.new_version.clone() else { return };
    if rot.verified() {
        return;
    }
    let expected = rot.expected_fingerprint.clone();
    let state = rot.state;
    let delete_new_issued = rot.delete_new_issued;
    let Some(h) = rot.hosts.get_mut(host) else { return };
    let on_new = applied.as_ref().is_some_and(|(v, f)| *v == new && Some(f) == expected.as_ref());
    let touched = h.state.in_flight() || h.state == HostState::Unreachable || h.state == HostState::Healthy;
    match state {
        RotationState::RollingOut | RotationState::Halted if touched => {
            if on_new {
                h.fingerprint = expected;
                h.error = None;
                h.set(HostState::Healthy, now);
            } else if h.state == HostState::Healthy && state == RotationState::RollingOut {
                // It lost the version it had confirmed: send it again.
                h.delivered_ms = Some(now);
                h.set(HostState::Delivered, now);
                actions.push(Action::Deliver { host: host.to_string() });
            } else if h.delivered_ms.is_some() && h.state != HostState::Healthy {
                // It may have missed (part of) its delivery while away; if it
                // was mid-apply its reports come first. Re-deliver on a tick.
                h.redeliver_at_ms = Some(now + REDELIVER_AFTER_MS);
            }
        }
        RotationState::Aborting if !delete_new_issued && h.rollback_pending => {
            // Trust an agent that says it runs another version, unless it
            // may still be applying ours; when in doubt, ask it to roll back.
            let on_other = applied.as_ref().is_some_and(|(v, _)| *v != new);
            if on_other && !h.state.in_flight() && h.state != HostState::Unreachable {
                h.rollback_pending = false;
                h.set(HostState::RolledBack, now);
            } else {
                actions.push(Action::Rollback { host: host.to_string() });
            }
        }
        _ => {}
    }
}

fn resume(rot: &mut Rotation, by: &str, now: i64, actions: &mut Vec<Action>) -> Result<(), Refusal> {
    match rot.state {
        RotationState::RollingOut if rot.paused => {
            rot.paused = false;
            rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note: format!("resumed by {by}") });
        }
        RotationState::Halted => {
            let from = rot.halted_from.unwrap_or(RotationState::RollingOut);
            rot.halt_reason = None;
            rot.halted_from = None;
            rot.paused = false;
            match from {
                RotationState::Generating if rot.new_version.is_none() => {
                    rot.goto(RotationState::Generating, format!("resumed by {by}: generating again"), now);
                    actions.push(Action::Create);
                }
                RotationState::Deactivating => {
                    rot.goto(RotationState::Deactivating, format!("resumed by {by}: deactivating again"), now);
                    actions.push(Action::DeactivateOld);
                }
                RotationState::Verified => {
                    rot.evidence_ok = false;
                    rot.usage_check_pending = false;
                    rot.next_check_ms = None;
                    rot.goto(RotationState::Verified, format!("resumed by {by}: checking usage evidence again"), now);
                }
                RotationState::Deleting => {
                    rot.goto(RotationState::Deleting, format!("resumed by {by}: deleting again"), now);
                    actions.push(Action::DeleteOld);
                }
                RotationState::Aborting => {
                    rot.goto(RotationState::Aborting, format!("resumed by {by}: aborting again"), now);
                }
                _ => {
                    // Failed and unreachable hosts get the new version again.
                    for h in rot.hosts.values_mut() {
                        if matches!(h.state, HostState::Failed | HostState::RolledBack | HostState::Unreachable) {
                            h.error = None;
                            h.set(HostState::Pending, now);
                        }
                    }
                    rot.goto(RotationState::RollingOut, format!("resumed by {by}: failed hosts retry"), now);
                }
            }
        }
        s => {
            return Err(Refusal(format!(
                "rotation {} is {}{}: only a halted or paused rotation can be resumed",
                rot.id,
                s.as_str(),
                if rot.paused { " (paused)" } else { "" }
            )));
        }
    }
    Ok(())
}

fn abort(rot: &mut Rotation, by: &str, now: i64, actions: &mut Vec<Action>) -> Result<(), Refusal> {
    match rot.state {
        RotationState::Planned => {
            rot.goto(RotationState::Aborted, format!("aborted by {by} before anything changed"), now);
            Ok(())
        }
        RotationState::Generating => Err(Refusal(format!(
            "rotation {} is generating its new version; abort once it is rolling out or halted",
            rot.id
        ))),
        RotationState::Halted if rot.halted_from.is_some_and(RotationState::is_past_verification) => {
            Err(Refusal(format!(
                "rotation {} halted after every host confirmed the new version: resume it instead of aborting",
                rot.id
            )))
        }
        RotationState::RollingOut | RotationState::Halted => {
            rot.paused = false;
            rot.halt_reason = None;
            rot.halted_from = None;
            for (name, h) in rot.hosts.iter_mut() {
                let touched = h.state.in_flight()
                    || h.state == HostState::Healthy
                    || h.state == HostState::Failed
                    || (h.state == HostState::Unreachable && h.delivered_ms.is_some());
                if touched {
                    h.rollback_pending = true;
                    actions.push(Action::Rollback { host: name.clone() });
                }
            }
            rot.goto(RotationState::Aborting, format!("aborted by {by}: rolling hosts back to the old version"), now);
            Ok(())
        }
        RotationState::Aborting => Err(Refusal(format!("rotation {} is already aborting", rot.id))),
        s => Err(Refusal(format!(
            "rotation {} is {}: every host already confirmed the new version, so there is nothing to roll back",
            rot.id,
            s.as_str()
        ))),
    }
}

/// When the last target host confirmed the new version.
fn last_switch_ms(rot: &Rotation) -> i64 {
    rot.hosts
        .values()
        .filter(|h| h.state == HostState::Healthy)
        .filter_map(|h| h.history.iter().rev().find(|(s, _)| *s == HostState::Healthy).map(|(_, t)| *t))
        .max()
        .unwrap_or(rot.created_ms)
}

fn fmt_at(ms: i64) -> String {
    rekey_common::time::format_unix(ms / 1000)
}

fn usage_checked(rot: &mut Rotation, usage: Option<Usage>, error: Option<String>, now: i64, actions: &mut Vec<Action>) {
    if !rot.usage_check_pending {
        return; // late answer
    }
    rot.usage_check_pending = false;
    let phase = rot.state;
    let old = rot.old_version.clone().unwrap_or_default();
    let mut entry = EvidenceEntry { at_ms: now, phase, usage, error: error.clone(), verdict: String::new() };
    match phase {
        RotationState::Verified => {
            let switch = last_switch_ms(rot);
            let limit = switch + rot.policy.usage_granularity_ms;
            match (usage, &error) {
                (_, Some(e)) => {
                    entry.verdict = format!("usage of {old} unknown ({e}); revocation held, checking again");
                    rot.next_check_ms = Some(now + rot.policy.check_every_ms);
                }
                (Some(Usage::At(t)), None) if t > limit => {
                    entry.verdict = format!(
                        "{old} was used at {} after every host had switched ({}): revocation held",
                        fmt_at(t),
                        fmt_at(switch)
                    );
                    let message = format!(
                        "{old} of {} was used at {}, after every target host had switched to the new version at {}: \
                         an undeclared consumer? find it with `rekey scope {}`, then resume to check again",
                        rot.secret,
                        fmt_at(t),
                        fmt_at(switch),
                        rot.secret
                    );
                    actions.push(Action::Alert {
                        kind: AlertKind::OldVersionUsed,
                        severity: Severity::Critical,
                        message: message.clone(),
                    });
                    rot.evidence.push(entry);
                    rot.halt(message, now);
                    return;
                }
                (Some(Usage::Unknown) | None, None) => {
                    entry.verdict = "the provider reports no usage data for this kind of secret".to_string();
                    rot.evidence_ok = true;
                }
                (Some(u), None) => {
                    // The provider has usage data: observe it for one check interval
                    // after the switch, so a forgotten consumer shows up.
                    let observed_until = limit + rot.policy.check_every_ms;
                    let last = match u {
                        Usage::At(t) => format!("last used at {}, before every host switched", fmt_at(t)),
                        _ => "never used".to_string(),
                    };
                    if now >= observed_until {
                        entry.verdict = format!("{old} {last}; no use since: ok");
                        rot.evidence_ok = true;
                    } else {
                        entry.verdict = format!("{old} {last}; observing until {}", fmt_at(observed_until));
                        rot.next_check_ms = Some(observed_until);
                    }
                }
            }
        }
        RotationState::Grace | RotationState::Monitoring => {
            rot.next_check_ms = Some(now + rot.policy.check_every_ms);
            let since = if phase == RotationState::Grace {
                rot.deactivated_ms
            } else {
                rot.phase_until_ms.map(|t| t - rot.policy.monitor_ms)
            };
            match (usage, since) {
                (Some(Usage::At(t)), Some(since))
                    if t > since + rot.policy.usage_granularity_ms && rot.alerted_use_ms.is_none_or(|a| t > a) =>
                {
                    rot.alerted_use_ms = Some(t);
                    let what = if phase == RotationState::Grace { "deactivated" } else { "revoked" };
                    entry.verdict = format!("{old} used at {} after it was {what}", fmt_at(t));
                    let reactivate = phase == RotationState::Grace && rot.policy.grace_use == GraceUse::Reactivate;
                    let message = format!(
                        "the {what} old version {old} of {} was used at {}{}",
                        rot.secret,
                        fmt_at(t),
                        if reactivate { "; reactivating it and halting the rotation" } else { "" }
                    );
                    actions.push(Action::Alert {
                        kind: if phase == RotationState::Grace {
                            AlertKind::OldVersionUsedDuringGrace
                        } else {
                            AlertKind::OldVersionUsedAfterRevocation
                        },
                        severity: Severity::Critical,
                        message,
                    });
                    if reactivate {
                        rot.reactivating = true;
                        actions.push(Action::ReactivateOld);
                    }
                }
                _ => {
                    entry.verdict = match (&error, usage) {
                        (Some(e), _) => format!("usage unknown: {e}"),
                        (None, Some(Usage::At(t))) => format!("last used at {}: no use since", fmt_at(t)),
                        (None, _) => "no use reported".into(),
                    };
                }
            }
        }
        _ => return,
    }
    rot.evidence.push(entry);
    if rot.evidence.len() > 200 {
        rot.evidence.remove(0);
    }
}

fn enter_monitoring(rot: &mut Rotation, note: &str, now: i64) {
    if rot.policy.monitor_ms > 0 {
        rot.phase_until_ms = Some(now + rot.policy.monitor_ms);
        rot.next_check_ms = Some(now + rot.policy.check_every_ms);
        rot.goto(RotationState::Monitoring, format!("{note}; monitoring for {}", fmt_ms(rot.policy.monitor_ms)), now);
    } else {
        rot.phase_until_ms = None;
        rot.goto(RotationState::Completed, format!("{note}; completed"), now);
    }
}

/// Moves the rotation forward as far as its state allows.
fn advance(rot: &mut Rotation, now: i64, actions: &mut Vec<Action>) {
    loop {
        match rot.state {
            RotationState::RollingOut if !rot.paused => {
                // Deliver every pending host up to the current wave.
                let upto = rot.current_wave;
                for (name, h) in rot.hosts.iter_mut() {
                    if h.wave <= upto && h.state == HostState::Pending {
                        h.delivered_ms = Some(now);
                        h.set(HostState::Delivered, now);
                        actions.push(Action::Deliver { host: name.clone() });
                    }
                }
                let wave_settled = rot.hosts.values().filter(|h| h.wave <= upto).all(|h| h.state.settled());
                if !wave_settled {
                    return;
                }
                let failed = rot.failed_hosts();
                let canary_failed: Vec<_> =
                    failed.iter().filter(|(_, h)| h.wave == 0 && rot.policy.canary > 0).collect();
                if !canary_failed.is_empty() || failed.len() > rot.failure_budget() {
                    let list = failed
                        .iter()
                        .map(|(n, h)| format!("{n}: {}", h.error.as_deref().unwrap_or("failed")))
                        .collect::<Vec<_>>()
                        .join("; ");
                    let why = if !canary_failed.is_empty() {
                        "the canary failed".to_string()
                    } else {
                        format!(
                            "{} host{} failed, over the failure budget of {}",
                            failed.len(),
                            if failed.len() == 1 { "" } else { "s" },
                            rot.failure_budget()
                        )
                    };
                    rot.halt(format!("{why} ({list}); the old version is untouched — fix and resume, or abort"), now);
                    return;
                }
                if upto + 1 < rot.waves.len() {
                    rot.current_wave += 1;
                    let note = format!("wave {} of {} started", rot.current_wave, rot.waves.len() - 1);
                    rot.timeline.push(TimelineEntry { at_ms: now, state: rot.state, note });
                    continue;
                }
                if rot.gate_open() {
                    rot.goto(RotationState::Verified, "every target host confirmed the new version", now);
                    continue;
                }
                if !failed.is_empty() {
                    let list = failed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
                    rot.halt(
                        format!("rollout finished but {list} did not confirm the new version; fix and resume, or exclude them"),
                        now,
                    );
                }
                // Otherwise: waiting for unreachable hosts to come back (or be excluded).
                return;
            }
            RotationState::Verified => {
                let revoking = rot.policy.deactivate || rot.policy.delete;
                if rot.old_version.is_some() && revoking && rot.policy.require_evidence && !rot.evidence_ok {
                    // Ask once the provider data has settled (its granularity after the switch).
                    let ready = last_switch_ms(rot) + rot.policy.usage_granularity_ms;
                    let due = rot.next_check_ms.is_none_or(|t| now >= t);
                    if !rot.usage_check_pending && now >= ready && due {
                        rot.usage_check_pending = true;
                        actions.push(Action::CheckUsage);
                    }
                    return;
                }
                if rot.old_version.is_none() {
                    enter_monitoring(rot, "first version in place, nothing to revoke", now);
                } else if rot.policy.deactivate {
                    rot.goto(RotationState::Deactivating, "deactivating the old version", now);
                    actions.push(Action::DeactivateOld);
                    return;
                } else if rot.policy.delete {
                    rot.goto(RotationState::Deleting, "deleting the old version", now);
                    actions.push(Action::DeleteOld);
                    return;
                } else {
                    enter_monitoring(rot, "revocation disabled by policy: old version left in place", now);
                }
            }
            RotationState::Grace => {
                if rot.reactivating {
                    return;
                }
                if rot.old_version.is_some() && !rot.usage_check_pending && rot.next_check_ms.is_some_and(|t| now >= t)
                {
                    rot.usage_check_pending = true;
                    rot.next_check_ms = Some(now + rot.policy.check_every_ms);
                    actions.push(Action::CheckUsage);
                    return;
                }
                if rot.usage_check_pending {
                    return; // the last check's answer decides whether deletion may follow
                }
                if rot.phase_until_ms.is_some_and(|t| now >= t) {
                    if rot.policy.delete {
                        rot.goto(RotationState::Deleting, "grace period over; deleting the old version", now);
                        actions.push(Action::DeleteOld);
                    } else {
                        enter_monitoring(rot, "grace period over; deletion disabled by policy", now);
                    }
                    continue;
                }
                return;
            }
            RotationState::Monitoring => {
                if rot.old_version.is_some() && !rot.usage_check_pending && rot.next_check_ms.is_some_and(|t| now >= t)
                {
                    rot.usage_check_pending = true;
                    rot.next_check_ms = Some(now + rot.policy.check_every_ms);
                    actions.push(Action::CheckUsage);
                }
                if rot.phase_until_ms.is_some_and(|t| now >= t) {
                    rot.goto(RotationState::Completed, "monitoring window over; completed", now);
                }
                return;
            }
            RotationState::Aborting => {
                if rot.hosts.values().any(|h| h.rollback_pending) || rot.delete_new_issued {
                    return;
                }
                if rot.new_version.is_some() {
                    rot.delete_new_issued = true;
                    actions.push(Action::DeleteNew);
                } else {
                    rot.goto(RotationState::Aborted, "aborted; no new version existed", now);
                }
                return;
            }
            _ => return,
        }
    }
}

/// What a coordinator restarted in the middle of this rotation must redo.
/// Deliveries and rollbacks are redone as agents reconnect ([`Event::Connected`]).
pub fn on_restart(rot: &mut Rotation, now: i64) -> Vec<Action> {
    let mut actions = match rot.state {
        RotationState::Generating => vec![Action::Create],
        RotationState::Deactivating => vec![Action::DeactivateOld],
        RotationState::Deleting => vec![Action::DeleteOld],
        RotationState::Aborting if rot.delete_new_issued => vec![Action::DeleteNew],
        RotationState::Grace if rot.reactivating => vec![Action::ReactivateOld],
        RotationState::Verified | RotationState::Grace | RotationState::Monitoring if rot.usage_check_pending => {
            vec![Action::CheckUsage]
        }
        _ => vec![],
    };
    advance(rot, now, &mut actions);
    actions
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
