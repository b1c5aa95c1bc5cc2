//! The preflight of a rotation (`rekey rotate plan SECRET`): what a rotation
//! started now would do, and everything that would stop it, before any key
//! exists. The provider is checked and reconciled with rekey's record; every
//! consumer agent dry-runs its apply with placeholder values.

use super::VersionView;
use super::string_enum;
use serde::{Deserialize, Serialize};

string_enum! {
    /// How a host came out of its dry run.
    pub enum PlanHostStatus {
        /// It answered and every check passed.
        Ready = "ready",
        /// It answered and at least one check failed.
        Failed = "failed",
        /// No live session: it cannot be asked (and could not be delivered to).
        NotConnected = "not_connected",
        /// Connected, but no answer within the plan's wait.
        NoAnswer = "no_answer",
    }
}

/// One check of a host's dry run, as the agent words it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanCheckView {
    /// What was checked, e.g. `file /etc/app/key.env`, `restart systemd app.service`.
    pub subject: String,
    pub ok: bool,
    /// What was found (owner, mode) or why it failed. Never a secret value.
    pub detail: String,
}

/// A consumer host in the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanHostView {
    pub name: String,
    pub status: PlanHostStatus,
    pub checks: Vec<PlanCheckView>,
}

/// One wave of the rollout a rotation started now would follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanWaveView {
    /// 0-based; wave 0 is the canary when the policy has one.
    pub index: usize,
    pub canary: bool,
    pub hosts: Vec<PlanHostView>,
}

/// The provider as the plan found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanProviderView {
    /// The provider kind: `random`, `aws-iam`, `vault`, `http`, `command`, ...
    pub kind: String,
    /// Its versions could be listed (the credentials work).
    pub listed: bool,
    /// Why not, when they could not (no list configured, or the error).
    pub error: Option<String>,
    /// Its versions, oldest first (empty when not listed).
    pub versions: Vec<VersionView>,
    /// Active versions rekey neither made nor knows.
    pub drift: Vec<String>,
    /// What an operator should know that stops nothing: the recorded version
    /// missing and another taken as old, drift, room made under a limit.
    pub findings: Vec<String>,
}

/// One thing that stops the rotation; `host` is absent for the secret or the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanProblemView {
    pub host: Option<String>,
    /// What failed: `provider`, `secret`, `connection`, `preflight`, or the check's subject.
    pub subject: String,
    pub detail: String,
}

/// `rekey rotate plan SECRET -o json`. `ok` is true when `problems` is empty:
/// `rekey rotate start` refuses to generate a key otherwise (unless
/// `--skip-preflight --reason`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanView {
    pub secret: String,
    /// rekey's record of the version the hosts run.
    pub recorded_version: Option<String>,
    /// The version a rotation started now would replace, after reconciling
    /// with the provider; absent when none is known.
    pub old_version: Option<String>,
    /// The field names the placeholder version carried (a new version will have these).
    pub fields: Vec<String>,
    pub provider: PlanProviderView,
    pub waves: Vec<PlanWaveView>,
    pub problems: Vec<PlanProblemView>,
    pub ok: bool,
    /// How long the plan waited for the agents' answers at most.
    pub wait_seconds: u64,
    pub elapsed_ms: u64,
}
