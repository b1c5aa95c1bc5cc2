//! The audit chain and alerts (`rekey audit`, `rekey audit verify`, `rekey alerts`).

use super::string_enum;
use serde::{Deserialize, Serialize};

/// One record of the hash-chained audit log: `rekey audit -o json` is a list of these, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecordView {
    /// 1-based position in the chain.
    pub seq: u64,
    pub at_ms: i64,
    /// `operator/NAME`, `agent/HOST`, or `rekeyd` for the engine itself.
    pub actor: String,
    /// e.g. `rotation.start`, `host.state`, `agent.revoke`, `scope.result`, `alert.old_version_used`.
    pub action: String,
    /// What the action was about; its fields depend on the action (never a secret value).
    pub details: serde_json::Value,
    /// Hash of the previous record (the chain link).
    pub prev_hash: String,
    /// Hash of this record, its link included.
    pub hash: String,
}

/// The first record of the chain whose link does not hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokenLink {
    pub seq: u64,
    /// What does not hold, in words.
    pub problem: String,
}

/// The result of walking the audit chain: `rekey audit verify -o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditVerifyView {
    /// Every link holds.
    pub ok: bool,
    /// Records walked.
    pub records: u64,
    /// Hash of the last record: what reports quote.
    pub head: String,
    pub first_broken: Option<BrokenLink>,
}

string_enum! {
    /// What an alert is about.
    pub enum AlertKind {
        /// The old version was used after every target host had switched: revocation is held.
        OldVersionUsed = "old_version_used",
        /// The deactivated old version was used during the grace window.
        OldVersionUsedDuringGrace = "old_version_used_during_grace",
        /// The deleted old version was used while monitoring.
        OldVersionUsedAfterRevocation = "old_version_used_after_revocation",
        /// A copy of a revoked value is still on a host (tripwire scan).
        LeftoverFound = "leftover_found",
    }
}

string_enum! {
    /// How urgent an alert is.
    pub enum Severity {
        Warning = "warning",
        Critical = "critical",
    }
}

/// Something an operator must look at now: `rekey alerts -o json` is a list of these, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertView {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: AlertKind,
    pub severity: Severity,
    pub secret: String,
    pub rotation: Option<String>,
    pub message: String,
    /// Facts behind the alert; fields depend on the kind (never a secret value).
    pub details: serde_json::Value,
    /// Webhook delivery: `not_configured`, `pending`, `delivered`, `failed: …`.
    pub delivery: String,
}
