//! The incident (campaign) record: what an incident rotates and how far it
//! got. Plain data, persisted by [`super::state`] and reconciled by
//! [`super::campaign`]; it imports nothing from the engine.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretProgress {
    pub rotation: Option<String>,
    /// Why its rotation could not be started (the campaign does not retry it).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub name: String,
    pub pattern: String,
    pub concurrency: usize,
    pub opened_by: String,
    pub opened_ms: i64,
    pub closed_by: Option<String>,
    pub closed_ms: Option<i64>,
    /// Secret name → its rotation in this campaign.
    pub secrets: BTreeMap<String, SecretProgress>,
    /// The order its secrets start in (`--first`, then catalog priority, then
    /// catalog order). Empty in records written before it existed: name order.
    #[serde(default)]
    pub order: Vec<String>,
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.closed_ms.is_none()
    }

    /// Every secret of the incident, in the order they start.
    pub fn start_order(&self) -> Vec<String> {
        let mut out: Vec<String> = self.order.iter().filter(|n| self.secrets.contains_key(*n)).cloned().collect();
        out.extend(self.secrets.keys().filter(|n| !self.order.contains(n)).cloned());
        out
    }

    /// The secrets still waiting for their turn, in start order.
    pub fn waiting(&self) -> Vec<String> {
        self.start_order()
            .into_iter()
            .filter(|n| self.secrets.get(n).is_some_and(|p| p.rotation.is_none() && p.error.is_none()))
            .collect()
    }
}
