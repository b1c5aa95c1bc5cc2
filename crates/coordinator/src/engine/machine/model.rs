//! The rotation's data: states, per-host status, policy, events and
//! actions. Plain types; the transitions live in [`super`] and the usage
//! evidence in [`super::evidence`].

use crate::engine::plan::{Amount, SelectorWave};
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
    /// Ended by an operator's `abandon`: rekey stopped acting; the provider
    /// and the hosts stay as they were.
    Abandoned,
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
            RotationState::Abandoned => "abandoned",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, RotationState::Completed | RotationState::Aborted | RotationState::Abandoned)
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
    pub(super) fn rank(self) -> u8 {
        match self {
            HostState::Delivered => 1,
            HostState::Applied => 2,
            HostState::Restarted => 3,
            HostState::Healthy => 4,
            _ => 0,
        }
    }

    pub(super) fn in_flight(self) -> bool {
        matches!(self, HostState::Delivered | HostState::Applied | HostState::Restarted)
    }

    /// Settled for the purpose of finishing a wave.
    pub(super) fn settled(self) -> bool {
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
    /// Waves chosen by labels, delivered before the size waves (`plan`).
    #[serde(default)]
    pub selector_waves: Vec<SelectorWave>,
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
    /// What a use of the old version after every host switched does to revocation.
    #[serde(default)]
    pub use_after_switch: UseAfterSwitch,
}

/// What a use of the old version after every target host switched does
/// (`on_use_after_switch` in the catalog).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UseAfterSwitch {
    /// Alert and hold revocation until an operator decides (routine rotations:
    /// a forgotten consumer keeps working).
    #[default]
    Hold,
    /// Alert and revoke anyway (a leaked key: whoever still uses it is cut off).
    Revoke,
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
    /// The version no longer exists at the provider (removed outside rekey).
    Gone,
}

/// What the provider added to a use: how coarse its clock is and where the use came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UseDetail {
    /// A use reported at `t` may have happened anywhere in `[t, t + resolution_ms)`.
    #[serde(default)]
    pub resolution_ms: i64,
    /// Where the use came from, as the provider says (service and region, a source address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// An operator's decision that overrides the rotation's own course, with who and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub kind: DecisionKind,
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
    /// The state the rotation was in.
    pub from: RotationState,
    /// Whether every target host had confirmed the new version (or was excluded).
    pub hosts_on_new: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Revoke the old version now, despite the usage evidence.
    Revoke,
    /// End as completed where it stands; the provider is left as it is.
    Finish,
    /// Stop acting; the provider and the hosts stay as they are.
    Abandon,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Revoke => "revoke",
            DecisionKind::Finish => "finish",
            DecisionKind::Abandon => "abandon",
        }
    }
}

/// One usage check, as shown in status and reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceEntry {
    pub at_ms: i64,
    pub phase: RotationState,
    pub usage: Option<Usage>,
    pub error: Option<String>,
    /// Where the last use came from, when the provider says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What rekey concluded.
    pub verdict: String,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            canary: 1,
            waves: vec![Amount::Percent(100)],
            selector_waves: Vec::new(),
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
            use_after_switch: UseAfterSwitch::Hold,
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
    /// (state, time) of each change, oldest first. A stage the agent
    /// reported carries the host's own time of that step (see
    /// [`HostStatus::host_time`]); rekeyd's own changes carry its clock.
    pub history: Vec<(HostState, i64)>,
    /// The last report's time as the agent stamped it and when rekeyd
    /// received it (both kept: the difference is queueing plus clock skew).
    #[serde(default)]
    pub last_report: Option<ReportTimes>,
}

/// When an agent says it did a step, and when rekeyd heard of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportTimes {
    /// The agent's clock, as sent (0: the agent did not say).
    pub host_ms: i64,
    pub received_ms: i64,
}

impl HostStatus {
    pub(super) fn new(wave: usize, now: i64) -> Self {
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
            last_report: None,
        }
    }

    pub(super) fn set(&mut self, state: HostState, now: i64) {
        self.set_at(state, now, now);
    }

    /// Records a change that happened at `at` (the host's time of the step)
    /// and was learnt at `now`.
    pub(super) fn set_at(&mut self, state: HostState, at: i64, now: i64) {
        if self.state != state {
            self.state = state;
            self.history.push((state, at));
            if self.history.len() > 64 {
                self.history.remove(1);
            }
        }
        self.updated_ms = now;
    }

    /// The time to show for a step the agent stamped `host_ms` and rekeyd
    /// received at `now`. The host's clock is trusted only where it is
    /// plausible: a step cannot precede the delivery that caused it (or the
    /// host's previous step) nor follow its own receipt, so the agent's time
    /// is clamped into that window. A skewed clock thus degrades to rekeyd's
    /// bounds, never to times out of order; `0` (not stamped) means `now`.
    pub fn host_time(&self, host_ms: i64, now: i64) -> i64 {
        if host_ms <= 0 {
            return now;
        }
        let floor = self.delivered_ms.into_iter().chain(self.history.last().map(|(_, t)| *t)).max().unwrap_or(i64::MIN);
        host_ms.clamp(floor.min(now), now)
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
    /// Key of the keyed fingerprints, in records written before the key was
    /// sealed apart (`EngineState::fingerprint_key`); empty since.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint_key: String,
    pub waves: Vec<Vec<String>>,
    pub current_wave: usize,
    /// Waves after which the rollout pauses for an operator (`pause_after`).
    #[serde(default)]
    pub pause_after: Vec<usize>,
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
    /// Uses before this time are not held against revocation: an operator
    /// resumed after dealing with a consumer, so evidence counts from then.
    #[serde(default)]
    pub evidence_since_ms: Option<i64>,
    /// Operators' overriding decisions (revoke, finish, abandon), oldest first.
    #[serde(default)]
    pub decisions: Vec<Decision>,
    /// When the old version was deleted (or found already gone at the provider).
    #[serde(default)]
    pub old_revoked_ms: Option<i64>,
    /// The hosts are stored as records of their own (one per host), not in
    /// this record; false in records written before (their hosts are inline,
    /// and the next commit moves them out).
    #[serde(default)]
    pub hosts_apart: bool,
    /// The hosts the last event may have changed, with their state before
    /// it: what the store rewrites (one record per host, so a host event
    /// costs O(1) bytes) and audits. Not persisted, not compared.
    #[serde(skip)]
    pub touched: Touched,
}

/// Hosts touched by one event → their state before it (see [`Rotation::touched`]).
#[derive(Debug, Clone, Default)]
pub struct Touched(pub BTreeMap<String, HostState>);

impl PartialEq for Touched {
    /// Bookkeeping of the last event, not part of the rotation.
    fn eq(&self, _: &Touched) -> bool {
        true
    }
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
    /// The old version was already gone at the provider when `op` came to it
    /// (removed outside rekey): it counts as revoked.
    OldGone {
        op: ProviderOp,
    },
    Report {
        host: String,
        version: String,
        stage: Stage,
        fingerprint: String,
        error: String,
        /// When the agent did the step, by its clock (0: not stamped).
        at_ms: i64,
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
        detail: UseDetail,
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
    /// An operator's decision (revoke, finish, abandon); `reason` is required.
    Decide {
        kind: DecisionKind,
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
            pause_after: Vec::new(),
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
            evidence_since_ms: None,
            decisions: Vec::new(),
            old_revoked_ms: None,
            timeline: vec![TimelineEntry { at_ms: now, state: RotationState::Planned, note: "planned".into() }],
            hosts_apart: true,
            touched: Touched::default(),
        }
    }

    /// The rotation's own record: every field but the hosts (JSON).
    pub fn head_record(&mut self) -> Vec<u8> {
        let hosts = std::mem::take(&mut self.hosts);
        let json = serde_json::to_vec(self).expect("a rotation serializes");
        self.hosts = hosts;
        json
    }

    /// What tells whether an event changed the record apart from its
    /// hosts: the record without hosts, waves (fixed at the start) and
    /// `updated_ms` (moved by every event). Small whatever the fleet size.
    pub fn head_digest(&mut self) -> Vec<u8> {
        let (hosts, waves, updated) =
            (std::mem::take(&mut self.hosts), std::mem::take(&mut self.waves), self.updated_ms);
        self.updated_ms = 0;
        let json = serde_json::to_vec(self).expect("a rotation serializes");
        (self.hosts, self.waves, self.updated_ms) = (hosts, waves, updated);
        json
    }

    /// A host to change, recorded in [`Rotation::touched`]: every change to
    /// a host goes through here, or it would not be persisted.
    pub(super) fn host_mut(&mut self, name: &str) -> Option<&mut HostStatus> {
        let h = self.hosts.get_mut(name)?;
        self.touched.0.entry(name.to_string()).or_insert(h.state);
        Some(h)
    }

    /// The hosts matching `pred`, by name (to change them through [`Rotation::host_mut`]).
    pub(super) fn hosts_where(&self, pred: impl Fn(&HostStatus) -> bool) -> Vec<String> {
        self.hosts.iter().filter(|(_, h)| pred(h)).map(|(n, _)| n.clone()).collect()
    }

    pub(super) fn goto(&mut self, state: RotationState, note: impl Into<String>, now: i64) {
        self.state = state;
        self.updated_ms = now;
        self.timeline.push(TimelineEntry { at_ms: now, state, note: note.into() });
    }

    pub(super) fn halt(&mut self, reason: String, now: i64) {
        self.halt_from(self.state, reason, now);
    }

    /// Halts, recording `from` as the state a resume redoes.
    pub(super) fn halt_from(&mut self, from: RotationState, reason: String, now: i64) {
        self.halted_from = Some(from);
        self.halt_reason = Some(reason.clone());
        self.goto(RotationState::Halted, reason, now);
    }

    /// An operator decided to revoke the old version despite the evidence.
    pub fn revoke_forced(&self) -> bool {
        self.decisions.iter().any(|d| d.kind == DecisionKind::Revoke)
    }

    /// Whether the secret's current version is the new one once this rotation ended.
    pub fn leaves_new_current(&self) -> bool {
        match self.state {
            RotationState::Completed | RotationState::Monitoring => true,
            RotationState::Abandoned => {
                self.new_version.is_some() && self.decisions.last().is_some_and(|d| d.hosts_on_new)
            }
            _ => false,
        }
    }

    /// Whether the verification decision was made (also while halted after it).
    /// Whether any host of wave `wave` was delivered to.
    pub fn wave_started(&self, wave: usize) -> bool {
        self.hosts.values().any(|h| h.wave == wave && h.state != HostState::Pending)
    }

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

    pub(super) fn failed_hosts(&self) -> Vec<(&String, &HostStatus)> {
        self.hosts.iter().filter(|(_, h)| matches!(h.state, HostState::Failed | HostState::RolledBack)).collect()
    }

    pub fn failure_budget(&self) -> usize {
        self.policy.failure_budget.resolve_down(self.hosts.len())
    }
}
