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
    /// Secret name → its rotation in this campaign, in catalog order.
    pub secrets: BTreeMap<String, SecretProgress>,
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.closed_ms.is_none()
    }
}
