//! Campaigns: an incident rotates every catalog secret matching a pattern
//! (`rekey incident open|status|list|close`).

use super::RotationState;
use super::string_enum;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

string_enum! {
    /// Where a whole incident stands.
    pub enum IncidentState {
        /// Not every secret's rotation has ended: some are waiting or
        /// rotating, or could not start (`needs_operator` then says why).
        Running = "running",
        /// Every secret's rotation ended (completed, monitoring or aborted);
        /// never while a secret was not started.
        Done = "done",
        /// An operator closed it: no further rotation is started for it.
        Closed = "closed",
    }
}

string_enum! {
    /// A secret of an incident that has no rotation.
    pub enum CampaignState {
        /// Its turn has not come (the incident's concurrency bound).
        Waiting = "waiting",
        /// Its rotation could not be started (`error` says why); the campaign does not retry it.
        NotStarted = "not_started",
    }
}

/// A secret's state in an incident: its rotation's state, or why it has none.
/// Serialized as the bare string (`"completed"`, `"waiting"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IncidentSecretState {
    Rotation(RotationState),
    Campaign(CampaignState),
}

impl IncidentSecretState {
    /// The value as its JSON spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentSecretState::Rotation(s) => s.as_str(),
            IncidentSecretState::Campaign(s) => s.as_str(),
        }
    }
}

impl std::fmt::Display for IncidentSecretState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One secret of an incident with the live state of its rotation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentSecretView {
    /// Its rotation in this campaign, once started.
    pub rotation: Option<String>,
    /// Why its rotation could not be started.
    pub error: Option<String>,
    pub state: IncidentSecretState,
    /// Target hosts of its rotation (null without a rotation).
    pub hosts: Option<usize>,
    /// Hosts that confirmed the new version (null without a rotation).
    pub healthy: Option<usize>,
    /// As in `RotationView::waiting_on`.
    pub waiting_on: Option<String>,
}

/// An incident (a campaign) with each secret's progress: `rekey incident status ID -o json`,
/// and the answer to opening or closing one; `rekey incident list -o json` is a list of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncidentView {
    /// `inc-` and six hex digits.
    pub id: String,
    pub name: String,
    /// The glob over catalog secret names.
    pub pattern: String,
    /// How many of its rotations may be rolling out at once.
    pub concurrency: usize,
    pub opened_by: String,
    pub opened_ms: i64,
    pub closed_by: Option<String>,
    pub closed_ms: Option<i64>,
    /// Secret name → its progress, every matching secret of the catalog.
    pub secrets: BTreeMap<String, IncidentSecretView>,
    /// How many secrets are in each state (keys as in `secrets[].state`).
    pub summary: BTreeMap<String, usize>,
    pub state: IncidentState,
    /// The order its secrets are started in: `--first` names, then higher
    /// catalog `priority`, then catalog order.
    #[serde(default)]
    pub order: Vec<String>,
    /// What only an operator can settle, one line per secret (`SECRET: why`):
    /// a secret that could not start, a halted rotation, a paused one.
    /// Empty while the campaign can make progress on its own.
    #[serde(default)]
    pub needs_operator: Vec<String>,
}
