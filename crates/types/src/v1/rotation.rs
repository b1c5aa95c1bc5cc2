//! Rotations: one secret going from its old version to a new one across the
//! hosts that consume it (`rekey rotate status|start|list|...`).

use super::string_enum;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

string_enum! {
    /// Where a rotation stands in its lifecycle:
    /// `planned → generating → rolling_out → verified → deactivating → grace
    /// → deleting → monitoring → completed`, or `halted`, or
    /// `aborting → aborted` (or abandoned by an operator: `aborted` with an
    /// `abandon` decision).
    pub enum RotationState {
        /// Created, nothing asked of the provider yet.
        Planned = "planned",
        /// The provider is creating the new version.
        Generating = "generating",
        /// Canary and waves: hosts are applying the new version.
        RollingOut = "rolling_out",
        /// Stopped by a failure over the budget (or evidence of use); the old
        /// version is untouched. `rekey rotate resume` or `abort` end it.
        Halted = "halted",
        /// Every target host confirmed the new version (or was excluded).
        Verified = "verified",
        /// The provider is deactivating the old version.
        Deactivating = "deactivating",
        /// The old version is inactive; any use of it is watched for.
        Grace = "grace",
        /// The provider is deleting the old version.
        Deleting = "deleting",
        /// Done, but the retired version is still watched as a tripwire.
        Monitoring = "monitoring",
        /// Done.
        Completed = "completed",
        /// Hosts are rolling back and the new version is being deleted.
        Aborting = "aborting",
        /// Ended by an operator: rolled back (`abort`: the old version is
        /// what every host runs), or abandoned (a `decisions` entry of kind
        /// `abandon`: rekey stopped acting and touched nothing more).
        Aborted = "aborted",
    }
}

impl RotationState {
    /// Completed or aborted (abandoned included): nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, RotationState::Completed | RotationState::Aborted)
    }
}

string_enum! {
    /// Where one host stands: `pending → delivered → applied → restarted →
    /// healthy`, or `failed`, `rolled_back`, `unreachable`, `excluded`.
    pub enum HostState {
        /// Not delivered yet (its wave has not started).
        Pending = "pending",
        /// The agent received the new version.
        Delivered = "delivered",
        /// The agent wrote its files.
        Applied = "applied",
        /// The agent restarted the service.
        Restarted = "restarted",
        /// The health check passed on the new version (confirmed).
        Healthy = "healthy",
        /// The apply failed (`error` says why).
        Failed = "failed",
        /// The agent restored the old version after a failure or an abort.
        RolledBack = "rolled_back",
        /// The host did not answer in time; revocation waits for it.
        Unreachable = "unreachable",
        /// An operator stopped waiting for this host (`exclusion` says who and why).
        Excluded = "excluded",
    }
}

/// A number of hosts, or a percentage of the rotation's targets:
/// `{"count": 3}` or `{"percent": 25}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    Count(usize),
    Percent(u32),
}

impl std::fmt::Display for Amount {
    /// `3` or `25%`, as the catalog spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

string_enum! {
    /// What a use of the old version after every target host switched does.
    pub enum UseAfterSwitch {
        /// Alert and hold revocation until an operator decides.
        Hold = "hold",
        /// Alert and revoke anyway.
        Revoke = "revoke",
    }
}

string_enum! {
    /// An operator's decision that overrides the rotation's own course.
    pub enum DecisionKind {
        /// Revoke the old version now, despite the usage evidence.
        Revoke = "revoke",
        /// End as completed where it stands, the provider left as it is.
        Finish = "finish",
        /// Stop acting; the provider and the hosts stay as they are.
        Abandon = "abandon",
    }
}

/// An operator's decision, with who and why (also in the audit log and the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionView {
    pub kind: DecisionKind,
    /// The operator, as `operator/NAME`.
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
    /// The state the rotation was in.
    pub from: RotationState,
    /// Whether every target host had confirmed the new version.
    pub hosts_on_new: bool,
}

/// Something an operator can do to a rotation in its current state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitView {
    /// `resume`, `revoke`, `finish`, `abandon`, `abort`, `pause`, `exclude`.
    pub verb: String,
    /// The exact command, e.g. `rekey rotate revoke rot-1 --reason "…"`.
    pub command: String,
    /// What it does, in words.
    pub what: String,
}

string_enum! {
    /// What happens when the deactivated old version is used during grace.
    pub enum GraceUse {
        /// Alert, reactivate the old version and halt the rotation.
        Reactivate = "reactivate",
        /// Alert and carry on.
        Proceed = "proceed",
    }
}

/// What the provider said about the old version's last use:
/// `{"kind": "unknown"}`, `{"kind": "never"}`, `{"kind": "at", "at_ms": T}`
/// (a version already gone at the provider reads `never`; the verdict says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "at_ms")]
pub enum Usage {
    /// The provider keeps no usage data for this kind of secret.
    Unknown,
    /// Never used.
    Never,
    /// Last used at this time (Unix ms).
    At(i64),
}

/// A wave chosen by labels: `{"selector": {"env": "staging"}, "pause_after": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorWaveView {
    /// Labels a host must carry (all of them); a host goes to the first wave it matches.
    pub selector: BTreeMap<String, String>,
    /// The rollout pauses for `rekey rotate resume` once this wave is confirmed.
    pub pause_after: bool,
}

/// The rollout and revocation policy, fixed when the rotation started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    /// Hosts in the canary wave (0: no canary).
    pub canary: usize,
    /// Cumulative sizes of the waves after the canary (and after the
    /// selector waves), as shares of the hosts no selector wave took.
    pub waves: Vec<Amount>,
    /// Waves chosen by labels, delivered first, in this order.
    #[serde(default)]
    pub selector_waves: Vec<SelectorWaveView>,
    /// Failed hosts tolerated before the rollout halts.
    pub failure_budget: Amount,
    /// How long a host may take to confirm before it counts as unreachable.
    pub host_deadline_ms: i64,
    /// Restarts inside a wave are spread over up to this long.
    pub jitter_ms: u64,
    /// Deactivate the old version once every host confirmed.
    pub deactivate: bool,
    /// How long the deactivated old version is watched before deletion.
    pub grace_ms: i64,
    /// Delete the old version after grace.
    pub delete: bool,
    /// How long the retired version stays a tripwire after the rotation's work is done.
    pub monitor_ms: i64,
    /// Hold revocation until the provider shows no use of the old version.
    pub require_evidence: bool,
    /// Use this soon after the last host switched is not held against the rotation.
    pub usage_granularity_ms: i64,
    /// What a use of the old version during grace does.
    pub grace_use: GraceUse,
    /// How often usage is checked during grace and monitoring.
    pub check_every_ms: i64,
    /// What a use of the old version after every host switched does.
    #[serde(default = "hold")]
    pub use_after_switch: UseAfterSwitch,
}

fn hold() -> UseAfterSwitch {
    UseAfterSwitch::Hold
}

/// One usage check of the old version (revocation evidence, grace tripwire, monitoring).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceView {
    pub at_ms: i64,
    /// The rotation's state when the check ran.
    pub phase: RotationState,
    /// What the provider answered, if it answered.
    pub usage: Option<Usage>,
    /// Why the check failed, if it did.
    pub error: Option<String>,
    /// Where the last use came from, when the provider says (service and region, a source address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What rekey concluded, in words.
    pub verdict: String,
}

/// An operator's decision to stop waiting for a host (also in the audit log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExclusionView {
    /// The operator, as `operator/NAME`.
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
}

/// One target host of a rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub state: HostState,
    /// 0 is the canary wave (when the policy has one).
    pub wave: usize,
    /// When the new version was last sent to it.
    pub delivered_ms: Option<i64>,
    pub updated_ms: i64,
    /// Keyed fingerprint of the version the host reports loaded (never the value).
    pub fingerprint: Option<String>,
    /// Why it failed or is unreachable.
    pub error: Option<String>,
    pub exclusion: Option<ExclusionView>,
    /// Abort: this host may hold the new version and must confirm its rollback.
    pub rollback_pending: bool,
    /// A reconnected host that may have missed its delivery gets it again at this time.
    pub redeliver_at_ms: Option<i64>,
    /// Every state change as `[state, at_ms]`, oldest first (at most 64).
    /// A stage the agent reported carries the host's own time of the step,
    /// clamped between the delivery and rekeyd's receipt of the report.
    pub history: Vec<(HostState, i64)>,
    /// The last report's time by the agent's clock, as sent (null: none yet;
    /// 0: not stamped), and when rekeyd received it.
    #[serde(default)]
    pub reported_ms: Option<i64>,
    #[serde(default)]
    pub received_ms: Option<i64>,
}

impl HostView {
    /// When the host first reached `state`, if it did.
    pub fn first_at(&self, state: HostState) -> Option<i64> {
        self.history.iter().find(|(s, _)| *s == state).map(|(_, t)| *t)
    }
}

/// One step of a rotation's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntryView {
    pub at_ms: i64,
    /// The state entered (or kept, for notes such as a pause).
    pub state: RotationState,
    pub note: String,
}

/// A rotation with every host's state: `rekey rotate status ID -o json`, and
/// the answer to starting or steering one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationView {
    pub id: String,
    /// The secret's name in the catalog.
    pub secret: String,
    pub state: RotationState,
    /// An operator paused the rollout (no new wave starts).
    pub paused: bool,
    /// Who started it: `operator/NAME`, or `operator/NAME (incident ID)` for a campaign.
    pub started_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub policy: PolicyView,
    /// The version being replaced (none for a secret's first rotation).
    pub old_version: Option<String>,
    /// The version being rolled out, once the provider created it.
    pub new_version: Option<String>,
    /// The keyed fingerprint every host must report for the new version.
    pub expected_fingerprint: Option<String>,
    /// Host names per wave; wave 0 is the canary when the policy has one.
    pub waves: Vec<Vec<String>>,
    pub current_wave: usize,
    /// Waves (indices into `waves`) after which the rollout pauses for an
    /// operator's `rekey rotate resume` (`pause_after` selector waves).
    #[serde(default)]
    pub pause_after: Vec<usize>,
    /// Host name → its state.
    pub hosts: BTreeMap<String, HostView>,
    /// Why the rotation is halted, and what to do about it.
    pub halt_reason: Option<String>,
    /// The state a halt interrupted.
    pub halted_from: Option<RotationState>,
    /// End of the grace or monitoring period.
    pub phase_until_ms: Option<i64>,
    /// Abort: the provider was asked to delete the new version.
    pub delete_new_issued: bool,
    pub timeline: Vec<TimelineEntryView>,
    /// Usage checks of the old version, oldest first.
    pub evidence: Vec<EvidenceView>,
    /// The pre-revocation evidence was gathered and allows deactivation.
    pub evidence_ok: bool,
    /// A usage check is in flight.
    pub usage_check_pending: bool,
    /// When the next usage check is due.
    pub next_check_ms: Option<i64>,
    /// When the old version was deactivated.
    pub deactivated_ms: Option<i64>,
    /// The old version is being reactivated after use during grace.
    pub reactivating: bool,
    /// The last use of the old version already alerted on.
    pub alerted_use_ms: Option<i64>,
    /// What the rotation waits on outside rekey (a pause, a halt, unreachable hosts), in words.
    pub waiting_on: Option<String>,
    /// Hosts that hold revocation back: every target neither healthy nor excluded, as `[host, state]`.
    pub blocking_hosts: Vec<(String, HostState)>,
    /// How many failed hosts the failure budget tolerates for this rotation.
    pub failure_budget_hosts: usize,
    /// Uses of the old version before this time no longer hold revocation (an operator resumed).
    #[serde(default)]
    pub evidence_since_ms: Option<i64>,
    /// When the old version was deleted, or found already gone at the provider.
    #[serde(default)]
    pub old_revoked_ms: Option<i64>,
    /// Operators' overriding decisions (revoke, finish, abandon), oldest first.
    #[serde(default)]
    pub decisions: Vec<DecisionView>,
    /// What an operator can do now, with the exact commands.
    #[serde(default)]
    pub exits: Vec<ExitView>,
}

impl RotationView {
    /// An operator abandoned it: `aborted`, but nothing was rolled back.
    pub fn abandoned(&self) -> bool {
        self.state == RotationState::Aborted && self.decisions.iter().any(|d| d.kind == DecisionKind::Abandon)
    }
}

impl RotationView {
    /// Hosts in `state`.
    pub fn count(&self, state: HostState) -> usize {
        self.hosts.values().filter(|h| h.state == state).count()
    }
}

/// One row of `rekey rotate list -o json`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationSummary {
    pub id: String,
    pub secret: String,
    pub state: RotationState,
    pub paused: bool,
    pub started_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Target hosts.
    pub hosts: usize,
    /// Target hosts that confirmed the new version.
    pub healthy: usize,
    /// The current wave.
    pub wave: usize,
    /// How many waves (the canary included).
    pub waves: usize,
    /// As in [`RotationView::waiting_on`].
    pub waiting_on: Option<String>,
}
