//! Operators and their roles: `rekey operator list -o json` (a list, by
//! name), `operator create` and `operator revoke` (one). Built by rekeyd.

use super::string_enum;
use serde::{Deserialize, Serialize};

string_enum! {
    /// What an operator may do; each role includes the ones after it.
    pub enum OperatorRole {
        /// Everything: also join tokens, agent revocation, operators.
        Admin = "admin",
        /// A viewer that also runs rotations (and exclusions), incidents and scope scans.
        Rotator = "rotator",
        /// Read-only: lists, status, reports, audit, alerts.
        Viewer = "viewer",
    }
}

/// One operator: a name (`rekey://operator/NAME` in its certificates) with a role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorView {
    pub name: String,
    pub role: OperatorRole,
    /// Serials of every certificate issued to it (lowercase hex).
    pub serials: Vec<String>,
    /// Unix seconds; 0 for an operator from before roles (migrated as admin).
    pub created_unix: i64,
    /// `operator/NAME`, `rekeyd (init)` or `rekeyd (recover on host)`.
    pub created_by: String,
    /// Its certificates are refused on every call.
    pub revoked: bool,
    pub revoked_unix: Option<i64>,
    pub revoked_by: Option<String>,
}
