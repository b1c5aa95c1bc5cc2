//! The secret catalog and a secret's versions (`rekey secrets`, `rekey versions`).

use super::RotationState;
use super::string_enum;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The latest rotation of a secret, in brief.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRotationView {
    pub id: String,
    pub state: RotationState,
    pub started_ms: i64,
    pub updated_ms: i64,
}

/// One `[[secret]]` of the coordinator's catalog: `rekey secrets -o json` is a list of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretView {
    pub name: String,
    pub description: String,
    /// The provider kind: `random`, `aws-iam`, `vault`, `http`, `command`, ...
    pub provider: String,
    /// Labels a host must carry to receive the secret (empty: every host that asks for it).
    pub selector: BTreeMap<String, String>,
    /// The version the hosts run: the one the last completed rotation
    /// installed or, before any completed, the one rekey adopted from the
    /// provider when a rotation started (`current_version_adopted`).
    pub current_version: Option<String>,
    /// `current_version` was not created by rekey: a rotation adopted it from
    /// the provider and none has completed yet. Absent in older documents.
    #[serde(default)]
    pub current_version_adopted: bool,
    /// The rotation in progress, if any (at most one per secret).
    pub active_rotation: Option<String>,
    pub last_rotation: Option<LastRotationView>,
    /// Enrolled, unrevoked agents that declare the secret and match the selector.
    pub consumers: Vec<String>,
}

string_enum! {
    /// A version's status at its provider.
    pub enum VersionStatus {
        /// Usable.
        Active = "active",
        /// Deactivated (the provider refuses it) but not deleted.
        Inactive = "inactive",
    }
}

/// One version of a secret as its provider reports it: `rekey versions SECRET -o json`
/// is a list of these, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionView {
    /// The provider's id (an access key id, a KV version, ...); never the value.
    pub id: String,
    pub status: VersionStatus,
    /// When the provider created it, where it says.
    pub created_unix: Option<i64>,
    /// The catalog's current version of the secret.
    pub current: bool,
}
